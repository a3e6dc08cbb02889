"""The GPU test suite in parallel shards (standalone script; for the lent GPU machine).

Each GPU test spends most of its ~16 s compiling Triton kernels on the CPU, so one pytest
process runs the 247 ``gpu``-marked tests in about an hour and a 600 s device call sees a
fraction of them (session 16: 56 in 370 s). This script collects the selected tests, deals them
round-robin into ``--shards`` pytest processes that share the GPU (``XLA_PYTHON_CLIENT_PREALLOCATE
=false``, so no process takes 75% of its memory), stops every shard at ``--timeout-s``, and writes
one report: passed / failed / skipped / not run per test file, then each failure's message.

    PYTHONPATH=. python benchmarks/gpu_tests.py --out OUT --shards 12 --timeout-s 500 \
        tests/test_pallas_higgs_matmul.py tests/test_nk_path.py -k "not wide"

Outcomes come from each shard's ``pytest -v`` log as the tests end; a test a shard did not reach
before its timeout is "not run" (never counted as passed). Exit status 1 if any test failed or
errored, else 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import re
import time
from pathlib import Path
from typing import Sequence

OUTCOMES = ("passed", "failed", "error", "skipped", "not run")


_COLLECT_ERROR = re.compile(r"^ERROR (\S+?)(?: - (.*))?$")


def collection_errors(text: str) -> dict[str, str]:
    """module -> message for every ``ERROR module`` line of a ``pytest --collect-only -q`` log
    (a test module that could not be imported, e.g. for a package the GPU machine lacks)."""
    out = {}
    for line in text.splitlines():
        m = _COLLECT_ERROR.match(line.strip())
        if m and "::" not in m.group(1):
            out[m.group(1)] = (m.group(2) or "").strip()[:300]
    return out


def collect(
    targets: Sequence[str], marker: str, k: str | None
) -> tuple[list[str], dict[str, str]]:
    """(node ids pytest selects for ``-m marker [-k k] targets``, modules that failed to import).

    Modules that do not import are reported, not fatal: the lent GPU machine lacks some test-only
    packages (session 17: gguf, nbformat), and their modules hold no gpu tests."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "--continue-on-collection-errors",
           "-m", marker, *targets]
    if k:
        cmd += ["-k", k]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line and
           not line.startswith("ERROR")]
    errors = collection_errors(out.stdout)
    if out.returncode not in (0, 1, 5) or (out.returncode == 1 and not errors):
        raise RuntimeError(f"collection failed (exit {out.returncode}):\n{out.stdout[-2000:]}")
    return ids, errors


def deal(ids: Sequence[str], shards: int) -> list[list[str]]:
    """Round-robin: neighbouring parametrizations (similar compile cost) go to different shards."""
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    groups = [list(ids[i::shards]) for i in range(shards)]
    return [g for g in groups if g]


_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)\b")
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")


def log_outcomes(text: str) -> dict[str, tuple[str, str]]:
    """node id -> (outcome, message) from a ``pytest -v -rfE`` log. The -v lines come as each
    test ends, so a shard stopped by its timeout keeps what it finished; the messages come from
    the short summary at the end (absent for a stopped shard)."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(1)] = (m.group(2).lower(), "")
    for line in text.splitlines():
        m = _SUMMARY.match(line)
        if m:
            out[m.group(2)] = (m.group(1).lower(), (m.group(3) or "")[:300])
    return out


def run_shards(
    groups: Sequence[Sequence[str]], out: Path, marker: str, timeout_s: float
) -> dict[str, tuple[str, str]]:
    """Runs every group as its own pytest process at once; node id -> (outcome, message)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    procs = []
    for i, group in enumerate(groups):
        log = out / f"shard{i}.log"
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-m", marker, "-p", "no:cacheprovider",
               *group]
        with log.open("w") as fh:
            procs.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + timeout_s
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # its unfinished tests are reported "not run"
            proc.wait()
    results: dict[str, tuple[str, str]] = {}
    for _, log in procs:
        results.update(log_outcomes(log.read_text(errors="replace")))
    return results


def report(ids: Sequence[str], results: dict[str, tuple[str, str]]) -> tuple[str, int]:
    """(markdown report, number of failed + errored tests)."""
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    for node in ids:
        outcome, msg = results.get(node, ("not run", ""))
        per_file[node.split("::")[0]][outcome] += 1
        if outcome in ("failed", "error"):
            failures.append(f"- `{node}`: {outcome}: {msg}")
    lines = ["| file | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|"]
    total: collections.Counter = collections.Counter()
    for f in sorted(per_file):
        total.update(per_file[f])
        lines.append(f"| {f} | " + " | ".join(str(per_file[f][o]) for o in OUTCOMES) + " |")
    lines.append("| **all** | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines), total["failed"] + total["error"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("targets", nargs="+", help="test files or node ids")
    ap.add_argument("--out", required=True, help="directory for the shard logs and report.md")
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--timeout-s", type=float, default=500.0, help="wall limit of every shard")
    ap.add_argument("-m", dest="marker", default="gpu", help="pytest marker expression (gpu)")
    ap.add_argument("-k", dest="k", default=None, help="pytest -k expression")
    args = ap.parse_args(argv)
    if args.timeout_s <= 0:
        raise ValueError(f"--timeout-s must be positive, got {args.timeout_s}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids, errors = collect(args.targets, args.marker, args.k)
    if not ids:
        raise ValueError(f"no tests selected by -m {args.marker!r} -k {args.k!r} in {args.targets}")
    groups = deal(ids, args.shards)
    t0 = time.monotonic()
    results = run_shards(groups, out, args.marker, args.timeout_s)
    text, bad = report(ids, results)
    head = (f"# GPU tests: {len(ids)} selected, {len(groups)} shards, "
            f"{time.monotonic() - t0:.0f} s (limit {args.timeout_s:.0f} s per shard)\n\n")
    if errors:
        text += "\n\nModules that did not import (their tests were not collected):\n" + "\n".join(
            f"- `{mod}`: {msg}" for mod, msg in sorted(errors.items())
        )
    (out / "report.md").write_text(head + text + "\n")
    print(head + text, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
