"""The nk16 weight layout (`nkpair.py`) and the kernel's "nk" path (`kernel_nk.py`): packing,
the pair decoder's PTX against its emulation, the full op against the f32 reference in interpret
mode (CPU) and on the GPU (marker ``gpu``), exact dequantisation, the Triton IR, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_higgs_matmul import (
    _on_gpu,
    _run_ptx,
    _with_grid,
    make_weight,
    rel_err,
    signmag_weight,
)

from pallas_kernels.higgs_matmul import Config, higgs_matmul_pallas, nkpair
from pallas_kernels.higgs_matmul.config import nk_config
from pallas_kernels.higgs_matmul.reference import decode_rotated, higgs_matmul_reference
from pallas_kernels.higgs_matmul.repack import kernel_codes, to_nk16, unpack_kernel_words


def _sm(k, n_cols, n, **kw):
    """A random p = 1 weight in sign/magnitude code order; 16-point weights on the Gaussian grid
    (the 4-bit nk16 decoder needs its magnitudes 2k, 2k + 1 to share a bfloat16 high byte, which
    the random test grids need not)."""
    w = signmag_weight(make_weight(k, n_cols, 1, n, **kw))
    if n == 16:
        from higgs_jax import grids

        g = np.sort(grids.grid_values(grids.gauss_grid(1, 16))[:, 0])
        w = _with_grid(w, np.r_[-g[8:], g[8:]])  # g[8 + i] = -g[i], the i-th magnitude
    return w


def _nk_weight(k, n_cols, n, *, g=512, seed=0, h=1):
    return to_nk16(_sm(k, n_cols, n, g=g, seed=seed, h=h))


def _cfg(**kw) -> Config:
    base = {
        "block_n": 64,
        "block_k": 512,
        "split_k": 2,
        "path": "nk",
        "block_m": 16,
        "num_warps": 4,
        "dot_order": "wx",
    }
    base.update(kw)
    return Config(**base)


# -- layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cb", [2, 4])
def test_pack_pair_words_round_trip_and_shape(cb):
    rng = np.random.default_rng(cb)
    codes = jnp.asarray(rng.integers(0, 1 << cb, size=(32 * 32, 10)), jnp.int32)
    words = nkpair.pack_pair_words(codes, cb)
    assert words.shape == (2, 2 * cb, 10, 16) and words.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(nkpair.unpack_pair_words(words, cb)), codes)
    # blocks of 16 units: stored[b, r, n, j] is row r, column n, unit 16 b + j
    rows = nkpair.unblock(words)
    assert rows.shape == (2 * cb, 10, 32)
    np.testing.assert_array_equal(np.asarray(rows[:, :, 16:]), np.asarray(words[1]))
    np.testing.assert_array_equal(np.asarray(nkpair.block(rows)), np.asarray(words))
    # every bit of a pair word carries information: 16 random bits per uint16 on average
    assert 0.4 < float(np.unpackbits(np.asarray(words).view(np.uint8)).mean()) < 0.6


def test_4bit_pair_word_holds_the_codes_as_nibbles():
    """4-bit: nibble 2 f + j of a pair word is plane f's code of unit 2i + j, unchanged (the
    decoder's selectors are the nibbles themselves)."""
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 16, size=(512, 3))
    rows = np.asarray(nkpair.unblock(nkpair.pack_pair_words(jnp.asarray(codes), 4)))
    for r, i, col in ((0, 0, 0), (3, 5, 2), (7, 7, 1)):
        pair = int(rows[r, col, 2 * i]) | int(rows[r, col, 2 * i + 1]) << 16
        for f in range(4):
            for j in range(2):
                got = (pair >> (4 * (2 * f + j))) & 0xF
                assert got == codes[32 * (2 * i + j) + 4 * r + f, col]


