"""Ulysses x ring (unified sequence parallelism): heads spread over a Ulysses group, sequence over a ring.

U x R ranks hold the global sequence as follows: the ring's layout cuts it into R shards (``shard`` over
``ring_group``), and each shard is cut into U contiguous parts, one per member of the Ulysses group
(``usp_shard``). ``usp_attn_func`` then
  1. exchanges within the Ulysses group so each member holds the whole ring shard for Hq / U query heads
     (and the K/V heads those use: fewer KV heads than U are replicated only as far as needed),
  2. runs ``ring_attn_func`` over ``ring_group`` on that shard, RoPE positions following the tokens,
  3. exchanges back to (this member's part of the sequence, all heads).
The exchanges are all-gathers over the Ulysses group keeping this member's slice (a U-fold more bytes
than an all-to-all; correct on every communicator, including the in-process fake).
"""

from __future__ import annotations

from typing import Any

import torch

from .dist_comm import ring_comm
from .scheduler import ring_attn_func
from .sharding import shard

__all__ = ["usp_attn_func", "usp_shard"]


def usp_shard(
    x: torch.Tensor,
    dim: int,
    ulysses_group: Any,
    ring_group: Any,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's part of the full sequence ``x`` along ``dim``: its ring shard cut into U equal
    contiguous parts (the ring shard's length must be a multiple of U)."""
    part = shard(x, dim, ring_group, layout, cu_seqlens)
    comm = ring_comm(ulysses_group)
    if part.shape[dim % x.dim()] % comm.world_size:
        raise ValueError(
            f"the ring shard has {part.shape[dim % x.dim()]} tokens, not a multiple of the Ulysses size "
            f"{comm.world_size}: pick a sequence length the layout splits evenly"
        )
    return part.tensor_split(comm.world_size, dim)[comm.rank].contiguous()


def _heads_to_sequence(x: torch.Tensor, comm) -> torch.Tensor:
    """(B, s, H, D) per member -> (B, U * s, H / U, D): the whole shard, this member's heads."""
    U, u = comm.world_size, comm.rank
    parts = comm.all_gather(x.contiguous()).to(x.device)  # (U, B, s, H, D)
    return torch.cat(list(parts.chunk(U, dim=3)[u].unbind(0)), dim=1)


def _sequence_to_heads(y: torch.Tensor, comm) -> torch.Tensor:
    """The inverse: (B, U * s, H / U, D) per member -> (B, s, H, D): this member's tokens, all heads."""
    U, u = comm.world_size, comm.rank
    parts = comm.all_gather(y.contiguous()).to(y.device)  # (U, B, U * s, H / U, D)
    return torch.cat(list(parts.chunk(U, dim=2)[u].unbind(0)), dim=2)


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _heads_to_sequence(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad, ctx.comm), None


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, comm):
        ctx.comm = comm
        return _sequence_to_heads(y, comm)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad, ctx.comm), None


def usp_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ulysses_group: Any,
    ring_group: Any,
    positions: torch.Tensor | None = None,
    return_lse: bool = False,
    **ring_options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's part (``usp_shard``) of the sequence over a Ulysses group x a ring.

    q: (B, s, Hq, D), k/v: (B, s, Hkv, D) with Hq % U == 0 and Hkv % U == 0 or U % Hkv == 0 (then each
    KV head serves U / Hkv members). ``positions``: this rank's part of the RoPE positions ((s,) or
    (B, s)). ``ring_options``: ``ring_attn_func``'s keywords (causal, layout, rope, cu_seqlens over the
    global sequence, window_size, ...). Returns out (B, s, Hq, D) [and lse (B, Hq, s)].
    """
    comm = ring_comm(ulysses_group)
    U = comm.world_size
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hq % U:
        raise ValueError(f"query heads {Hq} must be a multiple of the Ulysses size {U}")
    if Hkv % U and U % Hkv:
        raise ValueError(f"KV heads {Hkv} must divide or be a multiple of the Ulysses size {U}")
    if Hkv < U:  # replicate each KV head to the members whose query heads use it
        k, v = k.repeat_interleave(U // Hkv, dim=2), v.repeat_interleave(U // Hkv, dim=2)
    q_s, k_s, v_s = (_HeadsToSequence.apply(t, comm) for t in (q, k, v))
    if positions is not None:  # the positions of the whole ring shard, in token order
        gathered = comm.all_gather(positions.contiguous()).to(positions.device)
        positions = torch.cat(list(gathered.unbind(0)), dim=-1)
    out, lse = ring_attn_func(
        q_s, k_s, v_s, group=ring_group, positions=positions, return_lse=True, **ring_options
    )
    out = _SequenceToHeads.apply(out, comm)
    if not return_lse:
        return out
    lse = _sequence_to_heads(lse.transpose(1, 2).unsqueeze(-1), comm).squeeze(-1).transpose(1, 2)
    return out, lse
