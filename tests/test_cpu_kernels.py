"""The compiled CPU backend ("cpu") against the fp64 reference: forward, lse and all gradients."""

import itertools
import math
from dataclasses import replace

import pytest
import torch
from harness import nan_filled
from kernel_checks import FAR, Case, check_case, make_inputs

from ringattn import RoPEConfig, merge_partials
from ringattn._extension import compiled
from ringattn.backends import BACKENDS
from ringattn.block import BlockMask, Span, block_args, block_backward, block_forward, select_backend

pytestmark = pytest.mark.skipif(compiled() is None, reason="ringattn._C not built")

FAR_ROPE = RoPEConfig(64, theta=45.2e9)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "len1": Case(Sq=1, Sk=1),
    "len63-causal-mha": Case(Sq=63, Sk=63, Hq=2, Hkv=2),
    "len127-full-gqa4": Case(Sq=127, Sk=127, Hq=4, Hkv=1, causal=False),
    "len257-causal-gqa8-d128": Case(Sq=257, Sk=257, Hq=8, Hkv=1, D=128),
    "sq63-sk257-suffix-causal": Case(Sq=63, Sk=257, q_span=Span(194)),
    "sq257-sk63-full": Case(Sq=257, Sk=63, causal=False, Hq=2, Hkv=1),
    "d80-rope-far": Case(Sq=70, Sk=70, D=80, rope=RoPEConfig(80, theta=45.2e9), position_offset=FAR),
    "d96-rope-interleaved-partial": Case(
        Sq=65, Sk=65, D=96, rope=RoPEConfig(96, interleaved=True, partial_rotary_factor=0.5)
    ),
    "d256-rope-hf": Case(Sq=40, Sk=40, Hq=2, Hkv=1, D=256, rope=RoPEConfig(256, theta=5e5, precision="hf")),
    "docs-empty-doc-outside": Case(Sq=127, Sk=127, cu_seqlens=[3, 40, 40, 100, 120], rope=FAR_ROPE),
    "docs-full-mask": Case(Sq=80, Sk=80, causal=False, cu_seqlens=[0, 30, 30, 80]),
    "zigzag-stride-spans-rope": Case(Sq=33, Sk=40, q_span=Span(5, 2), k_span=Span(0, 3), rope=FAR_ROPE),
    "far-positions-batched": Case(
        B=2, Sq=50, Sk=50, rope=FAR_ROPE, position_offset=FAR, batched_positions=True, transposed=True
    ),
    "yarn-attention-factor": Case(Sq=48, Sk=48, rope=RoPEConfig(64, theta=1e4, scaling=YARN)),
    "fully-masked-block": Case(Sq=16, Sk=16, q_span=Span(0), k_span=Span(100)),
    "transposed-views": Case(Sq=70, Sk=70, transposed=True, rope=RoPEConfig(64)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cpu_matches_reference(case, dtype):
    check_case(case, dtype, "cpu")


def test_cpu_fp32_partials_for_bf16_inputs():
    check_case(Case(Sq=70, Sk=70, rope=FAR_ROPE, position_offset=FAR), torch.bfloat16, "cpu", out_fp32=True)


def test_cpu_backward_with_global_lse_and_delta_sums_over_blocks():
    # The ring's use: each key block's backward takes the global lse and delta; the sum is the full grad.
    case = Case(Sq=90, Sk=90, Hq=4, Hkv=2, rope=FAR_ROPE, cu_seqlens=[0, 50, 90])
    q, k, v, dout = make_inputs(case, torch.float32, seed=3)
    mask = case.mask()
    out, lse = block_forward(q, k, v, mask, rope=case.rope, backend="cpu")
    full = block_backward(dout, q, k, v, out, lse, mask, rope=case.rope, backend="cpu")
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for start, stop in ((0, 37), (37, 90)):
        block_mask = BlockMask(True, Span(0), Span(start), mask.cu_seqlens)
        kp = torch.arange(start, stop) - torch.where(torch.arange(start, stop) >= 50, 50, 0)
        dq_b, dk_b, dv_b = block_backward(
            dout, q, k[:, start:stop], v[:, start:stop], None, lse, block_mask, delta=delta,
            rope=case.rope, k_positions=kp, backend="cpu",
        )  # fmt: skip
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)
    torch.testing.assert_close(dq, full[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(dks, 1), full[1], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(dvs, 1), full[2], atol=2e-6, rtol=1e-5)


def test_cpu_writes_every_output_element():
    # Call the kernels on NaN-filled buffers: every element, empty rows included, must be written.
    from ringattn.backends.compiled import fill_params, op_inputs

    module = compiled()
    case = Case(B=2, Sq=70, Sk=70, Hq=4, Hkv=2, cu_seqlens=[5, 30, 30, 60], rope=FAR_ROPE)
    q, k, v, dout = make_inputs(case, torch.bfloat16)
    pos = torch.arange(70)
    args = block_args(
        q, k, v, case.mask(), softmax_scale=0.125, rope=case.rope, q_positions=pos, k_positions=pos
    )
    p = fill_params(module, q, k, v, *op_inputs(args, q.device))
    out, lse = nan_filled(2, 70, 4, 64), nan_filled(2, 4, 70)
    p.out.ptr, p.out.sb, p.out.ss, p.out.sh = out.data_ptr(), *out.stride()[:3]
    p.out_dtype, p.lse = 0, lse.data_ptr()
    module.attn_forward_cpu(p)
    assert torch.isfinite(out).all()
    outside = torch.cat([torch.arange(0, 5), torch.arange(60, 70)])
    assert torch.isneginf(lse[:, :, outside]).all() and torch.isfinite(lse[:, :, 5:60]).all()
    assert (out[:, outside] == 0).all()

    delta = (dout.float() * out).sum(-1).transpose(1, 2).contiguous()
    grads = [nan_filled(2, 70, 4, 64), nan_filled(2, 70, 2, 64), nan_filled(2, 70, 2, 64)]
    p.dout.ptr, p.dout.sb, p.dout.ss, p.dout.sh = dout.data_ptr(), *dout.stride()[:3]
    p.delta = delta.data_ptr()
    for view, g in zip((p.dq, p.dk, p.dv), grads, strict=True):
        view.ptr, view.sb, view.ss, view.sh = g.data_ptr(), *g.stride()[:3]
    p.grad_dtype = 0
    module.attn_backward_cpu(p)
    for g in grads:
        assert torch.isfinite(g).all()
        assert (g[:, outside] == 0).all()


def test_kernel_merge_matches_reference_merge():
    merge = compiled().merge_lse
    inf = math.inf
    for l1, l2 in [(-inf, -inf), (-inf, 2.5), (1.0, -inf), (0.3, 0.3), (-50.0, 40.0), (88.0, 87.0)]:
        lse, w1, w2 = merge(l1, l2)
        o1, o2 = torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), -1.0)
        ref_o, ref_l = merge_partials(o1, torch.tensor([[[l1]]]), o2, torch.tensor([[[l2]]]))
        assert math.isfinite(w1) and math.isfinite(w2)
        assert lse == pytest.approx(ref_l.item(), abs=1e-6) or lse == ref_l.item() == -inf
        assert 3.0 * w1 - w2 == pytest.approx(ref_o.item(), abs=1e-6)