def test_4bit_byte_tables_rebuild_every_code():
    """The low byte indexed by the magnitude and the high byte indexed by ``c >> 1`` rebuild the
    bfloat16 grid value of every code; a grid whose magnitudes 2k, 2k + 1 straddle a binade
    pair is refused, naming them."""
    w = _sm(64, 8, 16)
    lo, hi = nkpair.byte_tables4(w.grid_values)
    want = nkpair.table_values(w.grid_values, 4, "bfloat16")
    assert [lo[c & 7] | hi[c >> 1] << 8 for c in range(16)] == [int(v) for v in want]
    g = 1.3 * np.asarray(w.grid_values, np.float64)[:, 0]  # 0.167 and 0.504 straddle 1/2
    with pytest.raises(ValueError, match="magnitudes 0 and 1 of this grid, 0.16"):
        nkpair.check(tuple((v,) for v in g), 4)


def test_to_nk16_keeps_the_codes_and_pads_to_whole_blocks():
    w = _sm(32 * 5 + 7, 24, 16, g=64)  # 6 units: padded to 16
    w3 = _sm(32 * 3, 24, 4, g=32)  # 3 units: padded to 16
    w32 = _sm(32 * 32, 24, 4, g=32)  # 32 units: two whole blocks
    for kw in (w, w3, w32):
        nk = to_nk16(kw)
        assert nk.layout == "nk16" and nk.units == kw.units + -kw.units % 16
        codes = np.asarray(kernel_codes(nk))
        np.testing.assert_array_equal(
            codes[: 32 * kw.units], np.asarray(unpack_kernel_words(kw.words, kw.code_bits))
        )
        assert not codes[32 * kw.units :].any()
        assert nk.nbytes == nk.words.size * 2 + nk.scales.size * nk.scales.dtype.itemsize
        assert to_nk16(nk) is nk
    np.testing.assert_array_equal(
        np.asarray(decode_rotated(to_nk16(w))), np.asarray(decode_rotated(w))
    )


# -- decoder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,dtype", [(4, "bfloat16"), (4, "float16"), (16, "bfloat16")])
def test_nkpair_ptx_matches_emulation_and_grid(n, dtype):
    """Every plane's PTX gives, for random pair words, the bits `emulate_pairs` gives, and those
    are the grid values (rounded to the dtype) of the codes `pack_pair_words` stored."""
    w = _sm(64, 8, n)
    cb = w.code_bits
    rng = np.random.default_rng(n)
    codes = rng.integers(0, n, size=(512, 32))  # 16 units (one block) x 32 columns
    words = np.asarray(nkpair.unblock(nkpair.pack_pair_words(jnp.asarray(codes), cb)))  # (R, 32, 16)
    vals = nkpair.table_values(w.grid_values, cb, dtype)
    F = nkpair.planes_per_row(cb)
    for r in range(2 * cb):
        pair = words[r, :, 0].astype(np.uint32) | (words[r, :, 1].astype(np.uint32) << 16)
        for f in range(F):
            text = nkpair.ptx(w.grid_values, cb, f, dtype)
            want = np.asarray(nkpair.emulate_pairs(jnp.asarray(pair), w.grid_values, cb, f, dtype))
            got = np.asarray([_run_ptx(text, int(p)) for p in pair], np.uint32)
            np.testing.assert_array_equal(got, want)
            c = r * F + f  # plane: codes of units 0 and 1
            np.testing.assert_array_equal(want & 0xFFFF, vals[codes[c]])
            np.testing.assert_array_equal(want >> 16, vals[codes[32 + c]])
    g = np.asarray(w.grid_values, np.float32)[:, 0]
    got = vals.astype(np.uint16).view(getattr(jnp, dtype)).astype(np.float32)
    np.testing.assert_allclose(got, g, rtol=2**-8 if dtype == "bfloat16" else 2**-11)


def test_nkpair_op_counts():
    """The decode costs: 2-bit 3-4 ops per two weights (one is a multiply-add); 4-bit, per plane
    6 or 8 ops, of which 13 distinct per pair word (the first three are the same in every plane,
    the two shifts in planes 2 and 3, the table lookups in planes 0/1 and 2/3)."""
    w2 = make_weight(64, 8, 1, 4)
    w4 = _sm(64, 8, 16)
    n2 = [len(nkpair.program(w2.grid_values, 2, f)) for f in range(8)]
    n4 = [len(nkpair.program(w4.grid_values, 4, f)) for f in range(4)]
    assert n2 == [3] + [4] * 7 and n4 == [6, 6, 8, 8], (n2, n4)
    progs = [nkpair.program(w4.grid_values, 4, f) for f in range(4)]
    assert all(pr[:3] == progs[0][:3] for pr in progs)  # selectors of all eight codes
    assert progs[0][:5] == progs[1][:5] and progs[2][:7] == progs[3][:7]  # shared lookups
    # so 3 + 2 (shifts) + 2 x 2 (lookups) + 4 (interleaves) = 13 distinct ops per pair word


