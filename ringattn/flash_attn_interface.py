"""flash-attn 2.8's Python interface on ringattn: same functions, argument order and returns.

``import ringattn.flash_attn_interface as fa`` is the only change code written for
``flash_attn.flash_attn_interface`` needs. Every flash-attn argument is accepted; a value ringattn
does not implement raises NotImplementedError naming the argument and the value. ringattn's own extras are keyword-only: ``rope``/``positions`` (RoPE fused into
the kernel), ``group``/``layout`` (ring attention), ``return_lse`` and ``backend``.

Conventions, as flash-attn's: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with Hq % Hkv == 0; varlen
tensors (total, H, D) with documents in ``cu_seqlens_q``/``cu_seqlens_k``; causal and the window
align the last query with the last key of each sequence (bottom-right). ``return_attn_probs=True``
returns ``(out, softmax_lse, S_dmask)`` with lse fp32 (B, Hq, Sq), or (Hq, total_q) for varlen, and
S_dmask None (it only exists with dropout). A row that sees no key has out 0 and lse +inf there, as
flash-attn returns it; ringattn's own ``return_lse=True`` gives ``(out, lse)`` with -inf on such rows,
the value that merges correctly (``ringattn.merge_partials``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .block import Span, check_devices, check_score_features
from .dropout import keep_mask, new_seed
from .layouts import LAYOUTS
from .merge import merge_partials
from .ops import attention
from .reference import attention_probs_ref
from .rope import RoPEConfig, cos_sin, rotate

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


# ------------------------------------------------------------------------------ argument checking


def check_tensors(**tensors) -> None:
    """Each argument must be a torch.Tensor (None where allowed is not passed here)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_positions(positions) -> None:
    if positions is not None and (
        not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64)
    ):
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise TypeError(f"positions must be an int32/int64 tensor or None, got {got}")


def check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a probability in [0, 1), got {dropout_p!r}")


def _check_options(q, dropout_p, window_size, softcap, alibi_slopes, **flags) -> None:
    check_dropout(dropout_p)
    for name, flag in flags.items():
        check_flag(name, flag)
    if flags.get("return_attn_probs") and flags.get("return_lse"):
        raise ValueError("pass return_attn_probs (flash-attn's triple) or return_lse, not both")
    check_score_features(q, window_size, softcap, alibi_slopes)


def _window(window_size, causal: bool) -> tuple[int, int]:
    """flash-attn's window with causal folded in (a causal window has no right side)."""
    left, right = (int(w) for w in window_size)
    return (left, 0) if causal and left >= 0 else (left, right)


def _returns(out, lse, return_attn_probs: bool, return_lse: bool, s_dmask=None):
    """out alone, (out, lse) for ringattn's return_lse, or flash-attn's (out, softmax_lse, S_dmask)."""
    if return_attn_probs:
        # flash-attn reports rows that see no key with lse = +inf; ringattn uses -inf internally.
        return out, torch.where(torch.isneginf(lse), math.inf, lse), s_dmask
    return (out, lse) if return_lse else out


def _dropout_pattern(q, k, dropout_p, seed, q_index, k_index, **options) -> torch.Tensor:
    """flash-attn's S_dmask, for tests: the probabilities (B, Hq, Sq, Sk) fp32 before dropout, negated
    where dropout dropped them. Computed by the fp64 spec: O(Sq * Sk) memory."""
    with torch.no_grad():
        probs = attention_probs_ref(q, k, q_index=q_index, k_index=k_index, **options)
        keep = keep_mask(dropout_p, seed, 0, q.shape[0], q.shape[2], q_index, k_index)
        return torch.where(keep, probs, -probs).float()


def _split_positions(positions, Sq: int, Sk: int, name: str = "positions"):
    """Key positions (.., Sk) as given; queries take the last Sq of them (bottom-right alignment)."""
    check_positions(positions)
    if positions is None:
        return None, None
    if Sq > Sk:
        raise ValueError(f"{name} with more queries ({Sq}) than keys ({Sk}) is ambiguous; rotate outside")
    if positions.shape[-1] != Sk:
        raise ValueError(f"{name} must end in the key length {Sk}, got shape {tuple(positions.shape)}")
    return positions[..., Sk - Sq :], positions


