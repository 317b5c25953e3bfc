"""The compiled CPU backend ("cpu"): global lse over blocks, every element written, the merge kernel,
dispatch answers, errors, fake implementations, agreement with Triton.

Its correctness over the shared cases (and the slow sweep) is in test_attention.py.
"""

import math

import pytest
import torch
from attention_checks import Case, check_block, make_inputs
from harness import nan_filled

from ringattn import RoPEConfig, merge_partials
from ringattn._extension import compiled
from ringattn.backends import BACKENDS
from ringattn.block import BlockMask, Span, block_args, block_backward, block_forward, select_backend
from ringattn.dropout import keep_mask, philox4x32

pytestmark = pytest.mark.skipif(compiled() is None, reason="ringattn._C not built")

FAR_ROPE = RoPEConfig(64, theta=45.2e9)


def test_cpu_backward_with_global_lse_and_delta_sums_over_blocks():
    # The ring's use: each key block's backward takes the global lse and delta; the sum is the full grad.
    case = Case(90, Hq=4, Hkv=2, D=64, causal=True, rope=FAR_ROPE, cu_seqlens=(0, 50, 90))
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
    case = Case(70, B=2, Hq=4, Hkv=2, D=64, causal=True, cu_seqlens=(5, 30, 30, 60), rope=FAR_ROPE)
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


# Random123's kat_vectors for philox4x32_10 (Salmon et al., SC'11): (counter, key, result).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_kernel_philox_gives_the_known_answers():
    """attn_math.h's Philox4x32-10, the one copy the CPU and CUDA kernels both use."""
    for counter, key, want in PHILOX_KNOWN_ANSWERS:
        assert compiled().philox4x32(*counter, *key) == want


@pytest.mark.parametrize(
    "p, seed, offset", [(0.3, 0x5EED_1234_ABCD, 7), (0.9, 2**63 - 1, 2**32 + 5), (1e-6, 1, 2**40)]
)
def test_kernel_dropout_keep_is_the_spec(p, seed, offset):
    """attn_math.h's keep test (key words, counter words, integer threshold) against ringattn.dropout,
    indices up to 2^31 - 1, and its edge: p equal to an element's draw keeps it, the next double drops it."""
    keep_test = compiled().dropout_keep
    q_index = torch.tensor([0, 1, 77, 2**31 - 1])
    k_index = torch.tensor([0, 3, 2**20 + 5, 2**31 - 2])
    B, H = 2, 3
    keep = keep_mask(p, seed, offset, B, H, q_index, k_index)
    for b in range(B):
        for h in range(H):
            for i, qi in enumerate(q_index.tolist()):
                for j, kj in enumerate(k_index.tolist()):
                    assert keep_test(p, seed, offset, kj, qi, b * H + h) == bool(keep[b, h, i, j])
    words = philox4x32((k_index[:, None], q_index[None, :], 4, offset), (seed, seed >> 32))[0]
    j, i = divmod(int(torch.argmax(words)), len(q_index))
    u = int(words[j, i] >> 8) * 2.0**-24
    assert keep_test(u, seed, offset, int(k_index[j]), int(q_index[i]), 4)
    assert not keep_test(math.nextafter(u, 1.0), seed, offset, int(k_index[j]), int(q_index[i]), 4)


def test_dispatch_and_can_implement_reasons():
    cpu = BACKENDS["cpu"]
    q, k, v, _ = make_inputs(Case(8, Hq=4, Hkv=2, D=64), torch.float32)
    assert select_backend("auto", q, k, v, block_args(q, k, v)).name == "cpu"
    for dtype in (torch.bfloat16, torch.float16):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        assert select_backend("auto", qd, kd, vd, block_args(qd, kd, vd)).name == "cpu"
    assert select_backend("auto", q.double(), k.double(), v.double(), block_args(q, k, v)).name == "reference"
    ok, reason = cpu.can_implement(q.double(), k.double(), v.double(), block_args(q, k, v))
    assert not ok and "float64" in reason and "reference" in reason
    with pytest.raises(ValueError, match="backend 'cpu' cannot run"):
        block_forward(q.double(), k.double(), v.double(), backend="cpu")


