"""Merging partial attentions over disjoint key sets (the ring's accumulation step).

Partials are (out (B, S, H, D), lse (B, H, S)); a row that has seen no key yet is (0, -inf).
"""

from __future__ import annotations

import math

import torch

__all__ = ["empty_partials", "merge_partials"]


def empty_partials(q: torch.Tensor, dtype: torch.dtype = torch.float32):
    """The merge identity for q's rows: out = 0 (B, S, H, D), lse = -inf (B, H, S)."""
    B, S, H, D = q.shape
    out = torch.zeros(B, S, H, D, dtype=dtype, device=q.device)
    lse = torch.full((B, H, S), -math.inf, dtype=dtype, device=q.device)
    return out, lse


def merge_partials(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable merge of two partial attentions over disjoint key sets.

    out (B, S, H, D), lse (B, H, S). l = m + log(e^(l1-m) + e^(l2-m)) with m = max(l1, l2), and
    o = e^(l1-l) o1 + e^(l2-l) o2. Guards: -inf merged with x gives x; -inf with -inf gives
    (0, -inf), never NaN. A NaN lse (a NaN input reached the row) makes the merged row NaN, lse
    and out alike. Computed in the inputs' dtype (keep partials in fp32 or wider).
    """
    m = torch.maximum(lse1, lse2)  # NaN if either is NaN
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m_safe), torch.exp(lse2 - m_safe)
    total = w1 + w2
    empty = total == 0
    total_safe = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(m, -math.inf), m_safe + torch.log(total_safe))
    c1 = (w1 / total_safe).transpose(1, 2).unsqueeze(-1)  # (B, H, S) -> (B, S, H, 1)
    c2 = (w2 / total_safe).transpose(1, 2).unsqueeze(-1)
    return c1 * out1 + c2 * out2, lse
