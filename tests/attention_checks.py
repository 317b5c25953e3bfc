"""One attention problem (``Case``), its inputs, the peer and the checks every backend test shares.

The tolerance rule (``harness``, from ``ringattn.testing``): |ours - ref64| <= 2 |peer - ref64| + eps
for out and lse, 3x for dq, dk, dv. ``ref64`` is ``ringattn.reference`` (never re-written here); the
peer is ``peer_attention``: plain torch attention in the dtype under test, RoPE applied by
``rotate_in_dtype``, differentiated by autograd.

``check_block`` runs a backend through the block contract (``block_forward``/``block_backward``);
``check_triton_launchers`` runs the Triton launchers with an explicit tile shape. Both hold out, lse,
dq, dk and dv to the rule with ``assert_matches_reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from harness import (
    GRAD_FACTOR,
    HAS_GPU,
    OUTPUT_FACTOR,
    assert_within_peer_error,
    contract_floor,
    launcher_rope,
    nan_filled,
)

from ringattn import RoPEConfig
from ringattn.backends import BACKENDS
from ringattn.block import BlockMask, Span, block_args, block_backward, block_forward
from ringattn.dropout import keep_mask
from ringattn.indexing import aligned_query_index, default_positions, default_query_positions
from ringattn.reference import attention_backward_ref, attention_ref, visible_mask
from ringattn.rope import cos_sin, rotate

DROPOUT_SEED, DROPOUT_OFFSET = 0x5EED_1234_ABCD, 7  # above 2^32: both Philox key words matter
FAR = 4_190_000  # positions beyond 2^22, where fp32 angles pos * inv_freq are off by ~0.1 rad


def backend_device(backend: str) -> str:
    """Where a backend's test tensors live: CUDA for cuda/triton on a GPU machine, else the CPU
    (triton then runs under the interpreter; cuda declines CPU tensors and its tests skip)."""
    return "cuda" if HAS_GPU and backend in ("cuda", "triton") else "cpu"


@dataclass(frozen=True)
class Case:
    """One block: q (B, Sq, Hq, D) against k, v (B, Sk, Hkv, D), its mask, spans and RoPE.

    Positions are the contract's default (the index within the document) unless ``position_offset``
    is set (offset + global index) or ``batched_positions`` is (one row per batch entry, row b
    shifted by 1000 b); then they are passed explicitly.
    """

    Sq: int
    Sk: int | None = None  # None: Sq
    B: int = 1
    Hq: int = 2
    Hkv: int = 2
    D: int = 16
    causal: bool = False
    rope: RoPEConfig | None = None
    cu_seqlens: tuple[int, ...] | None = None
    q_span: Span = Span()
    k_span: Span = Span()
    position_offset: int | None = None
    batched_positions: bool = False
    transposed: bool = False  # q, k, v as (B, H, S, D).transpose(1, 2) views, as transformers passes them
    k_cu_seqlens: tuple[int, ...] | None = None  # key-side documents (cross-length varlen)
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # "head": slopes (Hq,); "batch": (B, Hq)
    dropout_p: float = 0.0  # with DROPOUT_SEED and DROPOUT_OFFSET

    @property
    def sk(self) -> int:
        return self.Sq if self.Sk is None else self.Sk

    def cu(self, device="cpu") -> torch.Tensor | None:
        return None if self.cu_seqlens is None else torch.tensor(self.cu_seqlens, device=device)

    def mask(self, device="cpu") -> BlockMask:
        k_cu = None if self.k_cu_seqlens is None else torch.tensor(self.k_cu_seqlens, device=device)
        return BlockMask(self.causal, self.q_span, self.k_span, self.cu(device), k_cu)

    def alibi_slopes(self, device="cpu") -> torch.Tensor | None:
        """ALiBi's geometric slopes 2^(-8 (h + 1) / Hq), per batch entry scaled by 1 / (b + 1)."""
        if self.alibi is None:
            return None
        slopes = 2.0 ** (-8.0 * torch.arange(1, self.Hq + 1) / self.Hq)
        if self.alibi == "batch":
            slopes = slopes[None, :] / torch.arange(1, self.B + 1)[:, None]
        return slopes.to(device, torch.float32)

    def feature_kwargs(self, device="cpu") -> dict:
        """The block contract's score options of this case."""
        return dict(
            window_size=self.window,
            softcap=self.softcap,
            alibi_slopes=self.alibi_slopes(device),
            dropout_p=self.dropout_p,
            dropout_seed=DROPOUT_SEED if self.dropout_p else 0,
            dropout_offset=DROPOUT_OFFSET if self.dropout_p else 0,
        )

    def positions(self, device="cpu"):
        """(q_positions, k_positions) to pass to the contract, or (None, None) for its defaults."""
        if self.rope is None or (self.position_offset is None and not self.batched_positions):
            return None, None
        sides = []
        for span, length in ((self.q_span, self.Sq), (self.k_span, self.sk)):
            index = span.indices(length)
            pos = index + self.position_offset if self.position_offset is not None else None
            pos = default_positions(index, self.cu()) if pos is None else pos
            if self.batched_positions:
                pos = torch.stack([pos + 1000 * b for b in range(self.B)])
            sides.append(pos.to(device))
        return tuple(sides)

    def spec_kwargs(self, device="cpu") -> dict:
        """Keyword arguments of ``attention_ref`` (and ``peer_attention``) for this block."""
        qp, kp = self.positions(device)
        return dict(
            causal=self.causal,
            q_index=self.q_span.indices(self.Sq, device),
            k_index=self.k_span.indices(self.sk, device),
            cu_seqlens=self.cu(device),
            rope=self.rope,
            q_positions=qp,
            k_positions=kp,
            k_cu_seqlens=self.mask(device).k_cu_seqlens,
            window=self.window,
            softcap=self.softcap,
            alibi_slopes=self.alibi_slopes(device),
            dropout_p=self.dropout_p,
            dropout_seed=DROPOUT_SEED if self.dropout_p else 0,
            dropout_offset=DROPOUT_OFFSET if self.dropout_p else 0,
        )


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0, device="cpu"):
    """q, k, v, dout: standard normal (drawn in fp32 on the CPU, then cast and moved)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(S, H):
        if case.transposed:
            return torch.randn(case.B, H, S, case.D, generator=gen).to(device, dtype).transpose(1, 2)
        return torch.randn(case.B, S, H, case.D, generator=gen).to(device, dtype)

    q, k, v = rand(case.Sq, case.Hq), rand(case.sk, case.Hkv), rand(case.sk, case.Hkv)
    dout = torch.randn(case.B, case.Sq, case.Hq, case.D, generator=gen).to(device, dtype)
    return q, k, v, dout


# ------------------------------------------------------------------------------------------ the peer


def rotate_in_dtype(x: torch.Tensor, positions: torch.Tensor, rope: RoPEConfig, *, transpose=False):
    """RoPE the way plain torch code (transformers) applies it, in x's dtype.

    cos and sin come from ``ringattn.rope.cos_sin`` (fp32; exact or transformers' angles as
    ``rope.precision`` says; attention factor included) and are cast to x's dtype, as transformers
    casts its fp32 tables; the rotation then runs in that dtype. ``positions``: (S,) or (B, S).
    ``transpose``: the transposed rotation (by -angle), the RoPE backward.
    """
    cos, sin = (t.to(x.device, x.dtype) for t in cos_sin(rope, positions.cpu()))
    return rotate(x, cos, sin, rope, transpose=transpose)


def peer_attention(
    q, k, v, *, causal=False, softmax_scale=None, q_index=None, k_index=None, cu_seqlens=None,
    rope=None, q_positions=None, k_positions=None, k_cu_seqlens=None, window=(-1, -1), softcap=0.0,
    alibi_slopes=None, dropout_p=0.0, dropout_seed=0, dropout_offset=0,
):  # fmt: skip
    """The peer of the tolerance rule: plain torch attention in the inputs' dtype; (out, lse).

    Same arguments and semantics as ``ringattn.reference.attention_ref`` (positions default to the
    index within the document). Every step runs in the test dtype, as user code without this
    library would: RoPE by ``rotate_in_dtype`` (fp32 tables cast to the dtype, not an fp64 rotation
    rounded once, which would flatter the peer), scores, softmax (torch upcasts internally, as it
    always does), lse and the value product. Rows that see no key give out = 0 and lse = -inf, with
    finite gradients. Differentiable: autograd in the dtype gives the peer's gradients.
    """
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    q_index = torch.arange(Sq, device=q.device) if q_index is None else q_index.to(q.device)
    k_index = torch.arange(Sk, device=q.device) if k_index is None else k_index.to(q.device)
    cu = None if cu_seqlens is None else cu_seqlens.to(q.device)
    k_cu = None if k_cu_seqlens is None else k_cu_seqlens.to(q.device)
    if rope is not None:
        qp = default_query_positions(q_index, cu, k_cu) if q_positions is None else q_positions
        kp = default_positions(k_index, cu if k_cu is None else k_cu) if k_positions is None else k_positions
        q, k = rotate_in_dtype(q, qp, rope), rotate_in_dtype(k, kp, rope)
    group = Hq // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:  # the bias in fp32, added in the dtype, as plain torch code would
        aligned = aligned_query_index(q_index, cu, k_cu)
        distance = (aligned[:, None] - k_index[None, :]).abs().float()
        bias = -alibi_slopes.float().reshape(-1, Hq, 1, 1) * distance
        scores = scores + bias.to(scores.dtype)
    visible = visible_mask(q_index, k_index, causal, cu, k_cu_seqlens=k_cu, window=window)  # (Sq, Sk)
    scores = scores.masked_fill(~visible, -math.inf)
    lse = scores.logsumexp(-1)
    has_key = visible.any(-1, keepdim=True)  # softmax over zeros on empty rows, then zeroed
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * visible
    if dropout_p:
        keep = keep_mask(dropout_p, dropout_seed, dropout_offset, B, Hq, q_index, k_index)
        probs = probs * keep / (1 - dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def peer_results(q, k, v, dout, **spec) -> dict:
    """The peer's out, lse and (by autograd in the dtype) dq, dk, dv, by name."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = peer_attention(q, k, v, **spec)
    out.backward(dout)
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def reference_results(q, k, v, dout, **spec) -> dict:
    """fp64 out, lse, dq, dk, dv from ``ringattn.reference`` (the spec), by name."""
    out, lse = attention_ref(q, k, v, **spec)
    dq, dk, dv = attention_backward_ref(dout, q, k, v, lse, out=out, **spec)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