def _check_cu(name: str, cu, tokens: int, what: str) -> list[int]:
    """Document boundaries on the host: 1-D ints from 0, non-decreasing, ending at ``tokens``."""
    check_tensors(**{name: cu})
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32/int64, got {cu.dtype}")
    bounds = cu.tolist() if cu.dim() == 1 else None
    if (
        bounds is None
        or len(bounds) < 2
        or bounds[0] != 0
        or any(b < a for a, b in zip(bounds, bounds[1:], strict=False))
    ):
        raise ValueError(f"{name} must be 1-D, start at 0 and be non-decreasing, got {cu.tolist()}")
    if bounds[-1] != tokens:
        raise ValueError(f"{what} has {tokens} tokens but {name} ends at {bounds[-1]}")
    return bounds


def _check_varlen_shapes(**tensors) -> None:
    for name, t in tensors.items():
        if t.dim() != 3:
            raise ValueError(f"{name} must be (total, H, D), got shape {tuple(t.shape)}")


# ------------------------------------------------------------------------------------ the functions


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    return_lse: bool = False,
    group: Any = None,
    layout: str = "zigzag",
    backend: str = "auto",
) -> torch.Tensor | tuple:
    """flash-attn's ``flash_attn_func``: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D).

    ``causal`` aligns the last query with the last key when Sq != Sk, as flash-attn does (with
    Sq > Sk the first Sq - Sk rows see no key and are zero). ``window_size`` (left, right) keeps keys
    within left before and right after the query's aligned position (-1: unbounded); key tiles
    outside it are skipped. ``softcap`` > 0 caps scores to softcap * tanh(scores / softcap);
    ``alibi_slopes`` (Hq,) or (B, Hq) fp32 adds -slope * |query - key| distance. ``dropout_p`` drops
    probabilities with a counter-based mask (``ringattn.dropout``) whose seed is drawn from torch's
    CPU generator per call (``torch.manual_seed`` repeats it); the backward regenerates the mask, and
    every backend draws the same one. With dropout, ``return_attn_probs`` gives S_dmask (B, Hq, Sq, Sk):
    the probabilities before dropout, negative where dropped (computed in fp64; for tests). ``rope`` rotates q
    and k inside the kernel at ``positions`` ((Sk,) or (B, Sk), default 0..Sk-1; queries use the
    last Sq). With ``group`` set, q/k/v are this rank's shard in ``layout`` and the call runs ring
    attention over the group. ``deterministic=True`` makes results repeat bit for bit: "reference",
    "cpu" (for a fixed thread count) and "triton" (for a fixed tile choice) always do; "cuda" then
    computes dQ in its own pass instead of with atomicAdd. "auto" tries "triton" first on a GPU.
    """
    check_tensors(q=q, k=k, v=v)
    _check_options(
        q, dropout_p, window_size, softcap, alibi_slopes, causal=causal, deterministic=deterministic,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
    )  # fmt: skip
    check_positions(positions)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    seed = new_seed() if dropout_p else 0
    if group is not None:
        if return_attn_probs and dropout_p:
            raise NotImplementedError("return_attn_probs with dropout_p and group= (S_dmask of a shard)")
        from .ring import ring_attn_func

        out, lse = ring_attn_func(
            q, k, v, group=group, causal=causal, layout=layout, rope=rope, positions=positions,
            softmax_scale=softmax_scale, deterministic=deterministic, return_lse=True, backend=backend,
            window_size=_window(window_size, causal), softcap=softcap, alibi_slopes=alibi_slopes,
            dropout_p=dropout_p, dropout_seed=seed,
        )  # fmt: skip
        return _returns(out, lse, return_attn_probs, return_lse)
    check_devices(q, positions=positions)
    Sq, Sk = q.shape[1], k.shape[1]
    q_positions, k_positions = _split_positions(positions, Sq, Sk)
    # Bottom-right alignment as global indices: the last query and the last key share an index.
    q_span, k_span = Span(max(Sk - Sq, 0)), Span(max(Sq - Sk, 0))
    scores = dict(window_size=_window(window_size, causal), softcap=softcap, alibi_slopes=alibi_slopes)
    out, lse = attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale, q_span=q_span, k_span=k_span, rope=rope,
        q_positions=q_positions, k_positions=k_positions, **scores, dropout_p=dropout_p, dropout_seed=seed,
        deterministic=deterministic, backend=backend,
    )  # fmt: skip
    s_dmask = None
    if return_attn_probs and dropout_p:
        s_dmask = _dropout_pattern(
            q, k, dropout_p, seed, q_span.indices(Sq, q.device), k_span.indices(Sk, q.device), causal=causal,
            softmax_scale=softmax_scale, rope=rope, q_positions=q_positions, k_positions=k_positions,
            window=scores["window_size"], softcap=softcap, alibi_slopes=alibi_slopes,
        )  # fmt: skip
    return _returns(out, lse, return_attn_probs, return_lse, s_dmask)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple:
    """flash-attn's varlen call on packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D).

    Sequence b's queries are ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and its keys
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (int32/int64 (B + 1,), from 0); the lengths may differ
    (padded batches, cross-attention), and causal/window align each sequence's last query with its
    last key. ``block_table`` (B, pages) int32 makes k/v a paged cache (n_pages, page_size, Hkv, D):
    sequence b's keys are its pages in order. RoPE positions default to the index within each
    sequence (queries: their aligned index); ``positions`` (total,) overrides when both sides share
    boundaries. ``max_seqlen_*`` are accepted for compatibility and not needed. Returns out
    (total_q, Hq, D) [and lse (Hq, total_q)]. Other arguments as ``flash_attn_func``.
    """
    check_tensors(q=q, k=k, v=v)
    _check_options(
        q[None], dropout_p, window_size, softcap, None, causal=causal, deterministic=deterministic,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
    )  # fmt: skip
    check_positions(positions)
    check_devices(q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, positions=positions)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    _check_varlen_shapes(q=q)
    bounds_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    if block_table is not None:
        check_tensors(block_table=block_table)
        lengths = torch.diff(cu_seqlens_k)
        k, v = _gather_pages(k, block_table, lengths, "k"), _gather_pages(v, block_table, lengths, "v")
    _check_varlen_shapes(k=k, v=v)
    bounds_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if len(bounds_q) != len(bounds_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got {len(bounds_q) - 1} "
            f"and {len(bounds_k) - 1}"
        )
    cross = bounds_q != bounds_k
    if cross and positions is not None:
        raise ValueError("positions needs cu_seqlens_k equal to cu_seqlens_q; leave it None for defaults")
    if cross and rope is not None:
        lengths = zip(
            torch.diff(torch.tensor(bounds_q)).tolist(),
            torch.diff(torch.tensor(bounds_k)).tolist(),
            strict=True,
        )
        for b, (lq, lk) in enumerate(lengths):
            if lq > lk:
                raise ValueError(
                    f"rope with cu_seqlens_k: sequence {b} has more queries ({lq}) than keys ({lk}), "
                    "so its first queries have no position; rotate outside"
                )
    if return_attn_probs and dropout_p:
        raise NotImplementedError("return_attn_probs with dropout_p in a varlen call (S_dmask is per batch)")
    out, lse = attention(
        q[None], k[None], v[None], causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens_q,
        dropout_p=dropout_p, dropout_seed=new_seed() if dropout_p else 0,
        k_cu_seqlens=cu_seqlens_k if cross else None, rope=rope, q_positions=positions,
        k_positions=positions, window_size=_window(window_size, causal), softcap=softcap,
        alibi_slopes=_per_sequence_slopes(q[None], alibi_slopes, len(bounds_q) - 1), deterministic=deterministic,
        backend=backend,
    )  # fmt: skip
    return _returns(out[0], lse[0], return_attn_probs, return_lse)


