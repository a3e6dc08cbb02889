"""Data-aware quantization of layers and whole models: HIGGS+GPTQ, QuantEase (+ outliers).

Glossary: K = input (contraction) dim, N = output dim, h = Hadamard block, g = scale group,
p = grid dimension, K_pad = K padded as the data-free quantizer pads it, R = the orthonormal block
Hadamard with the layer's signs (identity for RTN/NF4), Sigma = X^T X / num_tokens (K, K),
E = W_hat - W, hessian error = tr(E^T Sigma E) / tr(W^T Sigma W), t^2 = ||E||^2 / ||W||^2,
S = sparse full-precision outliers in the ORIGINAL domain (W ~ W_hat + S).

One layer (`quantize_datawise`):
  1. The data-free quantizer runs first (`quantize_with_error`): it fixes the padding, the signs
     and the scales (HIGGS "rms", RTN/NF4 "absmax", rounded to the stored dtype before coding), and
     is the "before" of the report. The data-aware result keeps exactly these scales, so it is
     bit-compatible with the kernels and differs only in its codes.
  2. Both sides are rotated by the same R: W_rot = R pad(W), Sigma_rot = R Sigma_pad R^T, where
     Sigma_pad is Sigma zero-padded to K_pad with a tiny diagonal (1e-6 * mean diag) on the padded
     inputs, so the problem stays well-posed (padded rows are dropped by `dequantize`). Since
     R is orthonormal, tr(E^T Sigma E) = tr(E_rot^T Sigma_rot E_rot).
  3. GPTQ (`gptq_quantize`) or QuantEase (`quantease_quantize`, warm-started from GPTQ or
     data-free codes) chooses the codes on the base grid; they are packed (`packing.pack_codes`).
  4. Outlier-aware QuantEase: a k-sparse S is only sparse in the original domain (R S is dense),
     so codes and S alternate: S by iterative hard thresholding in the original domain
     (S <- H_k(S - Sigma E / lambda), i.e. gradient 2 Sigma E with step 1 / (2 lambda),
     lambda >= lambda_max(Sigma), a step that raises the objective is rejected and lambda doubled),
     then one QuantEase sweep in the rotated domain on the target R pad(W - S). S is stored in the
     tensor's outlier leaves (int32 rows/cols, float32 values; 96 bits each, in bits/weight).

A whole model (`quantize_params_datawise`): windows of calibration text go through the model block
by block; for block i, the Sigma of each linear input is accumulated (streaming over sample
batches), the block's layers are quantized, and the hidden states are propagated through the
QUANTIZED block. Granularity ("sequential"):
  "layer" (default): within a block, q/k/v, then o_proj, then gate/up, then down_proj; each group's
      Sigma is measured with the earlier groups of the same block already quantized.
  "block": all Sigma of block i measured with block i in full precision (blocks < i quantized).
  "none": every Sigma from the full-precision model (not sequential; a cache then serves any
      method).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax import grids, hadamard, packing
from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig, code_bits
from higgs_jax.datawise import calibration as cal
from higgs_jax.datawise.gptq import gptq_quantize
from higgs_jax.datawise.quantease import monotone_iht, quantease_quantize
from higgs_jax.datawise.specs import (
    DATAWISE_TYPES,
    GPTQConfig,
    QuantEaseConfig,
    base_spec,
    is_datawise,
)
from higgs_jax.models.llama import LINEAR_INPUTS, LlamaConfig
from higgs_jax.params import (
    EXCLUDE_EMBEDDINGS,
    KERNEL_PATTERN,
    LayerPlan,
    LayerReport,
    QuantReport,
    path_str,
    plan_quantization,
)
from higgs_jax.params import Rule as _PlainRule
from higgs_jax.qtensor import HiggsTensor, dequantize, unpack
from higgs_jax.quantize import layer_key, quantize_with_error

__all__ = [
    "SEQUENTIAL_MODES",
    "DatawiseInfo",
    "DatawiseLayerReport",
    "DatawiseReport",
    "datawise_plan",
    "hessian_error",
    "plan_datawise",
    "can_share_solve",
    "quantize_datawise",
    "quantize_datawise_shared",
    "quantize_params_datawise",
]

_HI = jax.lax.Precision.HIGHEST
_PLAIN_TYPES = (HiggsConfig, RTNConfig, NF4Config)
SEQUENTIAL_MODES = ("layer", "block", "none")
#: Diagonal given to padded inputs, relative to mean(diag Sigma).
PAD_DIAGONAL = 1e-6
#: Condition number (of the undampened Sigma, from its Cholesky factor) above which it is reported
#: as ill-conditioned (float32 has ~7 digits).
ILL_CONDITIONED = 1e7


# ----------------------------------------------------------------------------- one layer


@dataclasses.dataclass(frozen=True)
class DatawiseInfo:
    """Diagnostics of one `quantize_datawise` call.

    Attributes:
      method: "gptq" or "quantease".
      t2, t2_datafree: relative squared error ||E||^2 / ||W||^2 after / with data-free rounding.
      hessian_error, hessian_error_datafree: tr(E^T Sigma E) / tr(W^T Sigma W) after / data-free
        (on the given Sigma, original domain, outliers included).
      num_outliers: outliers stored (0 without).
      damp_added: absolute dampening added to Sigma_rot's diagonal by GPTQ (None if GPTQ did not run).
      num_dead_inputs: inputs with Sigma_ii == 0 (never active on the calibration data).
      sigma_condition: condition-number estimate of the undampened Sigma (inf if singular).
      notes: human-readable remarks (singular Sigma and how it was handled, ...).
      seconds: wall time.
    """

    method: str
    t2: float
    t2_datafree: float
    hessian_error: float
    hessian_error_datafree: float
    num_outliers: int
    damp_added: float | None
    num_dead_inputs: int
    sigma_condition: float
    notes: str
    seconds: float


def _rotate(x, h, signs):
    """R x along axis 0 (x padded to K_pad rows)."""
    if h > 1:
        return hadamard.block_hadamard(x, h, axis=0, normalize=True, signs=signs)
    return x if signs is None else x * signs.astype(x.dtype)[:, None]


def _unrotate(x, h, signs):
    if h > 1:
        return hadamard.block_hadamard(x, h, axis=0, normalize=True, transpose=True, signs=signs)
    return x if signs is None else x * signs.astype(x.dtype)[:, None]


@functools.partial(jax.jit, static_argnames=("h", "k_pad"))
def _prepare(w, sigma, signs, *, h, k_pad):
    """(W_rot, Sigma_rot) from W (K, N) and Sigma (K, K), both padded to K_pad first."""
    k = w.shape[0]
    w = jnp.pad(w.astype(jnp.float32), ((0, k_pad - k), (0, 0)))
    sigma = sigma.astype(jnp.float32)
    sigma = 0.5 * (sigma + sigma.T)
    mean_diag = jnp.mean(jnp.diagonal(sigma))
    tiny = PAD_DIAGONAL * jnp.where(mean_diag > 0, mean_diag, 1.0)
    pad_diag = jnp.concatenate([jnp.zeros((k,)), jnp.full((k_pad - k,), 1.0)]) * tiny
    sigma = jnp.pad(sigma, ((0, k_pad - k), (0, k_pad - k))) + jnp.diag(pad_diag)
    s_rot = _rotate(_rotate(sigma, h, signs).T, h, signs)
    return _rotate(w, h, signs), 0.5 * (s_rot + s_rot.T)


@functools.partial(jax.jit, static_argnames=("h", "k_pad"))
def _rotate_weight(w, signs, *, h, k_pad):
    """R pad(W) only (Sigma_rot is unchanged between outlier rounds)."""
    w = jnp.pad(w.astype(jnp.float32), ((0, k_pad - w.shape[0]), (0, 0)))
    return _rotate(w, h, signs)


@jax.jit
def _errors(w, w_hat, sigma):
    """(||E||^2, ||W||^2, tr(E^T Sigma E), tr(W^T Sigma W)) in float32 (HIGHEST precision)."""
    w = w.astype(jnp.float32)
    e = w_hat.astype(jnp.float32) - w
    se = jnp.matmul(sigma, e, precision=_HI)
    sw = jnp.matmul(sigma, w, precision=_HI)
    return jnp.sum(e * e), jnp.sum(w * w), jnp.sum(e * se), jnp.sum(w * sw)


def hessian_error(w: jax.Array, w_hat: jax.Array, sigma: jax.Array) -> float:
    """tr(E^T Sigma E) / tr(W^T Sigma W) for (K, N) kernels and a (K, K) Sigma (0 if W^T Sigma W = 0)."""
    _, _, he, hw = _errors(jnp.asarray(w), jnp.asarray(w_hat), jnp.asarray(sigma, jnp.float32))
    return float(he) / float(hw) if float(hw) > 0 else 0.0


@jax.jit
def _condition(sigma):
    """Condition estimate from the Cholesky factor's diagonal (inf when it fails: singular)."""
    sigma = sigma.astype(jnp.float32)
    chol = jnp.linalg.cholesky(0.5 * (sigma + sigma.T))
    d = jnp.abs(jnp.diagonal(chol))
    cond = (jnp.max(d) / jnp.min(d)) ** 2
    ok = jnp.all(jnp.isfinite(chol)) & (jnp.min(d) > 0)
    return jnp.where(ok, cond, jnp.inf), jnp.sum(jnp.diagonal(sigma) <= 0)


