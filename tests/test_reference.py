"""fp64 references: attention vs torch SDPA, masks by global index, merge guards, ring equals full."""

import math

import pytest
import torch
import torch.nn.functional as F

from ringattn import RoPEConfig, apply_rope, attention_ref, merge_partials, ring_attention_ref
from ringattn.indexing import document_ids, positions_from_cu_seqlens
from ringattn.merge import empty_partials
from ringattn.reference import attention_backward_ref
from ringattn.ring import LAYOUTS, shard_indices


def _qkv(B, Sq, Sk, Hq, Hkv, D, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=gen, dtype=dtype)
    return q, k, v


def _sdpa_BSHD(q, k, v, mask=None, scale=None):
    """torch SDPA on (B, S, H, D) tensors, K/V heads repeated for GQA (test side only)."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa8"])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (33, 33), (17, 40)], ids=["s1", "s33", "sq17-sk40"])
def test_attention_matches_sdpa(causal, Hq, Hkv, Sq, Sk):
    q, k, v = _qkv(2, Sq, Sk, Hq, Hkv, 16)
    # Queries are the last Sq tokens of the key sequence, so causal rows are never empty.
    q_index = torch.arange(Sk - Sq, Sk)
    mask = (q_index[:, None] >= torch.arange(Sk)[None, :]) if causal else None
    out, lse = attention_ref(q, k, v, causal=causal, q_index=q_index)
    torch.testing.assert_close(out, _sdpa_BSHD(q, k, v, mask), atol=1e-12, rtol=1e-12)
    g = Hq // Hkv
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(g, dim=2)) / math.sqrt(16)
    if causal:
        scores = scores.masked_fill(~mask, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-12, rtol=1e-12)
    assert out.dtype == lse.dtype == torch.float64 and lse.shape == (2, Hq, Sq)


def test_softmax_scale_is_used():
    q, k, v = _qkv(1, 9, 9, 2, 2, 8)
    out, _ = attention_ref(q, k, v, softmax_scale=0.3)
    torch.testing.assert_close(out, _sdpa_BSHD(q, k, v, scale=0.3), atol=1e-12, rtol=1e-12)


def test_fused_rope_semantics_equal_rotate_then_attend():
    rope = RoPEConfig(32, theta=45.2e9)
    q, k, v = _qkv(1, 20, 20, 4, 2, 32)
    positions = torch.arange(4_194_284, 4_194_304)
    out, _ = attention_ref(q, k, v, causal=True, rope=rope, q_positions=positions, k_positions=positions)
    rq, rk = apply_rope(q, positions, rope), apply_rope(k, positions, rope)
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    torch.testing.assert_close(out, _sdpa_BSHD(rq, rk, v, mask), atol=1e-12, rtol=1e-12)


def test_empty_rows_give_minus_inf_lse_zero_output_and_finite_grads():
    q, k, v = _qkv(1, 4, 6, 2, 1, 8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # Queries 0..3 against keys 2..7: causal leaves rows 0 and 1 with nothing to see.
    out, lse = attention_ref(q, k, v, causal=True, q_index=torch.arange(4), k_index=torch.arange(2, 8))
    assert torch.isneginf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()
    assert (out[:, :2] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :2] == 0).all()


def test_documents_equal_separate_attention_per_document():
    # Documents of lengths 5, 0 (empty), 7, 4 and 3 padding tokens outside every document.
    cu = torch.tensor([0, 5, 5, 12, 16])
    q, k, v = _qkv(1, 19, 19, 4, 2, 16)
    out, lse = attention_ref(q, k, v, causal=True, cu_seqlens=cu)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if end > start:
            mask = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            expected = _sdpa_BSHD(q[:, start:end], k[:, start:end], v[:, start:end], mask)
            torch.testing.assert_close(out[:, start:end], expected, atol=1e-12, rtol=1e-12)
    assert (out[:, 16:] == 0).all() and torch.isneginf(lse[..., 16:]).all()


def test_document_ids_and_positions():
    cu = torch.tensor([0, 3, 3, 5])
    index = torch.arange(7)
    assert document_ids(index, cu).tolist() == [0, 0, 0, 2, 2, -1, -1]
    assert positions_from_cu_seqlens(index, cu).tolist() == [0, 1, 2, 0, 1, 0, 0]


def test_rope_positions_restart_per_document_by_default():
    rope = RoPEConfig(16, theta=10000.0)
    cu = torch.tensor([0, 6, 10])
    q, k, v = _qkv(1, 10, 10, 2, 2, 16)
    out, _ = attention_ref(q, k, v, causal=True, cu_seqlens=cu, rope=rope)
    second = attention_ref(q[:, 6:], k[:, 6:], v[:, 6:], causal=True, rope=rope)[0]
    torch.testing.assert_close(out[:, 6:], second, atol=1e-12, rtol=1e-12)


def test_reference_gradients_pass_gradcheck():
    rope = RoPEConfig(8, theta=10000.0)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 5, 5, 2, 1, 8))
    cu = torch.tensor([0, 2, 5])

    def f(q, k, v):
        return attention_ref(q, k, v, causal=True, cu_seqlens=cu, rope=rope)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def _split_keys(q, k, v, cut, **kw):
    first = attention_ref(q, k[:, :cut], v[:, :cut], k_index=torch.arange(cut), **kw)
    second = attention_ref(q, k[:, cut:], v[:, cut:], k_index=torch.arange(cut, k.shape[1]), **kw)
    return first, second


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_merge_of_key_halves_equals_full_attention(causal):
    q, k, v = _qkv(2, 12, 12, 4, 2, 8)
    (o1, l1), (o2, l2) = _split_keys(q, k, v, 5, causal=causal)
    out, lse = merge_partials(o1, l1, o2, l2)
    full_out, full_lse = attention_ref(q, k, v, causal=causal)
    torch.testing.assert_close(out, full_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=1e-12)
    swapped = merge_partials(o2, l2, o1, l1)
    torch.testing.assert_close(swapped[0], out, atol=1e-12, rtol=1e-12)


def test_merge_guards_for_empty_partials():
    q, k, v = _qkv(1, 3, 3, 2, 2, 4)
    o, l = attention_ref(q, k, v)
    e_out, e_lse = empty_partials(q, torch.float64)
    out, lse = merge_partials(e_out, e_lse, o, l)  # -inf with x gives x
    torch.testing.assert_close(out, o, atol=0, rtol=0)
    torch.testing.assert_close(lse, l, atol=0, rtol=0)
    out, lse = merge_partials(e_out, e_lse, e_out, e_lse)  # -inf with -inf stays empty, no NaN
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_is_stable_for_large_lse():
    q, k, v = _qkv(1, 2, 4, 1, 1, 4)
    o1, l1 = attention_ref(q, k[:, :2], v[:, :2])
    o2, l2 = attention_ref(q, k[:, 2:], v[:, 2:])
    out, lse = merge_partials(o1, l1 + 1000.0, o2, l2 + 1000.0)  # exp(1000) overflows unguarded
    ref_out, ref_lse = merge_partials(o1, l1, o2, l2)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse + 1000.0, atol=1e-9, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("seq_len", [24, 37], ids=["S24", "S37-uneven"])
def test_layout_shards_partition_the_sequence(layout, world_size, seq_len):
    shards = shard_indices(seq_len, world_size, layout)
    assert len(shards) == world_size
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(seq_len))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2


def test_zigzag_balances_causal_work():
    W, S = 4, 64
    visible_pairs = [
        int((idx[:, None] >= torch.arange(S)[None, :]).sum()) for idx in shard_indices(S, W, "zigzag")
    ]
    contiguous = [
        int((idx[:, None] >= torch.arange(S)[None, :]).sum()) for idx in shard_indices(S, W, "contiguous")
    ]
    assert max(visible_pairs) - min(visible_pairs) == 0
    assert max(contiguous) > 3 * min(contiguous)
    assert shard_indices(S, W, "zigzag")[1].tolist() == list(range(8, 16)) + list(range(48, 56))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "causal,docs,rope",
    [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
    ids=["full", "causal", "causal-docs", "causal-docs-rope"],
)
def test_reference_ring_equals_full_attention(layout, world_size, causal, docs, rope):
    S = 29  # not a multiple of W or 2W: shards are uneven, nothing may hang or mis-mask
    q, k, v = _qkv(1, S, S, 4, 2, 16)
    cu = torch.tensor([0, 7, 7, 20, 27]) if docs else None
    rope_cfg = RoPEConfig(16, theta=45.2e9) if rope else None
    kw = dict(causal=causal, cu_seqlens=cu, rope=rope_cfg)
    out, lse = ring_attention_ref(q, k, v, world_size=world_size, layout=layout, **kw)
    full_out, full_lse = attention_ref(q, k, v, **kw)
    torch.testing.assert_close(out, full_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=1e-12)


def test_input_errors_name_the_argument():
    q, k, v = _qkv(1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention_ref(q, k, v)
    with pytest.raises(ValueError, match="q_index"):
        attention_ref(q[:, :, :2], k, v, q_index=torch.arange(3))
    with pytest.raises(ValueError, match="layout"):
        shard_indices(8, 2, "spiral")


# ------------------------------------------------- flash-attn's score options: window, softcap, ALiBi


def _flash_attn_definition(q, k, v, causal, window, softcap, slopes):
    """One sequence as flash-attn defines its options (written from its row/column formulas, not
    from the spec): query row i sits at i + Sk - Sq on the key axis; key j is visible when
    j <= that (causal) and inside [that - left, that + right]; scores are scaled, capped by tanh,
    then get -slope * |i + Sk - Sq - j|."""
    Sq, Sk, Hq = q.shape[1], k.shape[1], q.shape[2]
    g = Hq // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    row = torch.arange(Sq)[:, None] + Sk - Sq
    col = torch.arange(Sk)[None, :]
    if slopes is not None:
        scores = scores - slopes.reshape(-1, Hq, 1, 1) * (row - col).abs()
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        visible &= col <= row
    if window[0] >= 0:
        visible &= col >= row - window[0]
    if window[1] >= 0:
        visible &= col <= row + window[1]
    scores = scores.masked_fill(~visible, -math.inf)
    lse = scores.logsumexp(-1)
    probs = torch.softmax(scores.masked_fill(~visible.any(-1, keepdim=True), 0.0), -1) * visible
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "window,softcap,alibi",
    [((-1, -1), 0.0, False), ((3, 0), 0.0, False), ((2, 5), 0.0, False), ((-1, 4), 0.0, False),
     ((-1, -1), 2.5, False), ((-1, -1), 0.0, True), ((4, 1), 1.5, True)],
    ids=["plain", "window-3-0", "window-2-5", "window-right-only", "softcap", "alibi", "all"],
)  # fmt: skip
def test_cross_length_varlen_with_options_matches_flash_attn_definition(causal, window, softcap, alibi):
    # Documents with more queries than keys, fewer, equal, and an empty one.
    cu_q, cu_k = torch.tensor([0, 7, 9, 9, 20]), torch.tensor([0, 3, 13, 15, 26])
    q, k, v = _qkv(1, 20, 26, 4, 2, 8, seed=3)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64) if alibi else None
    kw = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)
    out, lse = attention_ref(q, k, v, cu_seqlens=cu_q, k_cu_seqlens=cu_k, **kw)
    for d in range(4):
        qs, ks = slice(cu_q[d], cu_q[d + 1]), slice(cu_k[d], cu_k[d + 1])
        want_out, want_lse = _flash_attn_definition(
            q[:, qs], k[:, ks], v[:, ks], causal, window, softcap, slopes
        )
        torch.testing.assert_close(out[:, qs], want_out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[:, :, qs], want_lse, atol=1e-12, rtol=1e-12)


def test_batched_alibi_slopes_and_bottom_right_window_match_flash_attn_definition():
    q, k, v = _qkv(2, 6, 11, 2, 1, 8, seed=4)
    slopes = torch.tensor([[0.3, 0.1], [0.7, 0.05]], dtype=torch.float64)
    # Bottom-right alignment as global indices: the queries are the last 6 of the 11 keys.
    out, lse = attention_ref(
        q, k, v, causal=True, q_index=torch.arange(5, 11), window=(2, -1), alibi_slopes=slopes
    )
    want_out, want_lse = _flash_attn_definition(q, k, v, True, (2, -1), 0.0, slopes)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)


def test_backward_with_options_equals_autograd_of_the_forward():
    """attention_backward_ref's hand-written chain (softcap's tanh', ALiBi, window, key-side
    documents, RoPE) against autograd through attention_ref."""
    q, k, v = _qkv(1, 12, 15, 4, 2, 8, seed=5)
    dout = torch.randn(1, 12, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kw = dict(
        causal=True,
        cu_seqlens=torch.tensor([0, 5, 12]),
        k_cu_seqlens=torch.tensor([0, 6, 15]),
        window=(4, 0),
        softcap=3.0,
        alibi_slopes=torch.tensor([0.4, 0.2, 0.1, 0.05], dtype=torch.float64),
        rope=RoPEConfig(8, theta=100.0),
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ref(*leaves, **kw)
    want = torch.autograd.grad(out, leaves, dout)
    got = attention_backward_ref(dout, q, k, v, lse, out=out.detach(), **kw)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=name)


# ---------------------------------------------------------------------------------------- dropout


def test_philox_known_answers():
    """Philox4x32-10 known-answer vectors (Salmon et al., Random123's kat_vectors)."""
    from ringattn.dropout import philox4x32

    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        assert tuple(int(w) for w in philox4x32(counter, key)) == want


def test_dropout_mask_rate_and_keys():
    from ringattn.dropout import keep_mask

    idx = torch.arange(256)
    mask = keep_mask(0.3, seed=7, offset=0, batch=2, heads=4, q_index=idx, k_index=idx)
    assert abs(mask.double().mean().item() - 0.7) < 0.01  # 524288 draws: sigma ~ 6e-4
    assert not torch.equal(mask, keep_mask(0.3, 8, 0, 2, 4, idx, idx))
    assert not torch.equal(mask, keep_mask(0.3, 7, 1, 2, 4, idx, idx))
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    # Global indices key the draws: a sub-block of rows and columns is the same sub-block of the mask.
    part = keep_mask(0.3, 7, 0, 2, 4, idx[100:140], idx[10:200:3])
    assert torch.equal(part, mask[:, :, 100:140][..., 10:200:3])


def test_dropout_backward_equals_autograd_of_the_forward():
    q, k, v = _qkv(2, 9, 13, 4, 2, 8, seed=8)
    dout = torch.randn(2, 9, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    kw = dict(causal=True, q_index=torch.arange(4, 13), dropout_p=0.25, dropout_seed=123, dropout_offset=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ref(*leaves, **kw)
    want = torch.autograd.grad(out, leaves, dout)
    got = attention_backward_ref(dout, q, k, v, lse, out=out.detach(), **kw)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=name)
    plain_out, plain_lse = attention_ref(q, k, v, causal=True, q_index=torch.arange(4, 13))
    assert torch.equal(lse, plain_lse)  # lse is that of the probabilities before dropout
    assert not torch.allclose(out, plain_out)


def _long_tailed_documents(n=60, seed=0):
    """Lognormal document lengths (median ~1K tokens, a few of 8K+), as packed pretraining data."""
    lengths = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1.2 + 6.8).exp()
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.clamp(16, 32768).long().cumsum(0)])


@pytest.mark.parametrize("world_size", [4, 8, 32])
def test_doc_zigzag_balances_causal_work_within_documents(world_size):
    from ringattn.layouts import causal_work

    cu = _long_tailed_documents()
    S = int(cu[-1])
    busiest = {}
    for layout in ("zigzag", "doc_zigzag"):
        work = torch.tensor(causal_work(S, world_size, layout, cu), dtype=torch.float64)
        busiest[layout] = float(work.max() / work.mean())
    assert busiest["doc_zigzag"] <= 1.05
    assert busiest["zigzag"] >= 1.2  # what doc_zigzag fixes
    # Every token is held exactly once, each document cut into 2W runs.
    index = torch.cat(shard_indices(S, world_size, "doc_zigzag", cu_seqlens=cu))
    assert torch.equal(index.sort().values, torch.arange(S))


def test_doc_zigzag_without_documents_is_zigzag():
    for S, W in ((29, 3), (100, 4), (5, 4)):
        for a, b in zip(shard_indices(S, W, "doc_zigzag"), shard_indices(S, W, "zigzag"), strict=True):
            assert torch.equal(a, b)
