"""How a global sequence is split across the W ranks of a ring.

* contiguous: rank r holds one run of consecutive tokens (causal work is unbalanced).
* zigzag: the sequence is cut into 2W chunks; rank r holds chunks r and 2W - 1 - r, so every rank
  gets one early and one late chunk and causal work is balanced.
* stripe: rank r holds tokens r, r + W, r + 2W, ... (balanced at token granularity).
* doc_zigzag: every document of ``cu_seqlens`` is cut into 2W chunks and dealt out as zigzag deals
  the whole sequence, so causal work inside each document is balanced (zigzag over a packed
  sequence is not: a rank holding the end of a short document gets little work). Without documents
  it is zigzag. Tokens past ``cu_seqlens[-1]`` form one more document.

Any length is accepted: chunks differ in size by at most one token (contiguous, zigzag, each
document's chunks) and stripes by at most one token, so shards may be unequal when S is not a
multiple of W (or 2W).
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag", "stripe", "doc_zigzag")


def _check(seq_len: int, world_size: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")


def _documents(seq_len: int, layout: str, cu_seqlens) -> list[tuple[int, int]]:
    """The (start, end) runs that are cut independently: the documents for doc_zigzag (any tokens past
    the last boundary as one more), else the whole sequence."""
    if layout != "doc_zigzag" or cu_seqlens is None:
        return [(0, seq_len)]
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {bounds}")
    if bounds[-1] > seq_len:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]}, past the sequence length {seq_len}")
    bounds = bounds + ([seq_len] if bounds[-1] < seq_len else [])
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _chunks(start: int, length: int, n: int) -> list[tuple[int, int, int]]:
    """``length`` tokens from ``start`` cut into n runs, tensor_split's rule: the first length % n are
    one token longer."""
    base, extra = divmod(length, n)
    return [(start + i * base + min(i, extra), 1, base + (i < extra)) for i in range(n)]


def shard_pieces(
    seq_len: int, world_size: int, layout: str, cu_seqlens=None
) -> list[list[tuple[int, int, int]]]:
    """Per rank, its runs of tokens as ``(start, stride, length)``: global index ``start + stride * i``.

    One run per rank (contiguous, stripe), two for zigzag, two per document for doc_zigzag (empty
    runs included, so every rank has as many, in the same order). ``cu_seqlens`` (a tensor or list of
    document boundaries) is used by doc_zigzag only. Described without materialising indices, so a
    scheduler can mask each run by its arithmetic progression.
    """
    _check(seq_len, world_size, layout)
    if layout == "stripe":
        return [[(rank, world_size, len(range(rank, seq_len, world_size)))] for rank in range(world_size)]
    if layout == "contiguous":
        return [[chunk] for chunk in _chunks(0, seq_len, world_size)]
    n = 2 * world_size
    pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(world_size)]
    for start, end in _documents(seq_len, layout, cu_seqlens):
        chunks = _chunks(start, end - start, n)
        for rank in range(world_size):
            pieces[rank] += [chunks[rank], chunks[n - 1 - rank]]
    return pieces


def shard_indices(
    seq_len: int, world_size: int, layout: str, device=None, cu_seqlens=None
) -> list[torch.Tensor]:
    """Global token indices (int64, ascending within each run) held by each rank."""
    return [
        torch.cat(
            [start + stride * torch.arange(length, device=device) for start, stride, length in runs]
            or [torch.zeros(0, dtype=torch.int64, device=device)]
        )
        for runs in shard_pieces(seq_len, world_size, layout, cu_seqlens)
    ]


def shard_lengths(seq_len: int, world_size: int, layout: str, cu_seqlens=None) -> list[int]:
    """Number of tokens each rank holds."""
    pieces = shard_pieces(seq_len, world_size, layout, cu_seqlens)
    return [sum(length for _, _, length in runs) for runs in pieces]


def causal_work(seq_len: int, world_size: int, layout: str, cu_seqlens=None) -> list[int]:
    """Per rank, the (query, key) pairs its queries attend under causal attention within the documents
    of ``cu_seqlens`` (the whole sequence when None): the work a ring step balances."""
    bounds = [b for b, _ in _documents(seq_len, "doc_zigzag", cu_seqlens)] + [seq_len]
    work = []
    for runs in shard_pieces(seq_len, world_size, layout, cu_seqlens):
        total = 0
        for start, stride, length in runs:
            index = start + stride * torch.arange(length, dtype=torch.int64)
            doc_start = torch.tensor(bounds)[torch.searchsorted(torch.tensor(bounds), index, right=True) - 1]
            total += int((index - doc_start + 1).sum())
        work.append(total)
    return work