# -------------------------------------------------------------------------------------- the checks


def assert_lse(ours, ref, peer, name="lse"):
    """-inf exactly on the rows that see no key; elsewhere the rule."""
    assert not torch.isnan(ours).any(), f"{name}: NaN (unwritten or invalid)"
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), empty), f"{name}: -inf rows differ from the reference"
    assert_within_peer_error(ours[~empty], ref[~empty], peer[~empty], factor=OUTPUT_FACTOR, name=name)


def assert_matches_reference(ours: dict, q, k, v, dout, spec: dict) -> None:
    """out, lse, dq, dk, dv of a backend (by name) against the fp64 reference with the rule.

    Rows that see no key must output zeros. Gradients get the contract floor (``contract_floor``,
    computed from ours out and lse) added to the rule's epsilon.
    """
    ref, peer = reference_results(q, k, v, dout, **spec), peer_results(q, k, v, dout, **spec)
    assert_within_peer_error(ours["out"], ref["out"], peer["out"], factor=OUTPUT_FACTOR, name="out")
    assert_lse(ours["lse"], ref["lse"], peer["lse"])
    empty_rows = torch.isneginf(ref["lse"]).transpose(1, 2)  # (B, Sq, Hq)
    assert (ours["out"][empty_rows] == 0).all(), "rows that see no key must output zeros"
    grads = ("dq", "dk", "dv")
    floors = contract_floor(dout, q, k, v, ours["out"], ours["lse"], [ref[n] for n in grads], **spec)
    for name, floor in zip(grads, floors, strict=True):
        assert_within_peer_error(
            ours[name], ref[name], peer[name], factor=GRAD_FACTOR, eps=1e-6 + floor, name=name
        )