def test_dispatch_and_can_implement_reasons():
    cpu = BACKENDS["cpu"]
    q, k, v, _ = make_inputs(Case(Sq=8, Sk=8), torch.float32)
    assert select_backend("auto", q, k, v, block_args(q, k, v)).name == "cpu"
    assert select_backend("auto", q.bfloat16(), k.bfloat16(), v.bfloat16(), block_args(q, k, v)).name == "cpu"
    assert select_backend("auto", q.double(), k.double(), v.double(), block_args(q, k, v)).name == "reference"
    ok, reason = cpu.can_implement(q.half(), k.half(), v.half(), block_args(q, k, v))
    assert not ok and "float16" in reason
    ok, reason = cpu.can_implement(q.double(), k.double(), v.double(), block_args(q, k, v))
    assert not ok and "reference" in reason
    with pytest.raises(ValueError, match="backend 'cpu' cannot run"):
        block_forward(q.half(), k.half(), v.half(), backend="cpu")


def test_negative_positions_are_rejected():
    q, k, v, _ = make_inputs(Case(Sq=4, Sk=4), torch.float32)
    with pytest.raises(ValueError, match="k_positions"):
        block_forward(q, k, v, rope=RoPEConfig(64), k_positions=torch.tensor([0, 1, -2, 3]), backend="cpu")


