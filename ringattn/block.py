"""The block-attention contract: the one interface between the ring scheduler and the kernels.

A *block* is attention of a run of queries against a run of keys. Each run's rows carry global token
indices given cheaply as a ``Span`` (row i has index ``start + stride * i``): a contiguous shard, one
zigzag chunk and a stripe are all spans, so every layout is one code path. Masks are functions of
those indices (``BlockMask``); RoPE uses per-token *positions*, which are not indices.

Every backend implements the same two calls and says whether it can run a block:

    forward(q, k, v, mask, scale, rope, q_positions, k_positions, out_dtype) -> (out, lse)
    backward(dout, q, k, v, out, lse, delta, mask, scale, rope, q_positions, k_positions, grad_dtype)
        -> (dq, dk, dv)
    can_implement(q, k, v, mask, rope) -> (ok, reason)

Shapes: q, out, dout, dq (B, Sq, Hq, D); k, v, dk, dv (B, Sk, Hkv, D), Hq % Hkv == 0 (K/V never
expanded; dk/dv are reduced over each query group); lse and delta (B, Hq, Sq) fp32, natural log.
Rows that see no key have lse = -inf and out = 0. The scheduler calls ``block_forward`` and
``block_backward`` and never knows which backend ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .indexing import default_positions
from .rope import RoPEConfig

__all__ = [
    "Span",
    "BlockMask",
    "Backend",
    "block_forward",
    "block_backward",
    "check_inputs",
    "select_backend",
]
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Span:
    """Global token indices of a run of rows: row i has index ``start + stride * i``."""

    start: int = 0
    stride: int = 1

    def __post_init__(self):
        if self.start < 0 or self.stride < 1:
            raise ValueError(
                f"Span needs start >= 0 and stride >= 1, got start={self.start}, stride={self.stride}"
            )

    def indices(self, length: int, device=None) -> torch.Tensor:
        return self.start + self.stride * torch.arange(length, device=device)

    def last(self, length: int) -> int:
        return self.start + self.stride * (length - 1)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which (query, key) pairs of a block may attend.

    causal: query index >= key index. cu_seqlens: int tensor (n_docs + 1,) of document boundaries
    over global indices; pairs must share a document, and tokens outside every document see nothing.
    """

    causal: bool = False
    q_span: Span = field(default_factory=Span)
    k_span: Span = field(default_factory=Span)
    cu_seqlens: torch.Tensor | None = None

    def is_empty(self, q_len: int, k_len: int) -> bool:
        """True when no pair can attend, so the block may be skipped (a cheap, conservative test)."""
        if q_len == 0 or k_len == 0:
            return True
        return self.causal and self.q_span.last(q_len) < self.k_span.start


class Backend(Protocol):
    name: str

    def can_implement(self, q, k, v, mask: BlockMask, rope: RoPEConfig | None) -> tuple[bool, str]: ...

    def forward(self, q, k, v, mask, *, softmax_scale, rope, q_positions, k_positions, out_dtype): ...

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
    ): ...


def _backends() -> dict[str, Backend]:
    from .backends import BACKENDS

    return BACKENDS


# Tried in order by backend="auto". The fp64 reference is a CPU fallback only: on a GPU, silently
# running it would be a surprise, so a GPU block no fast backend supports is an error.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton")}


def select_backend(name: str, q, k, v, mask: BlockMask, rope: RoPEConfig | None) -> Backend:
    """The backend to run a block: ``name`` itself (checked), or the first capable one for "auto"."""
    backends = _backends()
    if name != "auto":
        if name not in backends:
            raise ValueError(f"backend must be 'auto' or one of {sorted(backends)}, got {name!r}")
        ok, reason = backends[name].can_implement(q, k, v, mask, rope)
        if not ok:
            raise ValueError(f"backend {name!r} cannot run this block: {reason}")
        return backends[name]
    reasons = []
    for candidate in _AUTO_ORDER.get(q.device.type, ()):
        if candidate in backends:
            ok, reason = backends[candidate].can_implement(q, k, v, mask, rope)
            if ok:
                return backends[candidate]
            reasons.append(f"{candidate}: {reason}")
    raise ValueError(
        f"no backend can run this block on {q.device.type}: " + "; ".join(reasons or ["none known"])
    )