def cannot_run(case: Case, dtype: torch.dtype, backend: str, device="cpu") -> str:
    """Why ``backend`` cannot run ``case`` in ``dtype`` on ``device`` (its ``can_implement`` reason),
    or "" when it can."""
    q, k, v, _ = make_inputs(case, dtype, device=device)
    qp, kp = case.positions(device)
    args = block_args(
        q,
        k,
        v,
        case.mask(device),
        rope=case.rope,
        q_positions=qp,
        k_positions=kp,
        **case.feature_kwargs(device),
    )
    feature = args.unsupported(BACKENDS[backend].features)
    if feature:
        return f"{backend}: {feature} is not implemented"
    ok, reason = BACKENDS[backend].can_implement(q, k, v, args)
    return "" if ok else f"{backend}: {reason}"


def check_block(case: Case, dtype: torch.dtype, backend: str, device="cpu", *, out_fp32=False, seed=0):
    """Forward and backward of ``backend`` through the block contract vs the fp64 reference.

    Also: output dtypes and shapes, and inputs left unmodified.
    """
    q, k, v, dout = make_inputs(case, dtype, seed, device)
    before = [t.clone() for t in (q, k, v, dout)]
    qp, kp = case.positions(device)
    mask = case.mask(device)
    kw = dict(rope=case.rope, q_positions=qp, k_positions=kp, backend=backend, **case.feature_kwargs(device))
    out_dtype = torch.float32 if out_fp32 else dtype
    out, lse = block_forward(q, k, v, mask, out_dtype=out_dtype, **kw)
    assert out.dtype == out_dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (case.B, case.Hq, case.Sq)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, mask, **kw)
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.dtype == dtype and g.shape == t.shape
    ours = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    assert_matches_reference(ours, q, k, v, dout, case.spec_kwargs(device))
    for t, b in zip((q, k, v, dout), before, strict=True):
        assert torch.equal(t, b), "inputs were modified"


