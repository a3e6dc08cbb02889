"""Where one HIGGS matmul's time goes: the device kernels of the full op, one by one.

For each (shape, M, grid, path) this runs R back-to-back calls of `higgs_matmul_pallas` in the
loop that `autotune.time_device` times (`autotune.timing_loop`: the next call's activations
depend on the previous output, and the body cycles through enough weight copies to defeat the
L2) under `jax.profiler.trace`, reads the GPU kernel events back from the Perfetto trace
(`decode_profile.device_kernels`) and prints, per call: the span on the device, the busy and idle
time, and each kernel (rotation fusions, the Pallas kernel, the split-K sum, ...) with its mean
duration and the idle time before it. The loop's own per-iteration cost (the trip predicate's
copy to the host) is spread over the calls of an iteration, as in the timing loop.

Usage (GPU): PYTHONPATH=. python benchmarks/op_profile.py --out $OUT \
                 --cases 8192x28672:1:p1_4b:default 8192x28672:16:p1_4b:nk
CPU smoke:   PYTHONPATH=. python benchmarks/op_profile.py --out /tmp/op --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import decode_profile as dp  # noqa: E402
from benchmarks.kernel_bench import (  # noqa: E402
    layout_for,
    n_copies,
    parse_shape,
    path_config,
    random_weight,
    weight_bytes,
)
from benchmarks.tile_sweep import GRIDS, parse_variant  # noqa: E402
from pallas_kernels.higgs_matmul import higgs_matmul_pallas  # noqa: E402
from pallas_kernels.higgs_matmul.autotune import timing_loop  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    k: int
    n: int
    m: int
    grid: str
    path: str
    overrides: str = ""

    @classmethod
    def parse(cls, text: str) -> Case:
        """``KxN:M:grid:path[:overrides]``, e.g. ``8192x28672:16:p1_4b:nk:split_k=2``."""
        parts = text.split(":")
        if len(parts) not in (4, 5):
            raise ValueError(f"a case is KxN:M:grid:path[:overrides], got {text!r}")
        k, n = parse_shape(parts[0])
        try:
            m = int(parts[1])
        except ValueError:
            raise ValueError(f"M must be an integer, got {parts[1]!r} in {text!r}") from None
        if parts[2] not in GRIDS:
            raise ValueError(f"unknown grid {parts[2]!r} in {text!r}; one of {sorted(GRIDS)}")
        if parts[3] not in ("default", "nk"):
            raise ValueError(f"path must be 'default' or 'nk', got {parts[3]!r} in {text!r}")
        overrides = parts[4] if len(parts) == 5 else ""
        parse_variant(overrides)  # unknown fields fail here, naming them
        return cls(k, n, m, parts[2], parts[3], overrides)

    @property
    def label(self) -> str:
        extra = f" [{self.overrides}]" if self.overrides else ""
        return f"{self.k}x{self.n} M={self.m} {self.grid} {self.path}{extra}"


def build_case(case: Case, key) -> tuple:
    """(config, weight copies enough to defeat the L2, bf16 activations) of a case."""
    p, n_grid = GRIDS[case.grid]
    cfg = path_config(case.path, case.m, case.k, case.n, p, n_grid)
    if case.overrides:
        cfg = dataclasses.replace(cfg, **parse_variant(case.overrides))
    kw0 = layout_for(random_weight(key, case.k, case.n, p, n_grid), cfg)
    kws = [kw0] + [
        layout_for(random_weight(jax.random.fold_in(key, i), case.k, case.n, p, n_grid), cfg)
        for i in range(1, n_copies(weight_bytes(kw0)))
    ]
    x = jax.random.normal(jax.random.fold_in(key, 99), (case.m, case.k), jnp.bfloat16)
    return cfg, kws, x


def profile_case(case: Case, calls: int, key) -> dict:
    cfg, kws, x = build_case(case, key)
    loop, n_calls = timing_loop(lambda a, w: higgs_matmul_pallas(a, w, config=cfg), kws, calls)
    loop(x, kws).block_until_ready()  # compile + warm up
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            loop(x, kws).block_until_ready()
        kernels, lines = dp.device_kernels(dp.load_trace(Path(tmp)))
    summary = dp.summarize(kernels, n_calls)
    summary["idle_before_by_name_us_per_call"] = idle_before_by_name(kernels, n_calls)
    hlo = jax.jit(lambda a, w: higgs_matmul_pallas(a, w, config=cfg)).lower(x, kws[0]).compile()
    summary["hlo"] = hlo.as_text()
    summary.update(case=case.label, config=cfg.to_dict(), calls=n_calls, trace_lines=lines)
    return summary


def idle_before_by_name(kernels: list[dict], calls: int) -> dict[str, float]:
    """Idle device time right before each kernel name (since the previous kernel ended), per
    call: which boundary of the op the launch gaps sit at."""
    gaps: dict[str, float] = {}
    cursor = float(kernels[0]["ts"]) if kernels else 0.0
    for e in kernels:
        s = float(e["ts"])
        if s > cursor:
            gaps[e["name"]] = gaps.get(e["name"], 0.0) + (s - cursor) / calls
        cursor = max(cursor, s + float(e["dur"]))
    return dict(sorted(gaps.items(), key=lambda kv: -kv[1]))


def render(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out += [f"## {r['case']} ({r['calls']} calls traced)", ""]
        if not r["kernels"]:
            out += ["no device kernels in the trace (CPU run?)", ""]
            continue
        out.append(
            f"per call: span {r['span_us_per_step']:.2f} us, busy {r['busy_us_per_step']:.2f} us,"
            f" idle {r['idle_us_per_step']:.2f} us, {r['kernels_per_step']:.2f} kernels"
        )
        idle = r.get("idle_before_by_name_us_per_call", {})
        out += [
            "",
            "| kernel | category | per call | us per call | mean us | idle before, us per call |",
            "|---|---|---|---|---|---|",
        ]
        for v in r["names"]:
            if v["count_per_step"] < 0.05:
                continue  # the loop's own once-per-iteration kernels
            out.append(
                f"| `{v['name'][:60]}` | {v['category']} | {v['count_per_step']:.2f} | "
                f"{v['us_per_step']:.2f} | {v['mean_us']:.2f} | {idle.get(v['name'], 0.0):.2f} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="+", default=["8192x28672:1:p1_4b:default"])
    ap.add_argument("--calls", type=int, default=64, help="calls traced per case")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (interpret-free: XLA only)")
    args = ap.parse_args(argv)
    cases = [Case.parse(c) for c in args.cases]
    if args.calls < 1:
        raise ValueError(f"--calls must be >= 1, got {args.calls}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke or jax.default_backend() != "gpu":
        print("op_profile: no GPU; nothing to profile (the Pallas kernel needs one)")
        return 0
    rows = []
    for i, case in enumerate(cases):
        print(f"profiling {case.label}", flush=True)
        rows.append(profile_case(case, args.calls, jax.random.key(i)))
        meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                "jax": jax.__version__}
        slim = [{k: v for k, v in r.items() if k != "hlo"} for r in rows]
        (out / "op_profile.json").write_text(json.dumps({"meta": meta, "rows": slim}, indent=1))
        (out / f"op_profile_hlo_{i}.txt").write_text(rows[-1]["hlo"])
        (out / "op_profile.md").write_text(render(rows))
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
