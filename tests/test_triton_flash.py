"""Triton fused-RoPE flash attention (forward, backward) against the fp64 reference.

Runs under the Triton interpreter without a GPU (conftest sets TRITON_INTERPRET=1 and patches the
interpreter's bf16 tl.dot). Tolerance rule (harness): |ours - ref64| <= 2 x |peer - ref64| + eps for
outputs, 3x for gradients, where the peer is plain torch attention in the dtype under test, on q/k
rotated in that dtype as transformers does (fp32 cos/sin cast to the dtype), differentiated by
autograd in that dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from harness import (
    GRAD_FACTOR,
    OUTPUT_FACTOR,
    assert_within_peer_error,
    contract_floor,
    launcher_rope,
    nan_filled,
)

from ringattn import RoPEConfig
from ringattn.block import block_args, block_forward
from ringattn.indexing import default_positions
from ringattn.reference import attention_backward_ref, attention_ref, visible_mask
from ringattn.rope import cos_sin
from tritonkernels.configs import KernelConfig
from tritonkernels.flash import flash_attn_bwd, flash_attn_fwd


@dataclass
class Case:
    Sq: int
    Sk: int | None = None
    Hq: int = 2
    Hkv: int = 2
    D: int = 16
    dtype: torch.dtype = torch.float32
    causal: bool = False
    rope: RoPEConfig | None = None
    q_span: tuple[int, int] = (0, 1)
    k_span: tuple[int, int] = (0, 1)
    cu_seqlens: list[int] | None = None
    pos_offset: int | None = None  # explicit positions: offset + index
    batch_positions: bool = False  # (B, S) positions instead of (S,)
    B: int = 1
    block: int = 32
    block_n: int | None = None  # key tile; None: square tiles of ``block``
    extra: dict = field(default_factory=dict)

    @property
    def sk(self) -> int:
        return self.Sq if self.Sk is None else self.Sk


def _inputs(c: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(c.B, c.Sq, c.Hq, c.D, generator=gen).to(c.dtype)
    k = torch.randn(c.B, c.sk, c.Hkv, c.D, generator=gen).to(c.dtype)
    v = torch.randn(c.B, c.sk, c.Hkv, c.D, generator=gen).to(c.dtype)
    dout = torch.randn(c.B, c.Sq, c.Hq, c.D, generator=gen).to(c.dtype)
    return q, k, v, dout


def _indices(c: Case):
    q_index = c.q_span[0] + c.q_span[1] * torch.arange(c.Sq)
    k_index = c.k_span[0] + c.k_span[1] * torch.arange(c.sk)
    return q_index, k_index


def _positions(c: Case):
    if c.rope is None:
        return None, None
    q_index, k_index = _indices(c)
    cu = None if c.cu_seqlens is None else torch.tensor(c.cu_seqlens)
    if c.pos_offset is not None:
        qp, kp = c.pos_offset + q_index, c.pos_offset + k_index
    else:
        qp, kp = default_positions(q_index, cu), default_positions(k_index, cu)
    if c.batch_positions:  # a different offset per batch row
        qp = torch.stack([qp + 5 * b for b in range(c.B)])
        kp = torch.stack([kp + 5 * b for b in range(c.B)])
    return qp.to(torch.int32), kp.to(torch.int32)


def _rotate_in_dtype(x, positions, rope: RoPEConfig):
    """transformers-style RoPE in x's dtype: fp32 cos/sin (exact-phase or hf) cast to the dtype."""
    cos, sin = cos_sin(rope, positions)
    cos, sin = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)  # (..., S, 1, r/2)
    r = rope.rotary_dim
    rot, rest = x[..., :r], x[..., r:]
    if rope.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def _peer(c: Case, q, k, v, dout):
    """Plain torch attention in the test dtype: (out, lse, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qp, kp = _positions(c)
    rq, rk = (q, k) if c.rope is None else (_rotate_in_dtype(q, qp, c.rope), _rotate_in_dtype(k, kp, c.rope))
    group = c.Hq // c.Hkv
    rk, rv = rk.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q_index, k_index = _indices(c)
    cu = None if c.cu_seqlens is None else torch.tensor(c.cu_seqlens)
    vis = visible_mask(q_index, k_index, c.causal, cu)  # (Sq, Sk)
    scale = 1.0 / math.sqrt(c.D)
    scores = torch.einsum("bqhd,bkhd->bhqk", rq, rk) * scale
    lse = scores.masked_fill(~vis, -math.inf).logsumexp(-1)
    # Rows with no visible key: softmax over zeros, then zeroed, so autograd stays finite.
    has_key = vis.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~vis, -math.inf).masked_fill(~has_key, 0.0), dim=-1)
    probs = probs * vis
    out = torch.einsum("bhqk,bkhd->bqhd", probs, rv)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _ref_kwargs(c: Case) -> dict:
    q_index, k_index = _indices(c)
    qp, kp = _positions(c)
    return dict(
        causal=c.causal,
        q_index=q_index,
        k_index=k_index,
        cu_seqlens=None if c.cu_seqlens is None else torch.tensor(c.cu_seqlens),
        rope=c.rope,
        q_positions=qp,
        k_positions=kp,
    )


def _reference(c: Case, q, k, v, dout):
    kw = _ref_kwargs(c)
    out, lse = attention_ref(q, k, v, **kw)
    dq, dk, dv = attention_backward_ref(dout, q, k, v, lse, out=out, **kw)
    return out, lse, dq, dk, dv


def _ours(c: Case, q, k, v, dout):
    qp, kp = _positions(c)
    cu = None if c.cu_seqlens is None else torch.tensor(c.cu_seqlens)
    kw = dict(causal=c.causal, q_span=c.q_span, k_span=c.k_span, cu_seqlens=cu)
    kw |= launcher_rope(
        q, k, c.rope, q_positions=qp, k_positions=kp, q_span=c.q_span, k_span=c.k_span, cu_seqlens=cu
    )
    cfg = KernelConfig(c.block, c.block_n or c.block, 4, 1)
    out = nan_filled(*q.shape, dtype=q.dtype)
    lse = nan_filled(c.B, c.Hq, c.Sq)
    flash_attn_fwd(q, k, v, out=out, lse=lse, config=cfg, **kw)
    dq, dk, dv = (
        nan_filled(*q.shape, dtype=q.dtype),
        nan_filled(*k.shape, dtype=k.dtype),
        nan_filled(*v.shape, dtype=v.dtype),
    )
    flash_attn_bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, config_dq=cfg, config_dkdv=cfg, **kw)
    return out, lse, dq, dk, dv


def _assert_lse(ours, ref, peer):
    assert not torch.isnan(ours).any(), "lse: NaN (unwritten or invalid)"
    empty = torch.isinf(ref)
    assert torch.equal(torch.isinf(ours) & (ours < 0), empty), "lse: -inf exactly where rows see no key"
    if (~empty).any():
        assert_within_peer_error(ours[~empty], ref[~empty], peer[~empty].float(), name="lse")


def check_case(c: Case, seed: int = 0):
    q, k, v, dout = _inputs(c, seed)
    originals = [t.clone() for t in (q, k, v, dout)]
    ours = _ours(c, q, k, v, dout)
    for before, after in zip(originals, (q, k, v, dout), strict=True):
        assert torch.equal(before, after), "inputs must not be modified"
    ref = _reference(c, q, k, v, dout)
    peer = _peer(c, q, k, v, dout)
    assert_within_peer_error(ours[0], ref[0], peer[0], factor=OUTPUT_FACTOR, name="out")
    _assert_lse(ours[1], ref[1], peer[1])
    empty_rows = torch.isinf(ref[1]).transpose(1, 2)  # (B, Sq, Hq)
    assert (ours[0][empty_rows] == 0).all(), "rows that see no key must output zeros"
    floors = contract_floor(dout, q, k, v, ours[0], ours[1], ref[2:], **_ref_kwargs(c))
    for i, name in ((2, "dq"), (3, "dk"), (4, "dv")):
        assert_within_peer_error(
            ours[i], ref[i], peer[i], factor=GRAD_FACTOR, eps=1e-6 + floors[i - 2], name=name
        )


R16 = RoPEConfig(16, theta=1e4)
R_BIG = RoPEConfig(16, theta=45.2e9)

FAST = {
    "fp32-len1-causal": Case(1, causal=True, rope=R16),
    "bf16-len63-causal-gqa4-rope": Case(63, Hq=4, Hkv=1, dtype=torch.bfloat16, causal=True, rope=R16),
    "fp16-sq63-sk127-full-gqa8-interleaved-partial": Case(
        63,
        127,
        Hq=8,
        Hkv=1,
        dtype=torch.float16,
        rope=RoPEConfig(32, 1e4, partial_rotary_factor=0.5, interleaved=True),
        D=32,
    ),
    "fp32-sq40-sk127-causal-offset-spans": Case(
        40, 127, causal=True, rope=R16, q_span=(90, 1), k_span=(0, 1)
    ),
    "bf16-docs-empty-doc-causal": Case(
        70, dtype=torch.bfloat16, causal=True, rope=R16, cu_seqlens=[3, 20, 20, 45, 66], Hq=4, Hkv=2
    ),
    "fp32-pos-beyond-2^22-theta45.2e9": Case(63, causal=True, rope=R_BIG, pos_offset=4_194_000),
    "bf16-pos-beyond-2^22-theta45.2e9": Case(
        63, causal=True, rope=R_BIG, pos_offset=4_194_000, dtype=torch.bfloat16
    ),
    "fp32-zigzag-stride2-batch-positions": Case(
        33, 30, causal=True, rope=R16, q_span=(1, 2), k_span=(0, 2), B=2, batch_positions=True
    ),
    "fp16-d80-yarn-hf-causal": Case(
        45,
        D=80,
        dtype=torch.float16,
        causal=True,
        rope=RoPEConfig(
            80,
            1e6,
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
            precision="hf",
        ),
    ),
    "fp32-no-rope-full-gqa4": Case(50, 37, Hq=4, Hkv=1),
}


@pytest.mark.parametrize("case", FAST.values(), ids=FAST.keys())
def test_flash_matches_reference(case):
    check_case(case)


def _slow_cases():
    cases = {}
    for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        for S in (1, 63, 127, 257):
            for group in (1, 4, 8):
                for causal in (False, True):
                    # Short sequences get more batch rows and KV heads: the tolerance rule compares
                    # max errors, which needs more than a handful of values to be a stable statistic.
                    B, Hkv = (4, 2) if S < 64 else (1, 1)
                    cases[f"{dname}-len{S}-gqa{group}-{'causal' if causal else 'full'}"] = Case(
                        S, B=B, Hq=group * Hkv, Hkv=Hkv, dtype=dtype, causal=causal, rope=R_BIG,
                        pos_offset=5_000_000,
                    )  # fmt: skip
    for D in (64, 80, 96, 128, 256):
        cases[f"bf16-d{D}-causal-docs"] = Case(
            70, D=D, dtype=torch.bfloat16, causal=True, rope=RoPEConfig(D, 5e5), cu_seqlens=[0, 30, 30, 70]
        )
    cases["fp32-sq257-sk63-llama3-partial"] = Case(
        257,
        63,
        rope=RoPEConfig(
            32,
            5e5,
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64},
            partial_rotary_factor=0.75,
        ),
        D=32,
        causal=True,
        q_span=(63, 1),
    )  # fmt: skip
    cases["fp32-dynamic-interleaved-block16"] = Case(
        90,
        rope=RoPEConfig(
            16, 1e4, {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32}, interleaved=True
        ),
        block=16,
    )
    return cases


SLOW = _slow_cases()


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW.values(), ids=SLOW.keys())
def test_flash_matches_reference_sweep(case):
    check_case(case)


def test_global_lse_and_delta_from_outside():
    # Two key blocks with the full attention's lse/delta: their gradients sum to the full gradients.
    c = Case(40, 40, causal=True, rope=R16, Hq=4, Hkv=2)
    q, k, v, dout = _inputs(c, seed=3)
    ref = _reference(c, q, k, v, dout)
    lse = ref[1].float()
    delta = (dout.double() * ref[0]).sum(-1).transpose(1, 2).float().contiguous()
    cfg = KernelConfig(16, 16, 4, 1)
    parts = []
    for lo, hi in ((0, 17), (17, 40)):
        parts.append(
            flash_attn_bwd(
                dout, q, k[:, lo:hi], v[:, lo:hi], None, lse, delta, causal=True, k_span=(lo, 1),
                **launcher_rope(q, k[:, lo:hi], R16, k_span=(lo, 1)), grad_dtype=torch.float32,
                config_dq=cfg, config_dkdv=cfg,
            )
        )  # fmt: skip
    peer = _peer(c, q, k, v, dout)
    dq = parts[0][0] + parts[1][0]
    assert_within_peer_error(dq, ref[2], peer[2], factor=GRAD_FACTOR, name="dq")
    assert_within_peer_error(
        torch.cat([parts[0][1], parts[1][1]], 1), ref[3], peer[3], factor=GRAD_FACTOR, name="dk"
    )
    assert_within_peer_error(
        torch.cat([parts[0][2], parts[1][2]], 1), ref[4], peer[4], factor=GRAD_FACTOR, name="dv"
    )


def test_strided_inputs_and_fp32_out():
    # q/k/v as (B, H, S, D) tensors viewed as (B, S, H, D): non-contiguous, handled by strides.
    c = Case(37, 29, Hq=4, Hkv=2, causal=True, rope=R16, q_span=(10, 1))
    q, k, v, dout = _inputs(c, seed=5)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    kw = dict(causal=True, q_span=(10, 1), config=KernelConfig(16, 16, 4, 1))
    kw |= launcher_rope(q, k, R16, q_span=(10, 1))
    out_c, lse_c = flash_attn_fwd(q, k, v, **kw)
    out_s, lse_s = flash_attn_fwd(qs, ks, vs, out_dtype=torch.float32, **kw)
    assert out_s.dtype == torch.float32
    torch.testing.assert_close(out_s, out_c, rtol=0, atol=0)
    torch.testing.assert_close(lse_s, lse_c, rtol=0, atol=0)


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, dout = _inputs(Case(8, Hq=2, Hkv=2))
    with pytest.raises(ValueError, match="q_positions"):
        block_forward(q, k, v, rope=R16, q_positions=torch.full((8,), -1), backend="triton")
    with pytest.raises(TypeError, match="q_positions"):
        block_forward(q, k, v, rope=R16, q_positions=torch.zeros(8), backend="triton")
    with pytest.raises(ValueError, match="q_rope and k_rope"):
        flash_attn_fwd(q, k, v, q_rope=launcher_rope(q, k, R16)["q_rope"])
    with pytest.raises(TypeError, match="q must be"):
        flash_attn_fwd(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="lse"):
        flash_attn_bwd(dout, q, k, v, None, torch.zeros(1, 2, 7), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="query heads"):
        flash_attn_fwd(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(TypeError, match="out_dtype"):
        flash_attn_fwd(q, k, v, out_dtype=torch.float16)


def test_position_checks_do_not_read_device_tensors_on_the_host():
    # On an accelerator the range check is a device-side assert, not a host sync per call (the ring
    # launches every hop). Meta tensors refuse host reads, so this fails if the check syncs.
    q = torch.empty(1, 8, 2, 16, device="meta")
    args = block_args(q, q, q, rope=R16, q_positions=torch.arange(8, device="meta"))
    assert args.q_rope.positions.device.type == "meta" and args.q_rope.positions.dtype == torch.int32
    dynamic = RoPEConfig(16, 1e4, {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 4})
    with pytest.raises(RuntimeError, match="meta"):  # dynamic scaling needs the maximum on the host
        block_args(q, q, q, rope=dynamic)


def test_empty_query_or_key_blocks():
    # Sk = 0: every row sees nothing (lse -inf, zero output, zero dq); Sq = 0: dk = dv = 0.
    q, k, v, dout = _inputs(Case(5, 3, Hq=2, Hkv=1, rope=R16))
    cfg = KernelConfig(16, 16, 4, 1)
    out, lse = flash_attn_fwd(
        q, k[:, :0], v[:, :0], causal=True, **launcher_rope(q, k[:, :0], R16), config=cfg
    )
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = flash_attn_bwd(
        dout,
        q,
        k[:, :0],
        v[:, :0],
        out,
        lse,
        **launcher_rope(q, k[:, :0], R16),
        config_dq=cfg,
        config_dkdv=cfg,
    )
    assert (dq == 0).all() and dk.shape == (1, 0, 1, 16)
    empty_q = q[:, :0]
    out0, lse0 = flash_attn_fwd(empty_q, k, v, **launcher_rope(empty_q, k, R16), config=cfg)
    assert out0.shape == (1, 0, 2, 16) and lse0.shape == (1, 2, 0)
    dq0, dk0, dv0 = flash_attn_bwd(
        dout[:, :0],
        empty_q,
        k,
        v,
        out0,
        lse0,
        **launcher_rope(empty_q, k, R16),
        config_dq=cfg,
        config_dkdv=cfg,
    )
    assert dq0.shape == (1, 0, 2, 16) and (dk0 == 0).all() and (dv0 == 0).all()