def check_triton_launchers(case: Case, dtype: torch.dtype, config, device="cpu", seed=0):
    """``tritonkernels.flash`` launchers with tile shape ``config`` (a ``KernelConfig``, used for
    the forward and both backward kernels) into NaN-filled buffers, vs the fp64 reference."""
    from tritonkernels.flash import flash_attn_bwd, flash_attn_fwd

    q, k, v, dout = make_inputs(case, dtype, seed, device)
    before = [t.clone() for t in (q, k, v, dout)]
    qp, kp = case.positions(device)
    cu = case.cu(device)
    kw = dict(causal=case.causal, q_span=case.q_span, k_span=case.k_span, cu_seqlens=cu)
    kw |= launcher_rope(
        q, k, case.rope, q_positions=qp, k_positions=kp, q_span=case.q_span, k_span=case.k_span, cu_seqlens=cu
    )
    out = nan_filled(*q.shape, dtype=dtype, device=device)
    lse = nan_filled(case.B, case.Hq, case.Sq, device=device)
    flash_attn_fwd(q, k, v, out=out, lse=lse, config=config, **kw)
    dq, dk, dv = (nan_filled(*t.shape, dtype=dtype, device=device) for t in (q, k, v))
    flash_attn_bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, config_dq=config, config_dkdv=config, **kw)
    for t, b in zip((q, k, v, dout), before, strict=True):
        assert torch.equal(t, b), "inputs must not be modified"
    ours = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    assert_matches_reference(ours, q, k, v, dout, case.spec_kwargs(device))
