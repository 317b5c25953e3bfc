"""fp64 references: the definition of "correct" for every kernel, backend and the ring scheduler.

Everything here is plain torch in float64, written for readability; gradients come from autograd.

Masks are functions of *global token indices*: a block's queries and keys carry the global index of
each token (``q_index``, ``k_index``), so contiguous, zigzag and stripe shards are one code path.
Causal means ``q_index >= k_index``; documents (``cu_seqlens`` over global indices) mean same document;
a token at or past ``cu_seqlens[-1]`` belongs to no document and is masked out entirely.
RoPE uses *positions*, which are not indices: they restart per document in packed batches.
"""

from __future__ import annotations

import math

import torch

from .dropout import keep_mask
from .indexing import aligned_query_index, default_positions, default_query_positions, document_ids
from .layouts import shard_indices
from .merge import empty_partials, merge_partials
from .rope import RoPEConfig, _dynamic_seq_len, apply_rope

__all__ = [
    "attention_ref",
    "attention_backward_ref",
    "attention_probs_ref",
    "visible_mask",
    "ring_attention_ref",
]


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, S, H, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B and D")
    if q.shape[3] == 0:
        raise ValueError(f"the head dim D of q, k and v must be > 0, got q shape {tuple(q.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"k and v need at least one head (Hkv > 0), got k shape {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")


def _as_index(index, length: int, name: str, device) -> torch.Tensor:
    if index is None:
        return torch.arange(length, device=device)
    index = torch.as_tensor(index, device=device)
    if index.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(index.shape)}")
    return index.to(torch.int64)


def visible_mask(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    causal: bool,
    cu_seqlens: torch.Tensor | None,
    *,
    k_cu_seqlens: torch.Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """(Sq, Sk) bool: which keys each query may attend, from global token indices.

    Queries belong to documents of ``cu_seqlens``, keys to those of ``k_cu_seqlens`` (default: the
    same boundaries); a pair must share a document. Causal and the window compare a key's index with
    the query's *aligned* index (``aligned_query_index``): causal keeps keys at or before it, the
    window (left, right) keeps keys in [aligned - left, aligned + right], -1 leaving a side unbounded.
    """
    aligned = aligned_query_index(q_index, cu_seqlens, k_cu_seqlens)[:, None]
    keys = k_index.to(torch.int64)[None, :]
    visible = torch.ones(len(q_index), len(k_index), dtype=torch.bool, device=q_index.device)
    if causal:
        visible &= keys <= aligned
    left, right = window
    if left >= 0:
        visible &= keys >= aligned - left
    if right >= 0:
        visible &= keys <= aligned + right
    if cu_seqlens is not None:
        q_doc = document_ids(q_index, cu_seqlens)
        k_doc = document_ids(k_index, cu_seqlens if k_cu_seqlens is None else k_cu_seqlens)
        visible &= (q_doc[:, None] == k_doc[None, :]) & (q_doc[:, None] >= 0)
    return visible


def _prepare(q, k, v, q_index, k_index, cu_seqlens, k_cu_seqlens, rope, q_positions, k_positions):
    """fp64 copies of q, k (rotated when rope is given), v, and the index tensors."""
    q_index = _as_index(q_index, q.shape[1], "q_index", q.device)
    k_index = _as_index(k_index, k.shape[1], "k_index", q.device)
    q, k, v = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    if rope is not None:
        if q_positions is None:
            q_positions = default_query_positions(q_index, cu_seqlens, k_cu_seqlens)
        if k_positions is None:
            k_positions = default_positions(k_index, cu_seqlens if k_cu_seqlens is None else k_cu_seqlens)
        q, k = apply_rope(q, q_positions, rope), apply_rope(k, k_positions, rope)
    return q, k, v, q_index, k_index, q_positions, k_positions


def _grouped_scores(q, k, scale, softcap, alibi_slopes, distance):
    """Unmasked scores (B, Hkv, G, Sq, Sk), query heads grouped by KV head, and the softcap's tanh
    (None without softcap), which the backward needs.

    Scores are scale * q.k, then softcap * tanh(. / softcap) when ``softcap`` > 0, then
    - slope * ``distance`` (|aligned query index - key index|, (Sq, Sk)) with ALiBi: flash-attn's order.
    """
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.view(B, Sq, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k).mul(scale)
    tanh = None
    if softcap:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=q.device, dtype=torch.float64).reshape(-1, Hkv, Hq // Hkv, 1, 1)
        scores = scores - slopes * distance
    return scores, tanh


def _block_terms(q_index, k_index, causal, cu_seqlens, k_cu_seqlens, window):
    """The visibility mask and the ALiBi distance of a block, both (Sq, Sk)."""
    visible = visible_mask(q_index, k_index, causal, cu_seqlens, k_cu_seqlens=k_cu_seqlens, window=window)
    aligned = aligned_query_index(q_index, cu_seqlens, k_cu_seqlens)
    distance = (aligned[:, None] - k_index.to(torch.int64)[None, :]).abs().to(torch.float64)
    return visible, distance


def _dropped(x, dropout_p, seed, offset, q_index, k_index):
    """x (B, Hkv, G, Sq, Sk) times dropout's Z / (1 - p); x itself when p = 0."""
    if not dropout_p:
        return x
    B, Hkv, G = x.shape[:3]
    keep = keep_mask(dropout_p, seed, offset, B, Hkv * G, q_index, k_index).view(x.shape)
    return x * keep / (1.0 - dropout_p)


def _check_features(q, k_cu_seqlens, cu_seqlens, window, softcap, alibi_slopes, dropout_p=0.0):
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if k_cu_seqlens is not None and (cu_seqlens is None or len(k_cu_seqlens) != len(cu_seqlens)):
        raise ValueError("k_cu_seqlens needs cu_seqlens with the same number of boundaries")
    if len(window) != 2 or min(window) < -1:
        raise ValueError(f"window must be (left, right) with each >= -1, got {window}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    B, _, Hq, _ = q.shape
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must be ({Hq},) or ({B}, {Hq}), got {tuple(alibi_slopes.shape)}")


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_index: torch.Tensor | None = None,
    k_index: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    k_cu_seqlens: torch.Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in fp64 with fused-RoPE semantics.

    Args:
        q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D) with Hq % Hkv == 0 (GQA; K/V are never expanded).
        causal: mask keys whose global index exceeds the query's.
        softmax_scale: default 1 / sqrt(D).
        q_index, k_index: (Sq,), (Sk,) global token indices of the rows (default 0..S-1).
        cu_seqlens: (n_docs + 1,) document boundaries over global indices.
        rope: rotate q and k before the dot product (never materialised by real kernels).
        q_positions, k_positions: (Sq,) / (B, Sq) positions for RoPE; default: index within the
            document when ``cu_seqlens`` is given, else the global index (with ``k_cu_seqlens``,
            queries take their aligned index within the document's keys).
        k_cu_seqlens: (n_docs + 1,) key-side document boundaries (cross-length varlen; default
            ``cu_seqlens``); each document's queries align bottom-right with its keys.
        window: sliding window (left, right) around the aligned query index; -1: unbounded side.
        softcap: > 0 caps scaled scores to softcap * tanh(scores / softcap) (Gemma 2); 0: off.
        alibi_slopes: (Hq,) or (B, Hq): adds -slope * |aligned query index - key index|.
        dropout_p, dropout_seed, dropout_offset: drop probabilities with ``ringattn.dropout``'s
            counter-based mask and scale the kept ones by 1 / (1 - p); lse is that of the
            probabilities before dropout (what the backward needs).

    Returns:
        out (B, Sq, Hq, D) and lse (B, Hq, Sq), both fp64. Rows with no visible key have
        lse = -inf and out = 0.
    """
    _check_qkv(q, k, v)
    B, Sq, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    _check_features(q, k_cu_seqlens, cu_seqlens, window, softcap, alibi_slopes, dropout_p)
    q, k, v, q_index, k_index, _, _ = _prepare(
        q, k, v, q_index, k_index, cu_seqlens, k_cu_seqlens, rope, q_positions, k_positions
    )
    visible, distance = _block_terms(q_index, k_index, causal, cu_seqlens, k_cu_seqlens, window)
    scores, _ = _grouped_scores(q, k, scale, softcap, alibi_slopes, distance)
    scores = scores.masked_fill(~visible, -math.inf)
    if scores.shape[-1]:
        row_max = scores.amax(dim=-1, keepdim=True)  # NaN when a visible score is NaN
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    else:  # no keys: every row is empty (amax of nothing is an error)
        row_max = scores.new_zeros(scores.shape[:-1] + (1,))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    # Empty rows (denom 0) give out 0 and lse -inf; a NaN score makes denom, out and lse NaN.
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    probs = _dropped(p / denom_safe, dropout_p, dropout_seed, dropout_offset, q_index, k_index)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(B, Sq, Hq, D)
    lse = torch.where(empty, -math.inf, row_max + torch.log(denom_safe))
    return out, lse.squeeze(-1).reshape(B, Hq, Sq)


def attention_probs_ref(q: torch.Tensor, k: torch.Tensor, **options) -> torch.Tensor:
    """The attention probabilities (B, Hq, Sq, Sk), fp64, before dropout: softmax of the masked scores
    (rows that see no key are 0). ``options`` as ``attention_ref``'s (dropout ones ignored)."""
    options = {name: value for name, value in options.items() if not name.startswith("dropout")}
    v = k.new_zeros(k.shape)  # the values do not enter the probabilities
    _, lse = attention_ref(q, k, v, **options)
    B, Sq, Hq, _ = q.shape
    cu, k_cu = options.get("cu_seqlens"), options.get("k_cu_seqlens")
    rq, rk, _, q_index, k_index, _, _ = _prepare(
        q, k, v, options.get("q_index"), options.get("k_index"), cu, k_cu, options.get("rope"),
        options.get("q_positions"), options.get("k_positions"),
    )  # fmt: skip
    visible, distance = _block_terms(
        q_index, k_index, options.get("causal", False), cu, k_cu, options.get("window", (-1, -1))
    )
    scale = options.get("softmax_scale") or 1.0 / math.sqrt(q.shape[-1])
    scores, _ = _grouped_scores(
        rq, rk, scale, options.get("softcap", 0.0), options.get("alibi_slopes"), distance
    )
    lse_g = lse.reshape(scores.shape[:-1] + (1,))
    probs = torch.where(visible & (lse_g > -math.inf), torch.exp(scores - lse_g), 0.0)
    return probs.reshape(B, Hq, Sq, k.shape[1])


def attention_backward_ref(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_index: torch.Tensor | None = None,
    k_index: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    k_cu_seqlens: torch.Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block in fp64, normalised by a given (possibly global) ``lse``.

    This is the flash-attention backward written out: P = exp(S - lse), dV = P^T dO,
    dS = P * (dO V^T - delta) with delta = rowsum(dO * O) (with dropout, P and dO V^T are taken
    through the mask Z / (1 - p) where the forward applied it), through the softcap's tanh when it is on
    (dS *= 1 - tanh^2), dQ = scale dS K, dK = scale dS^T Q, then RoPE's transpose takes dQ, dK from rotated back to unrotated coordinates. With the
    global lse and delta, the gradients of all blocks sum to the full attention's gradients.

    Args:
        dout: (B, Sq, Hq, D); lse: (B, Hq, Sq); give ``delta`` (B, Hq, Sq) or the final ``out``.
        Other arguments as ``attention_ref``.

    Returns:
        dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D), fp64; dk/dv summed over each query group.
    """
    _check_qkv(q, k, v)
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    if delta is None:
        if out is None:
            raise ValueError("attention_backward_ref needs delta or out")
        delta = (dout.double() * out.double()).sum(-1).transpose(1, 2)  # (B, Hq, Sq)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    _check_features(q, k_cu_seqlens, cu_seqlens, window, softcap, alibi_slopes, dropout_p)
    rq, rk, v, q_index, k_index, q_positions, k_positions = _prepare(
        q, k, v, q_index, k_index, cu_seqlens, k_cu_seqlens, rope, q_positions, k_positions
    )
    visible, distance = _block_terms(q_index, k_index, causal, cu_seqlens, k_cu_seqlens, window)
    scores, tanh = _grouped_scores(rq, rk, scale, softcap, alibi_slopes, distance)
    scores = scores.masked_fill(~visible, -math.inf)
    lse_g = lse.double().reshape(B, Hkv, Hq // Hkv, Sq, 1)
    # Rows with lse = -inf saw no key: their probabilities are zero, not exp(-inf + inf). A NaN lse
    # stays NaN.
    p = torch.where(lse_g == -math.inf, torch.zeros_like(scores), torch.exp(scores - lse_g))
    dout_g = dout.double().reshape(B, Sq, Hkv, Hq // Hkv, D)
    dv = torch.einsum(
        "bhgqk,bqhgd->bkhd", _dropped(p, dropout_p, dropout_seed, dropout_offset, q_index, k_index), dout_g
    )
    dp = torch.einsum("bqhgd,bkhd->bhgqk", dout_g, v)
    dp = _dropped(dp, dropout_p, dropout_seed, dropout_offset, q_index, k_index)  # dO V^T Z / (1 - p)
    ds = p * (dp - delta.double().reshape(B, Hkv, Hq // Hkv, Sq, 1))
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, rk).reshape(B, Sq, Hq, D) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, rq.view(B, Sq, Hkv, Hq // Hkv, D)) * scale
    if rope is not None:
        dq = apply_rope(dq, q_positions, rope, transpose=True)
        dk = apply_rope(dk, k_positions, rope, transpose=True)
    return dq, dk, dv


def ring_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    world_size: int,
    layout: str = "zigzag",
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention as pure math over ``world_size`` virtual ranks: the spec for the scheduler.

    Inputs are the full sequence, (B, S, H, D). Each rank keeps its shard of Q (by ``layout``) and
    visits every rank's K/V shard in ring order (rank r sees shard (r - step) mod W at ``step``),
    merging fp64 partials with ``merge_partials``. Returns the full (out, lse) in sequence order,
    which equals ``attention_ref`` on the whole sequence.
    """
    _check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention needs Sq == Sk, got {q.shape[1]} and {k.shape[1]}")
    B, S, Hq, D = q.shape
    shards = shard_indices(S, world_size, layout, q.device, cu_seqlens)
    if positions is None and rope is not None:
        positions = default_positions(torch.arange(S, device=q.device), cu_seqlens)
    if rope is not None:
        # Dynamic NTK scales by the whole sequence's length: pinned once, not per block.
        seq_len = _dynamic_seq_len(rope, positions, None)
        rope = rope if seq_len is None else rope.at_seq_len(seq_len)
    out = torch.zeros(B, S, Hq, D, dtype=torch.float64, device=q.device)
    lse = torch.full((B, Hq, S), -math.inf, dtype=torch.float64, device=q.device)
    for rank in range(world_size):
        q_idx = shards[rank]
        o_acc, l_acc = empty_partials(q[:, q_idx], torch.float64)
        for step in range(world_size):
            k_idx = shards[(rank - step) % world_size]
            o_part, l_part = attention_ref(
                q[:, q_idx],
                k[:, k_idx],
                v[:, k_idx],
                causal=causal,
                softmax_scale=softmax_scale,
                q_index=q_idx,
                k_index=k_idx,
                cu_seqlens=cu_seqlens,
                rope=rope,
                q_positions=None if positions is None else positions[..., q_idx],
                k_positions=None if positions is None else positions[..., k_idx],
                window=window,
                softcap=softcap,
                alibi_slopes=alibi_slopes,
                dropout_p=dropout_p,
                dropout_seed=dropout_seed,
            )
            o_acc, l_acc = merge_partials(o_acc, l_acc, o_part, l_part)
        out[:, q_idx], lse[:, :, q_idx] = o_acc, l_acc
    return out, lse