def _per_sequence_slopes(q_packed, alibi_slopes, sequences: int):
    """Packed calls have one batch row, so (sequences, Hq) slopes must be equal per sequence and become
    (Hq,) (different rows: NotImplementedError); (Hq,) passes through."""
    if alibi_slopes is None:
        return None
    if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.dim() == 2:
        if alibi_slopes.shape[0] != sequences:
            raise ValueError(
                f"alibi_slopes must be (Hq,) or (batch={sequences}, Hq), got {tuple(alibi_slopes.shape)}"
            )
        if sequences and not bool((alibi_slopes == alibi_slopes[:1]).all()):
            raise NotImplementedError(
                "alibi_slopes that differ per sequence in a packed call are not implemented"
            )
        alibi_slopes = alibi_slopes[0] if sequences else alibi_slopes.new_zeros(alibi_slopes.shape[1])
    check_score_features(q_packed, alibi_slopes=alibi_slopes)
    return alibi_slopes


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, name: str):
    """Sequence b's first ``lengths[b]`` tokens from its pages ``block_table[b]``, packed: (total, H, D)."""
    if cache.dim() != 4:
        raise ValueError(
            f"{name} with block_table must be (n_pages, page_size, H, D), got {tuple(cache.shape)}"
        )
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"block_table must be (B, pages) int32, got {block_table.dtype} {tuple(block_table.shape)}"
        )
    if block_table.shape[0] != len(lengths):
        raise ValueError(f"block_table has {block_table.shape[0]} rows for {len(lengths)} sequences")
    page = cache.shape[1]
    if lengths.numel() and int(lengths.max()) > page * block_table.shape[1]:
        raise ValueError(f"a sequence is longer than its {block_table.shape[1]} pages of {page} tokens")
    pages = block_table.long()
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= cache.shape[0]):
        raise ValueError(f"block_table entries must index the {cache.shape[0]} pages of {name}")
    rows = [cache[pages[b]].flatten(0, 1)[: int(lengths[b])] for b in range(len(lengths))]
    return torch.cat(rows) if rows else cache.new_empty(0, *cache.shape[2:])


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **extras: Any,
) -> torch.Tensor | tuple:
    """``flash_attn_func`` on qkv (B, S, 3, H, D); the gradient flows to qkv. ``extras``: the
    keyword-only ringattn options of ``flash_attn_func``."""
    check_tensors(qkv=qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, S, 3, H, D), got shape {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, **extras,
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **extras: Any,
) -> torch.Tensor | tuple:
    """``flash_attn_func`` on q (B, Sq, Hq, D) and kv (B, Sk, 2, Hkv, D)."""
    check_tensors(q=q, kv=kv)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be (B, Sk, 2, Hkv, D), got shape {tuple(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, **extras,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **extras: Any,
) -> torch.Tensor | tuple:
    """``flash_attn_varlen_func`` on qkv (total, 3, H, D) with one ``cu_seqlens`` for both sides."""
    check_tensors(qkv=qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total, 3, H, D), got shape {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs, **extras,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **extras: Any,
) -> torch.Tensor | tuple:
    """``flash_attn_varlen_func`` on q (total_q, Hq, D) and kv (total_k, 2, Hkv, D)."""
    check_tensors(q=q, kv=kv)
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must be (total_k, 2, Hkv, D), got shape {tuple(kv.shape)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, **extras,
    )  # fmt: skip


def _ints_per_sequence(name: str, value, batch: int, device, default: int | None = None) -> torch.Tensor:
    """An int or (batch,) int tensor as an int64 CPU tensor (batch,); None gives ``default``."""
    if value is None:
        return torch.full((batch,), default, dtype=torch.int64)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return torch.full((batch,), int(value), dtype=torch.int64)
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int or an int32 tensor ({batch},), got {value!r}")
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(value.shape)}")
    check_devices(torch.empty(0, device=device), **{name: value})
    return value.to("cpu", torch.int64)