# -- the op -------------------------------------------------------------------------------------
NK_CASES = [  # (n, m, k, n_cols, block_m, mma_m, dtype, h)
    (4, 1, 32 * 16 * 2 + 9, 40, 16, 0, jnp.bfloat16, 1),
    (16, 5, 32 * 16 * 3, 40, 16, 0, jnp.bfloat16, 1),
    (16, 40, 1024, 128, 64, 16, jnp.bfloat16, 64),
    (4, 70, 1000, 72, 64, 32, jnp.float16, 1),
    (16, 16, 2048, 64, 16, 0, jnp.bfloat16, 512),
]


@pytest.mark.parametrize("order", ["wx", "xw"])
@pytest.mark.parametrize("n,m,k,n_cols,block_m,mma_m,dtype,h", NK_CASES)
def test_nk_matches_reference(n, m, k, n_cols, block_m, mma_m, dtype, h, order):
    """The "nk" path in both operand orders (odd K, padded and masked rows / columns, sub-dots,
    bf16 and f16, Hadamard rotations) against the f32 reference on the original weight and the
    plane kernel's dot path."""
    w = _sm(k, n_cols, n, g=512, seed=m, h=h)
    nk = to_nk16(w)
    x = jnp.asarray(np.random.default_rng(m).normal(size=(m, k)), dtype)
    cfg = _cfg(block_m=block_m, mma_m=mma_m, dot_order=order)
    y = higgs_matmul_pallas(x, nk, config=cfg, interpret=not _on_gpu())
    r = higgs_matmul_reference(x.astype(jnp.float32), w)
    assert y.shape == (m, n_cols) and y.dtype == x.dtype
    assert rel_err(y, r) < 1e-2, rel_err(y, r)
    y0 = higgs_matmul_pallas(
        x, w, config=dataclasses.replace(cfg, path="dot", mma_m=0), interpret=not _on_gpu()
    )
    assert rel_err(y, y0) < 5e-3, rel_err(y, y0)
    # the default config of an nk16 weight is the nk path
    yd = higgs_matmul_pallas(x, nk, interpret=not _on_gpu())
    assert rel_err(yd, r) < 1e-2, rel_err(yd, r)


@pytest.mark.parametrize(
    "n,row_steps,order,m,split",
    [(16, 2, "xw", 16, 2), (16, 8, "xw", 3, 1), (4, 4, "xw", 20, 2), (4, 2, "wx", 1, 1), (16, 4, "wx", 40, 2)],
)
def test_nk_row_steps_match_whole_block_steps(n, row_steps, order, m, split):
    """row_steps > 1 splits each stored block's word rows over loop steps (a smaller pipeline
    stage); the sums are the same as with whole-block steps, up to f32 rounding order, and match
    the reference (odd K, masked columns, split-K, several blocks per program)."""
    k, n_cols = 32 * 16 * 4 + 5, 72
    w = _sm(k, n_cols, n, g=512, seed=row_steps)
    nk = to_nk16(w)
    x = jnp.asarray(np.random.default_rng(m).normal(size=(m, k)), jnp.bfloat16)
    bm = 64 if m > 16 else 16
    cfg = _cfg(dot_order=order, split_k=split, block_m=bm, mma_m=16 if bm == 64 and order == "xw" else 0)
    y1 = higgs_matmul_pallas(x, nk, config=cfg, interpret=not _on_gpu())
    ys = higgs_matmul_pallas(
        x, nk, config=dataclasses.replace(cfg, row_steps=row_steps), interpret=not _on_gpu()
    )
    r = higgs_matmul_reference(x.astype(jnp.float32), w)
    assert rel_err(ys, r) < 1e-2, rel_err(ys, r)
    assert rel_err(ys, y1) < 2e-3, rel_err(ys, y1)