@jax.jit
def _lambda_max(sigma):
    """Power-iteration estimate of lambda_max(Sigma), raised by 1% (the IHT step safeguard covers a low one)."""
    v = jax.random.normal(jax.random.key(0), (sigma.shape[0],), jnp.float32)

    def body(_, v):
        y = jnp.matmul(sigma, v, precision=_HI)
        return y / jnp.maximum(jnp.linalg.norm(y), 1e-30)

    v = jax.lax.fori_loop(0, 100, body, v / jnp.linalg.norm(v))
    return 1.01 * jnp.linalg.norm(jnp.matmul(sigma, v, precision=_HI))


@functools.partial(jax.jit, static_argnames=("k", "steps"))
def _iht(w, w_hat, s_mat, sigma, lam, *, k, steps):
    """`steps` monotone IHT steps on S for f = tr(E^T Sigma E), E = w_hat + S - w (original domain)."""
    e = w_hat + s_mat - w
    pe = jnp.matmul(sigma, e, precision=_HI)
    f = jnp.sum(e * pe)
    s_mat, _, _, f, lam = monotone_iht(s_mat, e, pe, f, lam, sigma, k=k, steps=steps)
    return s_mat, f, lam


@functools.partial(jax.jit, static_argnames=("group_size", "h", "k"))
def _decode_original(codes, grid, scales, signs, *, group_size, h, k):
    """W_hat (K, N) in the original domain from int codes (K_pad/p, N)."""
    kc, n_cols = codes.shape
    p = grid.shape[1]
    vals = jnp.swapaxes(grid[codes], 1, 2).reshape(kc * p, n_cols)
    w_rot = vals * jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)
    return _unrotate(w_rot, h, signs)[:k]


