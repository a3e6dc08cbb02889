"""alpha calibration by noise injection, error tables, dynamic plans (issue 5 items 1, 2, 4, 5)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.allocation import dynamic
from higgs_jax.allocation.calibrate import AlphaTable, calibrate_alphas, fit_alpha
from higgs_jax.config import HiggsConfig
from higgs_jax.params import quantize_params

OPTIONS = (HiggsConfig(bits=2, p=2, hadamard_size=64), HiggsConfig(bits=3, p=2, hadamard_size=64),
           HiggsConfig(bits=4, p=2, hadamard_size=64))


def _tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {"a": {"kernel": jax.random.normal(k[0], (128, 64))},
            "layers_0": {"b": {"kernel": jax.random.normal(k[1], (64, 128))},
                         "c": {"kernel": jax.random.normal(k[2], (64, 64))}}}


def _quadratic_ppl(weights):
    """A synthetic 'perplexity' that is exactly linear in each layer's relative error."""
    ref = _tree()
    coef = {"a": 3.0, "b": 1.0, "c": 0.0}

    def f(params):
        total = 10.0
        for name, w, w0 in (("a", params["a"]["kernel"], ref["a"]["kernel"]),
                            ("b", params["layers_0"]["b"]["kernel"], ref["layers_0"]["b"]["kernel"]),
                            ("c", params["layers_0"]["c"]["kernel"], ref["layers_0"]["c"]["kernel"])):
            total += coef[name] * float(jnp.sum((w - w0) ** 2) / jnp.sum(w0**2))
        return total

    return f


def test_fit_alpha_through_origin():
    t2 = np.array([1.0, 2.0, 4.0])
    assert fit_alpha(t2, 3 * t2) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="non-finite"):
        fit_alpha(t2, np.array([1.0, np.nan, 2.0]))


def test_calibration_recovers_known_alphas(tmp_path):
    table = calibrate_alphas(_tree(), _quadratic_ppl(None), t2_values=(1 / 256, 1 / 64),
                             progress=False)
    a = table.as_dict()
    # Noise of relative power t2 gives error ~t2 (random, so within a few %).
    assert a["a/kernel"] == pytest.approx(3.0, rel=0.05)
    assert a["layers_0/b/kernel"] == pytest.approx(1.0, rel=0.05)
    assert a["layers_0/c/kernel"] == pytest.approx(0.0, abs=1e-9)
    table.save(tmp_path / "alphas.json")
    again = AlphaTable.load(tmp_path / "alphas.json")
    assert again.as_dict() == a
    again.check_matches(list(a))


def test_block_mode_splits_by_size():
    table = calibrate_alphas(_tree(), _quadratic_ppl(None), t2_values=(1 / 128,), mode="block",
                             progress=False)
    a = table.as_dict()
    # b and c form one block: alpha_block = 1 + 0, split in proportion to size (2:1).
    assert a["layers_0/b/kernel"] == pytest.approx(2 / 3, rel=0.06)
    assert a["layers_0/c/kernel"] == pytest.approx(1 / 3, rel=0.06)
    assert set(table.groups) == {"a/kernel", "layers_0"}


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(t2_values=(0.5,)), "linear regime"), (dict(t2_values=()), "t2_values"),
     (dict(mode="neuron"), "mode")],
)
def test_calibration_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate_alphas(_tree(), _quadratic_ppl(None), progress=False, **kwargs)


def test_alpha_table_mismatch_and_bad_values(tmp_path):
    table = calibrate_alphas(_tree(), _quadratic_ppl(None), t2_values=(1 / 128,), progress=False)
    with pytest.raises(ValueError, match="missing"):
        table.check_matches(list(table.layers) + ["extra/kernel"])
    d = json.loads(json.dumps(table.__dict__, default=list))
    d["alphas"][0] = float("nan")
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="finite"):
        AlphaTable.load(tmp_path / "bad.json").check_matches(list(table.layers))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not an alpha table"):
        AlphaTable.load(tmp_path / "junk.json")


def test_error_table_shortcut_is_close_to_measured():
    tree = _tree()
    free = dynamic.error_table(jax.eval_shape(lambda: tree), OPTIONS)
    meas = dynamic.error_table(tree, OPTIONS, measure=True)
    assert free.errors.shape == meas.errors.shape == (3, 3)
    np.testing.assert_allclose(meas.bits, free.bits)
    rep = dynamic.shortcut_report(meas, free)
    assert rep["max_rel_dev"] < 0.15  # Gaussian weights: t^2 ~ grid MSE


def test_dynamic_plan_meets_budget_and_prefers_sensitive_layers():
    tree = _tree()
    table = dynamic.error_table(tree, OPTIONS, measure=True)
    alphas = {"a/kernel": 100.0, "layers_0/b/kernel": 1.0, "layers_0/c/kernel": 1.0}
    sol = dynamic.solve_dynamic(table, alphas, 3.25)
    assert sol.avg_bits <= 3.25 + 1e-9
    choice = dict(zip(table.layers, sol.choices))
    assert choice["a/kernel"] == 2  # the sensitive layer gets 4 bits
    plan = dynamic.plan_from_choices(tree, table, sol.choices)
    q, report = quantize_params(tree, plan=plan)
    assert report.quantized_bits_per_weight == pytest.approx(sol.avg_bits)
    assert q["a"]["kernel"].grid.n == 256
    with pytest.raises(ValueError, match="budget"):
        dynamic.solve_dynamic(table, alphas, 1.0)
