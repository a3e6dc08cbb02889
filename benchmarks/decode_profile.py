"""Where a decode step's time goes: per-kernel device timeline of a few decode steps.

Builds the same Llama-3.1-8B-shaped model as `decode_bench.py` (random weights; fewer layers by
default, the per-layer picture is the same), runs R decode steps inside one jitted
`lax.fori_loop` under `jax.profiler.trace` (with a Perfetto trace), and reads the GPU kernel
events back from that trace. Per variant it prints

- the step's span on the device (first kernel start to last kernel end, / R), the summed kernel
  time and the idle time between kernels (launch gaps, host-side while-loop condition checks);
- kernels per step, and a table of kernel names grouped into categories (HIGGS Pallas kernel,
  cuBLAS/cuBLASLt GEMM/GEMV, XLA fusions, copies/memsets) with count and µs per step.

No hardware counters are needed (CUPTI activity records through the JAX profiler), so this runs
wherever the JAX profiler sees the GPU. On a CPU it still runs (tiny config), but the host trace
has no device kernels; the summary then says so.

Usage (GPU): PYTHONPATH=. python benchmarks/decode_profile.py --out $OUT --layers 4 \
                 --variants bf16 p2_4b --fuse
CPU smoke:   PYTHONPATH=. python benchmarks/decode_profile.py --tiny --out /tmp/dp
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import decode_bench as db  # noqa: E402

#: (category, regex on the kernel name), first match wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("higgs pallas", r"higgs_"),
    ("gemm/gemv (cuBLAS, cuBLASLt, cutlass)", r"gemm|gemv|cublas|cutlass|sm90_xmma|nvjet|splitK"),
    ("triton gemm fusion (XLA)", r"triton|gemm_fusion"),
    ("copy/memset", r"memcpy|memset|copy"),
    ("reduce fusion (XLA)", r"reduce|reduction"),
    ("other XLA fusion", r"fusion|loop_|input_|wrapped_|concatenate|transpose|dynamic"),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def load_trace(log_dir: Path) -> list[dict]:
    files = sorted(log_dir.glob("**/perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_kernels(events: list[dict]) -> tuple[list[dict], dict[str, list[str]]]:
    """Complete events on GPU stream lines, sorted by start; and the thread names seen per process."""
    pname: dict = {}
    tname: dict = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            pname[e["pid"]] = e["args"]["name"]
        elif e.get("name") == "thread_name":
            tname[(e["pid"], e.get("tid"))] = e["args"]["name"]
    seen: dict[str, set] = collections.defaultdict(set)
    for (pid, _), t in tname.items():
        seen[pname.get(pid, str(pid))].add(t)
    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        proc = pname.get(e["pid"], "")
        thread = tname.get((e["pid"], e.get("tid")), "")
        if "GPU" not in proc and "gpu" not in proc:
            continue
        if not thread.lower().startswith("stream"):
            continue  # derived lines (XLA Ops / Modules / Steps) repeat the stream's kernels
        out.append(e)
    out.sort(key=lambda e: float(e["ts"]))
    return out, {k: sorted(v) for k, v in seen.items()}


def summarize(kernels: list[dict], steps: int) -> dict:
    """Span, busy and idle device time per step; per-name and per-category totals per step."""
    if not kernels:
        return {"kernels": 0}
    start = float(kernels[0]["ts"])
    end = max(float(e["ts"]) + float(e["dur"]) for e in kernels)
    busy = 0.0
    cursor = start
    for e in kernels:  # union of intervals (streams may overlap)
        s, t = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if t > cursor:
            busy += t - max(s, cursor)
            cursor = t
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e["name"]].append(float(e["dur"]))
    names = [
        {
            "name": n,
            "category": category(n),
            "count_per_step": len(d) / steps,
            "us_per_step": sum(d) / steps,
            "mean_us": sum(d) / len(d),
        }
        for n, d in by_name.items()
    ]
    names.sort(key=lambda r: -r["us_per_step"])
    cats: dict[str, dict] = {}
    for r in names:
        c = cats.setdefault(r["category"], {"count_per_step": 0.0, "us_per_step": 0.0})
        c["count_per_step"] += r["count_per_step"]
        c["us_per_step"] += r["us_per_step"]
    # Idle time before each kernel (gap since the previous kernel ended), by the kernel's
    # category: where launch gaps sit (e.g. before every Pallas call, or spread evenly).
    gaps: dict[str, float] = collections.defaultdict(float)
    cursor = float(kernels[0]["ts"])
    for e in kernels:
        s = float(e["ts"])
        if s > cursor:
            gaps[category(e["name"])] += s - cursor
        cursor = max(cursor, s + float(e["dur"]))
    return {
        "idle_before_us_per_step": {k: v / steps for k, v in sorted(gaps.items(), key=lambda kv: -kv[1])},
        "kernels": len(kernels),
        "kernels_per_step": len(kernels) / steps,
        "span_us_per_step": (end - start) / steps,
        "busy_us_per_step": busy / steps,
        "idle_us_per_step": (end - start - busy) / steps,
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]["us_per_step"])),
        "names": names,
    }


def profile_variant(args: argparse.Namespace, name: str) -> dict:
    spec = db.variant_spec(name)
    config = db.model_config(args.layers, args.tiny)
    gpu = db.on_gpu()
    params = db.build_params(
        config,
        spec,
        jax.random.key(0),
        kernel_layout=gpu and spec is not None,
        quantize_lm_head=args.quantize_lm_head,
    )
    if args.fuse:
        from higgs_jax.fuse import fuse_projections

        params, _ = fuse_projections(params)
    loop = db.make_decode_loop(config)
    n = jnp.asarray(args.steps, jnp.int32)
    cache = db.random_cache(jax.random.key(1), config, args.batch, args.cache_len, args.ctx)
    tok = jnp.zeros((args.batch, 1), jnp.int32)
    if args.hlo:  # the optimized HLO names every fusion the trace lists (what each computes)
        text = loop.lower(params, tok, cache, n).compile().as_text()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        (Path(args.out) / f"hlo_{safe}.txt").write_text(text)
    tok, cache = loop(params, tok, cache, n)  # compile + warm-up
    jax.block_until_ready(tok)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            tok, cache = loop(params, tok, cache, n)
            jax.block_until_ready(tok)
        events = load_trace(Path(tmp))
        kernels, lines = device_kernels(events)
    if args.dump_events:
        # Raw events of every line (host threads included) for offline reading of the timeline.
        keep = [e for e in events if e.get("ph") in ("X", "M")][: args.dump_events]
        (Path(args.out) / f"events_{name}.json").write_text(json.dumps(keep))
    summary = summarize(kernels, args.steps)
    summary.update(variant=name, fused=bool(args.fuse), layers=config.num_layers,
                   batch=args.batch, steps=args.steps, trace_lines=lines)
    return summary


def render(rows: list[dict], top: int) -> str:
    lines = []
    for r in rows:
        head = f"## {r['variant']}{' (fused q/k/v, gate/up)' if r['fused'] else ''}"
        head += f", {r['layers']} layers, batch {r['batch']}, {r['steps']} steps traced"
        lines += [head, ""]
        if not r["kernels"]:
            lines += ["no device kernels in the trace (CPU run?); trace lines seen:",
                      f"`{r['trace_lines']}`", ""]
            continue
        lines.append(
            f"per step: span {r['span_us_per_step']:.1f} us, kernels busy "
            f"{r['busy_us_per_step']:.1f} us, idle {r['idle_us_per_step']:.1f} us, "
            f"{r['kernels_per_step']:.1f} kernels"
        )
        lines += ["", "| category | kernels/step | us/step | idle before, us/step |", "|---|---|---|---|"]
        idle = r.get("idle_before_us_per_step", {})
        for c, v in r["categories"].items():
            lines.append(
                f"| {c} | {v['count_per_step']:.1f} | {v['us_per_step']:.1f} | "
                f"{idle.get(c, 0.0):.1f} |"
            )
        lines += ["", "| kernel | category | count/step | us/step | mean us |", "|---|---|---|---|---|"]
        for v in r["names"][:top]:
            lines.append(
                f"| `{v['name'][:70]}` | {v['category']} | {v['count_per_step']:.1f} | "
                f"{v['us_per_step']:.1f} | {v['mean_us']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="+", default=["bf16", "p2_4b"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="decode steps in the traced call")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--cache-len", type=int, default=512)
    ap.add_argument("--fuse", action="store_true", help="fuse q/k/v and gate/up (all variants)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="the lm_head kernel is a HIGGS tensor of each quantized variant's spec too",
    )
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo", action="store_true", help="write each variant's optimized HLO")
    ap.add_argument("--dump-events", type=int, default=0, help="write the first N raw events")
    args = ap.parse_args(argv)
    for v in args.variants:
        db.variant_spec(v)  # unknown names fail before any work
    if args.steps < 1 or args.batch < 1 or args.layers < 1:
        ap.error(f"--steps/--batch/--layers must be >= 1, got {args.steps}/{args.batch}/{args.layers}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    from pallas_kernels.higgs_matmul import wrapper

    defaults = wrapper.default_config, wrapper.nk_config
    for v in args.variants:
        options = db.split_variant(v)[1]  # "p1_4b@rotation=xla": this variant's kernel options
        # The wrapper's jitted entry point caches its trace per argument shapes, not per the
        # config functions patched here: start every variant from empty caches.
        jax.clear_caches()
        if options:
            db.apply_kernel_options(options)
        try:
            rows.append(profile_variant(args, v))
        finally:
            wrapper.default_config, wrapper.nk_config = defaults
        (out / "decode_profile.json").write_text(json.dumps(rows, indent=1))
    text = render(rows, args.top)
    (out / "decode_profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