@functools.partial(jax.jit, static_argnames=("k",))
def _sparse_leaves(s_mat, *, k):
    n_cols = s_mat.shape[1]
    _, idx = jax.lax.top_k(jnp.abs(s_mat.reshape(-1)), k)
    idx = jnp.sort(idx).astype(jnp.int32)
    return idx // n_cols, idx % n_cols, s_mat.reshape(-1)[idx].astype(jnp.float32)


def _check_sigma(sigma, k: int) -> jax.Array:
    if getattr(sigma, "ndim", None) != 2 or tuple(sigma.shape) != (k, k):
        raise ValueError(
            f"sigma must have shape (K, K) = {(k, k)}, got {getattr(sigma, 'shape', None)}"
        )
    sigma = jnp.asarray(sigma, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(sigma))):
        raise ValueError(f"sigma contains {int(jnp.sum(~jnp.isfinite(sigma)))} NaN/Inf values")
    return sigma


def quantize_datawise(
    w: jax.Array,
    sigma: jax.Array,
    spec: GPTQConfig | QuantEaseConfig,
    *,
    axis: int = 0,
    key: jax.Array | None = None,
) -> tuple[HiggsTensor, DatawiseInfo]:
    """Data-aware quantization of one weight to an ordinary `HiggsTensor`.

    Args:
      w: float weight, (K, N) for axis=0 (Flax kernel) or (N, K) for axis=1.
      sigma: (K, K) input second moment X^T X (any positive scaling: only ratios matter).
      spec: `GPTQConfig` or `QuantEaseConfig` around a HIGGS / RTN / NF4 base spec.
      axis: contraction axis of `w`.
      key: PRNG key; needed when the base spec uses random signs.

    Returns:
      (tensor, info): the tensor has the data-free quantizer's layout, signs and scales (bit
      for bit) and the method's codes (+ outliers); `info` reports errors before/after.

    Raises:
      ValueError: bad spec, shapes or non-finite inputs; a factorisation that fails even after
        dampening (GPTQ says which damp to raise).
    """
    t0 = time.perf_counter()
    qt, qt0, wk, t2_0, diag = _solve(w, sigma, spec, axis=axis, key=key)
    return qt, _info(spec, wk, qt, qt0, t2_0, sigma, diag, time.perf_counter() - t0)


def _solve(w, sigma, spec, *, axis, key):
    """Steps 1-4 of the module docstring: (tensor, data-free tensor, W as (K, N) float32,
    data-free t^2, (damp_added, num_outliers, num_dead, condition, notes))."""
    if not isinstance(spec, DATAWISE_TYPES):
        raise ValueError(f"spec must be a GPTQConfig or QuantEaseConfig, got {spec!r}")  # noqa: TRY004
    base = spec.base
    qt0, t2_0 = quantize_with_error(w, base, axis=axis, key=key)
    wk = jnp.asarray(w, jnp.float32)
    if qt0.contraction_axis == 1:
        wk = wk.T
    k, n_cols = wk.shape
    sigma = _check_sigma(sigma, k)
    h, g, k_pad, p = qt0.hadamard_size, qt0.group_size, qt0.k_pad, qt0.grid.p
    grid = jnp.asarray(grids.grid_values(qt0.grid), jnp.float32)
    scales = qt0.scales.astype(jnp.float32)
    w_rot, s_rot = _prepare(wk, sigma, qt0.signs, h=h, k_pad=k_pad)
    rtn_codes = unpack(qt0)

    cond, dead = _condition(sigma)
    cond, dead = float(cond), int(dead)
    notes = []
    if dead:
        notes.append(f"{dead} dead inputs (Sigma_ii = 0)")
    if not math.isfinite(cond) or cond > ILL_CONDITIONED:
        notes.append(
            "Sigma is singular"
            if not math.isfinite(cond)
            else f"Sigma is ill-conditioned (cond ~{cond:.2g})"
        )

    damp_added = None
    use_gptq = isinstance(spec, GPTQConfig) or spec.init == "gptq"
    codes = rtn_codes
    if use_gptq:
        block = max(p, spec.block_size - spec.block_size % p)
        codes, ginfo = gptq_quantize(
            w_rot, s_rot, grid=grid, scales=scales, group_size=g, damp=spec.damp, block_size=block
        )
        damp_added = float(ginfo.damp_added)
        if notes:
            notes.append(
                f"GPTQ dampening damp={spec.damp:g} added {damp_added:.3g} to the diagonal"
            )
    num_outliers = 0
    s_mat = None
    if isinstance(spec, QuantEaseConfig):
        codes, _, _ = quantease_quantize(
            w_rot,
            s_rot,
            grid=grid,
            scales=scales,
            group_size=g,
            num_sweeps=spec.num_sweeps,
            init_codes=codes,
        )
        if not use_gptq and notes:
            notes.append("QuantEase needs no inverse: no dampening")
        if spec.outlier_fraction is not None:
            num_outliers = round(spec.outlier_fraction * k * n_cols)
        if num_outliers:
            codes, s_mat = _outlier_rounds(
                wk, sigma, s_rot, codes, grid, scales, qt0, spec, num_outliers
            )
    packed = packing.pack_codes(codes.astype(jnp.int32), code_bits(qt0.grid))
    extra = {}
    if s_mat is not None:
        rows, cols, vals = _sparse_leaves(s_mat, k=num_outliers)
        extra = {"outlier_rows": rows, "outlier_cols": cols, "outlier_values": vals}
    qt = dataclasses.replace(qt0, codes=packed, **extra)
    qt.validate()
    return qt, qt0, wk, t2_0, (damp_added, num_outliers, dead, cond, "; ".join(notes))


