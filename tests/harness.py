"""Shared test machinery: the tolerance rule, NaN poisoning and the Triton interpreter bf16 fix.

The tolerance rule itself lives in ringattn.testing (the bench's GPU check uses it too).
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

from ringattn.testing import GRAD_FACTOR, OUTPUT_FACTOR, peer_error_check

HAS_GPU = torch.cuda.is_available()
__all__ = [
    "GRAD_FACTOR",
    "OUTPUT_FACTOR",
    "HAS_GPU",
    "assert_within_peer_error",
    "contract_floor",
    "install_nan_poisoning",
    "nan_filled",
]


def assert_within_peer_error(
    ours: torch.Tensor,
    ref64: torch.Tensor,
    peer: torch.Tensor,
    *,
    factor: float = OUTPUT_FACTOR,
    eps: float = 1e-6,
    name: str = "output",
) -> None:
    """Assert max|ours - ref64| <= factor * max|peer - ref64| + eps (non-finite values fail)."""
    try:
        check = peer_error_check(ours, ref64, peer, factor=factor, eps=eps)
    except ValueError as exc:
        raise AssertionError(f"{name}: {exc}") from None
    assert check.ok, check.describe(name)


def contract_floor(dout, q, k, v, out, lse, ref_grads, **ref_kw) -> list[float]:
    """Max error of (dq, dk, dv) that exact fp64 arithmetic makes from the contract's fp32 inputs.

    The block contract hands a backward lse and delta = rowsum(dout * out) in fp32; ``out`` and
    ``lse`` here are the backend's own. Where the peer is exact by structure (a row with a single
    visible key: p = 1 and dS = 0 exactly) no backend can beat this floor, so checks add it to the
    rule's epsilon. It is computed per case, never a constant.
    """
    from ringattn.reference import attention_backward_ref

    delta32 = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    floor = attention_backward_ref(dout, q, k, v, lse.float(), delta=delta32, **ref_kw)
    return [(f - r).abs().max().item() if r.numel() else 0.0 for f, r in zip(floor, ref_grads, strict=True)]


def nan_filled(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer poisoned with NaN, so any element a kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------- NaN poisoning

POISONED_PACKAGES = ("ringattn", "tritonkernels")


def _poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh allocation with a value no kernel produces: NaN for floating dtypes, the most
    negative value for signed integers (-1 is meaningful in ringattn: "outside every document",
    "unbounded window"; a large negative position, length or index fails every range check), the
    largest for unsigned ones. bool has no invalid value and is left as allocated.

    Fake, meta and other subclass tensors (torch.compile tracing, fake implementations of custom
    ops) have no memory and are returned untouched, as are allocations under a dispatch mode, so a
    fill never enters a traced graph.
    """
    if type(t) is not torch.Tensor or t.is_meta or torch._C._len_torch_dispatch_stack() > 0:
        return t
    if t.dtype.is_floating_point:
        value = float("nan")
    elif t.dtype.is_complex:
        value = complex(float("nan"), float("nan"))
    elif t.dtype == torch.bool:
        return t
    else:
        info = torch.iinfo(t.dtype)
        value = info.min if info.min < 0 else info.max
    with torch.no_grad():
        t.fill_(value)
    return t


def _from_poisoned_package(depth: int = 2) -> bool:
    """True when the caller of the patched allocator is a module of ringattn or tritonkernels."""
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name.split(".", 1)[0] in POISONED_PACKAGES


def _poisoning(original):
    def allocate(*args, **kwargs):
        if torch.compiler.is_compiling():  # dynamo traces this wrapper: no frame inspection, no fill
            return original(*args, **kwargs)
        t = original(*args, **kwargs)
        return _poison(t) if _from_poisoned_package() else t

    allocate.unpoisoned = original
    allocate.__name__ = original.__name__
    allocate.__doc__ = original.__doc__
    return allocate


_POISONED = (
    (torch, "empty"),
    (torch, "empty_like"),
    (torch, "empty_strided"),
    (torch.Tensor, "new_empty"),
)


