"""torch.library custom ops over the block contract, with fake implementations and autograd.

``torch.compile(fullgraph=True)`` sees each attention call as one opaque op whose output shapes come
from the fake implementation, so models using ringattn compile without graph breaks. Autograd saves
exactly q, k, v, out and lse; RoPE-rotated copies of q and k never exist.

Custom ops take only tensors and plain values, so the RoPE settings travel as a JSON string.
"""

from __future__ import annotations

import functools

import torch

from .block import BlockMask, Span, block_backward, block_forward, check_block, check_grad_inputs
from .rope import RoPEConfig

__all__ = ["attention", "rope_to_json"]


def rope_to_json(rope: RoPEConfig | None) -> str:
    if rope is not None and not isinstance(rope, RoPEConfig):
        raise TypeError(f"rope must be a RoPEConfig or None, got {type(rope).__name__}")
    return "" if rope is None else rope.to_json()


@functools.lru_cache(maxsize=32)
def _rope_from_json(text: str) -> RoPEConfig | None:
    return RoPEConfig.from_json(text) if text else None


def _block_kwargs(
    cu_seqlens, k_cu_seqlens, q_positions, k_positions, alibi_slopes, mask_ints, floats, rope_json, backend
) -> dict:
    """``block_forward``/``block_backward`` keywords from the ops' plain arguments.

    ``mask_ints`` is (causal, q_start, q_stride, k_start, k_stride, deterministic, window left, right,
    dropout seed, dropout offset); ``floats`` is (softmax_scale, softcap, dropout_p).
    """
    causal, q_start, q_stride, k_start, k_stride, deterministic, left, right, seed, offset = mask_ints
    softmax_scale, softcap, dropout_p = floats
    return dict(
        mask=BlockMask(
            bool(causal), Span(q_start, q_stride), Span(k_start, k_stride), cu_seqlens, k_cu_seqlens
        ),
        softmax_scale=softmax_scale,
        rope=_rope_from_json(rope_json),
        q_positions=q_positions,
        k_positions=k_positions,
        window_size=(left, right),
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=seed,
        dropout_offset=offset,
        deterministic=bool(deterministic),
        backend=backend,
    )


@torch.library.custom_op("ringattn::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    k_cu_seqlens: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    mask_ints: list[int],
    floats: list[float],
    rope_json: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kw = _block_kwargs(
        cu_seqlens,
        k_cu_seqlens,
        q_positions,
        k_positions,
        alibi_slopes,
        mask_ints,
        floats,
        rope_json,
        backend,
    )
    return block_forward(q, k, v, **kw)


def _check_op_call(q, k, v, *options):
    """The fakes' validation: what ``block_args`` checks without reading tensor data. The dispatcher
    runs a fake on real tensors too when one input is a meta tensor, so a fake must refuse what the
    real op would (mixed devices above all) instead of returning uninitialised memory."""
    kw = _block_kwargs(*options)
    check_block(
        q,
        k,
        v,
        kw["mask"],
        softmax_scale=kw["softmax_scale"],
        rope=kw["rope"],
        q_positions=kw["q_positions"],
        k_positions=kw["k_positions"],
        window_size=kw["window_size"],
        softcap=kw["softcap"],
        alibi_slopes=kw["alibi_slopes"],
        dropout_p=kw["dropout_p"],
        dropout_seed=kw["dropout_seed"],
        dropout_offset=kw["dropout_offset"],
    )


@_attention_fwd.register_fake
def _(q, k, v, *options):
    _check_op_call(q, k, v, *options)
    B, S, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("ringattn::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    k_cu_seqlens: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    mask_ints: list[int],
    floats: list[float],
    rope_json: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kw = _block_kwargs(
        cu_seqlens,
        k_cu_seqlens,
        q_positions,
        k_positions,
        alibi_slopes,
        mask_ints,
        floats,
        rope_json,
        backend,
    )
    return block_backward(dout, q, k, v, out, lse, **kw)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, *options):
    _check_op_call(q, k, v, *options)
    check_grad_inputs(q, dout, out, lse, None)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.options = options


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    # lse is an output for ring merges, not a differentiable quantity of this API.
    dq, dk, dv = _attention_bwd(dout.contiguous(), q, k, v, out, lse, *ctx.options)
    return (dq, dk, dv) + (None,) * len(ctx.options)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_span: Span | None = None,
    k_span: Span | None = None,
    cu_seqlens: torch.Tensor | None = None,
    k_cu_seqlens: torch.Tensor | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    deterministic: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable, compile-safe block attention: out (B, Sq, Hq, D), lse (B, Hq, Sq) fp32.

    Arguments as ``ringattn.block.block_forward`` (``k_cu_seqlens``: the mask's key-side documents);
    gradients flow to q, k and v (not through lse, nor to ``alibi_slopes``).
    """
    q_span, k_span = q_span or Span(), k_span or Span()
    # Everything that needs no tensor data is checked here, before the op: a meta tensor among real
    # ones would send the op to its fake, and errors name the user's arguments.
    check_block(
        q,
        k,
        v,
        BlockMask(causal, q_span, k_span, cu_seqlens, k_cu_seqlens),
        softmax_scale=softmax_scale,
        rope=rope,
        q_positions=q_positions,
        k_positions=k_positions,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        dropout_offset=dropout_offset,
    )
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or a backend name), got {backend!r}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    left, right = (int(w) for w in window_size)
    mask_ints = [
        int(causal), q_span.start, q_span.stride, k_span.start, k_span.stride, int(deterministic), left, right,
        int(dropout_seed), int(dropout_offset),
    ]  # fmt: skip
    floats = [scale, float(softcap), float(dropout_p)]
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach()
    return _attention_fwd(
        q, k, v, cu_seqlens, k_cu_seqlens, q_positions, k_positions, alibi_slopes, mask_ints, floats,
        rope_to_json(rope), backend,
    )  # fmt: skip