def _info(spec, wk, qt, qt0, t2_0, sigma, diag, seconds) -> DatawiseInfo:
    """Errors of `qt` (and of the data-free `qt0`) against W (K, N) on Sigma."""
    sigma = jnp.asarray(sigma, jnp.float32)
    w_hat = dequantize(qt, jnp.float32)
    w_hat0 = dequantize(qt0, jnp.float32)
    if qt.contraction_axis == 1:
        w_hat, w_hat0 = w_hat.T, w_hat0.T
    e2, w2, he, hw = (float(x) for x in _errors(wk, w_hat, sigma))
    e02, _, he0, _ = (float(x) for x in _errors(wk, w_hat0, sigma))
    rel = lambda a, b: a / b if b > 0 else 0.0
    damp_added, num_outliers, dead, cond, notes = diag
    return DatawiseInfo(
        method=spec.method,
        t2=rel(e2, w2),
        t2_datafree=rel(e02, w2) if t2_0 is None else t2_0,
        hessian_error=rel(he, hw),
        hessian_error_datafree=rel(he0, hw),
        num_outliers=num_outliers,
        damp_added=damp_added,
        num_dead_inputs=dead,
        sigma_condition=cond,
        notes=notes,
        seconds=seconds,
    )


def can_share_solve(spec: Any) -> bool:
    """Whether layers with this spec and a common Sigma may be solved as one problem.

    True for GPTQ / QuantEase without outliers and without random signs: every output column is
    then an independent problem given Sigma (same rotation, per-column scales, codes packed per
    column), so the columns of several kernels can be concatenated. Outliers (a top-k over the
    whole matrix) and per-layer random signs (a per-layer Sigma_rot) are layer-specific.
    """
    if not is_datawise(spec):
        return False
    if isinstance(spec, QuantEaseConfig) and spec.outlier_fraction is not None:
        return False
    return not (isinstance(spec.base, HiggsConfig) and spec.base.random_signs)


def quantize_datawise_shared(
    ws: Sequence[jax.Array], sigma: jax.Array, spec: GPTQConfig | QuantEaseConfig
) -> list[tuple[HiggsTensor, DatawiseInfo]]:
    """`quantize_datawise` for several (K, N_i) kernels that read the same input (q/k/v, gate/up).

    The kernels are concatenated along N and solved once (one Sigma factorisation, one sequential
    GPTQ / QuantEase pass instead of one per kernel): per column this is exactly the problem each
    kernel poses alone (see `can_share_solve`), so the result equals
    ``[quantize_datawise(w, sigma, spec) for w in ws]`` up to float rounding in the shared matmuls.

    Args:
      ws: (K, N_i) float kernels (contraction axis 0), same K.
      sigma: (K, K) input second moment.
      spec: a spec for which `can_share_solve` holds.

    Returns:
      One (tensor, info) per kernel; `info.seconds` is the shared wall time split by columns.

    Raises:
      ValueError: empty `ws`, different K, non-2-D kernels, or a spec that cannot share a solve.
    """
    t0 = time.perf_counter()
    if not can_share_solve(spec):
        raise ValueError(
            f"spec {spec!r} cannot share one solve between kernels (needs GPTQ/QuantEase without "
            "outliers or random signs)"
        )
    ws = [jnp.asarray(w) for w in ws]
    if not ws or any(w.ndim != 2 for w in ws) or len({w.shape[0] for w in ws}) != 1:
        raise ValueError(
            f"ws must be non-empty (K, N_i) kernels with one K, got {[w.shape for w in ws]}"
        )
    qt, qt0, wk, _, diag = _solve(jnp.concatenate(ws, axis=1), sigma, spec, axis=0, key=None)
    total = sum(w.shape[1] for w in ws)
    seconds = time.perf_counter() - t0
    out, c0 = [], 0
    for w in ws:
        c1 = c0 + w.shape[1]
        part = lambda t: dataclasses.replace(
            t, codes=t.codes[:, c0:c1], scales=t.scales[:, c0:c1], shape=tuple(w.shape)
        )
        qi, qi0 = part(qt), part(qt0)
        qi.validate()
        info = _info(
            spec, wk[:, c0:c1], qi, qi0, None, sigma, diag, seconds * w.shape[1] / total
        )
        out.append((qi, info))
        c0 = c1
    return out


