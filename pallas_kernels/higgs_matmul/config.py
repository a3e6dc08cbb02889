"""Kernel configuration: a frozen `Config`, its heuristic defaults and the autotuning space.

Glossary: M = rows of x, K = contraction dim, N = output columns, p = grid dimension,
unit = 32 consecutive codes of one column (32*p rotated coordinates of K, `cb` uint32 words).
"""

from __future__ import annotations

import dataclasses

PATHS = ("fma", "dot", "gemv", "wide", "nk")
WORD_LOADS = ("lazy", "eager", "prefetch")
DOT_ORDERS = ("xw", "wx")
REDUCES = ("xla", "kernel")
ROTATIONS = ("xla", "kernel", "fused")
#: Where a pre-norm handed to the matmul is computed (`Config.norm`).
NORMS = ("xla", "kernel")
DECODES = ("auto", "poly", "select", "gather", "gather_pair", "regtab", "regpair", "byte", "code")
MAX_M = 256
#: Largest M (after padding to a power of two) the CUDA-core (fma) path handles.
MAX_FMA_M = 8
#: Largest M for which `default_config` picks the fma path. Measured on an H100 (session 8,
#: p = 1, full op): at M = 8 the fma path (8 FMAs per weight, 255 registers) took 290 us at
#: 8192x28672 4-bit against 114 us on the pipelined dot path; at M = 4 the two were within 20%
#: of each other either way (fma 136 vs dot 113 us at 8192x28672, 41 vs 47 us at 4096x14336).
#: Session 17 (H100, full op, `tile_sweep.py --m 4|2 --variants as_m=16`, p = 1 at 2/3/4 bits,
#: `benchmarks/results/s17/sweep_m2_m4/`): at M = 4 the dot path (M = 16's default config) was
#: faster in 9 of 12 cases (8192x28672 4-bit 134.3 -> 99.4 us, 2-bit 98.7 -> 74.5; 4096x14336
#: and 14336x4096 1.02-1.25x) and slower only at 4096x4096 (21.8 vs 23.0, 22.1 vs 22.5, 17.9 vs
#: 20.4 us); at M = 2 the fma path was faster in 11 of 12 (one tie). M = 3 runs the fma path
#: with 4 padded rows, like M = 4. So: fma up to M = 2, and at M = 3..4 up to
#: `SMALL_FMA_WEIGHTS` weights.
DEFAULT_FMA_M = 4
#: Weights (K x N) up to which M = 3..4 keeps the fma path (4096 x 4096 in session 17's sweep).
SMALL_FMA_WEIGHTS = 4096 * 4096


