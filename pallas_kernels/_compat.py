"""Every backend-specific Pallas Triton call lives here.

The Triton backend of Pallas is deprecated upstream from jax 0.11 (it warns on use) and its API
has moved before (``TritonCompilerParams`` -> ``CompilerParams``). Kernels import the helpers
below instead of touching ``jax.experimental.pallas.triton`` directly, so a future move is a
one-file change.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp

# Triton supports NVIDIA GPUs from compute capability 8.0 (Ampere) in current releases; older
# chips (T4 is 7.5) still compile for most kernels but Triton dropped official support.
MIN_COMPUTE_CAPABILITY = (7, 5)


@contextlib.contextmanager
def quiet_triton_deprecation():
    """Silences the Triton-backend deprecation warning jax >= 0.11 emits on import and lowering."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Tt]riton.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*[Tt]riton.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*[Tt]riton.*", category=UserWarning)
        yield


def _plgpu():
    with quiet_triton_deprecation():
        from jax.experimental.pallas import triton as plgpu
    return plgpu


def compiler_params(num_warps: int, num_stages: int) -> Any:
    """Backend compiler params for ``pallas_call`` (name differs across jax versions)."""
    plgpu = _plgpu()
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def load(
    ref_at: Any, *, mask: jax.Array | None = None, other: Any = None, volatile: bool = False
) -> jax.Array:
    """Masked load of a ref view (``ref.at[...]``); a plain ``ref[...]`` when unmasked.

    ``volatile=True`` (GPU only) emits ``ld.volatile``: the compiler keeps it in program order
    with the other memory operations, so a prefetch written at the top of a loop body is issued
    there instead of being sunk to the end of the body (measured: it was, without it).
    """
    if volatile:
        return _plgpu().load(ref_at, mask=mask, other=other, volatile=True)
    if mask is None:
        return ref_at[...]
    return _plgpu().load(ref_at, mask=mask, other=other)


def store(ref_at: Any, val: jax.Array, *, mask: jax.Array | None = None) -> None:
    if mask is None:
        ref_at[...] = val
        return
    _plgpu().store(ref_at, val, mask=mask)


def block_barrier(*, interpret: bool) -> None:
    """``bar.sync`` over the program's threads (GPU); nothing in interpret mode, where a program
    runs as one sequential computation."""
    if not interpret:
        _plgpu().debug_barrier()


def atomic_add(ref: Any, idx: Any, val: jax.Array) -> jax.Array:
    """Atomic ``ref[idx] += val`` (acquire-release, GPU scope on the device); returns the old
    value. A scalar ``idx``/``val`` is one atomic per program."""
    return _plgpu().atomic_add(ref, idx, val)


