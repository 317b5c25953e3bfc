"""The Triton backend through the block contract: dispatch answers, stripes, global lse, memory."""

from __future__ import annotations

import pytest
import torch
from attention_checks import Case, backend_device, make_inputs, peer_results
from harness import GRAD_FACTOR, HAS_GPU, assert_within_peer_error, launcher_rope

from ringattn import RoPEConfig, attention_ref, merge_partials
from ringattn.backends import BACKENDS
from ringattn.block import BlockMask, Span, block_args, block_backward, block_forward
from ringattn.merge import empty_partials
from ringattn.reference import attention_backward_ref

ROPE = RoPEConfig(16, theta=45.2e9)
pytestmark = pytest.mark.gpu  # CUDA tensors on a GPU machine, the interpreter elsewhere
DEVICE = backend_device("triton")


def test_registered_and_can_implement_reasons(monkeypatch):
    backend = BACKENDS["triton"]
    q, k, v, _ = make_inputs(Case(4, Hq=2, Hkv=1), torch.float32)
    assert backend.can_implement(q, k, v, block_args(q, k, v)) == (True, "")
    ok, reason = backend.can_implement(q.double(), k.double(), v.double(), block_args(q, k, v))
    assert not ok and "float64" in reason
    big = torch.zeros(1, 4, 1, 512)
    ok, reason = backend.can_implement(big, big, big, block_args(big, big, big))
    assert not ok and "head dim" in reason
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors without the interpreter
    ok, reason = backend.can_implement(q, k, v, block_args(q, k, v))
    assert not ok and "TRITON_INTERPRET" in reason


def test_stripes_merge_to_full_attention():
    # Even/odd query stripes against even/odd key stripes, merged in fp32: the full attention.
    # Peer: plain fp32 torch attention over the whole sequence.
    case = Case(40, Hq=4, Hkv=2, causal=True, rope=ROPE, cu_seqlens=(0, 13, 13, 31, 40))
    q, k, v, dout = make_inputs(case, torch.float32, device=DEVICE)
    docs = case.cu(DEVICE)
    full_out, full_lse = attention_ref(q, k, v, causal=True, cu_seqlens=docs, rope=ROPE)
    peer = peer_results(q, k, v, dout, **case.spec_kwargs(DEVICE))
    peer_out, peer_lse = peer["out"], peer["lse"]
    for parity in (0, 1):
        acc = empty_partials(q[:, parity::2])
        for k_parity in (0, 1):
            mask = BlockMask(True, Span(parity, 2), Span(k_parity, 2), docs)
            out, lse = block_forward(
                q[:, parity::2], k[:, k_parity::2], v[:, k_parity::2], mask, rope=ROPE,
                out_dtype=torch.float32, backend="triton",
            )  # fmt: skip
            assert out.dtype == torch.float32 and lse.dtype == torch.float32
            acc = merge_partials(*acc, out, lse)
        assert_within_peer_error(acc[0], full_out[:, parity::2], peer_out[:, parity::2], name="out")
        lse_ref = full_lse[..., parity::2]
        assert torch.equal(torch.isinf(acc[1]), torch.isinf(lse_ref))
        finite = torch.isfinite(lse_ref)
        lse_peer = peer_lse[..., parity::2]
        assert_within_peer_error(acc[1][finite], lse_ref[finite], lse_peer[finite], name="lse")


def test_block_backward_with_global_lse_sums_to_full_gradients():
    # Two key blocks through block_backward with the full attention's lse and out (delta from
    # them): the blocks' gradients sum to the full gradients. Peer: fp32 torch autograd.
    case = Case(30, Hq=4, Hkv=2, causal=True, rope=ROPE)
    q, k, v, dout = make_inputs(case, torch.float32, seed=1, device=DEVICE)
    kw = dict(causal=True, rope=ROPE)
    out, lse = attention_ref(q, k, v, **kw)
    ref = attention_backward_ref(dout, q, k, v, lse, out=out, **kw)
    peer_grads = peer_results(q, k, v, dout, **case.spec_kwargs(DEVICE))
    peer = [peer_grads[name] for name in ("dq", "dk", "dv")]
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for start, stop in ((0, 13), (13, 30)):
        mask = BlockMask(True, Span(0), Span(start))
        dq_b, dk_b, dv_b = block_backward(
            dout, q, k[:, start:stop], v[:, start:stop], out.float(), lse.float(), mask, rope=ROPE,
            grad_dtype=torch.float32, backend="triton",
        )  # fmt: skip
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)
    ours = (dq, torch.cat(dks, 1), torch.cat(dvs, 1))
    for o, r, p, name in zip(ours, ref, peer, ("dq", "dk", "dv"), strict=True):
        assert_within_peer_error(o, r, p, factor=GRAD_FACTOR, name=name)


@pytest.mark.skipif(HAS_GPU, reason="measures the launchers' host allocations under the interpreter")
def test_launchers_allocate_no_score_matrix_or_rotated_copies():
    # Every torch allocation the launchers make is either an output (out; dq, dk, dv) or O(S)
    # bookkeeping (positions, doc ids, tile ranges: at most 16 bytes per token). A score matrix
    # (S x S) or a rotated copy of q or k would be a further allocation of q's size or more.
    from tritonkernels import flash_kernels
    from tritonkernels.configs import KernelConfig
    from tritonkernels.flash import flash_attn_bwd, flash_attn_fwd

    B, S, H, D = 1, 512, 2, 64
    q, k, v, dout = make_inputs(Case(S, B=B, Hq=H, Hkv=H, D=D), torch.bfloat16)
    cu = torch.tensor([0, 200, 512])
    kw = dict(causal=True, cu_seqlens=cu, **launcher_rope(q, k, RoPEConfig(D, 1e4), cu_seqlens=cu))
    cfg = KernelConfig(64, 64, 4, 1)
    out, lse = flash_attn_fwd(q, k, v, config=cfg, **kw)
    assert torch.isfinite(out.float()).all()

    # Measure the launchers alone: kernel launches become no-ops (a GPU kernel allocates nothing;
    # the interpreter's own host copies of the arguments are not the launchers').
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def allocations(fn):
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            fn()
        return sorted(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)

    with pytest.MonkeyPatch.context() as mp:
        for name in (
            "flash_fwd_kernel",
            "flash_bwd_dq_kernel",
            "flash_bwd_dkdv_kernel",
            "flash_bwd_delta_kernel",
        ):
            mp.setattr(flash_kernels, name, NoLaunch())
        fwd = allocations(lambda: flash_attn_fwd(q, k, v, config=cfg, **kw))
        bwd = allocations(
            lambda: flash_attn_bwd(dout, q, k, v, out, lse, config_dq=cfg, config_dkdv=cfg, **kw)
        )
    q_bytes = q.numel() * q.element_size()
    bookkeeping = 16 * B * S
    assert bookkeeping < q_bytes < S * S * 2
    assert [a for a in fwd if a > bookkeeping] == [q_bytes], f"forward allocations {fwd}"
    assert [a for a in bwd if a > bookkeeping] == [q_bytes] * 3, f"backward allocations {bwd}"
