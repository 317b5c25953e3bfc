"""The Triton backend of the block contract: fused-RoPE flash attention from ``tritonkernels``.

Runs CUDA tensors (sm_80 or newer), and CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), which is how it is tested without a GPU.
``tritonkernels`` is imported on first use, not with ringattn: importing triton is slow, and the
interpreter switch must be set before it happens.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from ..rope import kernel_frequencies

__all__ = ["TritonBackend", "rope_tables_for"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256


@lru_cache(maxsize=64)
def _frequency_tables(rope, seq_len: int | None, device: str):
    from tritonkernels.rope_tables import frequency_tables

    return frequency_tables(kernel_frequencies(rope, seq_len, device), rope.precision == "exact")


def rope_tables_for(rope, side):
    """``tritonkernels.rope_tables.RopeTables`` for a ``RoPEConfig`` and one side's resolved positions
    (``ringattn.block.RotaryPositions``)."""
    from tritonkernels.rope_tables import rope_tables

    tables = _frequency_tables(rope, side.seq_len, str(side.positions.device))
    return rope_tables(
        side.positions,
        tables,
        exact=rope.precision == "exact",
        rot_dim=rope.rotary_dim,
        interleaved=rope.interleaved,
        attn_factor=rope.attention_factor,
    )


def _launch_kwargs(args) -> dict:
    mask, rope = args.mask, args.rope
    return {
        "softmax_scale": args.scale,
        "causal": mask.causal,
        "q_span": (mask.q_span.start, mask.q_span.stride),
        "k_span": (mask.k_span.start, mask.k_span.stride),
        "cu_seqlens": mask.cu_seqlens,
        "q_rope": None if rope is None else rope_tables_for(rope, args.q_rope),
        "k_rope": None if rope is None else rope_tables_for(rope, args.k_rope),
        "window": args.window,
        "softcap": args.softcap,
        "alibi_slopes": args.alibi_slopes,
        "k_cu_seqlens": mask.k_cu_seqlens,
        "dropout_p": args.dropout_p,
        "dropout_seed": args.dropout_seed,
        "dropout_offset": args.dropout_offset,
    }


def _seq_major(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonBackend:
    name = "triton"
    # deterministic: two-pass backward, no atomics, fixed per tile choice. The score features and
    # dropout (its mask regenerated in the backward from ringattn.dropout's counter-based
    # generator) are constexpr variants of the kernels (tritonkernels/flash_kernels.py).
    features = frozenset(
        {"deterministic", "window_size", "softcap", "alibi_slopes", "cu_seqlens_k", "dropout_p"}
    )

    def can_implement(self, q, k, v, args) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if q.dtype not in _DTYPES:
            return False, f"dtype {q.dtype} is not supported (bf16, fp16, fp32)"
        head_dim = q.shape[-1]
        if head_dim > MAX_HEAD_DIM:
            return False, f"head dim {head_dim} is above {MAX_HEAD_DIM}"
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

    def forward(self, q, k, v, args, out_dtype):
        from tritonkernels.flash import flash_attn_fwd

        kernel_dtype = torch.float32 if out_dtype == torch.float64 else out_dtype
        out, lse = flash_attn_fwd(q, k, v, out_dtype=kernel_dtype, **_launch_kwargs(args))
        return out.to(out_dtype), lse

    def backward(self, dout, q, k, v, out, lse, delta, args, grad_dtype):
        from tritonkernels.flash import flash_attn_bwd

        kernel_dtype = torch.float32 if grad_dtype == torch.float64 else grad_dtype
        delta = None if delta is None else _seq_major(delta)  # None: the Triton delta kernel computes it
        dq, dk, dv = flash_attn_bwd(
            dout.to(q.dtype),
            q,
            k,
            v,
            out,
            _seq_major(lse),
            delta,
            grad_dtype=kernel_dtype,
            **_launch_kwargs(args),
        )
        return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)