def gpu_compute_capability(device: Any | None = None) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU device, None for anything else."""
    try:
        device = device or jax.devices()[0]
    except RuntimeError:
        return None
    if device.platform != "gpu":
        return None
    kind = getattr(device, "device_kind", "") or ""
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None if "nvidia" not in kind.lower() and "h100" not in kind.lower() else (9, 0)
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def device_kind(device: Any | None = None) -> str:
    device = device or jax.devices()[0]
    return str(getattr(device, "device_kind", device.platform)).replace(" ", "_")


# ----------------------------------------------------------------- register-level PTX helpers
# Inline PTX (NVIDIA only) for the byte-LUT GEMV kernel; `interpret=True` gives the plain-jnp
# equivalent, bit for bit the same arithmetic except for FMA rounding (one rounding instead of
# two), so CPU tests check the same dataflow.


def byte_of(word: jax.Array, b: int, *, interpret: bool) -> jax.Array:
    """Byte ``b`` (0 = least significant) of each uint32 as an int32 in [0, 256).

    On the GPU one PTX ``prmt`` (byte permute; selector nibbles 4 pick the zero operand) instead
    of a shift and a mask. The result is declared int32: Triton's inline-asm op accepts only
    signless integer results, which jax produces for int32 but not for uint32.
    """
    import jax.numpy as jnp
    import numpy as np

    if interpret:
        return ((word >> np.uint32(8 * b)) & np.uint32(0xFF)).astype(jnp.int32)
    (out,) = _plgpu().elementwise_inline_asm(
        "{ .reg .b32 z; mov.b32 z, 0; prmt.b32 $0, $1, z, " + hex(0x4440 | b) + "; }",
        args=[word],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(word.shape, jnp.int32)],
    )
    return out


def bf16_pair_fma(
    pair: jax.Array, xa: jax.Array, xb: jax.Array, acc: jax.Array, *, interpret: bool
) -> jax.Array:
    """``acc + lo(pair) * xa + hi(pair) * xb`` in f32, for a uint32 holding two bf16 values.

    bf16 -> f32 is exact (a 16-bit shift of the bit pattern). On the GPU: one shift, one and,
    two fused multiply-adds in a single inline-PTX block (XLA's Triton pipeline does not fuse
    a separate multiply and add, measured: FMUL + FADD in the SASS).
    """
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    if interpret:
        lo = lax.bitcast_convert_type(pair << np.uint32(16), jnp.float32)
        hi = lax.bitcast_convert_type(pair & np.uint32(0xFFFF0000), jnp.float32)
        return acc + lo * xa + hi * xb
    (out,) = _plgpu().elementwise_inline_asm(
        "{ .reg .b32 lo, hi; .reg .f32 t;"
        " shl.b32 lo, $1, 16;"
        " and.b32 hi, $1, 0xffff0000;"
        " fma.rn.f32 t, lo, $2, $4;"
        " fma.rn.f32 $0, hi, $3, t; }",
        args=[pair, xa, xb, acc],
        constraints="=f,r,f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(acc.shape, jnp.float32)],
    )
    return out


def fma_f32(a: jax.Array, b: jax.Array, c: jax.Array, *, interpret: bool) -> jax.Array:
    """``a * b + c`` in f32 as one fused multiply-add on the GPU (inline PTX)."""
    import jax.numpy as jnp

    if interpret:
        return a * b + c
    (out,) = _plgpu().elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;",
        args=[a, b, c],
        constraints="=f,f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.float32)],
    )
    return out


def unary_pair_asm(words: jax.Array, text: str, dtype: Any) -> jax.Array:
    """One-operand, one-result inline PTX over integer ``words`` giving a 16-bit float per word,
    two words per asm instance; ``$0`` out holds both values, the first in its low half. uint32
    words arrive as ``$1``, ``$2``; 16-bit words packed into one register ``$1`` (the first in
    its low half). Pure and unary, so Triton may hoist a dot operand's layout conversion through
    it (`pallas_kernels.higgs_matmul.pairdec`, `nkpair`)."""
    bits = jnp.dtype(words.dtype).itemsize * 8
    if bits not in (16, 32):
        raise ValueError(f"unary_pair_asm takes 16- or 32-bit words, got {words.dtype}")
    (out,) = _plgpu().elementwise_inline_asm(
        text,
        args=[words],
        constraints="=r,r,r" if bits == 32 else "=r,r",
        pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, dtype)],
    )
    return out


_MULTI_ASM_P = None


def _multi_result_asm_primitive():
    """A twin of Pallas Triton's ``elementwise_inline_asm_p`` whose lowering returns every result.

    jax's own lowering rule (0.10 and 0.11.2) wraps the op's results in a one-element list, so
    an asm block with several outputs fails to lower ("16 outvars do not match 1 outvals"). This
    primitive binds the same ``tt.elementwise_inline_asm`` op and unpacks its results. Private
    jax modules: keep this function the only place that touches them.
    """
    global _MULTI_ASM_P
    if _MULTI_ASM_P is not None:
        return _MULTI_ASM_P
    with quiet_triton_deprecation():
        from jax._src import core as jax_core
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as tl_lowering
        from jax.interpreters import mlir

    prim = jax_core.Primitive("higgs_multi_result_inline_asm")
    prim.multiple_results = True

    @prim.def_abstract_eval
    def _abstract(*avals, result_shape_dtypes, **_):
        if not all(a.shape == avals[0].shape for a in avals):
            raise ValueError("all arguments of an elementwise inline asm need the same shape")
        return [jax_core.ShapedArray(s.shape, s.dtype) for s in result_shape_dtypes]

    def _lower(ctx, *args, asm, constraints, pack, result_shape_dtypes):
        del result_shape_dtypes
        types = [mlir.aval_to_ir_type(ctx.context.mlir_ctx, a) for a in ctx.avals_out]
        op = tt_dialect.ElementwiseInlineAsmOp(
            types, asm, constraints=constraints, pure=True, packed_element=pack, args=args
        )
        return list(op.results)

    tl_lowering.register_lowering(prim)(_lower)
    _MULTI_ASM_P = prim
    return prim


def inline_asm(
    text: str, constraints: str, args: list, out_dtypes: list, shape: tuple[int, ...]
) -> list:
    """Elementwise inline PTX over same-shaped ``args`` (one element per asm instance), any
    number of results (see `_multi_result_asm_primitive`)."""
    prim = _multi_result_asm_primitive()
    return list(
        prim.bind(
            *args,
            asm=text,
            constraints=constraints,
            pack=1,
            result_shape_dtypes=tuple(jax.ShapeDtypeStruct(shape, d) for d in out_dtypes),
        )
    )


_DOT_ACC_P = None


def _dot_acc_primitive():
    """``acc + a @ b`` as one Triton ``tt.dot`` with ``acc`` as its accumulator operand.

    jax's lowering of ``jnp.dot`` in a Pallas Triton kernel always emits ``tt.dot(a, b, 0)``
    followed by an ``arith.addf`` with the running sum, and Triton 3.6 does not fold the two:
    the SASS keeps one FADD per output element per dot (session 8, `benchmarks/sass_count.py`).
    Private jax modules: keep this function the only place that touches them.
    """
    global _DOT_ACC_P
    if _DOT_ACC_P is not None:
        return _DOT_ACC_P
    with quiet_triton_deprecation():
        from jax._src import core as jax_core
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as tl_lowering

    prim = jax_core.Primitive("higgs_dot_acc")

    @prim.def_abstract_eval
    def _abstract(a, b, acc):
        return jax_core.ShapedArray(acc.shape, acc.dtype)

    def _lower(ctx, a, b, acc):
        del ctx
        return tt_dialect.dot(a, b, acc, input_precision=None)

    tl_lowering.register_lowering(prim)(_lower)
    _DOT_ACC_P = prim
    return prim


def dot_acc(a: jax.Array, b: jax.Array, acc: jax.Array, *, interpret: bool) -> jax.Array:
    """``acc + a @ b`` with f32 accumulation inside a kernel: (M, K) x (K, N) + (M, N) f32.

    ``a`` and ``b`` share one 16-bit float dtype (a tensor-core dot). On the GPU this is one
    ``tt.dot`` carrying ``acc`` (see `_dot_acc_primitive`); with ``interpret`` the same sum in
    jax.numpy.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"dot_acc needs (M, K) x (K, N), got {a.shape} x {b.shape}")
    if acc.shape != (a.shape[0], b.shape[1]) or acc.dtype != jnp.float32:
        raise ValueError(
            f"dot_acc needs a float32 accumulator of shape {(a.shape[0], b.shape[1])}, got "
            f"{acc.dtype}{list(acc.shape)}"
        )
    if a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"dot_acc needs two bf16 or two f16 operands, got {a.dtype}, {b.dtype}")
    if interpret:
        return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)
    return _dot_acc_primitive().bind(a, b, acc)


