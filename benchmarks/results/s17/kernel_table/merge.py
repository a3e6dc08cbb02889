"""Merges this session's kernel_bench runs into one table with the roofline of every cell.

Run from this directory: python merge.py > TABLE.md. Sources: s17_big_full.json (8192x28672,
4096x14336; M = 1, 16, 64), s17_small_full.json (14336x4096, 4096x4096, 4096x1024; M = 1, 16, 64),
s17_m4_full.json (M = 4, all shapes, default before the M = 3..4 default change, and nk) and
s17_m4_dot_full.json (M = 4 default after it; 4096x1024 not re-run). Roofline: the cell's bytes
(codes + scales + x + y, from its bw fraction) at the run's copy bandwidth, as a speed-up over
the torch time of the cell's own run (the torch column shows the first source's).
"""
import json

SHAPES = ["8192x28672", "4096x14336", "14336x4096", "4096x4096", "4096x1024"]
COLS = [("p1_b2", "2b"), ("p1_b2_nk", "2b nk"), ("p1_b3", "3b"), ("p1_b4", "4b"),
        ("p1_b4_nk", "4b nk")]


def rows(name):
    d = json.load(open(name))
    return {(f"{r['K']}x{r['N']}", r["M"]): r for r in d["rows"]}


big, small, m4, m4dot = (rows(f) for f in ("s17_big_full.json", "s17_small_full.json",
                                            "s17_m4_full.json", "s17_m4_dot_full.json"))
table = {**big, **small, **m4}
for t in table.values():  # every cell's ratio is against the torch time of its own run
    for key, _ in COLS:
        t[f"{key}_torch_us"] = t["torch_us"]
for key, r in m4dot.items():  # today's M = 4 default (the dot path above 4096x4096)
    for k in ("p1_b2", "p1_b3", "p1_b4"):
        if f"{k}_us" in r:
            table[key].update({f"{k}_us": r[f"{k}_us"], f"{k}_bw_frac": r[f"{k}_bw_frac"],
                               f"{k}_torch_us": r["torch_us"]})
print("| K x N | M | torch | " + " | ".join(f"p1 {c}: us (x, roofline x)" for _, c in COLS) + " |")
print("|---" * (3 + len(COLS)) + "|")
for shape in SHAPES:
    for m in (1, 4, 16, 64):
        r = table.get((shape, m))
        if r is None:
            continue
        cells = []
        for key, _ in COLS:
            t, bw = r.get(f"{key}_us"), r.get(f"{key}_bw_frac")
            if t is None or bw is None:
                cells.append("n/a")
                continue
            roof, tt = bw * t, r[f"{key}_torch_us"]  # us at copy bandwidth; torch of the run
            cells.append(f"{t:.1f} ({tt / t:.2f}x, {tt / roof:.1f}x)")
        print(f"| {shape} | {m} | {r['torch_us']:.1f} | " + " | ".join(cells) + " |")