def _rotate_new_tokens(x, positions, layout: RoPEConfig, cos_table, sin_table):
    """x (B, S, H, D) rotated at positions (B, S) in fp32, returned in x's dtype: by ringattn's exact
    phase when no tables are given (``layout`` is the user's rope), else by rows of flash-attn's
    ``rotary_cos``/``rotary_sin`` tables (``layout`` gives only the rotary dim and pairing)."""
    if cos_table is None:
        cos, sin = cos_sin(layout, positions.to(x.device))
    else:
        cos, sin = (t.float()[positions.to(t.device)] for t in (cos_table, sin_table))
    return rotate(x.float(), cos, sin, layout).to(x.dtype)


def _append(cache: torch.Tensor, new: torch.Tensor, rows, seqlens, block_table) -> None:
    """Write new tokens (B, S_new, H, D) into ``cache`` in place at positions seqlens[b] + i."""
    B, S_new = new.shape[:2]
    pos = seqlens[:, None] + torch.arange(S_new)[None, :]  # (B, S_new)
    if block_table is None:
        index = (rows[:, None].expand(B, S_new), pos)
    else:
        page = cache.shape[1]
        index = (block_table.cpu().long().gather(1, pos // page), pos % page)
    cache.index_put_(
        tuple(i.reshape(-1).to(cache.device) for i in index), new.reshape(B * S_new, *new.shape[2:])
    )


def _packed_cache(k_cache, v_cache, rows, ranges, block_table, queries):
    """Keys and values (1, N, Hkv, D) holding every sequence's key ranges (``ranges[b]``: (lo, hi) cache
    positions), each range a document of ``queries`` queries, with the key-side and query-side document
    boundaries for the varlen mask. An unpaged cache in batch order is a view (no copy): the gaps
    between ranges become documents without queries, which nobody attends."""
    B = len(rows)
    if block_table is not None:
        pages, page = block_table.cpu().long(), k_cache.shape[1]
        picked = [
            pages[b, torch.arange(lo, hi) // page] * page + torch.arange(lo, hi) % page
            for b in range(B)
            for lo, hi in ranges[b]
        ]
        flat = torch.cat(picked).to(k_cache.device)
        keys, values = (c.flatten(0, 1)[flat][None] for c in (k_cache, v_cache))
        sizes = [hi - lo for b in range(B) for lo, hi in ranges[b]]
        k_bounds = [0, *torch.tensor(sizes, dtype=torch.long).cumsum(0).tolist()]
        return keys, values, k_bounds, [queries * d for d in range(len(sizes) + 1)]
    if torch.equal(rows, torch.arange(B)):
        keys, values = (c[:B].flatten(0, 1)[None] for c in (k_cache, v_cache))
    else:
        index = rows.to(k_cache.device)
        keys, values = (c.index_select(0, index).flatten(0, 1)[None] for c in (k_cache, v_cache))
    S = k_cache.shape[1]
    k_bounds, q_bounds = [0], [0]
    for b in range(B):
        for lo, hi in ranges[b]:
            if b * S + lo > k_bounds[-1]:  # a gap: a document with no queries
                k_bounds.append(b * S + lo)
                q_bounds.append(q_bounds[-1])
            k_bounds.append(b * S + hi)
            q_bounds.append(q_bounds[-1] + queries)
    return keys, values, k_bounds, q_bounds


SPLIT_KEYS = 4096  # keys per split that num_splits=0 aims at for single-query decoding


def _split_count(num_splits: int, Sq: int, alibi_slopes, spans: torch.Tensor, device_type: str) -> int:
    """How many key chunks each sequence's single query attends to separately (1: no split). Only a
    single query (decoding) without ALiBi splits: its chunks need no causal or distance alignment. The
    default splits on GPUs only: on the CPU the heads already keep every core busy (measured: no gain
    on 2 cores at B = 1, Hq = 32, 32K keys)."""
    if Sq != 1 or alibi_slopes is not None or not spans.numel():
        return 1
    longest = int(spans.max())
    by_length = min(16, longest // SPLIT_KEYS) if device_type == "cuda" else 1
    wanted = num_splits if num_splits > 0 else by_length
    return max(1, min(wanted, longest))


@torch.no_grad()
def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    rope: RoPEConfig | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's decoding call: attention of q (B, Sq, Hq, D) against a K/V cache, no gradient.

    k_cache/v_cache: (B_cache, S_cache, Hkv, D), or pages (n_pages, page_size, Hkv, D) with
    ``block_table`` (B, pages_per_sequence) int32. ``cache_seqlens`` (int or (B,) int32; default: the
    whole cache) tokens are valid per sequence, from ``cache_leftpad`` ((B,), default 0). When ``k``
    and ``v`` (B, S_new, Hkv, D) are given they are written into the caches *in place* at
    ``cache_seqlens`` (flash-attn's contract; the caches must have room) and attended to.
    ``cache_batch_idx`` (B,) picks cache rows. Causal and the window align the last query with the
    last key of each sequence.

    Rotary embedding of the new tokens (only with ``k``/``v``): ``rotary_cos``/``rotary_sin``
    (S_ro, rotary_dim / 2) tables as flash-attn takes them (``rotary_interleaved`` picks GPT-J pairs),
    or ringattn's ``rope`` (exact phase at any position; cos/sin are built for the new tokens only,
    never for the cache). New keys are rotated at positions cache_seqlens - leftpad + i and stored
    rotated; queries at the same positions when causal or windowed, else all at cache_seqlens -
    leftpad (flash-attn's rule). ``num_splits``: a single query per sequence (decoding) without ALiBi
    attends to its keys in that many chunks in one call, merged by lse (split-K: parallel work when
    B x Hkv is small); 0 picks about one chunk per ``SPLIT_KEYS`` keys (up to 16) on a GPU and no split
    on the CPU; 1, or several queries, no split. Returns out (B, Sq, Hq, D) [and lse (B, Hq, Sq) fp32, +inf on rows with no key].
    """
    check_tensors(q=q, k_cache=k_cache, v_cache=v_cache)
    _check_options(
        q, 0.0, window_size, softcap, None, causal=causal, rotary_interleaved=rotary_interleaved,
        return_softmax_lse=return_softmax_lse,
    )  # fmt: skip
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, Sq, Hq, D), got shape {tuple(q.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4 or t.shape != k_cache.shape:
            raise ValueError(
                f"{name} must be 4-D and match k_cache {tuple(k_cache.shape)}, got {tuple(t.shape)}"
            )
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (new tokens) or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin or neither")
    if rotary_cos is not None and rope is not None:
        raise ValueError("pass rotary_cos/rotary_sin (flash-attn's tables) or rope (ringattn's), not both")
    rotary = rotary_cos is not None or rope is not None
    if rotary and k is None:
        raise ValueError("rotary embedding needs the new tokens k and v (the cache holds rotated keys)")
    check_devices(
        q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_batch_idx=cache_batch_idx, block_table=block_table,
    )  # fmt: skip
    B, Sq, Hq, D = q.shape
    paged = block_table is not None
    if paged:
        check_tensors(block_table=block_table)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx and block_table cannot be combined (pages already pick rows)")
        if (
            block_table.dim() != 2
            or block_table.shape[0] != B
            or block_table.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(
                f"block_table must be ({B}, pages) int32, got {block_table.dtype} {tuple(block_table.shape)}"
            )
        capacity = k_cache.shape[1] * block_table.shape[1]
    else:
        capacity = k_cache.shape[1]
    rows = _ints_per_sequence("cache_batch_idx", cache_batch_idx, B, q.device, 0)
    if cache_batch_idx is None:
        rows = torch.arange(B)
    elif B and (int(rows.min()) < 0 or int(rows.max()) >= k_cache.shape[0]):
        raise ValueError(f"cache_batch_idx must index the {k_cache.shape[0]} rows of k_cache")
    if not paged and cache_batch_idx is None and k_cache.shape[0] < B:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {B}")
    seqlens = _ints_per_sequence("cache_seqlens", cache_seqlens, B, q.device, capacity if k is None else 0)
    leftpad = _ints_per_sequence("cache_leftpad", cache_leftpad, B, q.device, 0)
    new = 0
    if k is not None:
        check_tensors(k=k, v=v)
        new = k.shape[1]
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(
                f"k and v must be ({B}, S_new, {k_cache.shape[2]}, {k_cache.shape[3]}), got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )
    lengths = seqlens + new
    if bool((seqlens < 0).any()) or bool((lengths > capacity).any()):
        raise ValueError(f"cache_seqlens + new tokens must lie in [0, {capacity}], got {lengths.tolist()}")
    if bool((leftpad < 0).any()) or bool((leftpad > seqlens).any()):
        raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens], got {leftpad.tolist()}")

    if rotary:
        if rope is None:
            rotary_dim = 2 * rotary_cos.shape[-1]
            layout = RoPEConfig(D, partial_rotary_factor=rotary_dim / D, interleaved=rotary_interleaved)
        else:
            layout = rope
        start = (seqlens - leftpad)[:, None]
        k_pos = start + torch.arange(new)[None, :]
        windowed = causal or tuple(window_size) != (-1, -1)
        q_pos = start + torch.arange(Sq)[None, :] if windowed else start.expand(B, Sq)
        if rotary_cos is not None and int(torch.cat([k_pos, q_pos], 1).max()) >= rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} rows; the new tokens need more")
        q = _rotate_new_tokens(q, q_pos, layout, rotary_cos, rotary_sin)
        k = _rotate_new_tokens(k, k_pos, layout, rotary_cos, rotary_sin)
    if k is not None:
        _append(k_cache, k, rows, seqlens, block_table)
        _append(v_cache, v, rows, seqlens, block_table)

    window = _window(window_size, causal)
    first = leftpad
    if Sq == 1 and window[0] >= 0:  # one query: its window is a key range
        first = torch.maximum(leftpad, lengths - 1 - window[0])
    splits = _split_count(num_splits, Sq, alibi_slopes, lengths - first, q.device.type)
    slopes = _per_sequence_slopes(q, alibi_slopes, B)
    if splits == 1:
        ranges = [[(int(leftpad[b]), int(lengths[b]))] for b in range(B)]
        out, lse = _cache_attention(q, k_cache, v_cache, rows, ranges, block_table, Sq, causal=causal,
                                    softmax_scale=softmax_scale, window_size=window, softcap=softcap,
                                    alibi_slopes=slopes, backend=backend)  # fmt: skip
        return _returns(out, lse, True, False)[:2] if return_softmax_lse else out
    # Split-K decoding: each sequence's keys in `splits` chunks, one document each (so the chunks run in
    # parallel in one call), the partial results merged by their lse. A single query sees every key up
    # to its own, so the chunks need no causal mask; the window is already in the ranges.
    ranges = [
        [(int(lo) + int(first[b]), int(hi) + int(first[b])) for lo, hi in _chunk_bounds(int(lengths[b] - first[b]), splits)]
        for b in range(B)
    ]  # fmt: skip
    out, lse = _cache_attention(q.repeat_interleave(splits, dim=0), k_cache, v_cache, rows, ranges, block_table,
                                1, softmax_scale=softmax_scale, softcap=softcap, backend=backend)  # fmt: skip
    out, lse = out.view(B, splits, Hq, D), lse.view(B, splits, Hq, 1)
    merged_out, merged_lse = out[:, :1], lse[:, 0]  # (B, 1, Hq, D), (B, Hq, 1)
    for j in range(1, splits):
        merged_out, merged_lse = merge_partials(merged_out, merged_lse, out[:, j : j + 1], lse[:, j])
    merged_out = merged_out.to(q.dtype)
    return _returns(merged_out, merged_lse, True, False)[:2] if return_softmax_lse else merged_out


def _chunk_bounds(length: int, n: int) -> list[tuple[int, int]]:
    """[0, length) cut into n runs, the first length % n one longer."""
    base, extra = divmod(length, n)
    starts = [i * base + min(i, extra) for i in range(n + 1)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def _cache_attention(q, k_cache, v_cache, rows, ranges, block_table, queries, **options):
    """q (R, queries, Hq, D) against each of the R key ranges of ``ranges`` (in order): out (R, queries,
    Hq, D) and lse (R, Hq, queries) fp32, -inf on rows that see no key."""
    R, _, Hq, D = q.shape
    keys, values, k_bounds, q_bounds = _packed_cache(k_cache, v_cache, rows, ranges, block_table, queries)
    out, lse = attention(
        q.reshape(1, R * queries, Hq, D), keys, values, cu_seqlens=torch.tensor(q_bounds, device=q.device),
        k_cu_seqlens=torch.tensor(k_bounds, device=q.device), **options,
    )  # fmt: skip
    return out.reshape(R, queries, Hq, D), lse.reshape(Hq, R, queries).transpose(0, 1)
