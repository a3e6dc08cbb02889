"""Device timing and autotuning of `Config`s, with a JSON cache keyed by GPU kind and shape.

Timing method (the same for every JAX contender in the benchmarks): R back-to-back calls inside
one jitted `lax.fori_loop`; the next call's activations depend on the previous output
(x + 0 * y[0]), so XLA can neither hoist the call out of the loop nor drop it. (An
`optimization_barrier` on (x, y) was tried first: XLA still removed the unused kernel and the
"times" read 10 TB/s.) Device time per call = wall time / R after a
warm-up run (compilation excluded). To keep weights from being served out of the L2 cache, the
loop body cycles through several copies of the weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _compat
from pallas_kernels.higgs_matmul.config import Config, candidate_configs, nk_candidate_configs


#: Calls per loop iteration: an XLA while loop on the GPU costs ~13 us per iteration (the trip
#: predicate goes back to the host; measured on an H100), so each iteration makes at least this
#: many calls and the loop overhead per call stays below ~0.5 us.
CALLS_PER_ITERATION = 32


def timing_loop(
    fn: Callable,
    weights: Sequence,
    reps: int = 100,
    *,
    calls_per_iteration: int = CALLS_PER_ITERATION,
) -> tuple[Callable, int]:
    """(jitted ``loop(x, weights)``, calls it makes): at least ``reps`` back-to-back calls of
    ``fn(x, w)`` in a `lax.fori_loop`, cycling through the ``weights`` copies, at least
    ``calls_per_iteration`` of them unrolled per iteration. `time_device` times it;
    `benchmarks/op_profile.py` traces it."""
    if calls_per_iteration < 1:
        raise ValueError(f"calls_per_iteration must be >= 1, got {calls_per_iteration}")
    copies = len(weights)
    inner = max(1, -(-calls_per_iteration // copies))  # passes over the copies per iteration
    outer = max(1, -(-reps // (copies * inner)))

    @jax.jit
    def loop(x, weights):
        def body(_, x):
            for _ in range(inner):
                for w in weights:
                    y = fn(x, w)
                    # A real data dependency of the next call on this output (x + 0*y[0]): XLA
                    # neither hoists nor dead-code-eliminates the call. The add is one small
                    # fusion per call (1.2-2.0 us on an H100, session 15 `op_profile.py`), into
                    # which XLA also folds the part of the op's epilogue that y[0] needs.
                    x = x + (y.reshape(-1)[0] * 0).astype(x.dtype)
            return x

        return lax.fori_loop(0, outer, body, x)

    return loop, outer * inner * copies


def time_device(
    fn: Callable,
    x: jax.Array,
    weights: Sequence,
    reps: int = 100,
    *,
    calls_per_iteration: int = CALLS_PER_ITERATION,
) -> float:
    """Seconds per call of ``fn(x, w)`` on the device, cycling through ``weights`` copies;
    ``calls_per_iteration``: calls unrolled in one iteration of the loop (at least)."""
    loop, calls = timing_loop(fn, weights, reps, calls_per_iteration=calls_per_iteration)
    loop(x, weights).block_until_ready()  # compile + warm up
    t0 = time.perf_counter()
    loop(x, weights).block_until_ready()
    return (time.perf_counter() - t0) / calls


def time_host_call(fn: Callable, x: jax.Array, w, reps: int = 20) -> float:
    """Median host wall time of one jitted call (dispatch + device), seconds."""
    f = jax.jit(fn)
    f(x, w).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x, w).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def shape_key(x: jax.Array, w) -> str:
    m = 1
    for d in x.shape[:-1]:
        m *= d
    dt = jnp.dtype(x.dtype).name
    key = f"m{m}_k{w.shape[0]}_n{w.shape[1]}_p{w.p}_n{w.n}_g{w.group_size}_{dt}"
    layout = getattr(w, "layout", "kn")
    return key if layout == "kn" else f"{key}_{layout}"  # the nk16 layout runs other configs


def _cache_key(x, w) -> str:
    return f"{_compat.device_kind()}|{shape_key(x, w)}"


def load_autotune_cache(path: str | Path) -> dict[str, Config]:
    p = Path(path)
    if not p.exists():
        return {}
    raw = json.loads(p.read_text())
    return {k: Config.from_dict(v) for k, v in raw.items()}


def save_autotune_cache(path: str | Path, cache: dict[str, Config]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({k: c.to_dict() for k, c in sorted(cache.items())}, indent=1))


def autotune(
    x: jax.Array,
    w,
    candidates: Sequence[Config] | None = None,
    *,
    reps: int = 50,
    cache_path: str | Path | None = None,
    bias: jax.Array | None = None,
) -> Config:
    """Times each candidate config on the device and returns the fastest.

    Default candidates: `candidate_configs` for the kn layout, `nk_candidate_configs` for a
    weight in the nk16 layout. Candidates that fail to compile are skipped. With
    ``cache_path``, a stored result for this GPU kind and shape key is returned without timing,
    and a new result is saved there.
    """
    from pallas_kernels.higgs_matmul.repack import repack
    from pallas_kernels.higgs_matmul.wrapper import higgs_matmul_pallas

    kw = repack(w)
    key = _cache_key(x, kw)
    cache = load_autotune_cache(cache_path) if cache_path else {}
    if key in cache:
        return cache[key]
    m = x.size // x.shape[-1]
    if candidates:
        cands = list(candidates)
    elif kw.layout == "nk16":
        cands = nk_candidate_configs(m, kw.K, kw.N, code_bits=kw.code_bits)
    else:
        cands = candidate_configs(m, kw.K, kw.N, kw.p, kw.code_bits / kw.p)
    best, best_t = None, float("inf")
    for cfg in cands:
        try:
            t = time_device(
                lambda a, b, c=cfg: higgs_matmul_pallas(a, b, bias=bias, config=c), x, [kw], reps
            )
        except Exception:  # noqa: BLE001, S112 - a candidate that does not compile is not a winner
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise ValueError(f"no candidate config ran for shape key {key}")
    if cache_path:
        cache[key] = best
        save_autotune_cache(cache_path, cache)
    return best
