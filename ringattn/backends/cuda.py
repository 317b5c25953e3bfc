"""The compiled CUDA backend: ``ringattn._C`` block attention on tensor cores (bf16 and fp16 inputs).

Same contract and argument conventions as the CPU backend (``ringattn.backends.cpu``); each entry is a
``torch.library`` custom op with a fake implementation. Kernels run on the tensors' device, on torch's
current stream. Any (B, S, H) strides are read directly; a last dimension that is not unit-stride is
copied first. Head dims: any even D up to 256 (tiles are padded to 64, 128 or 256 columns).
Direct calls: ``torch.ops.ringattn.cuda_block_forward`` / ``torch.ops.ringattn.cuda_block_backward``.
"""

from __future__ import annotations

import torch

from .._extension import compiled
from .cpu import _DTYPE_CODES, CompiledBackend, _unit_last, _view, fill_params

__all__ = ["CudaBackend", "cuda_block_forward", "cuda_block_backward"]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@torch.library.custom_op("ringattn::cuda_block_forward", mutates_args=())
def cuda_block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    q_start: int,
    q_stride: int,
    k_start: int,
    k_stride: int,
    cu_seqlens: torch.Tensor | None,
    softmax_scale: float,
    rope_mode: int,
    rotary_dim: int,
    interleaved: bool,
    attention_factor: float,
    q_freqs: torch.Tensor | None,
    k_freqs: torch.Tensor | None,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    out_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Sq, Hq, D) in q's dtype or fp32, lse (B, Hq, Sq) fp32 natural log."""
    module = compiled()
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Sq, Hq, D = q.shape
    out = torch.empty(B, Sq, Hq, D, dtype=torch.float32 if out_fp32 else q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    p = fill_params(
        module, q, k, v, causal=causal, q_start=q_start, q_stride=q_stride, k_start=k_start,
        k_stride=k_stride, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale, rope_mode=rope_mode,
        rotary_dim=rotary_dim, interleaved=interleaved, attention_factor=attention_factor,
        q_freqs=q_freqs, k_freqs=k_freqs, q_pos=q_pos, k_pos=k_pos,
    )  # fmt: skip
    p.out, p.out_dtype, p.lse = _view(module, out), _DTYPE_CODES[out.dtype], lse.data_ptr()
    with torch.cuda.device(q.device):
        p.stream = _stream(q.device)
        module.attn_forward_cuda(p)
    return out, lse


@cuda_block_forward.register_fake
def _(q, k, v, causal, q_start, q_stride, k_start, k_stride, cu_seqlens, softmax_scale, rope_mode,
      rotary_dim, interleaved, attention_factor, q_freqs, k_freqs, q_pos, k_pos, out_fp32):  # fmt: skip
    B, Sq, Hq, D = q.shape
    out = q.new_empty(B, Sq, Hq, D, dtype=torch.float32 if out_fp32 else q.dtype)
    return out, q.new_empty(B, Hq, Sq, dtype=torch.float32)


@torch.library.custom_op("ringattn::cuda_block_backward", mutates_args=())
def cuda_block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    causal: bool,
    q_start: int,
    q_stride: int,
    k_start: int,
    k_stride: int,
    cu_seqlens: torch.Tensor | None,
    softmax_scale: float,
    rope_mode: int,
    rotary_dim: int,
    interleaved: bool,
    attention_factor: float,
    q_freqs: torch.Tensor | None,
    k_freqs: torch.Tensor | None,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    grad_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D) in q's dtype or fp32, from a given lse and delta."""
    module = compiled()
    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    dtype = torch.float32 if grad_fp32 else q.dtype
    dq = torch.empty(q.shape, dtype=dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=dtype, device=q.device)
    # fp32 workspaces in rotated coordinates: dq gathers atomics from every key tile.
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_accum = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    p = fill_params(
        module, q, k, v, causal=causal, q_start=q_start, q_stride=q_stride, k_start=k_start,
        k_stride=k_stride, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale, rope_mode=rope_mode,
        rotary_dim=rotary_dim, interleaved=interleaved, attention_factor=attention_factor,
        q_freqs=q_freqs, k_freqs=k_freqs, q_pos=q_pos, k_pos=k_pos,
    )  # fmt: skip
    p.dout, p.lse, p.delta = _view(module, dout), lse.data_ptr(), delta.data_ptr()
    p.dq, p.dk, p.dv = _view(module, dq), _view(module, dk), _view(module, dv)
    p.grad_dtype = _DTYPE_CODES[dtype]
    p.dq_accum, p.dk_accum = dq_accum.data_ptr(), dk_accum.data_ptr()
    with torch.cuda.device(q.device):
        p.stream = _stream(q.device)
        module.attn_backward_cuda(p)
    return dq, dk, dv


@cuda_block_backward.register_fake
def _(dout, q, k, v, lse, delta, causal, q_start, q_stride, k_start, k_stride, cu_seqlens, softmax_scale,
      rope_mode, rotary_dim, interleaved, attention_factor, q_freqs, k_freqs, q_pos, k_pos, grad_fp32):  # fmt: skip
    dtype = torch.float32 if grad_fp32 else q.dtype
    return (
        q.new_empty(q.shape, dtype=dtype),
        k.new_empty(k.shape, dtype=dtype),
        v.new_empty(v.shape, dtype=dtype),
    )


class CudaBackend(CompiledBackend):
    """Block attention on CUDA tensors with the compiled tensor-core kernels (bf16 and fp16)."""

    name = "cuda"
    device_type = "cuda"
    dtypes = (torch.bfloat16, torch.float16)
    forward_op = cuda_block_forward
    backward_op = cuda_block_backward

    def can_implement(self, q, k, v, mask, rope):
        ok, reason = super().can_implement(q, k, v, mask, rope)
        if not ok:
            return ok, reason
        if not compiled().with_cuda:
            return False, "ringattn._C was built without CUDA kernels"
        if q.shape[3] % 2 or q.shape[3] > 256:
            return False, f"head dim must be even and <= 256, got {q.shape[3]}"
        return True, ""