def _outlier_rounds(wk, sigma, s_rot, codes, grid, scales, qt0, spec, num_outliers):
    """Alternates IHT on S (original domain) and one QuantEase sweep on R pad(W - S)."""
    h, g, k_pad = qt0.hadamard_size, qt0.group_size, qt0.k_pad
    k = wk.shape[0]
    lam = _lambda_max(sigma)
    s_mat = jnp.zeros_like(wk)
    for _ in range(spec.outlier_iters):
        w_hat = _decode_original(codes, grid, scales, qt0.signs, group_size=g, h=h, k=k)
        s_mat, _, lam = _iht(wk, w_hat, s_mat, sigma, lam, k=num_outliers, steps=spec.iht_steps)
        target = _rotate_weight(wk - s_mat, qt0.signs, h=h, k_pad=k_pad)
        codes, _, _ = quantease_quantize(
            target, s_rot, grid=grid, scales=scales, group_size=g, num_sweeps=1, init_codes=codes
        )
    return codes, s_mat


# ----------------------------------------------------------------------------- plans


def _spec_ok(spec) -> bool:
    return spec is None or isinstance(spec, _PLAIN_TYPES + DATAWISE_TYPES)


def plan_datawise(params: Any, rules) -> dict[str, LayerPlan]:
    """A plan whose specs may be data-aware: rules are (regex, spec | None[, axis]) with spec a
    plain spec (data-free for that layer), a `GPTQConfig` / `QuantEaseConfig`, or None (kept);
    a single spec means "every kernel but embeddings / lm_head". First match wins.

    Planning (padding, bits/weight) uses each data-aware spec's base; the returned `LayerPlan`s
    carry the data-aware spec itself.
    """
    if _spec_ok(rules) and rules is not None:
        rules = ((EXCLUDE_EMBEDDINGS.pattern, None), (KERNEL_PATTERN, rules))
    if not isinstance(rules, Sequence) or isinstance(rules, str) or not rules:
        raise ValueError(
            f"rules must be a non-empty sequence of (regex, spec[, axis]), got {rules!r}"
        )
    plain, wrapped = [], {}
    for i, r in enumerate(rules):
        required = True
        if isinstance(r, _PlainRule):
            r, required = (r.pattern, r.spec, r.axis), r.required
        if not isinstance(r, tuple) or len(r) not in (2, 3) or not _spec_ok(r[1]):
            raise ValueError(
                f"rule {i} must be (regex, spec | None[, axis]) with spec HiggsConfig/RTNConfig/"
                f"NF4Config/GPTQConfig/QuantEaseConfig, got {r!r}"
            )
        wrapped[i] = r[1]
        required = required and not (r[0] == EXCLUDE_EMBEDDINGS.pattern and r[1] is None)
        plain.append(_PlainRule(r[0], base_spec(r[1]), *(r[2:] or (0,)), required=required))
    base_plan = plan_quantization(params, plain)
    out = {}
    for path, lp in base_plan.items():
        m = re.match(r"rule (\d+) ", lp.reason)
        if lp.spec is not None and m and is_datawise(wrapped[int(m.group(1))]):
            lp = dataclasses.replace(lp, spec=wrapped[int(m.group(1))])
        out[path] = lp
    return out


def datawise_plan(
    plan: Mapping[str, LayerPlan], wrap: Callable[[Any], Any]
) -> dict[str, LayerPlan]:
    """Wraps every quantized entry of a plan (e.g. `allocation.dynamic.plan_from_choices`) in a
    data-aware method: ``datawise_plan(plan, lambda s: QuantEaseConfig(s))``."""
    out = {}
    for path, lp in plan.items():
        if lp.spec is not None and not is_datawise(lp.spec):
            new = wrap(lp.spec)
            if not _spec_ok(new):
                raise ValueError(f"wrap returned {new!r} for {path!r}: not a spec")
            lp = dataclasses.replace(
                lp, spec=new, reason=f"{lp.reason} + {getattr(new, 'method', 'plain')}"
            )
        out[path] = lp
    return out


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass
class DatawiseLayerReport(LayerReport):
    """A `LayerReport` with the data-aware diagnostics (errors before = data-free rounding)."""

    t2_datafree: float | None = None
    hessian_error: float | None = None
    hessian_error_datafree: float | None = None
    num_outliers: int = 0
    notes: str = ""


