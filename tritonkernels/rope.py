"""Standalone Triton RoPE (forward and backward) for paths that do not fuse it into attention.

``rope_apply(x, tables)`` returns the rotated copy of x (B, S, H, D), any strides, in x's
dtype (or ``out_dtype``); ``transpose=True`` is the RoPE backward (rotation by -angle, same
attention factor), which takes gradients w.r.t. rotated x back to x. Same angle arithmetic as the
fused attention kernels (exact-phase fixed point or hf fp32), see ``_rope_tile``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._rope_tile import load_parts, load_raw_parts, rotate_back, store_parts
from .configs import aux_rows, rope_pads
from .rope_tables import RopeTables

__all__ = ["rope_apply", "rope_kernel"]


@triton.jit
def rope_kernel(
    X,
    Y,
    Pos,
    TabA,
    TabB,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_xd,
    stride_yb,
    stride_ys,
    stride_yh,
    stride_yd,
    stride_pos_b,
    S,
    H,
    attn_factor,
    HEAD_DIM: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n_tiles = tl.cdiv(S, BLOCK_S)  # 1-D grid, a head's tiles fastest (axis 1 caps at 65535)
    pid_s = tl.program_id(0) % n_tiles
    pid_bh = tl.program_id(0) // n_tiles
    b = pid_bh // H
    h = pid_bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_valid = offs_s < S
    pos = tl.load(Pos + b.to(tl.int64) * stride_pos_b + offs_s, mask=s_valid, other=0)
    x_rows = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + offs_s.to(tl.int64) * stride_xs
    y_rows = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh + offs_s.to(tl.int64) * stride_ys
    if TRANSPOSE:
        a, b_, c = load_raw_parts(
            x_rows, s_valid, stride_xd, HEAD_DIM, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD
        )
        a, b_ = rotate_back(a, b_, pos, TabA, TabB, attn_factor, EXACT, ROT_DIM, HALF_PAD)
        if PASS_PAD == 0:
            c = a
    else:
        a, b_, c = load_parts(
            x_rows, s_valid, stride_xd, pos, TabA, TabB, attn_factor,
            HEAD_DIM, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
        )  # fmt: skip
    store_parts(y_rows, s_valid, stride_yd, a, b_, c, HEAD_DIM, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD)


def rope_apply(
    x: torch.Tensor,
    tables: RopeTables,
    *,
    transpose: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    block_s: int | None = None,
) -> torch.Tensor:
    """RoPE of x (B, S, H, D) at ``tables`` (``rope_tables.rope_tables``: positions (1 or B, S)); never
    modifies x.

    ``transpose`` applies the inverse rotation (the backward); ``block_s`` overrides the shipped rows per
    program (``configs.aux_rows``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, S, H, D) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if not isinstance(tables, RopeTables):
        raise TypeError(f"tables must be a RopeTables, got {type(tables).__name__}")
    B, S, H, D = x.shape
    if tables.rot_dim > D:
        raise ValueError(f"tables.rot_dim {tables.rot_dim} must not exceed x's head dim {D}")
    if tables.positions.shape[-1] != S or tables.positions.shape[0] not in (1, B):
        raise ValueError(
            f"tables.positions must be (1, {S}) or ({B}, {S}), got {tuple(tables.positions.shape)}"
        )
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.shape != x.shape or out.dtype != out_dtype or out.device != x.device:
        raise ValueError(f"out must be {tuple(x.shape)} {out_dtype} on {x.device}")
    if x.numel() == 0:
        return out
    t = tables
    half_pad, pass_pad = rope_pads(D, t.rot_dim)
    block_s = block_s or aux_rows("rope", D)
    # launch on x's device, not whichever CUDA device is current
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        rope_kernel[(triton.cdiv(S, block_s) * B * H,)](
            x, out, t.positions, t.tab_a, t.tab_b,
            *x.stride(), *out.stride(), t.stride_b, S, H, t.attn_factor,
            HEAD_DIM=D, EXACT=t.exact, ROT_DIM=t.rot_dim, INTERLEAVED=t.interleaved,
            HALF_PAD=half_pad, PASS_PAD=pass_pad, TRANSPOSE=transpose, BLOCK_S=block_s,
        )  # fmt: skip
    return out
