"""Shared test machinery: the tolerance rule, NaN poisoning and the Triton interpreter bf16 fix.

The tolerance rule itself lives in ringattn.testing (the bench's GPU check uses it too).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ringattn.testing import GRAD_FACTOR, OUTPUT_FACTOR, peer_error_check

HAS_GPU = torch.cuda.is_available()
__all__ = ["GRAD_FACTOR", "OUTPUT_FACTOR", "HAS_GPU", "assert_within_peer_error", "nan_filled"]


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


def nan_filled(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer poisoned with NaN, so any element a kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


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


def install_interpreter_bf16_fix() -> None:
    """Patch the Triton interpreter once per process (no-op when already patched)."""
    from triton.runtime.interpreter import InterpreterBuilder

    if not hasattr(InterpreterBuilder.create_dot, "unpatched"):
        InterpreterBuilder.create_dot = _create_dot_bf16_upcast(InterpreterBuilder.create_dot)


@contextlib.contextmanager
def interpreter_without_bf16_fix():
    """Temporarily restore the interpreter's own create_dot (to show the fix is needed)."""
    from triton.runtime.interpreter import InterpreterBuilder

    patched = InterpreterBuilder.create_dot
    if not hasattr(patched, "unpatched"):
        raise RuntimeError("the bf16 interpreter fix is not installed")
    InterpreterBuilder.create_dot = patched.unpatched
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = patched
