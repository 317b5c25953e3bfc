"""Global token indices, documents and default RoPE positions: runtime helpers shared by the
contract, the backends, the ring and the fp64 spec.

A packed batch's documents are ``cu_seqlens`` (n_docs + 1,) boundaries over global token indices;
a token at or past ``cu_seqlens[-1]`` (or before ``cu_seqlens[0]``) belongs to no document.
"""

from __future__ import annotations

import torch

__all__ = [
    "aligned_query_index",
    "document_ids",
    "positions_from_cu_seqlens",
    "default_positions",
    "default_query_positions",
]


def document_ids(index: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Document id of each global token index; -1 for tokens outside every document."""
    if cu_seqlens is None:
        return torch.zeros_like(index)
    cu = cu_seqlens.to(device=index.device, dtype=torch.int64)
    doc = torch.searchsorted(cu, index.to(torch.int64).contiguous(), right=True) - 1
    outside = (index < cu[0]) | (index >= cu[-1])
    return torch.where(outside, torch.full_like(doc, -1), doc)


def positions_from_cu_seqlens(index: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 in each document (tokens outside documents get 0)."""
    doc = document_ids(index, cu_seqlens)
    starts = cu_seqlens.to(device=index.device, dtype=torch.int64)[doc.clamp(min=0)]
    return torch.where(doc >= 0, index.to(torch.int64) - starts, torch.zeros_like(index, dtype=torch.int64))


def default_positions(index: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """RoPE positions when none are given: index within the document, or the global index."""
    return index if cu_seqlens is None else positions_from_cu_seqlens(index, cu_seqlens)


def aligned_query_index(
    q_index: torch.Tensor, cu_seqlens: torch.Tensor | None, k_cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """Each query's index on the key side's axis: what causal masks, windows and ALiBi compare keys with.

    With key-side documents (``k_cu_seqlens``, cross-length varlen) a query of document d is shifted by
    ``k_cu_seqlens[d + 1] - cu_seqlens[d + 1]``, so the last query of each document lines up with its
    last key (flash-attn's bottom-right alignment per sequence). Otherwise it is the global index.
    """
    q_index = q_index.to(torch.int64)
    if cu_seqlens is None or k_cu_seqlens is None:
        return q_index
    doc = document_ids(q_index, cu_seqlens)
    ends_q = cu_seqlens.to(device=q_index.device, dtype=torch.int64)[1:]
    ends_k = k_cu_seqlens.to(device=q_index.device, dtype=torch.int64)[1:]
    shift = (ends_k - ends_q)[doc.clamp(min=0)] if len(ends_q) else torch.zeros_like(doc)
    return torch.where(doc >= 0, q_index + shift, q_index)


def default_query_positions(
    q_index: torch.Tensor, cu_seqlens: torch.Tensor | None, k_cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """Queries' RoPE positions when none are given. With key-side documents, a query's position is
    its aligned index within its document's keys (the new tokens after a cache sit after it; a
    document with more queries than keys gives its first queries negative positions, which the
    contract refuses); otherwise ``default_positions``."""
    if cu_seqlens is None or k_cu_seqlens is None:
        return default_positions(q_index, cu_seqlens)
    doc = document_ids(q_index, cu_seqlens)
    starts = k_cu_seqlens.to(device=q_index.device, dtype=torch.int64)[doc.clamp(min=0)]
    aligned = aligned_query_index(q_index, cu_seqlens, k_cu_seqlens)
    return torch.where(doc >= 0, aligned - starts, torch.zeros_like(aligned))
