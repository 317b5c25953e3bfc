"""Shared checks of a compiled block-attention backend against the fp64 reference.

Each case runs the backend's forward and backward through ``ringattn.block`` and holds out, lse, dq, dk
and dv to the tolerance rule of ``harness.py``: the peer is plain torch attention (RoPE applied with
torch, scores, softmax, values) in the dtype under test, differentiated by autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from harness import GRAD_FACTOR, OUTPUT_FACTOR, assert_within_peer_error, contract_floor

from ringattn import RoPEConfig
from ringattn.block import BlockMask, Span, block_backward, block_forward
from ringattn.reference import attention_backward_ref, attention_ref, visible_mask
from ringattn.rope import cos_sin

FAR = 4_190_000  # positions beyond 2^22


@dataclass
class Case:
    B: int = 1
    Sq: int = 63
    Sk: int = 63
    Hq: int = 4
    Hkv: int = 2
    D: int = 64
    causal: bool = True
    rope: RoPEConfig | None = None
    cu_seqlens: list[int] | None = None
    q_span: Span = field(default_factory=Span)
    k_span: Span = field(default_factory=Span)
    position_offset: int = 0  # added to default positions (needs no documents)
    batched_positions: bool = False
    transposed: bool = False  # q, k, v as (B, H, S, D).transpose(1, 2) views, as transformers passes them

    def mask(self) -> BlockMask:
        cu = None if self.cu_seqlens is None else torch.tensor(self.cu_seqlens)
        return BlockMask(self.causal, self.q_span, self.k_span, cu)


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(S, H):
        if case.transposed:
            return torch.randn(case.B, H, S, case.D, generator=gen).to(device, dtype).transpose(1, 2)
        return torch.randn(case.B, S, H, case.D, generator=gen).to(device, dtype)

    q, k, v = rand(case.Sq, case.Hq), rand(case.Sk, case.Hkv), rand(case.Sk, case.Hkv)
    dout = torch.randn(case.B, case.Sq, case.Hq, case.D, generator=gen).to(device, dtype)
    return q, k, v, dout


def positions(case: Case, device="cpu"):
    if case.rope is None or case.position_offset == 0 and not case.batched_positions:
        return None, None  # the contract's defaults
    qp = case.q_span.indices(case.Sq) + case.position_offset
    kp = case.k_span.indices(case.Sk) + case.position_offset
    if case.batched_positions:  # a different offset per batch row
        qp = torch.stack([qp + 1000 * b for b in range(case.B)])
        kp = torch.stack([kp + 1000 * b for b in range(case.B)])
    return qp.to(device), kp.to(device)


def _rotate_peer(x, pos, rope: RoPEConfig):
    """Plain torch RoPE in x's dtype: exact (or hf) fp32 cos/sin tables cast to the dtype."""
    cos, sin = cos_sin(rope, pos.cpu(), impl="torch")
    cos, sin = cos.to(x.device, x.dtype).unsqueeze(-2), sin.to(x.device, x.dtype).unsqueeze(-2)
    r = rope.rotary_dim
    rot, rest = x[..., :r], x[..., r:]
    if rope.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def _default_positions(case: Case, qp, kp):
    from ringattn.indexing import default_positions

    mask = case.mask()
    if qp is None:
        qp = default_positions(case.q_span.indices(case.Sq), mask.cu_seqlens)
        kp = default_positions(case.k_span.indices(case.Sk), mask.cu_seqlens)
    return qp, kp


def peer_attention(case: Case, q, k, v, qp, kp):
    """Plain torch attention in the inputs' dtype (the peer of the tolerance rule): out, lse."""
    mask = case.mask()
    if case.rope is not None:
        qp, kp = _default_positions(case, qp, kp)
        q, k = _rotate_peer(q, qp, case.rope), _rotate_peer(k, kp, case.rope)
    G = case.Hq // case.Hkv
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(case.D))
    vis = visible_mask(
        case.q_span.indices(case.Sq, q.device), case.k_span.indices(case.Sk, q.device), case.causal,
        None if mask.cu_seqlens is None else mask.cu_seqlens.to(q.device),
    )  # fmt: skip
    scores = scores.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(torch.isfinite(lse)[..., None], torch.softmax(scores, dim=-1), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def _lse_check(ours, ref, peer, name):
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), finite), f"{name}: -inf rows differ from the reference"
    assert (ours[~finite] == -math.inf).all(), f"{name}: empty rows must have lse = -inf"
    assert_within_peer_error(ours[finite], ref[finite], peer[finite], factor=OUTPUT_FACTOR, name=name)


def check_case(case: Case, dtype: torch.dtype, backend: str, device="cpu", out_fp32=False):
    """Forward and backward of ``backend`` vs the fp64 reference, with the peer-error rule."""
    q, k, v, dout = make_inputs(case, dtype, device=device)
    before = [t.clone() for t in (q, k, v, dout)]
    qp, kp = positions(case, device)
    mask = case.mask()
    mask_dev = BlockMask(
        mask.causal, mask.q_span, mask.k_span, None if mask.cu_seqlens is None else mask.cu_seqlens.to(device)
    )
    kw = dict(rope=case.rope, q_positions=qp, k_positions=kp)
    out, lse = block_forward(
        q, k, v, mask_dev, out_dtype=torch.float32 if out_fp32 else None, backend=backend, **kw
    )
    assert out.dtype == (torch.float32 if out_fp32 else dtype) and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (case.B, case.Hq, case.Sq)

    ref_kw = dict(
        causal=case.causal,
        q_index=case.q_span.indices(case.Sq, device),
        k_index=case.k_span.indices(case.Sk, device),
        cu_seqlens=mask_dev.cu_seqlens,
        **kw,
    )
    out64, lse64 = attention_ref(q, k, v, **ref_kw)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    peer_out, peer_lse = peer_attention(case, qg, kg, vg, qp, kp)
    assert_within_peer_error(out, out64, peer_out, name="out")
    _lse_check(lse, lse64, peer_lse, "lse")

    dq, dk, dv = block_backward(dout, q, k, v, out, lse, mask_dev, backend=backend, **kw)
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.dtype == dtype and g.shape == t.shape
    ref_grads = attention_backward_ref(dout, q, k, v, lse64, out=out64, **ref_kw)
    floors = contract_floor(dout, q, k, v, out, lse, ref_grads, **ref_kw)
    peer_out.backward(dout)
    for name, ours, ref, peer, floor in zip(
        ("dq", "dk", "dv"), (dq, dk, dv), ref_grads, (qg.grad, kg.grad, vg.grad), floors, strict=True
    ):
        assert_within_peer_error(ours, ref, peer, factor=GRAD_FACTOR, eps=1e-6 + floor, name=name)
    for t, b in zip((q, k, v, dout), before, strict=True):
        assert torch.equal(t, b), "inputs were modified"