# ----------------------------------------------------------------- pipelining a loop without a dot
#: Kernel-name suffix that asks for a pipelined main loop: ``<name>_ls<stages>`` (`loop_stages_name`).
_LOOP_STAGES_SUFFIX = re.compile(r"_ls(\d+)$")
_LOOP_HOOK: bool | None = None


def loop_stages_name(name: str, stages: int) -> str:
    """The ``pallas_call`` name that makes `install_loop_stages_hook` mark the kernel's loops
    with ``stages`` (unchanged for 0)."""
    if not isinstance(stages, int) or stages < 0:
        raise ValueError(f"loop stages must be an int >= 0, got {stages!r}")
    return f"{name}_ls{stages}" if stages else name


def _mark_loops(op: Any, stages: int, ir: Any) -> int:
    """Sets ``tt.num_stages`` on every ``scf.for`` nested in ``op``; returns how many."""
    count = 0
    if op.name == "scf.for":
        with op.context, ir.Location.unknown():
            op.attributes["tt.num_stages"] = ir.IntegerAttr.get(
                ir.IntegerType.get_signless(32), stages
            )
        count += 1
    for region in op.regions:
        for block in region:
            for child in block:
                count += _mark_loops(child.operation, stages, ir)
    return count


def install_loop_stages_hook() -> bool:
    """Lets a Pallas Triton kernel ask Triton to software-pipeline its main loop.

    Triton's pipeliner stages (cp.async into shared memory) only the loads that feed a dot, unless
    the loop itself carries a ``tt.num_stages`` attribute, which Triton's Python frontend sets per
    loop (``tl.range(..., num_stages=)``) and Pallas has no way to request. This wraps jax's
    Pallas-to-Triton lowering: a module whose name ends in ``_ls<k>`` (`loop_stages_name`) gets
    ``tt.num_stages = k`` on its ``scf.for`` loops; every other kernel is left untouched.
    Idempotent. Returns False when this jax has no such lowering function to wrap. Private jax
    modules: keep this function the only place that touches them.
    """
    global _LOOP_HOOK
    if _LOOP_HOOK is False:
        return False
    try:
        with quiet_triton_deprecation():
            from jax._src.lib.mlir import ir
            from jax._src.pallas.triton import lowering as tl_lowering
        orig = tl_lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError):
        _LOOP_HOOK = False
        return False
    if getattr(orig, "_higgs_loop_stages", False):
        return True  # already wrapped (someone may have swapped it since: re-check every time)

    def lower(*args, **kwargs):
        result = orig(*args, **kwargs)
        op = result.module.operation
        match = _LOOP_STAGES_SUFFIX.search(ir.StringAttr(op.attributes["sym_name"]).value)
        if match:
            _mark_loops(op, int(match.group(1)), ir)
        return result

    lower._higgs_loop_stages = True
    tl_lowering.lower_jaxpr_to_triton_module = lower
    _LOOP_HOOK = True
    return True


