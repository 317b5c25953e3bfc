"""Global token indices, documents and default RoPE positions: runtime helpers shared by the
contract, the backends, the ring and the fp64 spec.

A packed batch's documents are ``cu_seqlens`` (n_docs + 1,) boundaries over global token indices;
a token at or past ``cu_seqlens[-1]`` (or before ``cu_seqlens[0]``) belongs to no document.
"""

from __future__ import annotations

import torch

__all__ = ["document_ids", "positions_from_cu_seqlens", "default_positions"]


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