@dataclasses.dataclass
class DatawiseReport(QuantReport):
    """`QuantReport` plus the calibration settings and timings."""

    calibration: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {**super().summary(), "calibration": self.calibration}

    def table(self) -> str:
        lines = [super().table()]
        rows = [
            r
            for r in self.layers
            if isinstance(r, DatawiseLayerReport) and r.hessian_error is not None
        ]
        if rows:
            lines.append(
                f"{'layer':48s} {'H-err data-free':>15s} {'H-err':>9s} {'t2 free':>9s} {'t2':>9s}"
            )
            for r in rows:
                lines.append(
                    f"{r.path[-48:]:48s} {r.hessian_error_datafree:15.5f} {r.hessian_error:9.5f} "
                    f"{r.t2_datafree:9.5f} {r.t2:9.5f}" + (f"  [{r.notes}]" if r.notes else "")
                )
        return "\n".join(lines)


_BLOCK_RE = re.compile(r"^layers_(\d+)/(.+)/kernel$")


def _locate(path: str) -> tuple[int, str, str] | None:
    """(block, sub-path, tap) for a block linear kernel, (-1, 'lm_head', tap) for the LM head."""
    if path == "lm_head/kernel":
        return -1, "lm_head", cal.LM_HEAD_TAP
    m = _BLOCK_RE.match(path)
    if m and m.group(2) in LINEAR_INPUTS:
        return int(m.group(1)), m.group(2), LINEAR_INPUTS[m.group(2)]
    return None


def _set(tree: dict, keys: Sequence[str], value) -> dict:
    """Copy of nested dict `tree` with tree[keys...] = value (other branches shared)."""
    out = dict(tree)
    out[keys[0]] = value if len(keys) == 1 else _set(tree[keys[0]], keys[1:], value)
    return out


