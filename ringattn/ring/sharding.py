"""Moving between a full sequence and one rank's shard of it (any tensor: activations, positions, labels).

``cu_seqlens`` are never sharded: every rank passes the same global ones to ``ring_attn_func``. Labels
for a causal LM are shifted on the full sequence first, then sharded like the inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layouts import LAYOUTS, shard_indices, shard_lengths
from .dist_comm import ring_comm

__all__ = ["shard", "unshard"]


def _check(x, dim, layout, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return dim % x.dim()


def shard(
    x: torch.Tensor,
    dim: int = 1,
    group: Any = None,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` along ``dim`` (a new tensor; ``x`` is unchanged).

    ``cu_seqlens`` (the global document boundaries, as passed to ``ring_attn_func``) is needed by the
    "doc_zigzag" layout, which cuts each document; the other layouts ignore it.

    ``group`` is the ring exactly as given to ``ring_attn_func`` (a ring order or a two-level ring lives
    in its communicator): the shard is the one of this rank's position in the ring. Any length: shards
    then differ by one token (a rank may hold none), which ``ring_attn_func`` accepts.
    """
    dim = _check(x, dim, layout, "x")
    comm = ring_comm(group)
    index = shard_indices(x.shape[dim], comm.world_size, layout, x.device, cu_seqlens)[comm.rank]
    return x.index_select(dim, index)


def unshard(
    x_local: torch.Tensor,
    dim: int = 1,
    group: Any = None,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """The full sequence from every rank's shard along ``dim`` (a collective; not differentiable).
    ``cu_seqlens`` as for ``shard``."""
    dim = _check(x_local, dim, layout, "x_local")
    comm = ring_comm(group)
    W = comm.world_size
    lengths = comm.all_gather(torch.tensor([x_local.shape[dim]], dtype=torch.int64)).flatten().tolist()
    seq_len = sum(lengths)
    if lengths != shard_lengths(seq_len, W, layout, cu_seqlens):
        raise ValueError(
            f"shard lengths {lengths} are not a {layout} split of {seq_len} tokens over {W} ranks"
        )
    capacity = max(lengths)
    padded_shape = list(x_local.shape)
    padded_shape[dim] = capacity
    padded = x_local.new_zeros(padded_shape)
    padded.narrow(dim, 0, lengths[comm.rank]).copy_(x_local)
    gathered = comm.all_gather(padded).to(x_local.device)  # (W, ..., capacity, ...)
    full_shape = list(x_local.shape)
    full_shape[dim] = seq_len
    out = x_local.new_empty(full_shape)
    for rank, index in enumerate(shard_indices(seq_len, W, layout, x_local.device, cu_seqlens)):
        out.index_copy_(dim, index, gathered[rank].narrow(dim, 0, lengths[rank]))
    return out
