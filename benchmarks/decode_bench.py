"""End-to-end decode benchmark: a Llama-3.1-8B-shaped model in bf16 vs HIGGS (standalone script).

Glossary: B = batch, ctx = tokens already in the KV cache when timing starts, S = KV-cache
length (attention always spans all S slots, masked beyond the written ones, as
`higgs_jax.models.llama.forward` does), R = decode steps per timed call, L = decoder layers.

What is measured, per variant (bf16, HIGGS p=2 at 4/3/2 bits, optionally p=1) and batch:

- device time of one decode step (one new token for each of the B rows, KV cache of length S
  holding ctx tokens): R steps inside one jitted `lax.fori_loop` whose carry is (tokens, cache)
  (the next token is the argmax of the previous step's logits, so XLA can neither hoist nor drop
  a step), wall time / R after a warm-up call (compilation excluded); tokens/s = B / step time;
- host-clocked time of one jitted call running a single step (the same executable with a trip
  count of 1): the difference to the device step time is the host dispatch overhead a Python
  loop around a jitted step would pay per token;
- peak GPU memory (``memory_stats()["peak_bytes_in_use"]``) of each variant in a fresh
  subprocess (batches run in ascending order, peak read after each, so each row's peak is that
  of its batch and every smaller one, which the larger batch dominates), and the params bytes.

Weights are random and built directly on the device: bf16 kernels ~ N(0, 1/in), and for HIGGS a
`HiggsTensor` per linear layer with uniformly random codes (every bit pattern is a valid code) and
scales ~ U(0.8, 1.2)/sqrt(K), with the library's default layout (`HiggsConfig()`: h = 512, one
bf16 scale per block, no random signs) and the real shipped grid for (p, bits). The kernel's
speed does not depend on the code values, so this is exactly the speed of a quantized 8B model,
without running the quantizer over 8B weights. Embeddings, lm_head and norms stay bf16 (the
library's default exclusions); ``--quantize-lm-head`` makes the lm_head a HIGGS tensor of the
variant's spec too (4096 x 128256: a third of the bf16 model's per-token weight reads after the
layers are quantized). On an NVIDIA GPU each `HiggsTensor` is repacked once at load time
into the kernel layout (`pallas_kernels.higgs_matmul.repack`, a real bit shuffle for 3-bit p=2
codes, free for 2/4 bits) and the model's `linear` sends those leaves to the Pallas kernel.
The KV cache is filled with random values instead of running a prefill (a prefill of B x ctx rows
exceeds the kernel's 256-row limit; the decode step costs the same either way).

Before timing, a correctness check (own subprocess, 2 layers of the same widths) compares one
decode step's logits of the first quantized variant through the Pallas kernel against the XLA
reference (`implementation="xla"`) and against the bf16 model with the dequantized weights.

Usage (H100): PYTHONPATH=. python benchmarks/decode_bench.py --out $OUT
CPU smoke:    PYTHONPATH=. python benchmarks/decode_bench.py --tiny --in-process --out /tmp/d
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax import packing
from higgs_jax.config import HiggsConfig, code_bits, scale_jnp_dtype
from higgs_jax.matmul import higgs_matmul
from higgs_jax.models import llama
from higgs_jax.qtensor import HiggsTensor, dequantize
from higgs_jax.quantize import resolve_layout

#: Variant name -> (p, bits) of the HIGGS grid, None for the bf16 baseline.
VARIANTS: dict[str, tuple[int, int] | None] = {
    "bf16": None,
    "p2_4b": (2, 4),
    "p2_3b": (2, 3),
    "p2_2b": (2, 2),
    "p1_4b": (1, 4),
    "p1_3b": (1, 3),
    "p1_2b": (1, 2),
    "p4_3b": (4, 3),
    "p4_2b": (4, 2),
}
DEFAULT_VARIANTS = ("bf16", "p2_4b", "p2_3b", "p2_2b")
RESULT_PREFIX = "DECODE_BENCH_RESULT "
DTYPE = jnp.bfloat16
TARGET_SPEEDUP = 2.5  # issue 4: >= 2.5x tokens/s at 4 bits, batch 1
CHECK_LAYERS = 2
CHECK_MAX_REL_ERR = 5e-2


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- model + weights


def model_config(layers: int | None, tiny: bool) -> llama.LlamaConfig:
    """Llama-3.1-8B shapes (optionally fewer layers), or a tiny CPU config."""
    if tiny:
        return llama.LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_layers=layers or 2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            rope_theta=500000.0,
            max_position_embeddings=4096,
        )
    return llama.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=layers or 32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_scaling=llama.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    )


def split_variant(name: str) -> tuple[str, dict]:
    """``"p1_4b@rotation=xla,reduce=kernel"`` -> ("p1_4b", {"rotation": "xla", ...}): a variant
    may carry its own kernel options (the `--kernel-options` keys), so one run can time the same
    weights under two kernel settings. Raises ValueError naming a bad name or option."""
    base, sep, opts = name.partition("@")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {base!r} in {name!r}; known: {sorted(VARIANTS)}")
    if not sep:
        return base, {}
    if VARIANTS[base] is None:
        raise ValueError(f"variant {name!r}: the bf16 baseline takes no kernel options")
    if not opts:
        raise ValueError(f"variant {name!r}: nothing after '@' (expected KEY=VALUE[,KEY=VALUE])")
    return base, parse_kernel_options(opts.split(","))


def variant_spec(name: str) -> HiggsConfig | None:
    """The HIGGS spec of a variant (library defaults apart from p and bits), None for bf16."""
    pb = VARIANTS[split_variant(name)[0]]
    return None if pb is None else HiggsConfig(bits=pb[1], p=pb[0])


@functools.partial(jax.jit, static_argnames=("shape", "kind", "fan_in"))
def _dense_leaf(key: jax.Array, shape: tuple[int, ...], kind: str, fan_in: int) -> jax.Array:
    if kind == "scale":
        return jnp.ones(shape, DTYPE)
    v = jax.random.normal(key, shape, DTYPE)
    return v if kind == "embedding" else v * DTYPE(1 / math.sqrt(fan_in))


@functools.partial(jax.jit, static_argnames=("k", "n", "spec", "kernel_layout"))
def _higgs_leaf(key: jax.Array, k: int, n: int, spec: HiggsConfig, kernel_layout: bool):
    """A random (k, n) HIGGS kernel; in the Pallas kernel layout when ``kernel_layout``."""
    h, g, k_pad = resolve_layout(k, spec)
    rows = packing.packed_rows(k_pad // spec.p, code_bits(spec.grid))
    k1, k2 = jax.random.split(key)
    codes = jax.random.bits(k1, (rows, n), jnp.uint32)
    scales = jax.random.uniform(k2, (k_pad // g, n), jnp.float32, 0.8, 1.2) / math.sqrt(k)
    qt = HiggsTensor(
        codes=codes,
        scales=scales.astype(scale_jnp_dtype(spec.scale_dtype)),
        signs=None,
        shape=(k, n),
        dtype="bfloat16",
        grid=spec.grid,
        hadamard_size=h,
        group_size=g,
        k_pad=k_pad,
    )
    if kernel_layout:
        from pallas_kernels.higgs_matmul import repack  # one-time repack at load time

        return repack(qt)
    return qt


def build_params(
    config: llama.LlamaConfig,
    spec: HiggsConfig | None,
    key: jax.Array,
    kernel_layout: bool,
    quantize_lm_head: bool = False,
) -> dict:
    """Random params on the device, leaf by leaf (no 8B-element host or f32 temporaries).

    Linear kernels inside the decoder layers are HIGGS tensors when ``spec`` is given, and so is
    the lm_head kernel with ``quantize_lm_head``; embeddings and norm scales are bf16.
    """
    shapes = llama.param_shapes(config, DTYPE)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, s) in enumerate(flat):
        names = [getattr(p, "key", str(p)) for p in path]
        leaf_key = jax.random.fold_in(key, i)
        kind = names[-1]
        quantized = names[0].startswith("layers_") or (quantize_lm_head and names[0] == "lm_head")
        if kind == "kernel" and spec is not None and quantized:
            out.append(_higgs_leaf(leaf_key, s.shape[0], s.shape[1], spec, kernel_layout))
        else:
            fan_in = s.shape[0] if kind == "kernel" else 1
            out.append(_dense_leaf(leaf_key, tuple(s.shape), kind, fan_in))
    params = jax.tree_util.tree_unflatten(treedef, out)
    jax.block_until_ready(params)
    return params


def params_bytes(params: dict) -> dict[str, int]:
    """Bytes of every stored array: total, decoder-layer linear weights, the rest."""
    total = sum(int(x.nbytes) for x in jax.tree.leaves(params))
    layers = sum(
        int(x.nbytes)
        for name, sub in params.items()
        if name.startswith("layers_")
        for part in ("attn", "mlp")
        for x in jax.tree.leaves(sub[part])
    )
    return {"total": total, "layer_linears": layers, "other": total - layers}


@functools.partial(jax.jit, static_argnames=("shape",))
def _random_kv(key: jax.Array, shape: tuple[int, ...]) -> dict:
    kk, kv = jax.random.split(key)
    return {"k": jax.random.normal(kk, shape, DTYPE), "v": jax.random.normal(kv, shape, DTYPE)}


def random_cache(
    key: jax.Array, config: llama.LlamaConfig, batch: int, cache_len: int, ctx: int
) -> dict:
    """A KV cache in `llama.init_cache` layout with random bf16 entries and ``index = ctx``.

    One small jitted generator called per layer: a single jit over all layers' 64 normals took
    3.5-3.8 min to compile on the H100 (XLA's "very slow compile" alarm, session 18)."""
    shape = (batch, cache_len, config.num_kv_heads, config.head_dim)
    cache: dict[str, Any] = {
        f"layers_{i}": _random_kv(jax.random.fold_in(key, i), shape)
        for i in range(config.num_layers)
    }
    cache["index"] = jnp.asarray(ctx, jnp.int32)
    return cache


# ----------------------------------------------------------------------------- linear routing


@contextlib.contextmanager
def linear_implementation(mode: str) -> Iterator[None]:
    """Routes the model's `HiggsTensor` leaves through ``mode`` while tracing inside the block.

    ``mode``: "xla" (reference), "pallas" (GPU kernel), "interpret" (Pallas interpret mode, CPU).
    `llama.forward` has no ``implementation`` argument, so the module's ``linear`` is swapped for
    the duration (jit functions traced inside see the swap; build fresh ones per mode).
    """
    if mode not in ("xla", "pallas", "interpret"):
        raise ValueError(f"mode must be 'xla', 'pallas' or 'interpret', got {mode!r}")
    original = llama.linear

    def routed(x, kernel, bias=None, **norm):  # norm: norm_scale / norm_eps of a pre-norm
        if isinstance(kernel, HiggsTensor):
            impl = "xla" if mode == "xla" else "pallas"
            return higgs_matmul(
                x, kernel, bias, implementation=impl, interpret=mode == "interpret", **norm
            )
        return original(x, kernel, bias, **norm)

    llama.linear = routed
    try:
        yield
    finally:
        llama.linear = original


#: Decode-step attention of every variant (`llama.forward(attention=)`), set by ``--attention``.
ATTENTION = "auto"


def make_step_fn(config: llama.LlamaConfig):
    """jit: (params, tokens (B, 1), cache) -> float32 logits (B, V) of one decode step."""

    def step(params, tok, cache):
        out = llama.forward(params, tok, config, cache=cache, dtype=DTYPE, attention=ATTENTION)
        return out[0][:, -1]

    return jax.jit(step)


def make_decode_loop(config: llama.LlamaConfig):
    """jit: (params, tokens (B, 1), cache, n) -> (tokens, cache) after n greedy decode steps.

    ``n`` is traced (one executable for every trip count); the cache is donated.
    """

    def loop(params, tok, cache, n):
        def body(_, carry):
            tok, cache = carry
            logits, cache = llama.forward(
                params, tok, config, cache=cache, dtype=DTYPE, attention=ATTENTION
            )
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
            return nxt, cache

        return jax.lax.fori_loop(0, n, body, (tok, cache))

    return jax.jit(loop, donate_argnums=(2,))


# ----------------------------------------------------------------------------- one job


def device_info() -> dict[str, str]:
    dev = jax.devices()[0]
    return {"device": str(getattr(dev, "device_kind", dev.platform)), "platform": dev.platform}


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def nk16_params(params):
    """Kernel-layout params -> (params with every weight the "nk" path takes in the nk16 layout,
    weights converted, weights kept): `repack.to_nk16_tree`, what
    ``prepare_for_inference(kernel_layout="nk16")`` runs after fusing."""
    from pallas_kernels.higgs_matmul.repack import to_nk16_tree

    out, n_conv, kept = to_nk16_tree(params)
    return out, n_conv, len(kept)


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_check(args: argparse.Namespace) -> Iterator[dict]:
    """Logits of one decode step, first quantized variant, `CHECK_LAYERS` layers: kernel vs XLA.

    Yields one row per batch (so a failure at a larger batch keeps the earlier rows).
    """
    quantized = [v for v in args.variants if variant_spec(v) is not None]
    if not quantized:
        return
    name = quantized[0]
    spec = variant_spec(name)
    config = model_config(min(CHECK_LAYERS, args.layers or 10**9), args.tiny)
    gpu = on_gpu()
    key = jax.random.key(args.seed)
    params = build_params(
        config, spec, key, kernel_layout=False, quantize_lm_head=args.quantize_lm_head
    )
    # Dense bf16 model with the dequantized weights: the same function through the bf16 path.
    dense = jax.tree.map(
        lambda x: dequantize(x, DTYPE) if isinstance(x, HiggsTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, HiggsTensor),
    )
    kernel_params = None
    if gpu:
        from pallas_kernels.higgs_matmul import repack

        kernel_params = jax.tree.map(
            lambda x: jax.jit(repack)(x) if isinstance(x, HiggsTensor) else x,
            params,
            is_leaf=lambda x: isinstance(x, HiggsTensor),
        )
    if args.fuse:  # check exactly what is timed: the fused kernel-layout params
        from higgs_jax.fuse import fuse_projections

        if kernel_params is not None:
            kernel_params, _ = fuse_projections(kernel_params)
    if args.nk16 and kernel_params is not None:
        kernel_params = nk16_params(kernel_params)[0]
    for b in sorted(args.batches):
        cache = random_cache(jax.random.fold_in(key, 1000 + b), config, b, args.cache_len, args.ctx)
        tok = jax.random.randint(jax.random.fold_in(key, 2000 + b), (b, 1), 0, config.vocab_size)
        with linear_implementation("xla"):
            ref = make_step_fn(config)(params, tok, cache)
        if gpu:  # exactly the timed path: kernel-layout leaves through the model's own linear
            got = make_step_fn(config)(kernel_params, tok, cache)
            path = "pallas (KernelPackedWeight leaves, model linear)"
        else:
            with linear_implementation("interpret"):
                got = make_step_fn(config)(params, tok, cache)
            path = "pallas interpret mode (CPU)"
        dense_logits = make_step_fn(config)(dense, tok, cache)
        row = {
            "variant": name,
            "fused_projections": bool(args.fuse),
            "batch": b,
            "layers": config.num_layers,
            "path": path,
            "rel_err_kernel_vs_xla": rel_err(got, ref),
            "rel_err_dense_dequant_vs_xla": rel_err(dense_logits, ref),
            "argmax_agree": float(np.mean(np.argmax(got, -1) == np.argmax(ref, -1))),
            "finite": bool(np.all(np.isfinite(np.asarray(got)))),
        }
        row["ok"] = bool(
            row["finite"]
            and row["rel_err_kernel_vs_xla"] < CHECK_MAX_REL_ERR
            and row["rel_err_dense_dequant_vs_xla"] < CHECK_MAX_REL_ERR
        )
        log(
            f"check {name} B={b} ({config.num_layers} layers, {path}): kernel vs xla rel err "
            f"{row['rel_err_kernel_vs_xla']:.2e}, dense(dequant) vs xla "
            f"{row['rel_err_dense_dequant_vs_xla']:.2e}, argmax agree {row['argmax_agree']:.2f} "
            f"-> {'OK' if row['ok'] else 'FAIL'}"
        )
        yield row


def loop_floor_us(reps: int) -> float:
    """Device us per iteration of the same traced-trip-count fori_loop around a trivial op."""

    @jax.jit
    def loop(tok, n):
        return jax.lax.fori_loop(0, n, lambda _, t: (t * 3 + 1) % 7, tok)

    tok, n = jnp.zeros((1, 1), jnp.int32), jnp.asarray(reps, jnp.int32)
    loop(tok, n).block_until_ready()
    t0 = time.perf_counter()
    loop(tok, n).block_until_ready()
    return (time.perf_counter() - t0) / reps * 1e6


def run_variant(args: argparse.Namespace, name: str) -> Iterator[dict]:
    """Builds one variant's params and yields one timing row per batch (ascending)."""
    spec = variant_spec(name)
    config = model_config(args.layers, args.tiny)
    gpu = on_gpu()
    t0 = time.perf_counter()
    params = build_params(
        config,
        spec,
        jax.random.key(args.seed),
        kernel_layout=gpu and spec is not None,
        quantize_lm_head=args.quantize_lm_head,
    )
    if args.fuse:
        from higgs_jax.fuse import fuse_projections

        params, fuse_report = fuse_projections(params)
        jax.block_until_ready(params)
        n_fused = sum(r["fused"] for r in fuse_report)
        log(f"[{name}] fused {n_fused}/{len(fuse_report)} shared-input groups (qkv, gate_up)")
    if args.nk16 and gpu and spec is not None:
        params, n_nk, n_kept = nk16_params(params)
        log(f"[{name}] {n_nk} weights in the nk16 layout, {n_kept} kept in the kn layout")
    build_s = time.perf_counter() - t0
    nbytes = params_bytes(params)
    log(
        f"[{name}] params built in {build_s:.1f} s: {nbytes['total'] / 2**30:.3f} GiB "
        f"(layer linears {nbytes['layer_linears'] / 2**30:.3f} GiB)"
    )
    floor = loop_floor_us(args.reps)
    loop = make_decode_loop(config)
    n_reps, n_one = jnp.asarray(args.reps, jnp.int32), jnp.asarray(1, jnp.int32)
    for b in sorted(args.batches):
        key = jax.random.fold_in(jax.random.key(args.seed), 3000 + b)
        cache = random_cache(key, config, b, args.cache_len, args.ctx)
        tok = jax.random.randint(jax.random.fold_in(key, 1), (b, 1), 0, config.vocab_size)

        def reset(c):  # back to ctx tokens (a fresh scalar: the cache, index included, is donated)
            return {**c, "index": jnp.asarray(args.ctx, jnp.int32)}

        t0 = time.perf_counter()
        tok_out, cache = loop(params, tok, cache, n_reps)
        jax.block_until_ready(tok_out)
        first_s = time.perf_counter() - t0
        step_times = []
        for _ in range(args.repeats):
            cache = reset(cache)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            tok_out, cache = loop(params, tok, cache, n_reps)
            jax.block_until_ready(tok_out)
            step_times.append((time.perf_counter() - t0) / args.reps)
        host_times = []
        for _ in range(args.host_calls):
            cache = reset(cache)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            tok_out, cache = loop(params, tok, cache, n_one)
            jax.block_until_ready(tok_out)
            host_times.append(time.perf_counter() - t0)
        step = float(np.median(step_times))
        host = float(np.median(host_times))
        row = {
            "variant": name,
            "fused_projections": bool(args.fuse),
            "p": None if spec is None else spec.p,
            "bits": None if spec is None else spec.bits,
            "batch": b,
            "step_us": step * 1e6,
            "step_us_min": min(step_times) * 1e6,
            "step_us_max": max(step_times) * 1e6,
            "tokens_per_s": b / step,
            "host_call_us": host * 1e6,
            "dispatch_overhead_us": (host - step) * 1e6,
            "compile_plus_first_call_s": first_s,
            "loop_floor_us": floor,
            "params_build_s": build_s,
            "peak_bytes": peak_bytes(),
            "params_bytes": nbytes["total"],
            "layer_linear_bytes": nbytes["layer_linears"],
            "kv_cache_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(cache)),
            "first_token": int(np.asarray(tok_out)[0, 0]),
        }
        peak = row["peak_bytes"]
        log(
            f"[{name}] B={b}: step {row['step_us']:.0f} us ({row['tokens_per_s']:.1f} tok/s), "
            f"host call {row['host_call_us']:.0f} us, compile+first {first_s:.1f} s, peak "
            + ("n/a" if peak is None else f"{peak / 2**30:.2f} GiB")
        )
        yield row
        del cache, tok_out


def run_one(args: argparse.Namespace, job: str) -> Iterator[dict]:
    """Runs one job ("check" or a variant name) and yields tagged result records."""
    try:
        if job == "check":
            for row in run_check(args):
                yield {"kind": "check", **row, **device_info()}
        else:
            for row in run_variant(args, job):
                yield {"kind": "row", **row, **device_info()}
    except Exception as e:  # noqa: BLE001 - recorded, the other jobs still run
        import traceback

        traceback.print_exc()
        yield {"kind": "error", "job": job, "error": f"{type(e).__name__}: {e}"[:600]}


# ----------------------------------------------------------------------------- orchestration


def child_argv(args: argparse.Namespace, job: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--one", job]
    argv += ["--variants", *args.variants, "--batches", *map(str, args.batches)]
    argv += ["--ctx", str(args.ctx), "--cache-len", str(args.cache_len), "--reps", str(args.reps)]
    argv += ["--repeats", str(args.repeats), "--host-calls", str(args.host_calls)]
    argv += ["--seed", str(args.seed)]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.tiny:
        argv.append("--tiny")
    if args.compile_cache:
        argv += ["--compile-cache", args.compile_cache]
    if args.fuse:
        argv.append("--fuse")
    if args.quantize_lm_head:
        argv.append("--quantize-lm-head")
    if args.nk16:
        argv.append("--nk16")
    if args.kernel_options:
        argv += ["--kernel-options", *args.kernel_options]
    argv += ["--attention", args.attention]
    return argv


#: `Config` fields ``--kernel-options`` may set, with their parsers.
KERNEL_OPTIONS = {
    "words": str,
    "fused_fma": lambda v: {"0": False, "1": True}[v],
    "rotation": str,
    "reduce": str,
    "norm": str,
}
#: Options that apply to every path's config; the others only to the M <= 8 (fma) configs.
ALL_PATH_OPTIONS = frozenset({"rotation", "reduce", "norm"})


def parse_kernel_options(items: Sequence[str]) -> dict:
    """``["words=eager", "fused_fma=1"]`` -> {"words": "eager", "fused_fma": True} (validated)."""
    from pallas_kernels.higgs_matmul.config import Config

    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in KERNEL_OPTIONS:
            raise ValueError(
                f"--kernel-options entries must be KEY=VALUE with KEY in {sorted(KERNEL_OPTIONS)}, "
                f"got {item!r}"
            )
        try:
            out[key] = KERNEL_OPTIONS[key](val)
        except KeyError:
            raise ValueError(f"--kernel-options {key} must be 0 or 1, got {val!r}") from None
    Config(**out)  # raises ValueError naming a bad value
    return out


def apply_kernel_options(options: dict) -> None:
    """In this (child) process the heuristic kernel configs get ``options``: `ALL_PATH_OPTIONS`
    on every config (the default layout's and the nk16 layout's), the others on the M <= 8 (fma)
    configs. The model's matmuls call `default_config` / `nk_config` through the wrapper, so the
    timed decode step runs exactly these kernels. Benchmark-only; the library's defaults are
    untouched elsewhere."""
    import dataclasses

    from pallas_kernels.higgs_matmul import wrapper

    every = {k: v for k, v in options.items() if k in ALL_PATH_OPTIONS}
    fma_only = {k: v for k, v in options.items() if k not in ALL_PATH_OPTIONS}

    def patch(base):
        def patched(*a, **kw):
            cfg = base(*a, **kw)
            cfg = dataclasses.replace(cfg, **every) if every else cfg
            if fma_only and cfg.path == "fma":
                cfg = dataclasses.replace(cfg, **fma_only)
            return cfg

        return patched

    wrapper.default_config = patch(wrapper.default_config)
    wrapper.nk_config = patch(wrapper.nk_config)


def run_subprocess(args: argparse.Namespace, job: str, timeout_s: float) -> list[dict]:
    """Runs ``job`` in a fresh interpreter, streaming its output; returns its result records."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    records: list[dict] = []
    proc = subprocess.Popen(
        child_argv(args, job),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        bufsize=1,
    )

    def pump() -> None:  # streams the child's progress, keeps its result records
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT_PREFIX):
                records.append(json.loads(line[len(RESULT_PREFIX) :]))
            elif line.strip():
                print(f"  | {line}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    reader.join(timeout=30)
    if timed_out:
        records.append({"kind": "error", "job": job, "error": f"timed out after {timeout_s:.0f} s"})
        log(f"[{job}] killed: time budget exhausted")
    elif proc.returncode != 0 and not any(r["kind"] == "error" for r in records):
        records.append({"kind": "error", "job": job, "error": f"exit code {proc.returncode}"})
    return records


def fmt_bytes(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def build_table(results: dict) -> str:
    rows = results["rows"]
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "bf16"}
    lines = [
        (
            "| variant | batch | step us | tokens/s | speed-up vs bf16 | host call us | dispatch "
            "overhead us | peak mem GiB | params GiB | compile+first s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else None
        r["speedup_vs_bf16"] = sp
        sp_txt = "n/a (no bf16 row)" if sp is None else f"{sp:.2f}x"
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['step_us']:.0f} | {r['tokens_per_s']:.1f} | "
            f"{sp_txt} | {r['host_call_us']:.0f} | {r['dispatch_overhead_us']:.0f} | "
            f"{fmt_bytes(r['peak_bytes'])} | {r['params_bytes'] / 2**30:.2f} | "
            f"{r['compile_plus_first_call_s']:.1f} |"
        )
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"# Decode benchmark ({m['date']}, {m['device']}, jax {m['jax']})",
        "",
        f"- command: `{m['command']}`",
        f"- model: {m['model']}; {m['layers_note']}"
        + ("; q/k/v and gate/up fused (one matmul each)" if m.get("fused_projections") else "")
        + (f"; kernel options {m['kernel_options']}" if m.get("kernel_options") else "")
        + f"; decode attention: {m.get('attention', 'xla (before session 18)')}",
        (
            f"- decode step: one new token per row, KV cache length S={m['cache_len']} holding "
            f"ctx={m['ctx']} tokens (attention spans all S slots, masked); R={m['reps']} steps per "
            f"timed call inside one jitted lax.fori_loop (carry: argmax token + cache), median of "
            f"{m['repeats']} calls, / R; tokens/s = B / step"
        ),
        (
            "- host call = host wall clock of one jitted call running one step (same executable, "
            f"trip count 1; median of {m['host_calls']}); dispatch overhead = host call - step"
        ),
        (
            f"- loop floor (same fori_loop around a trivial op, per iteration, included in step, not "
            f"subtracted): {m.get('loop_floor_us', float('nan')):.1f} us"
        ),
        (
            "- weights: random, built on device; HIGGS = library default layout (h=512, one bf16 "
            "scale per block, no signs) with the shipped grid for (p, bits), repacked once at load "
            "into the Pallas kernel layout (GPU); embeddings and norms bf16; lm_head "
            + ("HIGGS like the layers" if m.get("quantize_lm_head") else "bf16")
        ),
        (
            "- peak mem: peak_bytes_in_use of "
            + ("a fresh process per variant" if m["separate_processes"] else "ONE shared process")
            + " (batches ascending, read after each)"
        ),
        "",
    ]
    for c in results["check"]:
        lines.append(
            f"- check {c['variant']} B={c['batch']} ({c['layers']} layers, {c['path']}): logits "
            f"rel err kernel vs XLA {c['rel_err_kernel_vs_xla']:.2e}, bf16 dense(dequantized) vs "
            f"XLA {c['rel_err_dense_dequant_vs_xla']:.2e} -> {'OK' if c['ok'] else 'FAIL'}"
        )
    for e in results["errors"]:
        lines.append(f"- ERROR in {e['job']}: {e['error']}")
    lines += ["", build_table(results), ""]
    if m.get("target"):
        lines.append(m["target"])
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 32)")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU smoke config")
    ap.add_argument("--ctx", type=int, default=None, help="tokens in the cache (default 128)")
    ap.add_argument("--cache-len", type=int, default=None, help="cache slots S (default 512)")
    ap.add_argument("--reps", type=int, default=None, help="decode steps per timed call (32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--host-calls", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall budget of the whole run")
    ap.add_argument(
        "--out", default=None, help="output dir (default $OUT or benchmarks/results/decode)"
    )
    ap.add_argument(
        "--in-process", action="store_true", help="no subprocesses (peaks not separate)"
    )
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument(
        "--fuse",
        action="store_true",
        help="fuse q/k/v and gate/up into one matmul each (higgs_jax.fuse), every variant",
    )
    ap.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="the lm_head kernel is a HIGGS tensor of each quantized variant's spec too",
    )
    ap.add_argument(
        "--nk16",
        action="store_true",
        help="after fusing, convert every kernel weight the nk path takes to the nk16 layout "
        "(repack.to_nk16; decodes on warp-level MMAs at every batch size)",
    )
    ap.add_argument("--compile-cache", default=None, help="persistent jax compilation cache dir")
    ap.add_argument(
        "--kernel-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override the kernel defaults of every quantized variant, e.g. words=eager "
        "fused_fma=1 (M <= 8 configs) or rotation=xla (every config); pallas_kernels.higgs_matmul"
        ".Config fields. One variant's own options: p1_4b@rotation=xla",
    )
    ap.add_argument(
        "--attention",
        choices=["auto", "xla"],
        default="auto",
        help="decode-step attention of every variant: auto = the Pallas decode-attention kernel "
        "on a GPU (llama.forward's default), xla = the einsum/softmax path",
    )
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global ATTENTION
    ATTENTION = args.attention
    for v in args.variants:
        variant_spec(v)
    args.kernel_options_parsed = parse_kernel_options(args.kernel_options)
    if args.ctx is None:
        args.ctx = 8 if args.tiny else 128
    if args.cache_len is None:
        args.cache_len = 32 if args.tiny else 512
    if args.reps is None:
        args.reps = 4 if args.tiny else 32
    for name in ("ctx", "reps", "repeats", "host_calls"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batches):
        raise ValueError(f"--batches must be positive, got {args.batches}")
    if args.ctx + max(args.reps, 1) > args.cache_len:
        raise ValueError(f"ctx={args.ctx} + reps={args.reps} exceeds cache_len={args.cache_len}")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    if args.one:
        own = {} if args.one == "check" else split_variant(args.one)[1]
        options = {**args.kernel_options_parsed, **own}
        if options:
            apply_kernel_options(options)
        for rec in run_one(args, args.one):
            print(RESULT_PREFIX + json.dumps(rec), flush=True)
        return {}

    t_start = time.time()
    config = model_config(args.layers, args.tiny)
    full_layers = 2 if args.tiny else 32
    # In subprocess mode the parent must not start a backend: on a GPU it would grab (by default
    # 75% of) the device memory the children need. The device is read from the children.
    dev = device_info() if args.in_process else {"device": "unknown", "platform": "unknown"}
    cmd_argv = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": dev["device"],
        "platform": dev["platform"],
        "jax": jax.__version__,
        "command": "PYTHONPATH=. python benchmarks/decode_bench.py " + " ".join(cmd_argv),
        "model": "tiny CPU smoke config" if args.tiny else "Llama-3.1-8B shapes (random weights)",
        "config": {k: v for k, v in vars(config).items() if k != "rope_scaling"},
        "layers_note": (
            f"{config.num_layers} of {full_layers} layers"
            + (
                " (REDUCED: times and memory are not the full model's)"
                if config.num_layers != full_layers
                else ""
            )
        ),
        "ctx": args.ctx,
        "cache_len": args.cache_len,
        "reps": args.reps,
        "repeats": args.repeats,
        "host_calls": args.host_calls,
        "batches": args.batches,
        "variants": args.variants,
        "fused_projections": bool(args.fuse),
        "quantize_lm_head": bool(args.quantize_lm_head),
        "nk16": bool(args.nk16),
        "kernel_options": args.kernel_options_parsed,
        "attention": args.attention,
        "separate_processes": not args.in_process,
    }
    log(
        f"decode_bench: {meta['device']}, {meta['model']}, {meta['layers_note']}, "
        f"batches {args.batches}, variants {args.variants}"
    )
    results: dict[str, Any] = {"meta": meta, "check": [], "rows": [], "errors": []}
    out_dir = Path(args.out or os.environ.get("OUT") or "benchmarks/results/decode")
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out_dir / "decode_bench.json").write_text(json.dumps(results, indent=1))

    jobs = ([] if args.no_check else ["check"]) + list(args.variants)
    for job in jobs:
        left = args.budget_s - (time.time() - t_start)
        if left < 5:
            results["errors"].append({"job": job, "error": "skipped: time budget exhausted"})
            log(f"[{job}] skipped: budget exhausted")
            continue
        log(f"== {job} ({left:.0f} s of budget left)")
        if args.in_process:
            records = list(run_one(args, job))
        else:
            # the check is a sanity step: it may not eat the timing jobs' budget
            records = run_subprocess(
                args, job, min(left, 0.3 * args.budget_s) if job == "check" else left
            )
        for rec in records:
            kind = rec.pop("kind")
            if "device" in rec:
                meta["device"], meta["platform"] = rec.pop("device"), rec.pop("platform")
            {"check": results["check"], "row": results["rows"], "error": results["errors"]}[
                kind
            ].append(rec)
        save()

    table = build_table(results)
    if results["rows"]:
        meta["loop_floor_us"] = float(np.median([r["loop_floor_us"] for r in results["rows"]]))
    b1 = {r["variant"]: r for r in results["rows"] if r["batch"] == 1}
    if "bf16" in b1 and "p2_4b" in b1:
        sp = b1["p2_4b"]["tokens_per_s"] / b1["bf16"]["tokens_per_s"]
        meta["target"] = (
            f"target (issue 4): >= {TARGET_SPEEDUP}x tokens/s at 4 bits (p2_4b), batch 1: "
            f"measured {sp:.2f}x -> {'MET' if sp >= TARGET_SPEEDUP else 'NOT MET'}"
        )
    meta["wall_s"] = time.time() - t_start
    save()
    (out_dir / "decode_bench.md").write_text(render_markdown(results))
    log("")
    for c in results["check"]:
        log(
            f"check {c['variant']} B={c['batch']}: rel err kernel vs xla "
            f"{c['rel_err_kernel_vs_xla']:.2e} -> {'OK' if c['ok'] else 'FAIL'}"
        )
    for e in results["errors"]:
        log(f"ERROR {e['job']}: {e['error']}")
    log(
        f"{meta['model']}, {meta['layers_note']}, ctx {args.ctx}, S {args.cache_len}, "
        f"R {args.reps}; total wall {meta['wall_s']:.0f} s"
    )
    log(table)
    if meta.get("target"):
        log(meta["target"])
    return results


if __name__ == "__main__":
    main()
    raise SystemExit(0)
