"""Pure transforms over params pytrees: plan, quantize, dequantize.

Layers are chosen by ordered path rules ``(regex, spec | None)``: the first rule whose regex
matches (``re.search``) a leaf's path wins; ``None`` keeps the leaf in full precision. Paths are
the pytree keys joined by "/", e.g. ``layers_0/attn/q_proj/kernel`` (a Linen ``{'params': ...}``
tree gives ``params/layers_0/...``; NNX ``State`` trees give the same key names).

Kernels follow the Flax convention (K, N) = (in, out): contraction axis 0. A rule may carry another
axis as a third element, ``(regex, spec, axis)``, for trees in the PyTorch (out, in) layout.

Nothing is skipped silently: every leaf appears in the report with what happened to it and why.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax.config import HiggsConfig, NF4Config, QuantSpec, RTNConfig
from higgs_jax.qtensor import HiggsTensor, dequantize
from higgs_jax.quantize import expected_bits_per_weight, layer_key, quantize_with_error

_SPEC_TYPES = (HiggsConfig, RTNConfig, NF4Config)

@dataclasses.dataclass(frozen=True)
class Rule:
    """One path rule: leaves whose path matches `pattern` get `spec` (None = keep).

    A rule that matches no leaf is an error (it is almost always a typo), unless `required` is
    False, as for the built-in exclusion of embeddings / lm_head, which some trees don't have.
    """

    pattern: str
    spec: QuantSpec | None
    axis: int = 0
    required: bool = True

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"invalid rule regex {self.pattern!r}: {e}") from None
        if self.spec is not None and not isinstance(self.spec, _SPEC_TYPES):
            raise ValueError(
                f"rule {self.pattern!r}: spec must be HiggsConfig/RTNConfig/NF4Config or None, "
                f"got {self.spec!r}"
            )
        if self.axis not in (0, 1):
            raise ValueError(f"rule {self.pattern!r}: axis must be 0 or 1, got {self.axis!r}")


#: Embeddings and LM heads stay in full precision (optional: not every tree has them).
EXCLUDE_EMBEDDINGS = Rule(r"(^|/)(embed|embed_tokens|embedding|wte|wpe|lm_head)(/|$)", None,
                          required=False)
KERNEL_PATTERN = r"(^|/)kernel$"

#: Default rules: embeddings and the LM head stay in full precision, every other 2-D `kernel` gets
#: HIGGS 4-bit, p = 2, h = 512 (the HF integration's defaults).
DEFAULT_RULES: tuple[Rule, ...] = (EXCLUDE_EMBEDDINGS, Rule(KERNEL_PATTERN, HiggsConfig()))


def default_rules(spec: QuantSpec) -> tuple[Rule, ...]:
    """Embeddings / lm_head kept, every other 2-D kernel quantized with `spec`."""
    return (EXCLUDE_EMBEDDINGS, Rule(KERNEL_PATTERN, spec))


def as_rules(rules) -> tuple[Rule, ...]:
    """Normalises rules given as Rule objects, (regex, spec) or (regex, spec, axis) tuples, or a
    single spec (applied with the default exclusions of embeddings / lm_head)."""
    if isinstance(rules, _SPEC_TYPES):
        return default_rules(rules)
    if isinstance(rules, Rule):
        return (rules,)
    if not isinstance(rules, Sequence) or isinstance(rules, str):
        raise ValueError(f"rules must be a sequence of (regex, spec) pairs, got {rules!r}")
    out = []
    for r in rules:
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, tuple) and len(r) in (2, 3):
            out.append(Rule(*r))
        else:
            raise ValueError(f"each rule must be (regex, spec[, axis]) or Rule, got {r!r}")
    if not out:
        raise ValueError("rules is empty: nothing would be quantized")
    return tuple(out)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'/'-joined key names of a pytree path (NNX's trailing '.value' dropped)."""
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What will happen to one leaf: its spec (None = kept) and why."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: QuantSpec | None
    axis: int
    reason: str
    bits_per_weight: float  # predicted for quantized leaves; the dtype's width otherwise

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _leaf_plan(path: str, leaf, rules: Sequence[Rule], hits: list[int]) -> LayerPlan:
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = jnp.dtype(getattr(leaf, "dtype", jnp.float32))
    width = float(dtype.itemsize * 8)
    for i, rule in enumerate(rules):
        if re.search(rule.pattern, path) is None:
            continue
        hits[i] += 1
        if rule.spec is None:
            return LayerPlan(path, shape, dtype.name, None, rule.axis,
                             f"kept: rule {i} ({rule.pattern!r}) keeps it", width)
        if len(shape) != 2:
            raise ValueError(
                f"layer {path!r}: rule {i} ({rule.pattern!r}) asks to quantize a leaf of shape "
                f"{shape}, but only 2-D kernels can be quantized"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"layer {path!r}: rule {i} ({rule.pattern!r}) asks to quantize a leaf of dtype "
                f"{dtype.name}; only floating-point weights can be quantized"
            )
        try:
            bpw = expected_bits_per_weight(shape, rule.spec, rule.axis)
        except ValueError as e:
            raise ValueError(f"layer {path!r}: {e}") from None
        return LayerPlan(path, shape, dtype.name, rule.spec, rule.axis,
                         f"rule {i} ({rule.pattern!r})", bpw)
    return LayerPlan(path, shape, dtype.name, None, 0, "kept: no rule matched", width)


