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


def _decode_all(g, words: np.ndarray, cb: int) -> np.ndarray:
    """(U, cb, N) kernel words -> (U, 32, N) float32 values through the regtab programs."""
    units, _, ncols = words.shape
    out = np.full((units, 32, ncols), np.nan, np.float32)
    for prog, rows, first in regtab.jobs(g, cb):
        vals = regtab.emulate(prog, [words[:, t] for t in rows])
        for j, v in enumerate(vals):
            out[:, first + j] = np.asarray(v)
    return out


@pytest.mark.parametrize("n,cb", [(4, 2), (8, 3), (16, 4)])
def test_every_code_at_every_position(n, cb):
    """Each code value at each of the 32 positions of a unit decodes to effective_grid[code]."""
    g = _gauss(n)
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


@pytest.mark.parametrize("n,per_weight", [(4, 2.0), (8, 2.2), (16, 3.6)])
def test_programs_are_short(n, per_weight):
    """Integer ops per decoded weight (excluding loop-invariant table moves): the point of the
    decoder is a few ops per weight and no memory access."""
    cb = n.bit_length() - 1
    ops = sum(regtab.instruction_count(prog) for prog, _, _ in regtab.jobs(_gauss(n), cb))
    assert ops / 32 <= per_weight
    for prog, _, _ in regtab.jobs(_gauss(n), cb):
        assert all(
            op.op in ("and", "or", "xor", "shl", "shr", "not", "mul", "prmt", "mov")
            for op in prog.ops
        )


@pytest.mark.parametrize("n", [4, 8, 16])
def test_ptx_text_operands(n):
    cb = n.bit_length() - 1
    for prog, rows, _ in regtab.jobs(_gauss(n), cb):
        text, cons = regtab.ptx(prog)
        n_out = len(prog.outputs)
        assert cons.split(",") == ["=f"] * n_out + ["r"] * len(rows)
        assert text.count("prmt.b32") == sum(op.op == "prmt" for op in prog.ops)
        for j in range(n_out + len(rows)):
            assert f"${j}" in text
        assert f"${n_out + len(rows)}" not in text
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
        regtab.decode_words(regtab.program(_gauss(4)), [], interpret=True)
    from pallas_kernels.higgs_matmul.repack import bit2_position

    with pytest.raises(ValueError, match="0..31"):
        bit2_position(32)
