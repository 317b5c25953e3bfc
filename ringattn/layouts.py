"""How a global sequence is split across the W ranks of a ring.

* contiguous: rank r holds one run of consecutive tokens (causal work is unbalanced).
* zigzag: the sequence is cut into 2W chunks; rank r holds chunks r and 2W - 1 - r, so every rank
  gets one early and one late chunk and causal work is balanced.
* stripe: rank r holds tokens r, r + W, r + 2W, ... (balanced at token granularity).

Any length is accepted: chunks differ in size by at most one token (contiguous, zigzag) and
stripes by at most one token, so shards may be unequal when S is not a multiple of W (or 2W).
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag", "stripe")


def shard_indices(seq_len: int, world_size: int, layout: str, device=None) -> list[torch.Tensor]:
    """Global token indices (int64, ascending within each chunk) held by each rank."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    index = torch.arange(seq_len, device=device)
    if layout == "contiguous":
        return list(torch.tensor_split(index, world_size))
    if layout == "stripe":
        return [index[rank::world_size] for rank in range(world_size)]
    chunks = torch.tensor_split(index, 2 * world_size)
    return [torch.cat((chunks[rank], chunks[2 * world_size - 1 - rank])) for rank in range(world_size)]


def chunk_count(world_size: int, layout: str) -> int:
    """How many equal-capacity chunks the sequence is cut into (2W for zigzag, W otherwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 * world_size if layout == "zigzag" else world_size


def shard_pieces(seq_len: int, world_size: int, layout: str) -> list[list[tuple[int, int, int]]]:
    """Per rank, its runs of tokens as ``(start, stride, length)``: global index ``start + stride * i``.

    The same split as ``shard_indices`` (one run per rank, two for zigzag), described without
    materialising indices, so a scheduler can mask each run by its arithmetic progression.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    n = chunk_count(world_size, layout)
    if layout == "stripe":
        return [[(rank, world_size, len(range(rank, seq_len, world_size)))] for rank in range(world_size)]
    # tensor_split's rule: the first seq_len % n chunks are one token longer.
    base, extra = divmod(seq_len, n)
    sizes = [base + (i < extra) for i in range(n)]
    starts = [i * base + min(i, extra) for i in range(n)]
    chunks = [(starts[i], 1, sizes[i]) for i in range(n)]
    if layout == "contiguous":
        return [[chunks[rank]] for rank in range(world_size)]
    return [[chunks[rank], chunks[n - 1 - rank]] for rank in range(world_size)]


def shard_lengths(seq_len: int, world_size: int, layout: str) -> list[int]:
    """Number of tokens each rank holds."""
    return [sum(length for _, _, length in pieces) for pieces in shard_pieces(seq_len, world_size, layout)]
