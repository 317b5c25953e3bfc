"""Shared test machinery: the tolerance rule, NaN poisoning and the Triton interpreter bf16 fix.

Tolerance rule (DESIGN.md): |ours - ref64| <= factor * |torch_same_dtype - ref64| + eps, in max norm,
with factor 2 for outputs and 3 for gradients. The peer is plain torch run in the dtype under test,
so a kernel is held to the accuracy that dtype allows, never to a hand-picked tolerance.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

HAS_GPU = torch.cuda.is_available()
OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


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
    if ours.shape != ref64.shape or peer.shape != ref64.shape:
        raise AssertionError(
            f"{name}: shapes differ: ours {ours.shape}, ref {ref64.shape}, peer {peer.shape}"
        )
    ours64, peer64 = ours.detach().double(), peer.detach().double()
    ref = ref64.detach().double()
    assert torch.isfinite(ours64).all(), f"{name}: non-finite values in ours (unwritten or NaN)"
    ours_err = (ours64 - ref).abs().max().item() if ref.numel() else 0.0
    peer_err = (peer64 - ref).abs().max().item() if ref.numel() else 0.0
    bound = factor * peer_err + eps
    assert ours_err <= bound, (
        f"{name}: max error {ours_err:.3e} exceeds {factor:g} x peer error {peer_err:.3e} + {eps:.0e}"
    )


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
