"""Register-table decoder programs (pallas_kernels/higgs_matmul/regtab.py), checked bit for bit
with the jnp emulation of the same ops the inline PTX runs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.higgs_matmul import regtab
from pallas_kernels.higgs_matmul.repack import (
    BIT2_POSITION,
    pack_kernel_words,
    part_shifts,
    unpack_kernel_words,
)


def _gauss(n: int) -> np.ndarray:
    from higgs_jax import grids

    return np.asarray(grids.grid_values(grids.gauss_grid(1, n)))[:, 0]


def _signmag(g: np.ndarray) -> np.ndarray:
    """A sorted symmetric grid in sign/magnitude order (what `repack` stores for 16 points)."""
    from pallas_kernels.higgs_matmul.repack import kernel_grid_values

    return np.asarray(kernel_grid_values(1, g))[:, 0]


def _decode_all(g, words: np.ndarray, cb: int) -> np.ndarray:
    """(U, cb, N) kernel words -> (U, 32, N) float32 values through the regtab programs, with
    the table operands passed as the kernel passes them (`table_words`)."""
    units, _, ncols = words.shape
    out = np.full((units, 32, ncols), np.nan, np.float32)
    tables = [np.uint32(t) for t in regtab.table_words(g)]
    for prog, rows, first in regtab.jobs(g, cb):
        vals = regtab.emulate(prog, [words[:, t] for t in rows], tables)
        for j, v in enumerate(vals):
            out[:, first + j] = np.asarray(v)
    return out


@pytest.mark.parametrize(
    "n,cb,order", [(4, 2, "sorted"), (8, 3, "sorted"), (16, 4, "sorted"), (16, 4, "signmag")]
)
def test_every_code_at_every_position(n, cb, order):
    """Each code value at each of the 32 positions of a unit decodes to effective_grid[code]."""
    g = _gauss(n) if order == "sorted" else _signmag(_gauss(n))
    assert regtab.grid_order(g) == order
    rng = np.random.default_rng(n)
    codes = np.stack([(np.arange(32) + s) % n for s in range(n)], axis=1)  # (32, n): all pairs
    codes = np.concatenate([codes, rng.integers(0, n, size=(32 * 6, n))])  # + random units
    words = np.asarray(pack_kernel_words(jnp.asarray(codes), cb))
    got = _decode_all(g, words, cb).reshape(-1, n)
    np.testing.assert_array_equal(got, regtab.effective_grid(g)[codes])


@pytest.mark.parametrize("n", [4, 8, 16])
def test_effective_grid_is_close_and_keeps_symmetry(n):
    g = _gauss(n)
    eff = regtab.effective_grid(g).astype(np.float64)
    assert np.all(np.abs(eff - g) <= 2.0**-8 * np.abs(g))
    np.testing.assert_array_equal(eff[::-1], -eff)  # the Gaussian grids are symmetric
    assert np.all(np.diff(eff) > 0)  # order preserved
    # an already-representable grid is reproduced exactly (idempotent)
    np.testing.assert_array_equal(regtab.effective_grid(eff), eff.astype(np.float32))
    if n == 16:  # the sign/magnitude order decodes to the same values, relabelled
        perm = [c ^ 7 if c < 8 else c for c in range(16)]
        np.testing.assert_array_equal(regtab.effective_grid(_signmag(g)), eff[perm])


def test_grid_orders():
    g = _gauss(16)
    sm = _signmag(g)
    assert regtab.grid_order(g) == "sorted"
    assert regtab.grid_order(sm) == "signmag"
    np.testing.assert_array_equal(sm[8:], -sm[:8])
    assert np.all(np.diff(sm[8:]) > 0) and sm[8] > 0
    assert regtab.grid_order(np.linspace(-1.0, 2.0, 16)) is None
    assert regtab.grid_order(sm[::-1]) is None  # descending: neither order


def test_signmag_relabel_is_an_involution_and_keeps_the_weights():
    """`from_arrays` relabels sorted-order 4-bit codes (p = 1) into sign/magnitude order and
    stores the grid in that order: every weight decodes to the same value."""
    from higgs_jax import packing
    from pallas_kernels.higgs_matmul.repack import from_arrays, relabel_signmag

    w = jnp.asarray(
        np.random.default_rng(0).integers(0, 2**32, size=(6, 5), dtype=np.uint64), jnp.uint32
    )
    np.testing.assert_array_equal(relabel_signmag(relabel_signmag(w)), w)
    with pytest.raises(ValueError, match="float32"):
        relabel_signmag(jnp.zeros((2, 2), jnp.float32))
    g = _gauss(16)
    codes = np.random.default_rng(1).integers(0, 16, size=(64, 3))
    kw = from_arrays(
        packing.pack_codes(jnp.asarray(codes, jnp.int32), 4),
        jnp.ones((1, 3), jnp.bfloat16),
        g,
        shape=(64, 3),
        k_pad=64,
        group_size=64,
    )
    got = np.asarray(unpack_kernel_words(kw.words, 4))
    assert regtab.grid_order(np.asarray(kw.grid_values)[:, 0]) == "signmag"
    np.testing.assert_array_equal(np.asarray(kw.grid_values)[got, 0], g[codes])
    assert not np.array_equal(got, codes)  # relabelled, not copied


def test_prmt_emulation_matches_the_ptx_definition():
    a, b = 0x33221100, 0x77665544
    assert int(regtab._prmt(a, b, 0x3210)) == a
    assert int(regtab._prmt(a, b, 0x7654)) == b
    assert int(regtab._prmt(a, b, 0x0426)) == 0x00442266  # byte k <- nibble k of the selector
    # sign mode (nibble bit 3): replicate bit 7 of the selected byte
    assert int(regtab._prmt(0x0000807F, 0, 0x0098)) == 0x7F7FFF00  # nibbles 2, 3 = 0: byte 0
    assert int(regtab._prmt(a, b, 0xFFFF3210)) == a  # only the low 16 selector bits count


def test_bit2_layout_is_a_permutation_and_round_trips():
    assert sorted(BIT2_POSITION) == list(range(32))
    assert part_shifts(3) == (tuple(range(0, 32, 2)), BIT2_POSITION)
    codes = jnp.asarray(np.random.default_rng(3).integers(0, 8, size=(96, 5)), jnp.int32)
    words = pack_kernel_words(codes, 3)
    np.testing.assert_array_equal(unpack_kernel_words(words, 3), codes)
    # bit 2 of code c lands at BIT2_POSITION[c] of word row 2
    one = jnp.zeros((32, 1), jnp.int32).at[5, 0].set(4)
    assert int(pack_kernel_words(one, 3)[0, 2, 0]) == 1 << BIT2_POSITION[5]


@pytest.mark.parametrize(
    "n,order,per_weight",
    [(4, "sorted", 1.82), (8, "sorted", 2.16), (16, "sorted", 3.5), (16, "signmag", 2.88)],
)
def test_programs_are_short(n, order, per_weight):
    """Integer ops per decoded weight (the tables are operands, loaded once): the point of the
    decoder is a few ops per weight and no memory access; the sign/magnitude order saves 5 of
    the 28 ops per 8 codes of the sorted order."""
    cb = n.bit_length() - 1
    g = _gauss(n) if order == "sorted" else _signmag(_gauss(n))
    ops = sum(regtab.instruction_count(prog) for prog, _, _ in regtab.jobs(g, cb))
    assert ops / 32 <= per_weight
    for prog, _, _ in regtab.jobs(g, cb):
        assert not any(op.op == "mov" for op in prog.ops)  # no immediates to re-materialise
        assert all(
            op.op in ("and", "or", "xor", "shl", "shr", "not", "mul", "prmt", "mov")
            for op in prog.ops
        )


@pytest.mark.parametrize("n", [4, 8, 16])
def test_ptx_text_operands(n):
    cb = n.bit_length() - 1
    for prog, rows, _ in regtab.jobs(_gauss(n), cb):
        text, cons = regtab.ptx(prog)
        n_out, n_in = len(prog.outputs), len(rows) + len(prog.tables)
        assert (
            len(prog.tables)
            == len(regtab.table_words(_gauss(n)))
            == (2 if n == 4 else 4 + (n == 16))
        )
        assert cons.split(",") == ["=f"] * n_out + ["r"] * n_in
        assert text.count("prmt.b32") == sum(op.op == "prmt" for op in prog.ops)
        for j in range(n_out + n_in):
            assert f"${j}" in text
        assert f"${n_out + n_in}" not in text
        assert "mov.b32 r_" not in text  # tables arrive as operands
        assert text.startswith("{") and text.endswith("}")


def test_bad_grids_and_halves():
    with pytest.raises(ValueError, match="n=32"):
        regtab.program(np.linspace(-1, 1, 32))
    with pytest.raises(ValueError, match="symmetric"):
        regtab.program(np.linspace(-1.0, 2.0, 16))
    with pytest.raises(ValueError, match="half=1"):
        regtab.program(_gauss(4), half=1)
    with pytest.raises(ValueError, match="code_bits in"):
        regtab.jobs(_gauss(4), 6)
    with pytest.raises(ValueError, match="reads 1 words"):
        regtab.decode_words(regtab.program(_gauss(4)), [], [], interpret=True)
    with pytest.raises(ValueError, match="reads 2 tables"):
        regtab.decode_words(
            regtab.program(_gauss(4)), [jnp.zeros(2, jnp.uint32)], [], interpret=True
        )
    from pallas_kernels.higgs_matmul.repack import bit2_position

    with pytest.raises(ValueError, match="0..31"):
        bit2_position(32)