def plan_quantization(params: Any, rules=DEFAULT_RULES) -> dict[str, LayerPlan]:
    """Decides what happens to every leaf, from shapes alone.

    `params` may hold concrete arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), so
    a large model can be planned before any weight is loaded.

    Raises:
      ValueError: a rule matches no leaf, or asks to quantize a non-2-D / non-float leaf.
    """
    rules = as_rules(rules)
    hits = [0] * len(rules)
    plans: dict[str, LayerPlan] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = path_str(path)
        plans[p] = _leaf_plan(p, leaf, rules, hits)
    unused = [f"{i}: {r.pattern!r}" for i, r in enumerate(rules) if hits[i] == 0 and r.required]
    if unused:
        raise ValueError(f"rules matched no parameter: {', '.join(unused)}")
    return plans


@dataclasses.dataclass
class LayerReport:
    path: str
    shape: tuple[int, ...]
    method: str  # "higgs" | "rtn" | "nf4" | "kept"
    spec: str
    bits_per_weight: float
    t2: float | None
    seconds: float
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QuantReport:
    """Per-leaf outcome plus honest totals (every stored bit counted)."""

    layers: list[LayerReport]

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.method != "kept"]

    def _numel(self, rows) -> int:
        return sum(int(np.prod(r.shape)) if r.shape else 1 for r in rows)

    @property
    def quantized_bits_per_weight(self) -> float:
        """Average bits/weight over the quantized layers (codes + scales + padding)."""
        q = self.quantized
        n = self._numel(q)
        return sum(r.bits_per_weight * (int(np.prod(r.shape))) for r in q) / n if n else float("nan")

    @property
    def total_bits(self) -> float:
        return sum(r.bits_per_weight * (int(np.prod(r.shape)) if r.shape else 1) for r in self.layers)

    @property
    def total_megabytes(self) -> float:
        return self.total_bits / 8 / 1e6

    def summary(self) -> dict:
        return {
            "num_leaves": len(self.layers),
            "num_quantized": len(self.quantized),
            "quantized_params": self._numel(self.quantized),
            "total_params": self._numel(self.layers),
            "quantized_bits_per_weight": self.quantized_bits_per_weight,
            "model_megabytes": self.total_megabytes,
        }

    def to_json(self) -> str:
        return json.dumps(
            {"summary": self.summary(), "layers": [r.as_dict() for r in self.layers]}, indent=1
        )

    def table(self) -> str:
        lines = [f"{'layer':48s} {'shape':>14s} {'method':>6s} {'bits/w':>7s} {'t2':>9s}  spec / reason"]
        for r in self.layers:
            t2 = f"{r.t2:.5f}" if r.t2 is not None else "-"
            shape = "x".join(map(str, r.shape)) or "()"
            lines.append(
                f"{r.path[-48:]:48s} {shape:>14s} {r.method:>6s} {r.bits_per_weight:7.3f} {t2:>9s}  "
                f"{r.spec or r.reason}"
            )
        s = self.summary()
        lines.append(
            f"quantized {s['num_quantized']}/{s['num_leaves']} leaves, "
            f"{s['quantized_bits_per_weight']:.3f} bits/weight over quantized layers, "
            f"model {s['model_megabytes']:.2f} MB"
        )
        return "\n".join(lines)


def quantize_params(
    params: Any,
    rules=DEFAULT_RULES,
    key: jax.Array | None = None,
    *,
    progress: bool = False,
    plan: Mapping[str, LayerPlan] | None = None,
) -> tuple[Any, QuantReport]:
    """Returns a new params tree with `HiggsTensor` leaves where the rules say so, and a report.

    Args:
      params: any pytree of arrays (Linen dict, NNX State, nested dict). Not modified.
      rules: ordered (regex, spec | None[, axis]) rules, a single spec, or Rule objects.
      key: PRNG key for specs with random signs; each layer uses fold_in(key, hash(path)).
      progress: show a tqdm progress bar over the quantized layers.
      plan: a precomputed `plan_quantization` result (e.g. from a dynamic allocation).
    """
    if plan is None:
        plan = plan_quantization(params, rules)
    todo = sum(1 for p in plan.values() if p.spec is not None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc="quantizing", unit="layer")
    reports: list[LayerReport] = []

    def visit(path, leaf):
        p = path_str(path)
        lp = plan.get(p)
        if lp is None:
            raise ValueError(f"plan has no entry for leaf {p!r}")
        if lp.spec is None:
            reports.append(LayerReport(p, lp.shape, "kept", "", lp.bits_per_weight, None, 0.0, lp.reason))
            return leaf
        if bar is not None:
            bar.set_postfix_str(p[-40:])
        t0 = time.perf_counter()
        try:
            qt, t2 = quantize_with_error(leaf, lp.spec, axis=lp.axis, key=layer_key(key, p))
        except ValueError as e:
            raise ValueError(f"layer {p!r}: {e}") from None
        jax.block_until_ready(qt.codes)
        reports.append(
            LayerReport(p, lp.shape, lp.spec.method, lp.spec.describe(), qt.bits_per_weight, t2,
                        time.perf_counter() - t0, lp.reason)
        )
        if bar is not None:
            bar.update(1)
        return qt

    try:
        out = jax.tree_util.tree_map_with_path(visit, params)
    finally:
        if bar is not None:
            bar.close()
    return out, QuantReport(reports)


def dequantize_params(params: Any, dtype=None) -> Any:
    """Replaces every `HiggsTensor` leaf by its dense array (inverse of `quantize_params`)."""
    return jax.tree_util.tree_map(
        lambda x: dequantize(x, dtype) if isinstance(x, HiggsTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, HiggsTensor),
    )
