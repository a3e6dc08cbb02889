"""HiggsTensor is a pytree: jit, vmap, device_put, orbax, tree utilities; matmul paths agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.checkpoints.orbax import load_params, save_params
from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig
from higgs_jax.matmul import higgs_matmul, linear
from higgs_jax.qtensor import HiggsTensor, dequantize
from higgs_jax.quantize import quantize

SPECS = [
    HiggsConfig(bits=4, p=2, hadamard_size=64),
    HiggsConfig(bits=3, p=1, hadamard_size=64, random_signs=True),
    HiggsConfig(bits=2, p=2, hadamard_size=48, indivisible="error"),  # Paley order 48 = 4 * 12
    NF4Config(),
    RTNConfig(bits=3, group_size=32),
]


def _qt(spec, shape=(192, 40), seed=0):
    w = jax.random.normal(jax.random.key(seed), shape)
    return w, quantize(w, spec, axis=0, key=jax.random.key(7))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_jit_round_trip(spec):
    _, qt = _qt(spec)
    out = jax.jit(lambda t: t)(qt)
    assert isinstance(out, HiggsTensor) and out.shape == qt.shape and out.grid == qt.grid
    np.testing.assert_array_equal(np.asarray(dequantize(out)), np.asarray(dequantize(qt)))
    np.testing.assert_allclose(
        np.asarray(jax.jit(dequantize)(qt)), np.asarray(dequantize(qt)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_matmul_equals_dense(spec):
    w, qt = _qt(spec)
    x = jax.random.normal(jax.random.key(1), (3, 5, 192))
    y = higgs_matmul(x, qt, implementation="xla")
    ref = jnp.einsum("abk,kn->abn", x, dequantize(qt), precision="highest")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)
    b = jnp.arange(40.0)
    np.testing.assert_allclose(
        np.asarray(linear(x, qt, b, implementation="xla")), np.asarray(ref + b), rtol=1e-4, atol=1e-4
    )


def test_vmap_over_activations_and_over_stacked_tensors():
    _, qt = _qt(SPECS[0])
    xs = jax.random.normal(jax.random.key(2), (4, 192))
    y = jax.vmap(lambda x: higgs_matmul(x, qt, implementation="xla"))(xs)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(higgs_matmul(xs, qt, implementation="xla")), rtol=1e-5, atol=1e-5
    )
    # A stack of tensors (same metadata) vmaps like a batch of arrays.
    qts = [_qt(SPECS[0], seed=s)[1] for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *qts)
    dense = jax.vmap(dequantize)(stacked)
    for i, q in enumerate(qts):
        np.testing.assert_allclose(np.asarray(dense[i]), np.asarray(dequantize(q)), rtol=1e-6)


def test_device_put_and_tree_utils():
    _, qt = _qt(SPECS[1])
    moved = jax.device_put(qt, jax.devices()[0])
    assert isinstance(moved, HiggsTensor) and moved.signs is not None
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 3  # codes, scales, signs
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.hadamard_size == qt.hadamard_size
    assert len(jax.tree_util.tree_leaves(_qt(SPECS[0])[1])) == 2  # no signs -> no leaf


def test_grad_flows_to_scales():
    w, qt = _qt(SPECS[0])
    x = jnp.ones((2, 192))

    def loss(scales):
        t = HiggsTensor(qt.codes, scales, qt.signs, qt.shape, qt.dtype, qt.grid, qt.hadamard_size,
                        qt.group_size, qt.k_pad, qt.contraction_axis)
        return jnp.sum(higgs_matmul(x, t, implementation="xla") ** 2)

    g = jax.grad(loss)(qt.scales.astype(jnp.float32))
    assert g.shape == qt.scales.shape and bool(jnp.any(g != 0))


def test_orbax_round_trip(tmp_path):
    trees = {
        "a": {"kernel": _qt(SPECS[0])[1], "bias": jnp.arange(40.0)},
        "b": {"kernel": _qt(SPECS[1])[1]},
        "c": {"kernel": _qt(SPECS[3])[1], "scale": jnp.ones(3)},
    }
    save_params(tmp_path / "ckpt", trees, metadata={"note": "x"})
    restored, meta = load_params(tmp_path / "ckpt")
    assert meta == {"note": "x"}
    for k in trees:
        a, b = trees[k]["kernel"], restored[k]["kernel"]
        assert isinstance(b, HiggsTensor) and (a.grid, a.hadamard_size, a.k_pad) == (b.grid, b.hadamard_size, b.k_pad)
        np.testing.assert_array_equal(np.asarray(dequantize(a)), np.asarray(dequantize(b)))
    np.testing.assert_array_equal(np.asarray(restored["a"]["bias"]), np.arange(40.0))
    with pytest.raises(ValueError, match="not empty"):
        save_params(tmp_path / "ckpt", trees)
    with pytest.raises(ValueError, match="higgs_meta"):
        load_params(tmp_path)


def test_validate_catches_broken_invariant():
    _, qt = _qt(SPECS[0])
    qt.validate()
    bad = HiggsTensor(qt.codes[:-1], qt.scales, None, qt.shape, qt.dtype, qt.grid, qt.hadamard_size,
                      qt.group_size, qt.k_pad)
    with pytest.raises(ValueError, match="codes"):
        bad.validate()


def test_matmul_bad_input():
    _, qt = _qt(SPECS[0])
    with pytest.raises(ValueError, match="last dim 100"):
        higgs_matmul(jnp.ones((2, 100)), qt)
    with pytest.raises(ValueError, match="implementation"):
        higgs_matmul(jnp.ones((2, 192)), qt, implementation="cuda")
    with pytest.raises(ValueError, match="floating"):
        higgs_matmul(jnp.ones((2, 192), jnp.int32), qt)
    qt1 = quantize(jnp.ones((40, 192)), HiggsConfig(hadamard_size=64), axis=1)
    with pytest.raises(ValueError, match="axis 1"):
        higgs_matmul(jnp.ones((2, 192)), qt1)
