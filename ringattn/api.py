"""Drop-in attention functions with flash-attn's and SDPA's signatures, plus fused RoPE.

Unsupported arguments (dropout, dense masks) raise NotImplementedError naming the argument: nothing
is silently ignored. ``backend`` picks "triton", "cuda", "cpu" or "reference"; "auto" takes the best
one whose ``can_implement`` accepts the inputs' device, dtype and shapes.
"""

from __future__ import annotations

import torch

from .block import Span, check_devices, check_softmax_scale
from .layouts import LAYOUTS
from .ops import attention
from .rope import RoPEConfig

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "scaled_dot_product_attention"]


def _no_dropout(dropout_p: float) -> None:
    if dropout_p:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not supported (use 0.0)")


def _check_tensors(**tensors) -> None:
    """Each argument must be a torch.Tensor (None where allowed is not passed here)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_positions(positions) -> None:
    if positions is not None and (
        not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64)
    ):
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise TypeError(f"positions must be an int32/int64 tensor or None, got {got}")


def _split_positions(positions, Sq: int, Sk: int, name: str = "positions"):
    """Key positions (.., Sk) as given; queries take the last Sq of them (bottom-right alignment)."""
    _check_positions(positions)
    if positions is None:
        return None, None
    if Sq > Sk:
        raise ValueError(f"{name} with more queries ({Sq}) than keys ({Sk}) is ambiguous; rotate outside")
    if positions.shape[-1] != Sk:
        raise ValueError(f"{name} must end in the key length {Sk}, got shape {tuple(positions.shape)}")
    return positions[..., Sk - Sq :], positions


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    group=None,
    layout: str = "zigzag",
    backend: str = "auto",
):
    """flash-attn's ``flash_attn_func``: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D).

    ``causal`` aligns the last query with the last key when Sq != Sk, as flash-attn does (with
    Sq > Sk the first Sq - Sk rows see no key and are zero). ``rope``
    rotates q and k inside the kernel at ``positions`` ((Sk,) or (B, Sk), default 0..Sk-1; queries
    use the last Sq). With ``group`` set, q/k/v are this rank's shard in ``layout`` and the call runs
    ring attention over the group. ``return_lse`` adds lse (B, Hq, Sq) fp32. ``deterministic=True``
    runs only backends whose results repeat bit for bit: "reference", "cpu" (for a fixed thread
    count) and "triton" (for a fixed tile choice), not "cuda", whose backward accumulates dQ with
    atomicAdd (``csrc/attn_cuda.cu``). "auto" tries "triton" first on a GPU.
    """
    _no_dropout(dropout_p)
    _check_tensors(q=q, k=k, v=v)
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("deterministic", deterministic)):
        _check_flag(name, flag)
    _check_positions(positions)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if group is not None:
        from .ring import ring_attn_func

        return ring_attn_func(
            q,
            k,
            v,
            group=group,
            causal=causal,
            layout=layout,
            rope=rope,
            positions=positions,
            softmax_scale=softmax_scale,
            deterministic=deterministic,
            return_lse=return_lse,
            backend=backend,
        )
    check_devices(q, positions=positions)
    Sq, Sk = q.shape[1], k.shape[1]
    q_positions, k_positions = _split_positions(positions, Sq, Sk)
    # Bottom-right alignment as global indices: the last query and the last key share an index.
    q_span, k_span = Span(max(Sk - Sq, 0)), Span(max(Sq - Sk, 0))
    out, lse = attention(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        q_span=q_span,
        k_span=k_span,
        rope=rope,
        q_positions=q_positions,
        k_positions=k_positions,
        deterministic=deterministic,
        backend=backend,
    )
    return (out, lse) if return_lse else out


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
    *,
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
):
    """flash-attn's varlen call on packed documents: q (total, Hq, D), k/v (total, Hkv, D).

    Documents are given by ``cu_seqlens_q`` (int32/int64, (n_docs + 1,), starting at 0); packed
    self-attention needs ``cu_seqlens_k`` equal to it. RoPE positions default to the index within each
    document; ``positions`` (total,) overrides. Returns out (total, Hq, D) [and lse (Hq, total)].
    ``max_seqlen_*`` are accepted for compatibility; they are not needed. ``deterministic`` as in
    ``flash_attn_func``.
    """
    _no_dropout(dropout_p)
    _check_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("deterministic", deterministic)):
        _check_flag(name, flag)
    _check_positions(positions)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32/int64, got {cu.dtype}")
    check_devices(q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, positions=positions)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must be 1-D, start at 0 and be non-decreasing, got {cu.tolist()}")
    if not torch.equal(cu_seqlens_q.cpu(), cu_seqlens_k.cpu()):
        raise NotImplementedError(
            "cu_seqlens_k different from cu_seqlens_q (cross-attention) is not supported"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (total, H, D), got shape {tuple(t.shape)}")
        if t.shape[0] != int(cu_seqlens_q[-1]):
            raise ValueError(
                f"{name} has {t.shape[0]} tokens but cu_seqlens_q ends at {int(cu_seqlens_q[-1])}"
            )
    out, lse = attention(
        q[None],
        k[None],
        v[None],
        causal=causal,
        softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens_q,
        rope=rope,
        q_positions=positions,
        k_positions=positions,
        deterministic=deterministic,
        backend=backend,
    )
    return (out[0], lse[0]) if return_lse else out[0]


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
    it needs Sq == Sk). Dense ``attn_mask`` is not supported.
    """
    _no_dropout(dropout_p)
    if attn_mask is not None:
        raise NotImplementedError(
            "attn_mask: dense masks are not supported; use is_causal or documents (varlen)"
        )
    _check_tensors(query=query, key=key, value=value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, S, D), got shape {tuple(t.shape)}")
    _check_flag("is_causal", is_causal)
    _check_flag("enable_gqa", enable_gqa)
    _check_positions(positions)
    check_devices(query, key=key, value=value, positions=positions)
    check_softmax_scale(scale, "scale")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for GQA"
        )
    if rope is not None and positions is not None and query.shape[2] != key.shape[2]:
        raise ValueError("positions with rope need equal query and key lengths")
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
