"""Bit-packing: round trips for every code width, exact layout, density."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax import packing


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("length", [1, 31, 32, 33, 96, 100])
def test_round_trip(bits, length):
    rng = np.random.default_rng(bits * 1000 + length)
    codes = rng.integers(0, 2**bits, size=(length, 7))
    packed = packing.pack_codes(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint32
    assert packed.shape == (packing.packed_rows(length, bits), 7)
    np.testing.assert_array_equal(np.asarray(packing.unpack_codes(packed, bits, length)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12])
def test_density_is_bits_per_code(bits):
    # 32 codes of b bits take exactly b words of 32 bits.
    assert packing.packed_rows(32 * 10, bits) * 32 == 32 * 10 * bits


def test_layout_4bit_is_little_endian_nibbles():
    codes = jnp.arange(32, dtype=jnp.int32)[:, None] % 16
    packed = np.asarray(packing.pack_codes(codes, 4))
    assert packed[0, 0] == 0x76543210
    assert packed[1, 0] == 0xFEDCBA98


def test_layout_3bit_code_straddles_words():
    codes = np.zeros((32, 1), np.int32)
    codes[10] = 0b111  # stream bits 30, 31, 32
    packed = np.asarray(packing.pack_codes(jnp.asarray(codes), 3))
    assert packed[0, 0] == 0b11 << 30
    assert packed[1, 0] == 1
    assert packed[2, 0] == 0


def test_padding_is_zero_and_jit_works():
    codes = jnp.full((5, 2), 3, jnp.int32)
    packed = jax.jit(packing.pack_codes, static_argnums=1)(codes, 2)
    full = np.asarray(packing.unpack_codes(packed, 2, 32))
    assert (full[5:] == 0).all() and (full[:5] == 3).all()


def test_values_out_of_range_are_masked_not_spread():
    # A too-large code must not corrupt its neighbours.
    codes = jnp.asarray([[5], [1]], jnp.int32)  # 5 does not fit 2 bits
    out = np.asarray(packing.unpack_codes(packing.pack_codes(codes, 2), 2, 2))
    assert out[1, 0] == 1


@pytest.mark.parametrize("bad", [0, 17, 2.5])
def test_bad_widths(bad):
    with pytest.raises(ValueError, match="code_bits"):
        packing.pack_codes(jnp.zeros((4,), jnp.int32), bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="integer dtype"):
        packing.pack_codes(jnp.zeros((4,), jnp.float32), 4)
    with pytest.raises(ValueError, match="rows"):
        packing.unpack_codes(jnp.zeros((3, 1), jnp.uint32), 4, 32)