def test_fp64_outputs_requested_from_fp32_inputs():
    q, k, v, dout = make_inputs(Case(Sq=20, Sk=20), torch.float32)
    out, lse = block_forward(q, k, v, BlockMask(True), out_dtype=torch.float64, backend="cpu")
    assert out.dtype == torch.float64
    grads = block_backward(dout, q, k, v, out, lse, BlockMask(True), grad_dtype=torch.float64, backend="cpu")
    assert all(g.dtype == torch.float64 for g in grads)


def test_custom_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, dout = make_inputs(Case(Sq=12, Sk=9, Hq=4, Hkv=2), torch.bfloat16)
    with FakeTensorMode() as mode:
        fq, fk, fv, fd = (mode.from_tensor(t) for t in (q, k, v, dout))
        args = (None, None, None, None, None, [1, 0, 1, 0, 1, 0, 0, 0], [0.125, 1.0])
        out, lse = torch.ops.ringattn.cpu_block_forward(fq, fk, fv, *args, True)
        assert out.shape == (1, 12, 4, 64) and out.dtype == torch.float32 and lse.shape == (1, 4, 12)
        dq, dk, dv = torch.ops.ringattn.cpu_block_backward(fd, fq, fk, fv, lse, lse, *args, False)
        assert dq.shape == q.shape and dk.shape == k.shape and dk.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.ringattn.cpu_block_forward.default, (q, k, v, *args, True))


def test_cpu_and_triton_interpreter_agree():
    case = Case(Sq=40, Sk=40, Hq=4, Hkv=2, D=64, rope=FAR_ROPE, cu_seqlens=[0, 17, 40])
    q, k, v, dout = make_inputs(case, torch.float32)
    ok, reason = BACKENDS["triton"].can_implement(q, k, v, block_args(q, k, v, case.mask(), rope=case.rope))
    if not ok:
        pytest.skip(f"the triton backend cannot run here: {reason}")
    results = {}
    for name in ("cpu", "triton"):
        out, lse = block_forward(q, k, v, case.mask(), rope=case.rope, backend=name)
        grads = block_backward(dout, q, k, v, out, lse, case.mask(), rope=case.rope, backend=name)
        results[name] = (out, lse, *grads)
    for a, b in zip(results["cpu"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


SWEEP = list(
    itertools.product(
        (1, 63, 127, 257),  # length
        ((1, 1), (4, 1), (8, 1)),  # (Hq, Hkv): GQA 1, 4, 8
        (64, 80, 96, 128, 256),  # head dim
        (False, True),  # causal
    )
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "S,heads,D,causal", SWEEP, ids=[f"S{s}-H{h[0]}x{h[1]}-D{d}-c{int(c)}" for s, h, d, c in SWEEP]
)
def test_cpu_sweep(S, heads, D, causal, dtype):
    case = Case(B=2, Sq=S, Sk=S, Hq=heads[0], Hkv=heads[1], D=D, causal=causal)
    check_case(case, dtype, "cpu")
    rope = RoPEConfig(D, theta=45.2e9)
    check_case(replace(case, rope=rope, position_offset=FAR, B=1), dtype, "cpu")
    if S > 2:
        docs = replace(case, B=1, cu_seqlens=[0, S // 3, S // 3, S - 1], rope=rope)
        check_case(docs, dtype, "cpu")