@pytest.mark.parametrize("order", ["wx", "xw"])
@pytest.mark.parametrize("n", [4, 16])
def test_nk_identity_is_exact(n, order):
    """x = I returns every weight exactly: its 16-bit table value times the scale."""
    w = _sm(1024, 64, n, g=512, seed=6)
    vals = nkpair.table_values(w.grid_values, w.code_bits, "bfloat16").astype(np.uint16)
    w_eff = _with_grid(w, vals.view(jnp.bfloat16).astype(np.float32))
    nk = to_nk16(w)
    x = jnp.eye(w.K, dtype=jnp.bfloat16)
    cfg = _cfg(split_k=1, block_m=64, dot_order=order, mma_m=32 if order == "xw" else 0)
    got = jnp.concatenate(
        [
            higgs_matmul_pallas(x[i : i + 256], nk, config=cfg, interpret=not _on_gpu())
            for i in range(0, w.K, 256)
        ]
    )
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(decode_rotated(w_eff).astype(jnp.bfloat16))
    )


def _nk_ir(order: str):
    """(inline asm ops as (constraints, pack, operand type, result type), main-loop text) of the
    Triton IR of a 16-row nk kernel with dot order ``order``, 4-bit codes, 128 columns."""
    import re

    from benchmarks.sass_count import capture_ttir

    nk = _nk_weight(1024, 128, 16)
    x = jnp.zeros((16, 1024), jnp.bfloat16)
    ir = capture_ttir(x, nk, _cfg(block_n=128, split_k=1, dot_order=order))
    asm = re.findall(
        r"tt\.elementwise_inline_asm .*\{constraints = \"([^\"]*)\", packed_element = (\d+).* : "
        r"(tensor<[^>]*>) -> (tensor<[^>]*>)",
        ir,
    )
    return asm, ir[ir.index("scf.for") : ir.index("scf.yield")]


def test_nk_lowers_to_unary_asm_on_uint16_tiles():
    """The Triton IR holds one single-operand asm per plane on a (BN, BKU) int16 tile (two values
    per register) feeding the dots, with no transpose or float truncation between them: the chain
    Triton hoists the first MMA operand's layout through (docs/KERNELS.md, session 11)."""
    import re

    asm, loop = _nk_ir("wx")
    assert len(asm) == 32, len(asm)
    assert set(asm) == {("=r,r", "2", "tensor<128x16xi16>", "tensor<128x16xbf16>")}
    assert "arith.truncf" not in loop
    # the only transposes in the loop are of the activations (second dot operand)
    for t in re.findall(r"tt\.trans %\S+ .*: (tensor<[^>]*>)", loop):
        assert t.endswith("xbf16>") and t.startswith("tensor<16x16"), t


def test_nk_xw_lowers_to_unary_asm_on_transposed_tiles():
    """dot_order="xw": the loaded (BN, BKU) word tile is transposed once, then each plane is one
    single-operand asm on the (BKU, BN) tile feeding the dot as its second operand, with no
    transpose of decoded values (on Hopper a warp-level MMA: no warpgroup waits; session 12)."""
    import re

    asm, loop = _nk_ir("xw")
    assert len(asm) == 32, len(asm)
    assert set(asm) == {("=r,r", "2", "tensor<16x128xi16>", "tensor<16x128xbf16>")}
    assert "arith.truncf" not in loop
    trans = re.findall(r"tt\.trans %\S+ .*: (tensor<[^>]*>) -> (tensor<[^>]*>)", loop)
    words = [t for t in trans if "i16" in t[0]]
    assert words == [("tensor<128x16xi16>", "tensor<16x128xi16>")] * 8, trans
    # besides the word tiles only the (BN, 1) scale column is transposed, never decoded values
    assert [t for t in trans if "i16" not in t[0]] == [("tensor<128x1xf32>", "tensor<1x128xf32>")]