def quantize_params_datawise(
    params: Mapping[str, Any],
    config: LlamaConfig,
    calib_tokens: Any,
    rules_or_plan: Any,
    *,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    key: jax.Array | None = None,
    progress: bool = False,
    cache_dir: str | None = None,
    calib_source: str | None = None,
    sequential: str = "layer",
    batch_size: int = 8,
    dtype: Any = jnp.float32,
    share_inputs: bool = True,
) -> tuple[Any, DatawiseReport]:
    """Quantizes a Llama-family params tree with calibration data, block by block.

    Args:
      params: the model's params tree (`higgs_jax.models.llama` layout, full precision).
      config: its `LlamaConfig`.
      calib_tokens: 1-D token stream of the calibration text (never the evaluation split).
      rules_or_plan: rules for `plan_datawise` (plain specs = data-free for that layer, GPTQConfig /
        QuantEaseConfig = data-aware, None = kept), a single spec, or a precomputed plan
        ``{path: LayerPlan}`` (e.g. ``datawise_plan(plan_from_choices(...), GPTQConfig)``).
      num_samples: calibration windows (distinct random starts).
      seqlen: tokens per window (<= max_position_embeddings).
      seed: seed of the window starts.
      key: PRNG key for random signs (per layer: fold_in(key, hash(path)), as `quantize_params`).
      progress: tqdm bar over blocks.
      cache_dir: if set, Sigma is loaded from it when present (its metadata must match, else
        ValueError naming the field), else computed and saved there. With a cache, no forward
        pass runs.
      calib_source: name of the calibration text, recorded in the cache metadata.
      sequential: "layer" (default), "block" or "none" (see the module docstring).
      batch_size: windows per forward pass (bounds activation memory).
      dtype: compute dtype of the forward passes.
      share_inputs: solve kernels of one block that read the same input and have the same spec
        (q/k/v, gate/up) as one problem (`quantize_datawise_shared`; when `can_share_solve`):
        same result up to float rounding, fewer sequential steps and factorisations.

    Returns:
      (quantized params, `DatawiseReport`).

    Raises:
      ValueError: bad arguments, calibration text too short, a data-aware spec on a leaf that is
        not a linear layer of the model, cache mismatch.
    """
    t_start = time.perf_counter()
    if sequential not in SEQUENTIAL_MODES:
        raise ValueError(f"sequential must be one of {SEQUENTIAL_MODES}, got {sequential!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(share_inputs, bool):
        raise ValueError(f"share_inputs must be a bool, got {share_inputs!r}")
    if isinstance(seqlen, int) and seqlen > config.max_position_embeddings:
        raise ValueError(
            f"seqlen={seqlen} exceeds max_position_embeddings={config.max_position_embeddings}"
        )
    if isinstance(rules_or_plan, Mapping):
        plan = dict(rules_or_plan)
        for p, lp in plan.items():
            if not isinstance(lp, LayerPlan) or not _spec_ok(lp.spec):
                raise ValueError(f"plan entry {p!r} is not a LayerPlan with a valid spec: {lp!r}")
    else:
        plan = plan_datawise(params, rules_or_plan)
    leaves = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(leaves) - set(plan))
    if missing:
        raise ValueError(f"plan has no entry for leaves {missing[:4]}")

    # Which (block, tap) statistics are needed, and which layers sit where.
    by_block: dict[int, list[tuple[str, str, str]]] = {}
    need: set[tuple[int, str]] = set()
    for path, lp in plan.items():
        if lp.spec is None:
            continue
        loc = _locate(path)
        if loc is None:
            if is_datawise(lp.spec):
                raise ValueError(
                    f"layer {path!r}: data-aware methods need the layer's inputs, which are known "
                    "for the decoder blocks' linear kernels and lm_head/kernel only"
                )
            continue
        if is_datawise(lp.spec) and lp.axis != 0:
            raise ValueError(
                f"layer {path!r}: model kernels have contraction axis 0, the plan says {lp.axis}"
            )
        by_block.setdefault(loc[0], []).append((path, loc[1], loc[2]))
        if is_datawise(lp.spec):
            need.add((loc[0], loc[2]))
    tokens = np.asarray(calib_tokens)
    windows = cal.sample_windows(tokens, num_samples, seqlen, seed) if need else None
    if windows is not None and (int(windows.max()) >= config.vocab_size or int(windows.min()) < 0):
        raise ValueError(f"calibration token ids must lie in [0, {config.vocab_size})")

    meta = None
    cached: dict[str, np.ndarray] | None = None
    if need:
        meta = {
            "model": cal.model_fingerprint(params, config),
            "text": calib_source,
            "text_hash": cal.tokens_hash(tokens),
            "num_samples": int(num_samples),
            "seqlen": int(seqlen),
            "seed": int(seed),
            "sequential": sequential,
            "num_tokens": int(num_samples) * int(seqlen),
            "quantization": "fp model" if sequential == "none" else _plan_signature(plan),
            "key": None if key is None or sequential == "none" else _key_signature(key),
        }
        if cache_dir is not None and cal.cache_exists(cache_dir):
            compare = {k: v for k, v in meta.items() if k != "text"}
            cached, _ = cal.load_sigmas(cache_dir, compare)
            absent = sorted(
                f"layers_{b}.{t}" if b >= 0 else t
                for b, t in need
                if (f"layers_{b}.{t}" if b >= 0 else t) not in cached
            )
            if absent:
                raise ValueError(f"Sigma cache {cache_dir} lacks statistics {absent[:4]}")

    results: dict[str, tuple[Any, LayerReport]] = {}

    def quantize_leaf(path: str, sigma: np.ndarray | None):
        lp = plan[path]
        leaf = leaves[path]
        t0 = time.perf_counter()
        try:
            if is_datawise(lp.spec):
                qt, info = quantize_datawise(
                    leaf,
                    jnp.asarray(sigma) / meta["num_tokens"],
                    lp.spec,
                    axis=lp.axis,
                    key=layer_key(key, path),
                )
                rep = DatawiseLayerReport(
                    path,
                    lp.shape,
                    lp.spec.method,
                    lp.spec.describe(),
                    qt.bits_per_weight,
                    info.t2,
                    time.perf_counter() - t0,
                    lp.reason,
                    t2_datafree=info.t2_datafree,
                    hessian_error=info.hessian_error,
                    hessian_error_datafree=info.hessian_error_datafree,
                    num_outliers=info.num_outliers,
                    notes=info.notes,
                )
            else:
                qt, t2 = quantize_with_error(leaf, lp.spec, axis=lp.axis, key=layer_key(key, path))
                rep = LayerReport(
                    path,
                    lp.shape,
                    lp.spec.method,
                    lp.spec.describe(),
                    qt.bits_per_weight,
                    t2,
                    time.perf_counter() - t0,
                    lp.reason,
                )
        except ValueError as e:
            raise ValueError(f"layer {path!r}: {e}") from None
        jax.block_until_ready(qt.codes)
        results[path] = (qt, rep)
        return dequantize(qt, jnp.dtype(leaf.dtype))

    def quantize_shared(paths: list[str], sigma: np.ndarray) -> list[jax.Array]:
        spec = plan[paths[0]].spec
        try:
            res = quantize_datawise_shared(
                [leaves[pth] for pth in paths], jnp.asarray(sigma) / meta["num_tokens"], spec
            )
        except ValueError as e:
            raise ValueError(f"layers {paths!r}: {e}") from None
        deqs = []
        for pth, (qt, info) in zip(paths, res):
            lp = plan[pth]
            jax.block_until_ready(qt.codes)
            results[pth] = (
                qt,
                DatawiseLayerReport(
                    pth,
                    lp.shape,
                    spec.method,
                    spec.describe(),
                    qt.bits_per_weight,
                    info.t2,
                    info.seconds,
                    lp.reason + " (solved with " + ", ".join(paths) + ")",
                    t2_datafree=info.t2_datafree,
                    hessian_error=info.hessian_error,
                    hessian_error_datafree=info.hessian_error_datafree,
                    num_outliers=info.num_outliers,
                    notes=info.notes,
                ),
            )
            deqs.append(dequantize(qt, jnp.dtype(leaves[pth].dtype)))
        return deqs

    def groups_of(stage_layers):
        """Stage layers as solve groups: same spec, shareable, contraction axis 0 -> one group."""
        if not share_inputs:
            return [[x] for x in stage_layers]
        out: list[list[tuple[str, str, str]]] = []
        for x in stage_layers:
            lp = plan[x[0]]
            for grp in out:
                lp0 = plan[grp[0][0]]
                if (
                    can_share_solve(lp.spec)
                    and lp0.spec == lp.spec
                    and lp.axis == lp0.axis == 0
                    and grp[0][2] == x[2]
                ):
                    grp.append(x)
                    break
            else:
                out.append([x])
        return out

    sig_store: dict[str, np.ndarray] = {}
    t_calib = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_layers, desc="datawise", unit="block")

    hs = None
    if need and cached is None:
        emb = params["embed_tokens"]["embedding"]
        hs = [
            cal.embed_batch(emb, jnp.asarray(windows[i : i + batch_size]), dtype=jnp.dtype(dtype))
            for i in range(0, num_samples, batch_size)
        ]

    def sigma_pass(lp_cur, block, taps):
        acc = {t: jnp.zeros((cal.tap_dims(config)[t],) * 2, jnp.float32) for t in taps}
        for hb in hs:
            acc = cal.block_sigma(
                lp_cur, hb, acc, config=config, taps=tuple(taps), dtype=jnp.dtype(dtype)
            )
        for t in taps:
            sig_store[f"layers_{block}.{t}"] = np.asarray(acc[t])

    try:
        for i in range(config.num_layers):
            todo = by_block.get(i, [])
            block_needs = [t for t in cal.BLOCK_TAPS if (i, t) in need]
            lp_fp = params[f"layers_{i}"]
            lp_cur = lp_fp
            if sequential == "layer":
                stages = [[t] for t in cal.BLOCK_TAPS]
            else:
                stages = [list(cal.BLOCK_TAPS)]
            for stage in stages:
                stage_layers = [x for x in todo if x[2] in stage]
                want = [t for t in stage if t in block_needs]
                if want and cached is None:
                    t1 = time.perf_counter()
                    sigma_pass(lp_fp if sequential == "none" else lp_cur, i, want)
                    t_calib += time.perf_counter() - t1
                src = cached if cached is not None else sig_store
                for grp in groups_of(stage_layers):
                    tap = grp[0][2]
                    if len(grp) > 1:
                        deqs = quantize_shared([x[0] for x in grp], src[f"layers_{i}.{tap}"])
                    else:
                        path = grp[0][0]
                        sigma = (
                            src.get(f"layers_{i}.{tap}") if is_datawise(plan[path].spec) else None
                        )
                        deqs = [quantize_leaf(path, sigma)]
                    for (_, sub, _), deq in zip(grp, deqs):
                        lp_cur = _set(lp_cur, sub.split("/") + ["kernel"], deq)
            if hs is not None and (i < config.num_layers - 1 or (-1, cal.LM_HEAD_TAP) in need):
                t1 = time.perf_counter()
                lp_prop = lp_fp if sequential == "none" else lp_cur
                hs = [
                    cal.block_forward(lp_prop, hb, config=config, dtype=jnp.dtype(dtype))
                    for hb in hs
                ]
                t_calib += time.perf_counter() - t1
            if bar is not None:
                bar.update(1)
        for path, _, tap in by_block.get(-1, []):
            sigma = None
            if is_datawise(plan[path].spec):
                if cached is None:
                    acc = jnp.zeros((config.hidden_size,) * 2, jnp.float32)
                    for hb in hs:
                        acc = cal.final_norm_sigma(
                            params["final_norm"]["scale"], hb, acc, eps=config.rms_norm_eps
                        )
                    sig_store[tap] = np.asarray(acc)
                sigma = (cached or sig_store)[tap]
            quantize_leaf(path, sigma)
    finally:
        if bar is not None:
            bar.close()

    if need and cached is None and cache_dir is not None:
        cal.save_sigmas(cache_dir, sig_store, meta)

    # Plain specs on leaves outside the blocks (and anything the loop did not reach).
    for path, lp in plan.items():
        if lp.spec is not None and path not in results:
            quantize_leaf(path, None)

    reports: list[LayerReport] = []

    def visit(path, leaf):
        p = path_str(path)
        if p in results:
            reports.append(results[p][1])
            return results[p][0]
        lp = plan[p]
        reports.append(
            LayerReport(p, lp.shape, "kept", "", lp.bits_per_weight, None, 0.0, lp.reason)
        )
        return leaf

    out = jax.tree_util.tree_map_with_path(visit, params)
    calib = {
        "num_samples": int(num_samples) if need else 0,
        "seqlen": int(seqlen) if need else 0,
        "seed": int(seed),
        "sequential": sequential,
        "text": calib_source,
        "cache": None if cache_dir is None else str(cache_dir),
        "cache_hit": cached is not None,
        "calibration_seconds": t_calib,
        "total_seconds": time.perf_counter() - t_start,
    }
    return out, DatawiseReport(reports, calibration=calib)


def _plan_signature(plan: Mapping[str, LayerPlan]) -> str:
    """A stable short description of what the plan does to every leaf (for the Sigma cache)."""
    import hashlib

    items = sorted((p, repr(lp.spec), lp.axis) for p, lp in plan.items())
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def _key_signature(key: jax.Array) -> str:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return ",".join(str(int(x)) for x in np.asarray(data).reshape(-1))