def install_nan_poisoning() -> None:
    """Make torch.empty, empty_like, empty_strided and Tensor.new_empty return poisoned memory when
    called from ringattn or tritonkernels (see ``_poison``), so an output element a kernel forgets
    to write fails the tolerance rule in every test, not only where a test passes ``nan_filled``
    buffers. Once per process; calls from anywhere else (torch itself, tests) are unchanged."""
    for owner, name in _POISONED:
        if not hasattr(getattr(owner, name), "unpoisoned"):
            setattr(owner, name, _poisoning(getattr(owner, name)))


def nan_poisoning_installed() -> bool:
    return all(hasattr(getattr(owner, name), "unpoisoned") for owner, name in _POISONED)


# ------------------------------------------------------------------------------ interpreter bf16 fix


def _create_dot_bf16_upcast(original):
    """Wrap InterpreterBuilder.create_dot so bf16 operands are upcast to fp32 first.

    triton 3.9's interpreter keeps bf16 tensors as raw uint16 numpy arrays and hands them to
    np.matmul, which multiplies the bit patterns as integers. bf16 is the top half of fp32, so a
    16-bit left shift recovers the exact fp32 value.
    """
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def upcast(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    create_dot.unpatched = original
    return create_dot


def _cast_impl_bf16_round_nearest(original):
    """Wrap InterpreterBuilder.cast_impl so fp32 -> bf16 rounds to nearest even, as the GPU's cvt.rn.

    triton 3.9's interpreter chops the low 16 bits (round toward zero), a biased error that grows
    with every rounded operand, and its "rtne" mode is wrong when rounding carries into the exponent.
    """
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return TensorHandle(rounded.reshape(src.data.shape), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.unpatched = original
    return cast_impl


def install_interpreter_bf16_fix() -> None:
    """Patch the Triton interpreter's bf16 handling once per process: tl.dot operands and fp32 -> bf16 casts."""
    from triton.runtime.interpreter import InterpreterBuilder

    if not hasattr(InterpreterBuilder.create_dot, "unpatched"):
        InterpreterBuilder.create_dot = _create_dot_bf16_upcast(InterpreterBuilder.create_dot)
    if not hasattr(InterpreterBuilder.cast_impl, "unpatched"):
        InterpreterBuilder.cast_impl = _cast_impl_bf16_round_nearest(InterpreterBuilder.cast_impl)


@contextlib.contextmanager
def interpreter_without_bf16_fix():
    """Temporarily restore the interpreter's own create_dot and cast_impl (to show the fixes are needed)."""
    from triton.runtime.interpreter import InterpreterBuilder

    patched = {name: getattr(InterpreterBuilder, name) for name in ("create_dot", "cast_impl")}
    if not all(hasattr(fn, "unpatched") for fn in patched.values()):
        raise RuntimeError("the bf16 interpreter fixes are not installed")
    for name, fn in patched.items():
        setattr(InterpreterBuilder, name, fn.unpatched)
    try:
        yield
    finally:
        for name, fn in patched.items():
            setattr(InterpreterBuilder, name, fn)


def launcher_rope(
    q, k, rope, *, q_positions=None, k_positions=None, q_span=(0, 1), k_span=(0, 1), cu_seqlens=None
):
    """``q_rope``/``k_rope`` keyword arguments of the Triton launchers for a RoPEConfig, resolved the
    way the block contract resolves them (positions default to the index within the document).
    Spans are ``ringattn.block.Span``s or (start, stride) tuples, as the launchers take them."""
    if rope is None:
        return {}
    from ringattn.backends.triton import rope_tables_for
    from ringattn.block import BlockMask, Span, block_args

    q_span, k_span = (s if isinstance(s, Span) else Span(*s) for s in (q_span, k_span))
    mask = BlockMask(False, q_span, k_span, cu_seqlens)
    args = block_args(q, k, k, mask, rope=rope, q_positions=q_positions, k_positions=k_positions)
    return {"q_rope": rope_tables_for(rope, args.q_rope), "k_rope": rope_tables_for(rope, args.k_rope)}
