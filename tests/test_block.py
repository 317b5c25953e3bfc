"""The block contract with the reference backend: spans, merge, backward with global lse, errors."""

import pytest
import torch

from ringattn import RoPEConfig, attention_ref, merge_partials
from ringattn.block import BlockMask, Span, block_args, block_backward, block_forward, select_backend
from ringattn.merge import empty_partials


def _qkv(B, S, Hq, Hkv, D, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, S, Hq, D, generator=gen, dtype=dtype),
        torch.randn(B, S, Hkv, D, generator=gen, dtype=dtype),
        torch.randn(B, S, Hkv, D, generator=gen, dtype=dtype),
    )


CASES = {
    "causal-gqa4": dict(causal=True, rope=None, docs=None),
    "causal-rope-docs": dict(
        causal=True, rope=RoPEConfig(16, theta=45.2e9), docs=torch.tensor([0, 9, 9, 21, 30])
    ),
    "full-rope-interleaved": dict(causal=False, rope=RoPEConfig(16, theta=1e4, interleaved=True), docs=None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_stripe_blocks_merge_to_full_attention(case):
    # Two stripes of queries (even and odd tokens) against two stripes of keys: four blocks per row set.
    q, k, v = _qkv(2, 32, 8, 2, 16)
    full_out, full_lse = attention_ref(
        q, k, v, causal=case["causal"], cu_seqlens=case["docs"], rope=case["rope"]
    )
    for parity in (0, 1):
        acc = empty_partials(q[:, parity::2])
        for k_parity in (0, 1):
            mask = BlockMask(case["causal"], Span(parity, 2), Span(k_parity, 2), case["docs"])
            out, lse = block_forward(
                q[:, parity::2],
                k[:, k_parity::2],
                v[:, k_parity::2],
                mask,
                rope=case["rope"],
                out_dtype=torch.float32,
            )
            assert out.dtype == torch.float32 and lse.dtype == torch.float32
            acc = merge_partials(*acc, out, lse)
        torch.testing.assert_close(acc[0].double(), full_out[:, parity::2], atol=1e-6, rtol=0)
        finite = torch.isfinite(full_lse[..., parity::2])
        torch.testing.assert_close(
            acc[1].double()[finite], full_lse[..., parity::2][finite], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_backward_blocks_with_global_lse_sum_to_autograd(case):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 30, 4, 2, 16, seed=1))
    kw = dict(causal=case["causal"], cu_seqlens=case["docs"], rope=case["rope"])
    out, lse = attention_ref(q, k, v, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    # Keys split into a contiguous head [0, 13) and tail [13, 30); each block uses the global lse/out.
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for start, stop in ((0, 13), (13, 30)):
        mask = BlockMask(case["causal"], Span(0), Span(start), case["docs"])
        dq_b, dk_b, dv_b = block_backward(
            dout, q.detach(), k.detach()[:, start:stop], v.detach()[:, start:stop], out.detach(), lse.detach(),
            mask, rope=case["rope"],
        )  # fmt: skip
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)
    torch.testing.assert_close(dq, q.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.cat(dks, 1), k.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.cat(dvs, 1), v.grad, atol=1e-10, rtol=1e-10)


def test_empty_block_and_rows():
    mask = BlockMask(causal=True, q_span=Span(0), k_span=Span(8))
    assert mask.is_empty(8, 8)
    assert not BlockMask(causal=True, q_span=Span(8), k_span=Span(0)).is_empty(8, 8)
    q, k, v = _qkv(1, 8, 2, 1, 8, dtype=torch.float32)
    out, lse = block_forward(q, k, v, mask)
    assert torch.isneginf(lse).all() and (out == 0).all()
    dq, dk, dv = block_backward(torch.ones_like(q), q, k, v, out, lse, mask)
    for g in (dq, dk, dv):
        assert (g == 0).all()


def test_inputs_are_not_modified():
    q, k, v = _qkv(1, 12, 4, 2, 16, dtype=torch.float32)
    before = [t.clone() for t in (q, k, v)]
    rope = RoPEConfig(16)
    out, lse = block_forward(q, k, v, BlockMask(causal=True), rope=rope)
    block_backward(torch.ones_like(out), q, k, v, out, lse, BlockMask(causal=True), rope=rope)
    for t, b in zip((q, k, v), before, strict=True):
        assert torch.equal(t, b)


def test_default_backend_on_cpu_is_capable():
    q, k, v = _qkv(1, 4, 2, 2, 8, dtype=torch.bfloat16)
    assert select_backend("auto", q, k, v, block_args(q, k, v)).name in ("cpu", "reference")
    out, lse = block_forward(q, k, v)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda q, k, v: block_forward(q, k, v, backend="magic"), ValueError, "backend"),
        (lambda q, k, v: block_forward(q.float(), k, v), TypeError, "share a dtype"),
        (lambda q, k, v: block_forward(q[0], k, v), ValueError, "q must be"),
        (lambda q, k, v: block_forward(q, k, v, rope=RoPEConfig(8)), ValueError, "rope.dim"),
        (
            lambda q, k, v: block_forward(q, k, v, rope=RoPEConfig(16), q_positions=torch.arange(3)),
            ValueError,
            "q_positions",
        ),
        (lambda q, k, v: block_forward(q, k, v, out_dtype=torch.float16), TypeError, "out_dtype"),
        (lambda q, k, v: block_backward(q, q, k, v, None, torch.zeros(1, 4, 6)), ValueError, "out or delta"),
        (lambda q, k, v: Span(-1), ValueError, "start"),
    ],
    ids=[
        "unknown-backend",
        "mixed-dtype",
        "not-4d",
        "rope-dim",
        "positions-shape",
        "out-dtype",
        "no-delta",
        "span",
    ],
)
def test_errors_name_the_argument(call, error, match):
    q, k, v = _qkv(1, 6, 4, 2, 16)
    with pytest.raises(error, match=match):
        call(q, k, v)


def test_dynamic_ntk_uses_one_sequence_length_for_queries_and_keys():
    # Dynamic NTK frequencies follow the sequence's largest position: with Sq != Sk (or positions
    # whose query part misses the maximum) q and k must still rotate with the same frequencies.
    import ringattn

    rope = RoPEConfig(16, scaling={"rope_type": "dynamic", "factor": 4.0, "max_position_embeddings": 8})
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=gen)
    k, v = (torch.randn(1, 32, 1, 16, generator=gen) for _ in range(2))
    pinned = rope.at_seq_len(32)
    ours = ringattn.flash_attn_func(q, k, v, rope=rope)
    torch.testing.assert_close(ours, ringattn.flash_attn_func(q, k, v, rope=pinned), rtol=0, atol=1e-6)
    positions = torch.cat((torch.arange(4, 32), torch.arange(4)))  # the queries' last 4 miss the max
    ours = ringattn.flash_attn_func(q, k, v, rope=rope, positions=positions)
    want = ringattn.flash_attn_func(q, k, v, rope=pinned, positions=positions)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