def use_fma_path(m: int, k: int, n: int) -> bool:
    """Whether `default_config` picks the fma path for an (m, k) x (k, n) product."""
    return m <= 2 or (m <= DEFAULT_FMA_M and k * n <= SMALL_FMA_WEIGHTS)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of one `higgs_matmul_pallas` launch.

    Attributes:
      block_n: output columns per program (power of two).
      block_k: rotated K coordinates each program consumes per loop step; a multiple of 32*p
        with block_k / (32*p) (code words per column per step) a power of two.
      split_k: number of programs along K (partial sums are reduced outside the kernel).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth.
      path: "gemv" (byte-LUT kernel of gemv.py: M <= 8, 2/4/8-bit codes), "fma" (plane kernel,
        CUDA-core multiply-add, M <= 8, any code width), "dot" (plane kernel, tensor-core
        bf16/f16 dots of K = block_k / (32 p), any M) or "wide" (whole tile decoded at once,
        one tensor-core dot of K = block_k / p per grid coordinate, any M; see kernel.py), or
        "nk" (weights in the nk16 layout of `repack.to_nk16`, p = 1 with 2- or 4-bit codes,
        any M: each plane decoded by `nkpair` into a tensor-core operand straight from
        registers, the first with dot_order="wx", the second with "xw"; kernel_nk.py). A weight
        in the nk16 layout runs only on "nk".
      block_m: rows of x per program on the "dot" and "wide" paths (power of two, >= 16).
      decode: how a code becomes a grid value: "poly" (exact interpolating polynomial of the
        symmetric 1-D grid's magnitudes), "select" (select tree on the code bits, constants
        compiled in), "gather" (f32 LUT gather), "gather_pair" (p=2: one 32-bit gather returns
        both coordinates as a bf16 pair), "regtab" (p = 1 with 2-, 3- or 4-bit codes, "fma" and
        "dot" paths: the grid as byte tables in registers, decoded with PTX byte permutes, no
        memory lookups; `regtab.py`), "regpair" ("dot" path, p = 1 with 2- or 4-bit codes,
        tiles inside one scale group: each plane decoded straight to bf16/f16 pairs by one unary
        PTX block per two weights, so with dot_order="xw" Triton keeps the decoded operand in
        the MMA's registers instead of a shared-memory round trip per plane; `pairdec.py`), or
        "auto"; on the "gemv" path "byte" (one lookup per byte of codes in 256-entry pair tables) or "code" (one lookup per code in an n-entry
        table) or "auto".
      volatile: "gemv" path: prefetch the next tile's words with volatile loads, which keeps
        the compiler from sinking the prefetch to the end of the loop body.
      words: "fma"/"dot" paths: when a tile's weight words are loaded: "lazy" (each word row
        right before its first use: one DRAM round trip per word row, in series), "eager" (all
        word rows at the top of the loop step) or "prefetch" (eager, and the next tile's rows
        are issued at the top of each step and carried in registers to the next one).
      fused_fma: "fma" path: inline-PTX fused multiply-adds (and, with the bf16-pair decoder,
        the pair unpacking in the same PTX block) instead of a separate multiply and add.
      tile_scale: "dot" path: where every loop step's tile lies inside one scale group (group
        size a multiple of block_k), chain the planes' dots into one unscaled tile sum and scale
        it once per (tile, column) instead of scaling every decoded weight. Ignored elsewhere.
      loop_stages: GPU only: mark the kernel's main loop for Triton's software pipeliner with
        this depth (`_compat.install_loop_stages_hook`), so the weight words are prefetched into
        shared memory with async copies even on paths without a dot (fma, gemv). 0: unmarked
        (Triton then pipelines only loads that feed a dot, per ``num_stages``).
      dot_order: "dot" and "nk" paths: operand order of each plane's tensor-core dot. "xw": (BM, BKU)
        activations times the (BKU, BN) decoded weights, accumulating (BM, BN). "wx": the
        transposed product, decoded weights (BN, BKU) as the first operand times the
        activations (BKU, BM), accumulating (BN, BM) (stored transposed). On Hopper the first
        operand of a warpgroup MMA may come from registers and the second must sit in shared
        memory, so "wx" lets the decoded weights feed the MMA from registers while the
        activations (plain loads) are staged by Triton's pipeliner. Ignored on other paths.
        (`nk_config` picks "xw" at 16-row blocks and "wx" above for the "nk" path.)
      mma_m: "dot" path: rows of x per tensor-core dot (a power of two >= 16 dividing block_m;
        0 = block_m). With mma_m < block_m a program decodes each plane once and feeds it to
        block_m / mma_m dots of mma_m rows, each with its own running sum: on Hopper, 16-row
        dots are warp-level MMAs (mma.sync) while 64-row ones become warpgroup MMAs that wait
        for their shared-memory operand at every plane. Ignored on other paths.
      prefetch: "fma" and "dot" paths, GPU only: at each loop step, prefetch the weight words of
        the tile this many steps ahead into L2 (PTX ``prefetch.global.L2``, one per 128-byte
        line, `_compat.prefetch_l2`). Unlike early loads (``words``) or staged copies
        (``loop_stages``) a prefetch holds no registers and no shared memory, so it adds DRAM
        reads in flight at the same occupancy. 0: off. Ignored on other paths and in interpret
        mode (the values computed are the same either way).
      row_steps: "nk" path: loop steps per stored 16-unit block (a divisor of the block's 2 cb
        word rows); each step reads 2 cb / row_steps rows and decodes their planes, so one
        pipeline stage holds that fraction of a block and ``num_stages`` >= 3 double-buffers in
        the shared memory of one whole-block step (kernel_nk.py). 1 on every other path.
      reduce: where the split-K partial sums are summed (with the bias and the cast to the
        output dtype): "xla" (the kernel stores (split_k, M, N) float32 partials, XLA sums them
        afterwards, fused into the consumer inside a model) or "kernel" (the last program of
        each output tile sums them and stores the output itself, found with an atomic counter
        per tile: one launch instead of two; `splitk.py`).
      rotation: how the activations are rotated into the kernel's blocked layout: "kernel" (one
        Pallas launch with the Sylvester factors H_XB x H_32; p = 1 and power-of-two h in
        512..2048, the XLA route elsewhere; `rotate.py`) or "xla" (one XLA matmul per Hadamard
        block with the dense +-1 matrix: a split-K GEMM plus one or two fusions). Ignored on the
        "wide" path. "kernel" since session 15: on an H100 (full op, same run) M = 1 was 1.00-1.33x
        faster on all 12 (shape, width) cases of `tile_sweep.py --variants rotation=kernel`
        (8192x28672 4-bit 66.9 -> 64.2 us, 4096x4096 2-bit 17.6 -> 13.2), and at M = 16 (nk,
        4-bit 8192x28672) the op's kernels took 57.6 instead of 61.4 us in a profiler trace.
        "fused": the matmul kernel rotates x itself, in its prologue (`fused.py`; "fma" path,
        p = 1, h = 512..2048, reduce="xla"; the "kernel" route elsewhere). Slower on an H100
        (session 17): 63.7 -> 81.9 us at 8192x28672 4-bit M = 1, within 1.5 us elsewhere.
      norm: where a pre-norm handed to the matmul (``norm_scale``/``norm_eps``: the model's
        RMSNorm before q/k/v, gate/up and the lm_head) is computed: "xla" (`higgs_jax.norms.
        rms_norm` before the rotation; XLA fuses it with the residual add and the sum of
        squares) or "kernel" (inside the rotation kernel, where ``rotation="kernel"`` applies;
        two XLA launches fewer per norm). "xla" by default: in the 32-layer decode on an H100
        (session 16, same run) "kernel" measured 3104 vs 3078 us per step at batch 1 and 5234
        vs 5151 us at batch 16.
    """

    block_n: int = 128
    block_k: int = 256
    split_k: int = 8
    num_warps: int = 4
    num_stages: int = 2
    path: str = "fma"
    block_m: int = 16
    decode: str = "auto"
    volatile: bool = False
    words: str = "lazy"
    fused_fma: bool = False
    tile_scale: bool = True
    loop_stages: int = 0
    dot_order: str = "xw"
    mma_m: int = 0
    prefetch: int = 0
    row_steps: int = 1
    reduce: str = "xla"
    rotation: str = "kernel"
    norm: str = "xla"

    def __post_init__(self):
        for name in ("block_n", "num_warps", "block_m"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _pow2(v):
                raise ValueError(f"{name} must be a positive power of two, got {v!r}")
        for name in ("block_k", "split_k", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if not isinstance(self.volatile, bool):
            raise ValueError(f"volatile must be a bool, got {self.volatile!r}")
        if self.words not in WORD_LOADS:
            raise ValueError(f"words must be one of {WORD_LOADS}, got {self.words!r}")
        if not isinstance(self.fused_fma, bool):
            raise ValueError(f"fused_fma must be a bool, got {self.fused_fma!r}")
        if not isinstance(self.tile_scale, bool):
            raise ValueError(f"tile_scale must be a bool, got {self.tile_scale!r}")
        if not isinstance(self.loop_stages, int) or not 0 <= self.loop_stages <= 8:
            raise ValueError(f"loop_stages must be an int in [0, 8], got {self.loop_stages!r}")
        if not isinstance(self.prefetch, int) or not 0 <= self.prefetch <= 8:
            raise ValueError(f"prefetch must be an int in [0, 8], got {self.prefetch!r}")
        if not isinstance(self.row_steps, int) or not _pow2(self.row_steps) or self.row_steps > 8:
            raise ValueError(f"row_steps must be 1, 2, 4 or 8, got {self.row_steps!r}")
        if self.row_steps != 1 and self.path != "nk":
            raise ValueError(
                f"row_steps={self.row_steps} splits the loop steps of path='nk', got "
                f"path={self.path!r}"
            )
        if self.reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {self.reduce!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.dot_order not in DOT_ORDERS:
            raise ValueError(f"dot_order must be one of {DOT_ORDERS}, got {self.dot_order!r}")
        if not isinstance(self.mma_m, int) or not (
            self.mma_m == 0 or (self.mma_m >= 16 and _pow2(self.mma_m))
        ):
            raise ValueError(f"mma_m must be 0 or a power of two >= 16, got {self.mma_m!r}")
        if self.path in ("dot", "wide", "nk") and self.block_m < 16:
            raise ValueError(
                f"block_m must be >= 16 on the {self.path} path (tensor-core dot), got "
                f"{self.block_m}"
            )

    def units_per_step(self, p: int) -> int:
        """Code words per column per loop step (``block_k / (32 p)``); validated."""
        if self.block_k % (32 * p) or not _pow2(self.block_k // (32 * p)):
            raise ValueError(
                f"block_k={self.block_k} must be 32*p*2^j for p={p} (e.g. {32 * p}, {64 * p})"
            )
        return self.block_k // (32 * p)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**d)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


#: Programs to aim for: a few per SM of an H100 (132 SMs) so the memory system stays busy.
TARGET_PROGRAMS = 528


#: nk path, 32/64-row blocks: at most this many programs (H100, session 18, full op,
#: `benchmarks/results/s18/`). M = 64, 4-bit: 4096x14336 split 2 / 4 / 8 = 43.9 / 49.1 / 52.0 us
#: (224 / 448 / 896 programs); 14336x4096 split 4 / 8 / 16 = 49.5 / 43.9 / 50.5 (128 / 256 / 512);
#: 4096x4096 split 4 / 8 = 22.9 / 24.7; 8192x28672 split 1 / 2 / 4 = 129.7 / 133.8 / 130.5.
#: M = 64, 2-bit: 4096x14336 split 2 / 8 = 43.3 / 50.2; 14336x4096 split 4 / 8 / 16 = 51.8 /
#: 43.0 / 48.9. M = 32 4096x14336 split 2 / 4 / 8 = 32.5 / 32.3 / 36.0; M = 128 split 1 / 2 / 4 =
#: 72.8 / 76.3 / 76.4.
NK_WIDE_MAX_PROGRAMS = 256


def split_k_at_most(steps_total: int, n_blocks: int, max_programs: int) -> int:
    """Largest power-of-two split-K with >= 1 loop step per program and at most
    ``max_programs`` programs (n_blocks output tiles x split); 1 if even that is exceeded."""
    split = 1
    while split * 2 <= steps_total and n_blocks * split * 2 <= max_programs:
        split *= 2
    return split


def split_k_for(steps_total: int, n_blocks: int, target: int = TARGET_PROGRAMS) -> int:
    """Power-of-two split-K: double while each program keeps >= 1 loop step and the grid
    (n_blocks output tiles x split) is below `target` programs."""
    split = 1
    while split * 2 <= steps_total and n_blocks * split < target:
        split *= 2
    return split


def default_config(
    m: int, k: int, n: int, p: int, bits: float, *, fma: bool | None = None
) -> Config:
    """Heuristic config for an (m, k) x (k, n) product with a p-dim grid of `bits` bits/weight.
    ``fma``: force the fma path (True, M <= `MAX_FMA_M`) or the dot path (False); None: the
    measured choice (`use_fma_path`)."""
    codes = -(-k // p)  # ceil(k / p) codes per column
    units = -(-codes // 32)  # 32-code units (cb words each) per column
    code_bits = round(bits * p)
    if fma and m > MAX_FMA_M:
        raise ValueError(f"the fma path takes M <= {MAX_FMA_M}, got M={m}")
    if use_fma_path(m, k, n) if fma is None else fma:
        # Plane kernel with pair decoding: fastest of the measured M=1 variants on an H100
        # (Nsight Compute sweeps, benchmarks/results/kernel_profile_sweep*.md; the byte-LUT
        # "gemv" path was 2-20% slower). p = 2: 16 units per step for 8-bit codes (76 vs 83 vs
        # 99 us for 16/8/4 at 8192x28672), 8 for 4/6-bit codes.
        block_n = 128 if n >= 128 else max(16, _next_pow2(n))
        # p = 4 (not swept yet): 8 units = 1024 coordinates per step, like p = 2 at 8 units.
        # p = 1 (register-table decoder): 16 units for 2- and 4-bit codes. Session 6 (tables as
        # PTX immediates) measured them at 8192x28672: 51.1 / 72.0 us vs 53.4 / 75.5 at 8.
        # 3-bit codes: 16 units at M = 1 (session 8: 61.2 vs 67.3 us at 8192x28672, within 3%
        # at 4096x14336, 14336x4096 and 4096x4096), 8 above (M = 4 at 8192x28672: 157.3 us at
        # 16 units in the session-8 kernel table vs 122.9 at 8 in that session's sweep).
        wide_3bit = p == 1 and code_bits == 3 and m == 1
        wide = (p == 2 and code_bits == 8) or (p == 1 and code_bits in (2, 4)) or wide_3bit
        bku = 16 if wide else 8
        bku = min(bku, _next_pow2(units))
        path = "fma"
        block_m, warps = 16, 4
        if p == 1 and code_bits == 4 and m == 1:
            # 8 warps (session 8, full op, M = 1; M = 2..4 not measured): 64.2 vs 71.0 us at
            # 8192x28672, 18.3 vs 19.8 at 4096x4096, within 2% at 4096x14336 and 14336x4096.
            warps = 8
    else:
        block_m = min(64, max(16, _next_pow2(m)))
        block_n = 128 if m <= 64 else 64
        block_n = min(block_n, max(16, _next_pow2(n)))
        bku = 16
        path, warps = "dot", 4
    n_blocks = -(-n // block_n) * (-(-m // block_m) if path == "dot" else 1)
    if path == "fma":
        # Latency-bound small shapes (e.g. 4096x4096: 32 column blocks x 4 steps of 16 units =
        # 128 programs for 132 SMs): halve the units per step, down to 4, while the grid could
        # not reach half the program target. Measured on an H100, M=1, p=2 4-bit, full op
        # (benchmarks/tile_sweep.py): 4096x4096 28.0 -> 19.4 us (BKU 16 -> 4, split 4 -> 16),
        # 4096x6144 29.0 -> 26.0 us (BKU 16 -> 8); shapes already near the target keep BKU.
        while bku > 4 and n_blocks * -(-units // bku) < TARGET_PROGRAMS // 2:
            bku //= 2
    steps_total = -(-units // bku)
    # 2-bit codes: twice the programs (measured: split 8 vs 4 at 8192x28672, M=1: 62 vs 69 us).
    target = TARGET_PROGRAMS * (2 if code_bits == 2 and path != "dot" else 1)
    split = split_k_for(steps_total, n_blocks, target)
    shape = (
        _dot_shape(p, block_m, m, -(-steps_total // split), code_bits) if path == "dot" else {}
    )
    return Config(
        block_n=block_n,
        block_k=bku * 32 * p,
        split_k=split,
        num_warps=warps,
        # p = 1 on the fma path decodes with register tables ("auto"), whose FMUL + FADD pairs
        # cost 15-20% at 8192x28672 against inline-PTX FMAs (session 6 sweep).
        fused_fma=path == "fma" and p == 1,
        num_stages=(2 if shape.get("mma_m") else _dot_stages(p, block_m))
        if path == "dot"
        else 2,
        path=path,
        block_m=block_m,
        **({"decode": "auto"} | shape),
    )


def nk_config(m: int, k: int, n: int, *, code_bits: int) -> Config:
    """Heuristic config of the "nk" path (p = 1 weights in the nk16 layout, ``code_bits`` 2 or 4)
    for an (m, k) x (k, n) product: one 16-unit block (one dot of K = 16 per plane) per
    ``row_steps`` loop steps, BM = M rounded up to a power of two between 16 and 64, 128
    columns, split-K up to `TARGET_PROGRAMS` programs at 16-row blocks and at most
    `NK_WIDE_MAX_PROGRAMS` at 32/64-row blocks (whose float32 partials cost real traffic).

    Loop steps and stages (H100, session 14, full op, `benchmarks/results/s14/`): at num_stages
    = 2 Triton keeps one shared-memory buffer and serialises the copies with the compute, at 3
    with whole-block steps the two buffers cost occupancy. Splitting each block over loop steps
    with 3 stages wins: at 16-row blocks 4-bit codes take 2 steps per block (8192x28672 72.2 ->
    66.0 us, 4096x4096 27.6 -> 19.0), 2-bit codes stay at 1 step and 2 stages (mixed: 4096x4096
    24.2 -> 20.3 but 14336x4096 31.5 -> 61.3); at 32/64-row blocks both take 8 planes per step
    (4-bit: 4 steps, 185.9 -> 131.1 us at 8192x28672, 75.0 -> 53.9 at 14336x4096; 2-bit: 4
    steps, 170.0 -> 125.2).

    Operand order (H100, session 12, full op, `benchmarks/results/s12/sweep_m16_nk_blocked.json`,
    `sweep_m64_nk_blocked.json`): at 16-row blocks "xw" (the decoded plane as the second operand
    of warp-level MMAs; no warpgroup waits), faster than "wx" in 5 of 6 (shape, width) cases, e.g.
    8192x28672 4-bit 89.9 vs 99.2 us, 2-bit 64.8 vs 72.8 (14336x4096 4-bit: 52.7 vs 45.5); at
    64-row blocks "wx" (one warpgroup MMA per plane): 200.0 us against 245.5 for "xw" with 32-row
    sub-dots, 4-bit 8192x28672."""
    if code_bits not in (2, 4):
        raise ValueError(f"the nk16 layout holds 2- and 4-bit codes, got code_bits={code_bits!r}")
    units = -(-k // 32)
    units += -units % 16  # the nk16 layout pads to whole 16-unit blocks
    block_m = min(64, max(16, _next_pow2(m)))
    block_n = min(128, max(64, _next_pow2(n)))
    bku = 16
    steps_total = -(-units // bku)
    n_blocks = -(-n // block_n) * -(-m // block_m)
    # The (split, M, N) float32 partials grow with M: at M = 64 and split 8 they are as large as
    # the 4-bit codes of a 4096-row weight (16 split M / K of the code bytes, written and read
    # again). So 32/64-row blocks take at most `NK_WIDE_MAX_PROGRAMS` programs.
    if block_m > 16:
        split = split_k_at_most(steps_total, n_blocks, NK_WIDE_MAX_PROGRAMS)
    else:
        split = split_k_for(steps_total, n_blocks, TARGET_PROGRAMS)
    if block_m > 16:
        row_steps = 4  # 8 planes per step: 2 word rows of 4-bit codes, 1 of 2-bit
    else:
        row_steps = 2 if code_bits == 4 else 1
    return Config(
        block_n=block_n,
        block_k=bku * 32,
        split_k=split,
        num_warps=4,
        num_stages=3 if row_steps > 1 else 2,
        path="nk",
        block_m=block_m,
        dot_order="xw" if block_m == 16 else "wx",
        row_steps=row_steps,
    )


def _dot_shape(p: int, block_m: int, m: int, steps: int, code_bits: int = 0) -> dict:
    """Operand order and rows per dot of the p = 1 dot path; ``steps``: loop steps per program.

    Measured on an H100 (session 9, full op, p = 1 at 2/3/4 bits, `benchmarks/results/s9/`; one
    kernel table against session 8's and same-run A/B sweeps), the effect follows the steps per
    program, not the shape:
    - 16-row blocks, weights as the first dot operand ("wx", a warpgroup MMA with the decoded
      plane in registers): faster where a program runs one step (4096x14336 12-26%, 4096x1024
      13-20%), slower with 2 or 4 steps (14336x4096 +12-24%, 8192x28672 +8-30%; A/B at 8192x28672:
      2-bit 96 -> 115 us, 3-bit 108 -> 134). The warpgroup MMA waits at every plane, which
      seems to cost the overlap with the next step's staged loads.
    - 64-row blocks up to M = 64, two 32-row dots per decoded plane with two stages instead of one
      64-row warpgroup dot: faster with 4 steps (8192x28672: 274 -> 201, 245 -> 214,
      221 -> 184 us), even with 2 (14336x4096, A/B 76.2 vs 75.5), slower with 1 (4096x14336 A/B
      70.5 -> 108.0; 4096x4096 +3-18%). So from 3 steps on.
    M > 64 keeps one 64-row dot (not measured).

    Since session 11, 16-row blocks of 2- and 4-bit codes decode with the pair decoder
    (``decode="regpair"``, "xw": the decoded planes stay in the MMA's registers), where it was
    faster in two runs (sessions 10 and 11, full op, us, default -> regpair): 2-bit 8192x28672
    96.8 -> 81.0 and 98.8 -> 83.1, 4096x14336 (one step) 42.9 -> 32.1 and 43.7 -> 33.0, 14336x4096
    41.5 -> 36.2; 4-bit 8192x28672 118.1 -> 106.6 and 114.9 -> 102.3, 14336x4096 47.8 -> 44.5.
    4-bit with one step keeps "wx" (4096x14336: 38.6 -> 44.3 and 39.5 -> 41.4 with regpair). The
    wrapper falls back to "auto" where regpair does not apply (`wrapper._default_for`)."""
    if p != 1:
        return {}
    if block_m == 16 and (code_bits == 2 or (code_bits == 4 and steps >= 2)):
        return {"decode": "regpair", "dot_order": "xw"}
    if block_m == 16 and steps == 1:
        return {"dot_order": "wx"}
    if block_m == 64 and m <= 64 and steps >= 3:
        return {"mma_m": 32}
    return {}


def _dot_stages(p: int, block_m: int) -> int:
    """Triton pipelining depth of the dot path. Two stages let Triton's pipeliner stage the next
    tile's words in shared memory (52 KB per program at BM = 16, `benchmarks/sass_count.py`)
    while this tile is decoded. Measured on an H100 (session 8, full op, p = 1): BM = 16 at
    8192x28672 203 -> 116 us (4-bit), 170 -> 107 (3-bit), 157 -> 98 (2-bit); 14336x4096 62 -> 49;
    4096-wide shapes within 8%. BM = 64 got slower at three of four shapes (e.g. 69 -> 109 us at
    4096x14336), and with gather decoders (p > 1) two stages once asked for 283-299 KB of shared
    memory (session 3), so those keep one stage."""
    return 2 if p == 1 and block_m <= 16 else 1


def wide_config(m: int, k: int, n: int, p: int, bits: float) -> Config:
    """Heuristic config of the "wide" path (whole-tile decode, one long-K dot per coordinate).

    Per loop step each program decodes 128 codes' worth of weights per column (BKU = 4 units for
    p = 1, 2 for p = 2, so block_k = 128 either way): a (128, BN) decoded tile in registers.
    BN = 128 for M <= 64 (few rows: fewer, wider programs), 64 above (the accumulator grows with
    BM). BM = next power of two of M, at most 128 (each M block decodes the tile again, so
    larger M blocks save decode work). split-K doubles until the grid has ~TARGET_PROGRAMS
    programs or each program is down to one step. Not timed on a GPU yet (unlike
    `default_config`); `bits` is accepted for signature parity and unused.
    """
    del bits
    codes = -(-k // p)  # ceil(k / p) codes per column
    units = -(-codes // 32)
    block_m = min(128, max(16, _next_pow2(m)))
    block_n = min(128 if m <= 64 else 64, max(16, _next_pow2(n)))
    bku = min(4 if p == 1 else 2, _next_pow2(units))
    steps_total = -(-units // bku)
    n_blocks = -(-n // block_n) * -(-m // block_m)
    split = split_k_for(steps_total, n_blocks, TARGET_PROGRAMS)
    return Config(
        block_n=block_n,
        block_k=bku * 32 * p,
        split_k=split,
        num_warps=4,
        num_stages=2,
        path="wide",
        block_m=block_m,
        decode="auto",
    )


def candidate_configs(m: int, k: int, n: int, p: int, bits: float) -> list[Config]:
    """Autotuning search space around the heuristic default."""
    base = default_config(m, k, n, p, bits)
    out = [base]
    for split in (base.split_k // 2, base.split_k * 2, base.split_k * 4):
        if split >= 1:
            out.append(dataclasses.replace(base, split_k=split))
    for bn in (64, 256):
        out.append(dataclasses.replace(base, block_n=bn))
    for warps in (2, 8):
        out.append(dataclasses.replace(base, num_warps=warps))
    out.append(dataclasses.replace(base, block_k=base.block_k * 2))
    if base.block_k // (32 * p) > 1 and base.path == "fma":
        out.append(dataclasses.replace(base, block_k=base.block_k // 2))
    if base.path == "dot":
        # Pipelining depth decided M = 16 on an H100 (session 8: 1.5-1.8x at 8192x28672).
        out.append(dataclasses.replace(base, num_stages=1 if base.num_stages > 1 else 2))
        # Operand order and rows per dot (session 9), decoder (session 11).
        out.append(dataclasses.replace(base, dot_order="xw" if base.dot_order == "wx" else "wx"))
        if base.decode == "regpair":
            out.append(dataclasses.replace(base, decode="auto"))
        if base.block_m > 16:
            for mm in (0, 16, 32):
                if mm < base.block_m and mm != base.mma_m:
                    out.append(dataclasses.replace(base, mma_m=mm))
        if m <= DEFAULT_FMA_M:  # the other side of `use_fma_path` (session 17)
            out.append(default_config(m, k, n, p, bits, fma=True))
    elif m > 1:
        # The pipelined dot path (K = 16 units per dot) against the fma path for 2 <= M <= 4.
        dot_k = max(base.block_k, 16 * 32 * p)
        dot_split = max(1, base.split_k * base.block_k // dot_k)
        dot_steps = -(-(-(-k // dot_k)) // dot_split)  # loop steps per program
        out.append(
            dataclasses.replace(
                base,
                path="dot",
                block_k=dot_k,
                split_k=dot_split,
                num_warps=4,
                num_stages=_dot_stages(p, 16),
                fused_fma=False,
                **_dot_shape(p, 16, m, dot_steps, round(bits * p)),
            )
        )
    if m > 1:
        wide = wide_config(m, k, n, p, bits)
        out += [
            wide,
            dataclasses.replace(wide, block_n=64 if wide.block_n == 128 else 128),
            dataclasses.replace(wide, num_warps=8),
            dataclasses.replace(wide, split_k=max(1, wide.split_k // 2)),
        ]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def nk_candidate_configs(m: int, k: int, n: int, *, code_bits: int) -> list[Config]:
    """Autotuning search space of the "nk" path (weights in the nk16 layout) around `nk_config`:
    loop steps per block x pipeline stages (session 14), split-K, columns, operand order."""
    base = nk_config(m, k, n, code_bits=code_bits)
    rows = 2 * code_bits
    out = [base]
    for rs in (1, 2, 4, 8):
        if rows % rs:
            continue
        for st in (2, 3, 4):
            out.append(dataclasses.replace(base, row_steps=rs, num_stages=st))
    for split in (base.split_k // 2, base.split_k * 2):
        if split >= 1:
            out.append(dataclasses.replace(base, split_k=split))
    for bn in (64, 256):
        out.append(dataclasses.replace(base, block_n=bn))
    out.append(dataclasses.replace(base, dot_order="wx" if base.dot_order == "xw" else "xw"))
    return list(dict.fromkeys(out))