@pytest.mark.parametrize("row_steps", [1, 2, 8])
def test_nk_row_steps_split_the_loop_body(row_steps):
    """The Triton IR of a 4-bit nk kernel with row_steps = r: each loop step loads 8 / r word
    tiles and runs 32 / r plane dots (it lowers at all: jnp's // and % on the loop index did
    not)."""
    import re

    from benchmarks.sass_count import capture_ttir

    nk = _nk_weight(2048, 128, 16)
    x = jnp.zeros((16, 2048), jnp.bfloat16)
    cfg = _cfg(block_n=128, split_k=1, dot_order="xw", row_steps=row_steps, num_stages=3)
    ir = capture_ttir(x, nk, cfg)
    loop = ir[ir.index("scf.for") : ir.index("scf.yield")]
    words = re.findall(r"tt\.load .*-> tensor<128x16xi16>|tt\.load .*: tensor<128x16x!tt\.ptr<i16>>", loop)
    assert len(words) == 8 // row_steps, words
    assert len(re.findall(r"tt\.dot ", loop)) == 32 // row_steps


def test_nk_autotune_space():
    """autotune's default candidates for an nk16 weight are nk configs (the kn space would not
    run on it): row steps x stages for the code width, split, columns, operand order; the cache
    keys the two layouts apart. A few candidates run against the reference (interpret)."""
    from pallas_kernels.higgs_matmul.autotune import shape_key
    from pallas_kernels.higgs_matmul.config import nk_candidate_configs

    c4 = nk_candidate_configs(16, 8192, 28672, code_bits=4)
    c2 = nk_candidate_configs(16, 8192, 28672, code_bits=2)
    assert c4[0] == nk_config(16, 8192, 28672, code_bits=4)
    assert all(c.path == "nk" and c.block_k == 512 for c in c4 + c2)
    assert {c.row_steps for c in c4} == {1, 2, 4, 8} and {c.row_steps for c in c2} == {1, 2, 4}
    assert {c.num_stages for c in c4} == {2, 3, 4} and {c.dot_order for c in c4} == {"xw", "wx"}
    assert len(set(c4)) == len(c4)
    w = _sm(1024, 64, 16, g=512)
    nk = to_nk16(w)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 1024)), jnp.bfloat16)
    assert shape_key(x, nk) == shape_key(x, w) + "_nk16"
    r = higgs_matmul_reference(x.astype(jnp.float32), w)
    cands = nk_candidate_configs(16, 1024, 64, code_bits=4)
    for cfg in (cands[-1], next(c for c in cands if c.row_steps == 8 and c.num_stages == 4)):
        y = higgs_matmul_pallas(x, nk, config=cfg, interpret=True)
        assert rel_err(y, r) < 1e-2, (cfg, rel_err(y, r))


def test_nk16_problem_names_what_the_nk_path_cannot_take():
    from pallas_kernels.higgs_matmul.repack import nk16_problem, repack

    assert nk16_problem(repack(_sm(1024, 16, 16, g=512))) is None
    assert nk16_problem(repack(make_weight(1024, 16, 1, 4, g=1024))) is None
    assert nk16_problem(repack(make_weight(1024, 16, 2, 16))) == "p=2 (nk16 holds p = 1 codes)"
    assert "got 3-bit codes" in nk16_problem(repack(make_weight(1024, 16, 1, 8)))
    assert nk16_problem(repack(make_weight(1024, 16, 1, 4, g=256))) == (
        "group size 256 is not a multiple of 512"
    )


