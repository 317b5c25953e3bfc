"""Drop-in attention functions: torch SDPA's signature here, flash-attn's whole interface in
``ringattn.flash_attn_interface`` (re-exported), both with fused RoPE.

Unsupported arguments raise NotImplementedError naming the argument: nothing is silently ignored.
``backend`` picks "triton", "cuda", "cpu" or "reference"; "auto" takes the best one whose
``can_implement`` accepts the inputs' device, dtype and shapes.
"""

from __future__ import annotations

import torch

from .block import check_devices, check_softmax_scale
from .flash_attn_interface import (
    check_dropout,
    check_flag,
    check_positions,
    check_tensors,
    flash_attn_func,
    flash_attn_varlen_func,
)
from .ops import attention
from .rope import RoPEConfig

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "key_padding_attention",
    "scaled_dot_product_attention",
]


def key_padding_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of a padded batch: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), ``key_valid`` (B, Sk) bool
    with one run of valid keys per row (left or right padding) -> out (B, Sq, Hq, D).

    Unpads into a varlen call across lengths and pads the result back (differentiable). Causal aligns a
    row's last query with its last valid key. A causal row padded on the right needs Sq == Sk: its
    queries are then the valid tokens, and the padding rows output 0. RoPE positions ((Sq,)/(B, Sq) and
    (Sk,)/(B, Sk)) default to the index within the valid run (queries: their aligned index).
    """
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    check_tensors(key_valid=key_valid)
    if key_valid.dtype != torch.bool or key_valid.shape != (B, Sk):
        raise ValueError(
            f"the key padding mask must be bool ({B}, {Sk}), got {key_valid.dtype} {tuple(key_valid.shape)}"
        )
    valid = key_valid.cpu()
    counts = valid.sum(1)
    starts = torch.where(counts > 0, valid.int().argmax(1), torch.zeros_like(counts))
    ends = starts + counts
    contiguous = torch.arange(Sk)[None, :].ge(starts[:, None]) & torch.arange(Sk)[None, :].lt(ends[:, None])
    if not torch.equal(contiguous, valid):
        raise NotImplementedError("key padding must leave one contiguous run of valid keys per row")
    query_rows = []
    for b in range(B):
        right_padded = int(ends[b]) < Sk
        if causal and right_padded and Sq != Sk:
            raise NotImplementedError("a causal row padded on the right needs as many queries as keys")
        lo, hi = (int(starts[b]), int(ends[b])) if causal and right_padded else (0, Sq)
        query_rows.append(torch.arange(lo, hi) + b * Sq)
    q_rows = torch.cat(query_rows)
    k_rows = torch.cat([torch.arange(int(starts[b]), int(ends[b])) + b * Sk for b in range(B)])
    cu_q = torch.tensor([0, *torch.tensor([len(r) for r in query_rows]).cumsum(0).tolist()])
    cu_k = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    device = q.device
    q_rows_d, k_rows_d = q_rows.to(device), k_rows.to(device)

    def packed_positions(positions, rows, length):
        if positions is None:
            return None
        return positions.expand(B, length).reshape(-1)[rows.to(positions.device)]

    q_pos = packed_positions(q_positions, q_rows_d, Sq)
    k_pos = packed_positions(k_positions, k_rows_d, Sk)
    if (q_pos is None) != (k_pos is None):
        raise ValueError("pass positions for both queries and keys, or neither")
    flat = (q.reshape(B * Sq, Hq, D).index_select(0, q_rows_d),) + tuple(
        t.reshape(B * Sk, *t.shape[2:]).index_select(0, k_rows_d) for t in (k, v)
    )
    cross = not torch.equal(cu_q, cu_k)
    out, _ = attention(
        *(t[None] for t in flat), causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_q.to(device),
        k_cu_seqlens=cu_k.to(device) if cross else None, rope=rope,
        q_positions=q_pos, k_positions=k_pos, window_size=window_size, softcap=softcap, backend=backend,
    )  # fmt: skip
    return q.new_zeros(B * Sq, Hq, D).index_copy(0, q_rows_d, out[0]).reshape(B, Sq, Hq, D)


def _padding_structure(attn_mask: torch.Tensor, B: int, H: int, Sq: int, Sk: int):
    """(key_valid (B, Sk), causal) when a boolean SDPA mask is key padding, optionally with causal
    aligned bottom-right (the masks transformers builds); else NotImplementedError."""
    if attn_mask.dtype != torch.bool:
        raise NotImplementedError(
            f"attn_mask of dtype {attn_mask.dtype}: only boolean key-padding masks (optionally causal) are supported"
        )
    try:
        mask = attn_mask.expand(B, H, Sq, Sk).cpu()
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {(B, H, Sq, Sk)}"
        ) from None
    key_valid = mask.any(dim=2).any(dim=1)  # (B, Sk): keys some query sees
    padding = key_valid[:, None, None, :].expand(B, H, Sq, Sk)
    if torch.equal(mask, padding):
        return key_valid, False
    below = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    if torch.equal(mask, padding & below):
        return key_valid, True
    raise NotImplementedError(
        "attn_mask: only boolean key-padding masks, optionally with causal (bottom-right), are supported"
    )


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """torch SDPA's signature and (B, H, S, D) layout; ``is_causal`` is top-left aligned, as in SDPA.

    ``rope`` rotates query and key inside the kernel at ``positions`` ((S,) or (B, S), default 0..S-1;
    it needs Sq == Sk). ``attn_mask``: a boolean mask broadcastable to (B, H, Sq, Sk) that is key
    padding, optionally combined with causal aligned bottom-right (what transformers builds); it runs
    as ``key_padding_attention`` (one run of valid keys per row; see there for padding-query rows).
    Other masks raise NotImplementedError naming ``attn_mask``.
    """
    check_dropout(dropout_p)
    check_tensors(query=query, key=key, value=value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, S, D), got shape {tuple(t.shape)}")
    check_flag("is_causal", is_causal)
    check_flag("enable_gqa", enable_gqa)
    check_positions(positions)
    check_devices(query, key=key, value=value, positions=positions)
    check_softmax_scale(scale, "scale")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for GQA"
        )
    if rope is not None and positions is not None and query.shape[2] != key.shape[2]:
        raise ValueError("positions with rope need equal query and key lengths")
    if attn_mask is not None:
        check_tensors(attn_mask=attn_mask)
        if is_causal:
            raise ValueError("pass attn_mask or is_causal, not both (as torch SDPA requires)")
        B, H, Sq, D = query.shape
        key_valid, causal = _padding_structure(attn_mask, B, H, Sq, key.shape[2])
        out = key_padding_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_valid, causal=causal,
            softmax_scale=scale, rope=rope, q_positions=positions, k_positions=positions, backend=backend,
        )  # fmt: skip
        return out.transpose(1, 2)
    out, _ = attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=is_causal,
        softmax_scale=scale,
        rope=rope,
        q_positions=positions,
        k_positions=positions,
        backend=backend,
    )
    return out.transpose(1, 2)