# ----------------------------------------------------------------- L2 prefetch of global memory
_PREFETCH_P = None


def _prefetch_primitive():
    """``prefetch.global.L2`` of ``ref``'s elements at int32 ``offsets`` (one PTX prefetch each).

    A prefetch only warms the L2 cache: no register receives the data and the warp does not wait
    for it, so it puts DRAM reads in flight ahead of the loads that will need them, without the
    register or shared-memory cost of loading early. The primitive takes the whole ref (a Triton
    pointer once lowered) and flat element offsets; it carries an effect of its own so jax keeps
    it although nothing uses its (empty) result. Private jax modules: keep this function the only
    place that touches them.
    """
    global _PREFETCH_P
    if _PREFETCH_P is not None:
        return _PREFETCH_P
    with quiet_triton_deprecation():
        from jax._src import core as jax_core
        from jax._src import effects as jax_effects
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas import core as pallas_core
        from jax._src.pallas.triton import lowering as tl_lowering

    class PrefetchEffect(jax_core.Effect):
        pass

    effect = PrefetchEffect()
    pallas_core.kernel_local_effects.add_type(PrefetchEffect)
    jax_effects.control_flow_allowed_effects.add_type(PrefetchEffect)

    prim = jax_core.Primitive("higgs_prefetch_l2")
    prim.multiple_results = True

    @prim.def_effectful_abstract_eval
    def _abstract(ref, offsets):
        del ref
        if offsets.dtype != jnp.int32:
            raise ValueError(f"prefetch offsets must be int32, got {offsets.dtype}")
        return (), {effect}

    def _lower(ctx, ptr, offsets):
        info = ctx.block_infos[0] if ctx.block_infos else None
        if info is not None and tuple(info.block_shape) != tuple(info.full_shape_dtype.shape):
            raise NotImplementedError(
                f"prefetch_l2 needs a whole-array ref, got a block {info.block_shape} of "
                f"{info.full_shape_dtype.shape}"
            )
        shape = list(ir.RankedTensorType(offsets.type).shape)
        ptrs = tt_dialect.splat(ir.RankedTensorType.get(shape, ptr.type), ptr)
        ptrs = tt_dialect.addptr(ptrs.type, ptrs, offsets)
        i32 = ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(32))
        tt_dialect.ElementwiseInlineAsmOp(
            [i32],
            "prefetch.global.L2 [$1]; mov.b32 $0, 0;",
            constraints="=r,l",
            pure=False,
            packed_element=1,
            args=[ptrs],
        )
        return []

    tl_lowering.register_lowering(prim)(_lower)
    _PREFETCH_P = prim
    return prim


def prefetch_l2(ref: Any, offsets: jax.Array, *, interpret: bool) -> None:
    """Ask the GPU to bring ``ref``'s elements at flat int32 ``offsets`` into L2 (no result).

    ``ref``: a whole kernel argument (not a ``.at[...]`` view); offsets count elements from its
    start and must stay inside it. A no-op with ``interpret`` (the CPU has nothing to warm), so
    the kernel computes the same values either way.
    """
    offsets = jnp.asarray(offsets)
    if offsets.dtype != jnp.int32:
        raise ValueError(f"prefetch_l2 needs int32 offsets, got {offsets.dtype}")
    if interpret:
        return
    _prefetch_primitive().bind(ref, offsets)
