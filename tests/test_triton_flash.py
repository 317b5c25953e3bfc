"""The Triton flash-attention launchers (``tritonkernels.flash``) called directly: tile shapes, a
global lse/delta from outside, strided inputs, empty blocks, argument errors.

Correctness of the Triton backend over the shared cases is in test_attention.py (through the block
contract); here the launchers get explicit ``KernelConfig`` tile shapes and NaN-filled output
buffers (``attention_checks.check_triton_launchers``). Without a GPU they run under the Triton
interpreter (conftest sets TRITON_INTERPRET=1 and installs the interpreter's bf16 fixes).
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import (
    Case,
    backend_device,
    check_triton_launchers,
    make_inputs,
    peer_results,
    reference_results,
)
from harness import GRAD_FACTOR, assert_within_peer_error, launcher_rope

from ringattn import RoPEConfig
from ringattn.block import Span, block_args, block_forward
from tritonkernels.configs import KernelConfig
from tritonkernels.flash import flash_attn_bwd, flash_attn_fwd

R16 = RoPEConfig(16, theta=1e4)
pytestmark = pytest.mark.gpu  # CUDA tensors on a GPU machine, the interpreter elsewhere
DEVICE = backend_device("triton")
TILE16 = KernelConfig(16, 16, 4, 1)


@pytest.mark.slow
def test_dynamic_interleaved_rope_with_16x16_tiles():
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32}
    case = Case(90, rope=RoPEConfig(16, 1e4, dynamic, interleaved=True))
    check_triton_launchers(case, torch.float32, TILE16, DEVICE)


def test_global_lse_and_delta_from_outside():
    # Two key blocks with the full attention's lse/delta: their gradients sum to the full gradients.
    c = Case(40, Hq=4, Hkv=2, causal=True, rope=R16)
    q, k, v, dout = make_inputs(c, torch.float32, seed=3, device=DEVICE)
    spec = c.spec_kwargs(DEVICE)
    ref = reference_results(q, k, v, dout, **spec)
    lse = ref["lse"].float()
    delta = (dout.double() * ref["out"]).sum(-1).transpose(1, 2).float().contiguous()
    parts = []
    for lo, hi in ((0, 17), (17, 40)):
        parts.append(
            flash_attn_bwd(
                dout, q, k[:, lo:hi], v[:, lo:hi], None, lse, delta, causal=True, k_span=(lo, 1),
                **launcher_rope(q, k[:, lo:hi], R16, k_span=(lo, 1)), grad_dtype=torch.float32,
                config_dq=TILE16, config_dkdv=TILE16,
            )
        )  # fmt: skip
    peer = peer_results(q, k, v, dout, **spec)
    dq = parts[0][0] + parts[1][0]
    assert_within_peer_error(dq, ref["dq"], peer["dq"], factor=GRAD_FACTOR, name="dq")
    dk, dv = (torch.cat([parts[0][i], parts[1][i]], 1) for i in (1, 2))
    assert_within_peer_error(dk, ref["dk"], peer["dk"], factor=GRAD_FACTOR, name="dk")
    assert_within_peer_error(dv, ref["dv"], peer["dv"], factor=GRAD_FACTOR, name="dv")


def test_strided_inputs_and_fp32_out():
    # q/k/v as (B, H, S, D) tensors viewed as (B, S, H, D): non-contiguous, handled by strides.
    c = Case(37, 29, Hq=4, Hkv=2, causal=True, rope=R16, q_span=Span(10))
    # Each launch is held to the fp64 rule, not to the other launch: Triton specialises on unit
    # strides and on divisibility by 16, so the two launches are different compiled kernels, which on
    # a GPU may contract multiply-adds differently and differ in the last bits.
    q, k, v, dout = make_inputs(c, torch.float32, seed=5, device=DEVICE)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    kw = dict(causal=True, q_span=(10, 1), config=TILE16)
    kw |= launcher_rope(q, k, R16, q_span=(10, 1))
    out_c, lse_c = flash_attn_fwd(q, k, v, **kw)
    out_s, lse_s = flash_attn_fwd(qs, ks, vs, out_dtype=torch.float32, **kw)
    assert out_s.dtype == torch.float32
    spec = c.spec_kwargs(DEVICE)
    ref = reference_results(q, k, v, dout, **spec)
    peer = peer_results(q, k, v, dout, **spec)
    for layout, (out, lse) in (("contiguous", (out_c, lse_c)), ("strided", (out_s, lse_s))):
        assert_within_peer_error(out, ref["out"], peer["out"], name=f"{layout} out")
        assert_within_peer_error(lse, ref["lse"], peer["lse"], name=f"{layout} lse")
    # the same launch again is the same compiled variant: bitwise equal
    again, _ = flash_attn_fwd(qs, ks, vs, out_dtype=torch.float32, **kw)
    assert torch.equal(again, out_s)


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, dout = make_inputs(Case(8, Hq=2, Hkv=2), torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="q_positions"):
        block_forward(q, k, v, rope=R16, q_positions=torch.full((8,), -1), backend="triton")
    with pytest.raises(TypeError, match="q_positions"):
        block_forward(q, k, v, rope=R16, q_positions=torch.zeros(8), backend="triton")
    with pytest.raises(ValueError, match="q_rope and k_rope"):
        flash_attn_fwd(q, k, v, q_rope=launcher_rope(q, k, R16)["q_rope"])
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        flash_attn_fwd(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="lse"):
        flash_attn_bwd(
            dout, q, k, v, None, torch.zeros(1, 2, 7, device=DEVICE), torch.zeros(1, 2, 8, device=DEVICE)
        )
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
    q, k, v, dout = make_inputs(Case(5, 3, Hq=2, Hkv=1, rope=R16), torch.float32, device=DEVICE)
    no_k = dict(launcher_rope(q, k[:, :0], R16), config_dq=TILE16, config_dkdv=TILE16)
    out, lse = flash_attn_fwd(
        q, k[:, :0], v[:, :0], causal=True, **launcher_rope(q, k[:, :0], R16), config=TILE16
    )
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = flash_attn_bwd(dout, q, k[:, :0], v[:, :0], out, lse, **no_k)
    assert (dq == 0).all() and dk.shape == (1, 0, 1, 16)
    empty_q = q[:, :0]
    out0, lse0 = flash_attn_fwd(empty_q, k, v, **launcher_rope(empty_q, k, R16), config=TILE16)
    assert out0.shape == (1, 0, 2, 16) and lse0.shape == (1, 2, 0)
    no_q = dict(launcher_rope(empty_q, k, R16), config_dq=TILE16, config_dkdv=TILE16)
    dq0, dk0, dv0 = flash_attn_bwd(dout[:, :0], empty_q, k, v, out0, lse0, **no_q)
    assert dq0.shape == (1, 0, 2, 16) and (dk0 == 0).all() and (dv0 == 0).all()
