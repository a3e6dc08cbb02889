"""quantize_params / plan_quantization / dequantize_params over params pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig
from higgs_jax.params import (
    DEFAULT_RULES,
    Rule,
    dequantize_params,
    path_str,
    plan_quantization,
    quantize_params,
)
from higgs_jax.qtensor import HiggsTensor


def _tree(seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    return {
        "embed_tokens": {"embedding": jax.random.normal(k[0], (100, 64))},
        "layers_0": {
            "attn": {"q_proj": {"kernel": jax.random.normal(k[1], (64, 128)),
                                "bias": jnp.ones(128)}},
            "mlp": {"down_proj": {"kernel": jax.random.normal(k[2], (256, 64))}},
            "norm": {"scale": jnp.ones(64)},
        },
        "lm_head": {"kernel": jax.random.normal(k[3], (64, 100))},
    }


def test_default_rules_skip_embeddings_and_head_and_report_everything():
    tree = _tree()
    q, report = quantize_params(tree, DEFAULT_RULES)
    assert isinstance(q["layers_0"]["attn"]["q_proj"]["kernel"], HiggsTensor)
    assert isinstance(q["layers_0"]["mlp"]["down_proj"]["kernel"], HiggsTensor)
    assert not isinstance(q["lm_head"]["kernel"], HiggsTensor)
    assert not isinstance(q["embed_tokens"]["embedding"], HiggsTensor)
    # The bias is untouched, never dropped.
    np.testing.assert_array_equal(np.asarray(q["layers_0"]["attn"]["q_proj"]["bias"]), np.ones(128))
    paths = {r.path: r for r in report.layers}
    assert len(paths) == len(jax.tree_util.tree_leaves(tree))
    assert paths["lm_head/kernel"].method == "kept" and "rule 0" in paths["lm_head/kernel"].reason
    assert paths["layers_0/norm/scale"].reason == "kept: no rule matched"
    assert paths["layers_0/attn/q_proj/kernel"].t2 < 0.01
    # The input tree is not modified.
    assert not isinstance(tree["layers_0"]["attn"]["q_proj"]["kernel"], HiggsTensor)


def test_first_matching_rule_wins_and_mixed_specs():
    rules = [
        (r"down_proj", RTNConfig(bits=4, group_size=64)),
        (r"(embed|lm_head)", None),
        (r"kernel$", HiggsConfig(bits=3, p=1, hadamard_size=64)),
    ]
    q, report = quantize_params(_tree(), rules)
    down = q["layers_0"]["mlp"]["down_proj"]["kernel"]
    qp = q["layers_0"]["attn"]["q_proj"]["kernel"]
    assert down.grid.kind == "int" and qp.grid.kind == "gauss" and qp.grid.p == 1
    s = report.summary()
    assert s["num_quantized"] == 2
    # Average bits over quantized layers weights by size.
    n_down, n_q = 256 * 64, 64 * 128
    avg = (down.bits_per_weight * n_down + qp.bits_per_weight * n_q) / (n_down + n_q)
    assert s["quantized_bits_per_weight"] == pytest.approx(avg)


def test_plan_from_abstract_shapes_matches_real_bits():
    tree = _tree()
    abstract = jax.eval_shape(lambda: tree)
    plan = plan_quantization(abstract)
    _, report = quantize_params(tree)
    for r in report.layers:
        assert plan[r.path].bits_per_weight == pytest.approx(r.bits_per_weight)


def test_dequantize_params_inverts_structure():
    tree = _tree()
    q, _ = quantize_params(tree, NF4Config())
    d = dequantize_params(q)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(tree)
    a = tree["layers_0"]["attn"]["q_proj"]["kernel"]
    b = d["layers_0"]["attn"]["q_proj"]["kernel"]
    assert b.shape == a.shape and float(jnp.mean((a - b) ** 2) / jnp.mean(a**2)) < 0.02


def test_same_key_same_result_independent_of_traversal():
    spec = HiggsConfig(bits=4, p=2, hadamard_size=64, random_signs=True)
    key = jax.random.key(3)
    q1, _ = quantize_params(_tree(), spec, key=key)
    # A tree with extra leaves (different traversal indices) gives the same per-path signs.
    t2 = _tree()
    t2["aaa_extra"] = {"kernel": jnp.ones((64, 8))}
    q2, _ = quantize_params(t2, spec, key=key)
    s1 = q1["layers_0"]["attn"]["q_proj"]["kernel"].signs
    s2 = q2["layers_0"]["attn"]["q_proj"]["kernel"].signs
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))


def test_linen_style_tree_and_jit():
    tree = {"params": _tree()}
    q, _ = quantize_params(tree, [(r"lm_head|embed", None), (r"kernel$", HiggsConfig(hadamard_size=64))])
    assert isinstance(q["params"]["layers_0"]["attn"]["q_proj"]["kernel"], HiggsTensor)
    out = jax.jit(lambda t: t)(q)
    assert isinstance(out["params"]["layers_0"]["attn"]["q_proj"]["kernel"], HiggsTensor)


def test_nnx_state():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(64, 128, rngs=rngs)
            self.down = nnx.Linear(128, 64, rngs=rngs)

    state = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    q, report = quantize_params(state, [(r"kernel$", HiggsConfig(bits=4, p=2, hadamard_size=64))])
    paths = {r.path: r.method for r in report.layers}
    assert paths["up/kernel"] == "higgs" and paths["down/kernel"] == "higgs"
    assert paths["up/bias"] == "kept"
    kernels = [x for x in jax.tree_util.tree_leaves(q, is_leaf=lambda x: isinstance(x, HiggsTensor))
               if isinstance(x, HiggsTensor)]
    assert len(kernels) == 2


@pytest.mark.parametrize(
    "rules,match",
    [
        ([(r"no_such_layer", HiggsConfig())], "matched no parameter"),
        ([(r"norm/scale", HiggsConfig())], r"layers_0/norm/scale.*2-D"),
        ([(r"(", HiggsConfig())], "invalid rule regex"),
        ([(r"kernel", "higgs4")], "spec must be"),
        ([(r"kernel", HiggsConfig(), 2)], "axis"),
        ([], "empty"),
        ("kernel", "sequence"),
    ],
)
def test_bad_rules(rules, match):
    with pytest.raises(ValueError, match=match):
        quantize_params(_tree(), rules)


def test_error_names_layer_path():
    tree = _tree()
    tree["layers_0"]["attn"]["q_proj"]["kernel"] = tree["layers_0"]["attn"]["q_proj"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"layers_0/attn/q_proj/kernel.*NaN"):
        quantize_params(tree, HiggsConfig(hadamard_size=64))
    tree = {"w": {"kernel": jnp.ones((64, 4), jnp.int8)}}
    with pytest.raises(ValueError, match=r"w/kernel.*int8"):
        quantize_params(tree, [(r"kernel", HiggsConfig(hadamard_size=64))])


def test_path_str_and_rule_axis():
    tree = {"torch_style": {"weight": jax.random.normal(jax.random.key(0), (32, 128))}}
    q, _ = quantize_params(tree, [Rule(r"weight$", HiggsConfig(hadamard_size=64), axis=1)])
    qt = q["torch_style"]["weight"]
    assert qt.contraction_axis == 1 and qt.K == 128
    assert path_str(jax.tree_util.tree_leaves_with_path(tree)[0][0]) == "torch_style/weight"