def check_inputs(q, k, v, rope=None) -> None:
    """Validate q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) and rope; raise TypeError/ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, S, H, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be bf16, fp16, fp32 or fp64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B and D")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")
    if rope is not None and not isinstance(rope, RoPEConfig):
        raise TypeError(f"rope must be a RoPEConfig or None, got {type(rope).__name__}")
    if rope is not None and rope.dim != q.shape[3]:
        raise ValueError(f"rope.dim {rope.dim} must equal the head dim {q.shape[3]}")


def _resolve_positions(positions, span: Span, length: int, batch: int, mask: BlockMask, device, name: str):
    if positions is None:
        return default_positions(span.indices(length, device), mask.cu_seqlens)
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor")
    if positions.shape not in ((length,), (batch, length)):
        raise ValueError(f"{name} must be ({length},) or ({batch}, {length}), got {tuple(positions.shape)}")
    return positions.to(device)


def _prepare(q, k, v, mask, softmax_scale, rope, q_positions, k_positions):
    check_inputs(q, k, v, rope)
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a BlockMask, got {type(mask).__name__}")
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    if rope is not None:
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
        q_positions = _resolve_positions(q_positions, mask.q_span, Sq, B, mask, q.device, "q_positions")
        k_positions = _resolve_positions(k_positions, mask.k_span, Sk, B, mask, q.device, "k_positions")
    return scale, q_positions, k_positions


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask | None = None,
    *,
    softmax_scale: float | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention with fused RoPE; returns out (B, Sq, Hq, D) and lse (B, Hq, Sq) fp32.

    ``out_dtype`` defaults to q's dtype; ``torch.float32`` keeps ring partials unrounded. Positions
    default to the global index (index within the document when ``mask.cu_seqlens`` is given).
    Inputs are never modified.
    """
    mask = BlockMask() if mask is None else mask
    scale, q_positions, k_positions = _prepare(q, k, v, mask, softmax_scale, rope, q_positions, k_positions)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if out_dtype not in (q.dtype, torch.float32, torch.float64):
        raise TypeError(f"out_dtype must be q's dtype, float32 or float64, got {out_dtype}")
    impl = select_backend(backend, q, k, v, mask, rope)
    return impl.forward(
        q,
        k,
        v,
        mask,
        softmax_scale=scale,
        rope=rope,
        q_positions=q_positions,
        k_positions=k_positions,
        out_dtype=out_dtype,
    )


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    mask: BlockMask | None = None,
    *,
    delta: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block, normalised by ``lse`` (B, Hq, Sq), which may be the global one.

    ``delta`` = rowsum(dout * out) (B, Hq, Sq) fp32 is computed from ``out`` when not given (the ring
    passes the global one). Returns dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D) in ``grad_dtype``
    (default: the input dtype; ``torch.float32`` for accumulation across blocks).
    """
    mask = BlockMask() if mask is None else mask
    scale, q_positions, k_positions = _prepare(q, k, v, mask, softmax_scale, rope, q_positions, k_positions)
    B, Sq, Hq, _ = q.shape
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    if lse.shape != (B, Hq, Sq):
        raise ValueError(f"lse must be (B, Hq, Sq) = {(B, Hq, Sq)}, got {tuple(lse.shape)}")
    if delta is None:
        if out is None:
            raise ValueError("block_backward needs out or delta")
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()
    elif delta.shape != (B, Hq, Sq):
        raise ValueError(f"delta must be (B, Hq, Sq) = {(B, Hq, Sq)}, got {tuple(delta.shape)}")
    grad_dtype = q.dtype if grad_dtype is None else grad_dtype
    if grad_dtype not in (q.dtype, torch.float32, torch.float64):
        raise TypeError(f"grad_dtype must be the input dtype, float32 or float64, got {grad_dtype}")
    impl = select_backend(backend, q, k, v, mask, rope)
    return impl.backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        delta,
        mask,
        softmax_scale=scale,
        rope=rope,
        q_positions=q_positions,
        k_positions=k_positions,
        grad_dtype=grad_dtype,
    )
