"""The Triton backend of the block contract: fused-RoPE flash attention from ``tritonkernels``.

Runs CUDA tensors (sm_80 or newer), and CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), which is how it is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_HEAD_DIM = 256


class TritonBackend:
    name = "triton"

    def can_implement(self, q, k, v, mask, rope) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if q.dtype not in _DTYPES:
            return False, f"dtype {q.dtype} is not supported (bf16, fp16, fp32)"
        head_dim = q.shape[-1]
        if head_dim > _MAX_HEAD_DIM:
            return False, f"head dim {head_dim} is above {_MAX_HEAD_DIM}"
        device = q.device
        if device.type == "cuda":
            if torch.cuda.get_device_capability(device) < (8, 0):
                return False, f"compute capability {torch.cuda.get_device_capability(device)} is below sm_80"
        elif device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        else:
            return False, f"device {device.type} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
        return True, ""

    def forward(self, q, k, v, mask, *, softmax_scale, rope, q_positions, k_positions, out_dtype):
        from tritonkernels.flash import flash_attn_fwd

        if out_dtype == torch.float64:
            out, lse = self.forward(
                q, k, v, mask, softmax_scale=softmax_scale, rope=rope, q_positions=q_positions,
                k_positions=k_positions, out_dtype=torch.float32,
            )  # fmt: skip
            return out.double(), lse
        return flash_attn_fwd(
            q,
            k,
            v,
            softmax_scale=softmax_scale,
            causal=mask.causal,
            q_span=mask.q_span,
            k_span=mask.k_span,
            cu_seqlens=mask.cu_seqlens,
            rope=rope,
            q_positions=q_positions,
            k_positions=k_positions,
            out_dtype=out_dtype,
        )

    def backward(
        self,
        dout,
        q,
        k,
        v,
        out,
        lse,
        delta,
        mask,
        *,
        softmax_scale,
        rope,
        q_positions,
        k_positions,
        grad_dtype,
    ):
        from tritonkernels.flash import flash_attn_bwd

        wide = grad_dtype == torch.float64
        if delta is not None:
            delta = delta.float()
            delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        lse = lse.float()
        lse = lse if lse.stride(-1) == 1 else lse.contiguous()
        dq, dk, dv = flash_attn_bwd(
            dout.to(q.dtype),
            q,
            k,
            v,
            out,
            lse,
            delta,
            softmax_scale=softmax_scale,
            causal=mask.causal,
            q_span=mask.q_span,
            k_span=mask.k_span,
            cu_seqlens=mask.cu_seqlens,
            rope=rope,
            q_positions=q_positions,
            k_positions=k_positions,
            grad_dtype=torch.float32 if wide else grad_dtype,
        )
        if wide:
            return dq.double(), dk.double(), dv.double()
        return dq, dk, dv