def test_nk_config_defaults():
    c1, c64 = nk_config(1, 8192, 28672, code_bits=4), nk_config(64, 4096, 4096, code_bits=4)
    assert (c1.path, c1.block_m, c1.block_k, c1.num_stages, c1.row_steps) == ("nk", 16, 512, 3, 2)
    c2 = nk_config(16, 8192, 28672, code_bits=2)
    assert (c2.num_stages, c2.row_steps) == (2, 1)
    # wider blocks: 8 planes per step for either code width, double-buffered
    assert (c64.num_stages, c64.row_steps) == (3, 4)
    assert nk_config(33, 4096, 4096, code_bits=2).row_steps == 4
    assert c64.block_m == 64 and c64.split_k >= 1
    # the grid reaches the program target where K allows it
    assert (28672 // c1.block_n) * c1.split_k >= 528
    assert (c1.dot_order, c64.dot_order, c64.mma_m) == ("xw", "wx", 0)


@pytest.mark.parametrize(
    "m,k,n,split",
    [
        (64, 4096, 14336, 2),  # 112 column tiles: 224 programs
        (64, 14336, 4096, 8),  # 32 column tiles: 256 programs
        (32, 4096, 14336, 2),
        (64, 8192, 28672, 1),  # 224 tiles already
        (128, 4096, 14336, 1),  # 2 row blocks x 112 tiles
        (64, 4096, 1024, 8),  # capped by K: 8 blocks of 16 units
    ],
)
def test_nk_config_wide_blocks_cap_programs(m, k, n, split):
    """32/64-row blocks: the largest power-of-two split with <= NK_WIDE_MAX_PROGRAMS programs
    (their float32 partials are as large as the codes at split 8, M = 64, K = 4096)."""
    from pallas_kernels.higgs_matmul.config import NK_WIDE_MAX_PROGRAMS

    cfg = nk_config(m, k, n, code_bits=4)
    assert cfg.split_k == split
    tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    steps = -(-k // 512)
    assert tiles * cfg.split_k <= NK_WIDE_MAX_PROGRAMS or cfg.split_k == 1
    assert cfg.split_k * 2 > steps or tiles * cfg.split_k * 2 > NK_WIDE_MAX_PROGRAMS


def test_nk_bad_input():
    nk = _nk_weight(1024, 16, 16)
    kn = _sm(1024, 16, 16, g=512)
    x = jnp.zeros((16, 1024), jnp.bfloat16)
    with pytest.raises(
        ValueError, match="path='nk' reads the nk16 weight layout, but this weight is in the 'kn'"
    ):
        higgs_matmul_pallas(x, kn, config=_cfg(), interpret=True)
    with pytest.raises(
        ValueError, match="path='dot' reads the kn weight layout, but this weight is in the 'nk16'"
    ):
        higgs_matmul_pallas(x, nk, config=_cfg(path="dot"), interpret=True)
    with pytest.raises(ValueError, match="group size 64 must be a multiple of block_k=512"):
        higgs_matmul_pallas(x, _nk_weight(1024, 16, 4, g=64), config=_cfg(), interpret=True)
    with pytest.raises(ValueError, match="path='nk' needs block_k / \\(32 p\\) >= 16"):
        higgs_matmul_pallas(x, nk, config=_cfg(block_k=256), interpret=True)
    with pytest.raises(ValueError, match="one block of 16 units per step: block_k must be 512, got 1024"):
        higgs_matmul_pallas(x, nk, config=_cfg(block_k=1024), interpret=True)
    with pytest.raises(ValueError, match="holds p = 1 codes, got p=2"):
        to_nk16(make_weight(1024, 16, 2, 16))
    with pytest.raises(ValueError, match="holds 2- and 4-bit codes, got 3-bit"):
        to_nk16(make_weight(1024, 16, 1, 8))
    with pytest.raises(ValueError, match="sign/magnitude order .* got order 'sorted'"):
        nkpair.check(make_weight(64, 8, 1, 16).grid_values, 4)
    with pytest.raises(ValueError, match="field must be in \\[0, 4\\) for 4-bit codes, got 4"):
        nkpair.ptx(nk.grid_values, 4, 4)
    with pytest.raises(
        ValueError, match="produces one of \\('bfloat16', 'float16'\\), got 'float32'"
    ):
        nkpair.ptx(nk.grid_values, 4, 0, "float32")
    with pytest.raises(ValueError, match="4-bit codes decode to bfloat16 only .*no float16 form"):
        nkpair.ptx(nk.grid_values, 4, 0, "float16")
    with pytest.raises(ValueError, match="4-bit nk16 weights decode to bfloat16 only, got float16"):
        higgs_matmul_pallas(x.astype(jnp.float16), nk, config=_cfg(), interpret=True)
    with pytest.raises(ValueError, match="row_steps=8 must divide the 4 word rows of a 2-bit"):
        higgs_matmul_pallas(x, _nk_weight(1024, 16, 4), config=_cfg(row_steps=8), interpret=True)
    with pytest.raises(ValueError, match="holds 2- and 4-bit codes, got code_bits=3"):
        nk_config(16, 1024, 16, code_bits=3)
    with pytest.raises(ValueError, match="row_steps must be 1, 2, 4 or 8, got 3"):
        _cfg(row_steps=3)
    with pytest.raises(ValueError, match="row_steps=2 splits the loop steps of path='nk', got "):
        _cfg(row_steps=2, path="dot")
    from pallas_kernels.higgs_matmul import can_use_pallas

    ok, why = can_use_pallas(x.astype(jnp.float16), nk)
    assert not ok and "4-bit nk16 weights decode to bfloat16 only" in why
    with pytest.raises(ValueError, match="codes need a multiple of 512 k rows, got 96"):
        nkpair.pack_pair_words(jnp.zeros((96, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match="whole blocks of 16 units, got 6 units"):
        nkpair.block(jnp.zeros((4, 8, 6), jnp.uint16))
    from pallas_kernels import _compat

    with pytest.raises(ValueError, match="takes 16- or 32-bit words, got uint8"):
        _compat.unary_pair_asm(jnp.zeros((16, 16), jnp.uint8), "", jnp.bfloat16)


# -- on the GPU -------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not _on_gpu(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 100])
def test_gpu_nk_default_config(n, m):
    """Default nk configs on the GPU (warpgroup MMA from registers) against the reference."""
    w = _sm(4096, 512, n, g=512, seed=m)
    x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
    y = higgs_matmul_pallas(x, to_nk16(w))
    r = higgs_matmul_reference(x.astype(jnp.float32), w)
    assert rel_err(y, r) < 1e-2, rel_err(y, r)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("m,mma_m", [(1, 0), (16, 0), (64, 16), (64, 32), (100, 32)])
def test_gpu_nk_xw(n, m, mma_m):
    """dot_order="xw" on the GPU (warp-level MMAs, the decoded plane as the second operand in
    registers): the pairs the asm sees must be units 2i, 2i + 1, or this fails."""
    w = _sm(4096, 512, n, g=512, seed=m)
    x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
    cfg = dataclasses.replace(nk_config(m, 4096, 512, code_bits=n.bit_length() - 1), dot_order="xw", mma_m=mma_m)
    y = higgs_matmul_pallas(x, to_nk16(w), config=cfg)
    r = higgs_matmul_reference(x.astype(jnp.float32), w)
    assert rel_err(y, r) < 1e-2, rel_err(y, r)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,row_steps", [(4, 2), (4, 4), (16, 2), (16, 4), (16, 8)])
@pytest.mark.parametrize("m,stages", [(1, 3), (16, 3), (16, 4), (64, 3)])
def test_gpu_nk_row_steps(n, row_steps, m, stages):
    """Blocks split over loop steps, with deeper pipelines, on the GPU against the reference."""
    w = _sm(4096, 512, n, g=512, seed=m)
    x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
    cfg = dataclasses.replace(
        nk_config(m, 4096, 512, code_bits=n.bit_length() - 1), row_steps=row_steps, num_stages=stages
    )
    y = higgs_matmul_pallas(x, to_nk16(w), config=cfg)
    r = higgs_matmul_reference(x.astype(jnp.float32), w)
    assert rel_err(y, r) < 1e-2, rel_err(y, r)


@pytest.mark.gpu
@gpu
def test_gpu_autotune_nk16(tmp_path):
    """autotune on an nk16 weight times nk candidates, caches the winner under the layout's key
    and the winner computes the product."""
    from pallas_kernels.higgs_matmul.autotune import autotune, load_autotune_cache

    w = _sm(4096, 1024, 16, g=512, seed=5)
    nk = to_nk16(w)
    x = jax.random.normal(jax.random.key(5), (16, 4096), jnp.bfloat16)
    cache = tmp_path / "tune.json"
    best = autotune(x, nk, reps=8, cache_path=cache)
    assert best.path == "nk"
    (key,) = load_autotune_cache(cache)
    assert key.endswith("_nk16")
    y = higgs_matmul_pallas(x, nk, config=best)
    r = higgs_matmul_reference(x.astype(jnp.float32), w)
    assert rel_err(y, r) < 1e-2, rel_err(y, r)
    assert autotune(x, nk, cache_path=cache) == best  # from the cache