def test_negative_positions_are_rejected():
    q, k, v, _ = make_inputs(Case(4, Hq=4, Hkv=2, D=64), torch.float32)
    with pytest.raises(ValueError, match="k_positions"):
        block_forward(q, k, v, rope=RoPEConfig(64), k_positions=torch.tensor([0, 1, -2, 3]), backend="cpu")


def test_fp64_outputs_requested_from_fp32_inputs():
    q, k, v, dout = make_inputs(Case(20, Hq=4, Hkv=2, D=64), torch.float32)
    out, lse = block_forward(q, k, v, BlockMask(True), out_dtype=torch.float64, backend="cpu")
    assert out.dtype == torch.float64
    grads = block_backward(dout, q, k, v, out, lse, BlockMask(True), grad_dtype=torch.float64, backend="cpu")
    assert all(g.dtype == torch.float64 for g in grads)


def test_custom_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, dout = make_inputs(Case(12, 9, Hq=4, Hkv=2, D=64), torch.bfloat16)
    with FakeTensorMode() as mode:
        fq, fk, fv, fd = (mode.from_tensor(t) for t in (q, k, v, dout))
        # INT_FIELDS and FLOAT_FIELDS of ringattn.backends.compiled, dropout (p 0.2, seed above 2^32) on
        ints, floats = [1, 0, 1, 0, 1, 0, 0, 0, -1, -1, 2**40 + 9, 3, 0], [0.125, 1.0, 0.0, 0.2]
        args = (None, None, None, None, None, None, None, ints, floats)
        out, lse = torch.ops.ringattn.cpu_block_forward(fq, fk, fv, *args, True)
        assert out.shape == (1, 12, 4, 64) and out.dtype == torch.float32 and lse.shape == (1, 4, 12)
        dq, dk, dv = torch.ops.ringattn.cpu_block_backward(fd, fq, fk, fv, lse, lse, *args, False)
        assert dq.shape == q.shape and dk.shape == k.shape and dk.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.ringattn.cpu_block_forward.default, (q, k, v, *args, True))


def test_cpu_and_triton_interpreter_agree():
    case = Case(40, Hq=4, Hkv=2, D=64, causal=True, rope=FAR_ROPE, cu_seqlens=(0, 17, 40))
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


@pytest.mark.parametrize("threads", [1, 3, 64])
def test_backward_at_any_thread_count_matches_the_reference(threads):
    # The backward splits work by query-head groups, then key chunks, as far as the thread count asks
    # (64 threads: every head its own group and several key chunks, each with partial sums).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_block(Case(200, B=2, Hq=4, Hkv=1, D=64, causal=True, rope=FAR_ROPE), torch.float32, "cpu")
    finally:
        torch.set_num_threads(before)


def _runnable_variants() -> list[str]:
    module = compiled()
    return [name for name, _, missing in module.cpu_variants() if not missing] if module is not None else []


# The SIMD micro-kernels' tails (csrc/cpu_simd.h) in every variant this CPU runs: query rows that fill no
# register block (70 = 64 + 6; 7 rows), keys past the last whole 64-key tile, head dims with a partial
# vector (72) and an odd one (33: bf16 pairs padded). Without RoPE the bf16 variant runs every product in
# bf16 (vdpbf16ps), with RoPE the rotated Q K^T in fp32.
TAIL_CASES = {
    "sq70-sk135-d72-causal-gqa2": Case(70, 135, Hq=4, Hkv=2, D=72, causal=True),
    "sq7-sk70-d33": Case(7, 70, Hq=2, Hkv=1, D=33),
    "sq70-d80-rope": Case(70, Hq=2, Hkv=1, D=80, causal=True, rope=RoPEConfig(80, theta=1e4)),
}


@pytest.mark.parametrize("variant", _runnable_variants())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(TAIL_CASES))
def test_simd_tails_in_every_variant(name, dtype, variant, monkeypatch):
    monkeypatch.setenv("RINGATTN_CPU_ISA", variant)
    check_block(TAIL_CASES[name], dtype, "cpu")
