"""flash-attn 2.8's interface on ringattn: signatures, options, returns, varlen across lengths,
packed variants and the KV-cache call, each against an independent path (the fp64 spec, per-sequence
calls, or the same attention computed without the feature under test)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import ringattn
import ringattn.dropout
import ringattn.flash_attn_interface as fa
from ringattn import RoPEConfig, attention_ref
from ringattn.rope import cos_sin, rotate

# flash-attn 2.8's parameter names, in order (from its documentation).
FLASH_ATTN_28 = {
    "flash_attn_func": "q k v dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
    "return_attn_probs",
    "flash_attn_kvpacked_func": "q kv dropout_p softmax_scale causal window_size softcap alibi_slopes "
    "deterministic return_attn_probs",
    "flash_attn_qkvpacked_func": "qkv dropout_p softmax_scale causal window_size softcap alibi_slopes "
    "deterministic return_attn_probs",
    "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
    "softmax_scale causal window_size softcap alibi_slopes deterministic return_attn_probs block_table",
    "flash_attn_varlen_kvpacked_func": "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
    "softmax_scale causal window_size softcap alibi_slopes deterministic return_attn_probs",
    "flash_attn_varlen_qkvpacked_func": "qkv cu_seqlens max_seqlen dropout_p softmax_scale causal window_size "
    "softcap alibi_slopes deterministic return_attn_probs",
    "flash_attn_with_kvcache": "q k_cache v_cache k v rotary_cos rotary_sin cache_seqlens cache_batch_idx "
    "cache_leftpad block_table softmax_scale causal window_size softcap rotary_interleaved alibi_slopes "
    "num_splits return_softmax_lse",
}


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_28))
def test_signature_is_flash_attn_28(name):
    fn = getattr(fa, name)
    positional = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert positional == FLASH_ATTN_28[name].split()
    assert getattr(ringattn, name) is fn


def test_no_op_defaults_pass_and_dropout_names_itself():
    q, k, v = _randn(1, 9, 2, 16), _randn(1, 9, 2, 16, seed=1), _randn(1, 9, 2, 16, seed=2)
    plain = fa.flash_attn_func(q, k, v, causal=True)
    every_default = fa.flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, False)
    assert torch.equal(plain, every_default)
    with pytest.raises(ValueError, match=r"dropout_p must be a probability in \[0, 1\), got 1\.0"):
        fa.flash_attn_func(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="window_size"):
        fa.flash_attn_func(q, k, v, window_size=4)
    with pytest.raises(ValueError, match="softcap"):
        fa.flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fa.flash_attn_func(q, k, v, alibi_slopes=torch.ones(3))


def test_return_attn_probs_is_flash_attns_triple_with_plus_inf_on_empty_rows():
    # Sq > Sk with causal: the first Sq - Sk rows see no key (flash-attn: out 0, lse +inf).
    q, k, v = _randn(2, 7, 4, 16), _randn(2, 4, 2, 16, seed=1), _randn(2, 4, 2, 16, seed=2)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert s_dmask is None and lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    assert torch.isposinf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()
    assert (out[:, :3] == 0).all()
    ref_out, ref_lse = attention_ref(
        q, k, v, causal=True, q_index=torch.arange(7), k_index=torch.arange(3, 7)
    )
    torch.testing.assert_close(out, ref_out.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[:, :, 3:], ref_lse[:, :, 3:].float(), atol=1e-5, rtol=0)
    out2, lse2 = fa.flash_attn_func(q, k, v, causal=True, return_lse=True)  # ringattn's own convention
    assert torch.isneginf(lse2[:, :, :3]).all()


@pytest.mark.parametrize(
    "window,softcap,alibi",
    [
        ((3, 0), 0.0, False),
        ((2, 4), 0.0, False),
        ((-1, -1), 4.0, False),
        ((-1, -1), 0.0, True),
        ((5, 2), 2.0, True),
    ],
    ids=["window-left", "window-both", "softcap", "alibi", "all"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_options_match_the_spec_with_bottom_right_alignment(window, softcap, alibi, causal):
    q, k, v = (
        _randn(2, s, h, 16, seed=i, dtype=torch.float64)
        for i, (s, h) in enumerate([(11, 4), (19, 2), (19, 2)])
    )
    slopes = torch.tensor([0.5, 0.3, 0.2, 0.1]) if alibi else None  # fp32, as flash-attn takes them
    out, lse = fa.flash_attn_func(
        q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_lse=True
    )
    # The spec on global indices: the 11 queries are the last 11 of the 19 key positions.
    want_window = (window[0], 0) if causal and window[0] >= 0 else window
    ref_out, ref_lse = attention_ref(
        q,
        k,
        v,
        causal=causal,
        q_index=torch.arange(8, 19),
        window=want_window,
        softcap=softcap,
        alibi_slopes=slopes,
    )
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-6, rtol=0)


def test_dropout_mask_is_the_spec_and_s_dmask_reproduces_the_output():
    q, k, v = (
        _randn(2, s, h, 16, seed=i, dtype=torch.float64)
        for i, (s, h) in enumerate([(9, 4), (13, 2), (13, 2)])
    )
    torch.manual_seed(11)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    torch.manual_seed(11)
    seed = ringattn.dropout.new_seed()  # the same draw the call made
    q_index, k_index = torch.arange(4, 13), torch.arange(13)
    ref_out, _ = attention_ref(q, k, v, causal=True, q_index=q_index, dropout_p=0.3, dropout_seed=seed)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    keep = ringattn.dropout.keep_mask(0.3, seed, 0, 2, 4, q_index, k_index)
    assert torch.equal(s_dmask >= 0, keep | (s_dmask == 0))  # masked-out pairs have probability 0
    # Independent of the kernels: the output is the kept probabilities, rescaled, times V.
    kept = s_dmask.double().clamp(min=0) / 0.7
    again = torch.einsum("bhqk,bkhd->bqhd", kept, v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out, again, atol=1e-6, rtol=0)  # S_dmask is fp32
    torch.manual_seed(12)
    assert not torch.allclose(fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True), out)


def test_dropout_gradients_regenerate_the_forward_mask():
    q, k, v = (_randn(1, 11, h, 16, seed=20 + h, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    dout = _randn(1, 11, 4, 16, seed=30, dtype=torch.float64)
    torch.manual_seed(3)
    out = fa.flash_attn_func(q, k, v, dropout_p=0.25, causal=True, window_size=(5, 0))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.manual_seed(3)
    seed = ringattn.dropout.new_seed()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want_out, _ = attention_ref(*leaves, causal=True, window=(5, 0), dropout_p=0.25, dropout_seed=seed)
    want = torch.autograd.grad(want_out, leaves, dout)
    for g, w in zip(grads, want, strict=True):  # the contract hands the backward an fp32 lse: ~1e-7
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
        assert (g - w).abs().max() < 1e-3 * w.abs().max()  # a wrong mask errs by O(|grad|)


def test_cross_length_varlen_equals_one_call_per_sequence_forward_and_backward():
    lq, lk = [3, 0, 8, 5], [7, 4, 8, 12]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q = _randn(sum(lq), 4, 16, seed=3, dtype=torch.float64).requires_grad_()
    k = _randn(sum(lk), 2, 16, seed=4, dtype=torch.float64).requires_grad_()
    v = _randn(sum(lk), 2, 16, seed=5, dtype=torch.float64).requires_grad_()
    kw = dict(causal=True, window_size=(4, 0), softcap=3.0, alibi_slopes=torch.tensor([0.3, 0.2, 0.1, 0.05]))
    rope = RoPEConfig(16, theta=1e4)
    out, lse, _ = fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lq), max(lk), **kw, return_attn_probs=True, rope=rope
    )
    assert out.shape == q.shape and lse.shape == (4, sum(lq))
    dout = _randn(*q.shape, seed=6, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for b in range(4):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        pieces = [t.detach()[None, s].clone().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks))]
        # Alone, a sequence's keys sit at 0..lk-1 and its queries at the last lq of them: RoPE positions too.
        alone = fa.flash_attn_func(*pieces, **kw, rope=rope, positions=torch.arange(lk[b]))
        torch.testing.assert_close(out[qs], alone[0], atol=1e-12, rtol=0)
        want = torch.autograd.grad(alone, pieces, dout[None, qs])
        for g, w, s in zip(grads, want, (qs, ks, ks), strict=True):
            torch.testing.assert_close(g[s], w[0], atol=1e-12, rtol=0)


def test_packed_variants_equal_the_unpacked_calls_and_grad_reaches_the_pack():
    qkv = _randn(2, 10, 3, 2, 16, seed=7).requires_grad_()
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(3, 0))
    q, k, v = qkv.detach().unbind(2)
    torch.testing.assert_close(
        out, fa.flash_attn_func(q, k, v, causal=True, window_size=(3, 0)), atol=0, rtol=0
    )
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    kv = torch.stack([k, v], 2)
    torch.testing.assert_close(
        fa.flash_attn_kvpacked_func(q, kv, causal=True), fa.flash_attn_func(q, k, v, causal=True)
    )
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    flat = qkv.detach()[0]
    packed = fa.flash_attn_varlen_qkvpacked_func(flat, cu, 6, causal=True)
    torch.testing.assert_close(packed, fa.flash_attn_varlen_func(*flat.unbind(1), cu, cu, 6, 6, causal=True))
    q0, kv0 = flat[:, 0], flat[:, 1:]
    torch.testing.assert_close(
        fa.flash_attn_varlen_kvpacked_func(q0, kv0, cu, cu, 6, 6),
        fa.flash_attn_varlen_func(q0, *kv0.unbind(1), cu, cu, 6, 6),
    )


def test_varlen_block_table_reads_keys_from_pages():
    page, lengths = 4, [6, 3]
    k_pages, v_pages = _randn(5, page, 2, 16, seed=8), _randn(5, page, 2, 16, seed=9)
    table = torch.tensor([[3, 0], [4, 1]], dtype=torch.int32)
    k = torch.cat([k_pages[[3, 0]].flatten(0, 1)[:6], k_pages[[4, 1]].flatten(0, 1)[:3]])
    v = torch.cat([v_pages[[3, 0]].flatten(0, 1)[:6], v_pages[[4, 1]].flatten(0, 1)[:3]])
    q = _randn(4, 2, 16, seed=10)
    cu_q, cu_k = torch.tensor([0, 2, 4]), torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    paged = fa.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 2, 6, causal=True, block_table=table)
    torch.testing.assert_close(
        paged, fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 6, causal=True), atol=0, rtol=0
    )


# -------------------------------------------------------------------------------------- KV cache


def _decode_reference(q, k_full, v_full, lengths, rope=None, **kw):
    """Each sequence b alone: its queries are the last of its ``lengths[b]`` keys (flash_attn_func)."""
    outs = []
    for b, n in enumerate(lengths):
        positions = None if rope is None else torch.arange(n)
        outs.append(
            fa.flash_attn_func(
                q[b : b + 1],
                k_full[b : b + 1, :n],
                v_full[b : b + 1, :n],
                rope=rope,
                positions=positions,
                **kw,
            )
        )
    return torch.cat(outs)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_decode_with_fused_rope_equals_full_attention(paged):
    """Prefill a cache with rotated keys, then decode 2 tokens per step with ringattn's exact RoPE:
    every step equals causal attention over the whole prefix with RoPE fused in."""
    B, Hq, Hkv, D, S_max = 2, 4, 2, 16, 16
    rope = RoPEConfig(D, theta=1e4)
    k_all, v_all = _randn(B, S_max, Hkv, D, seed=11), _randn(B, S_max, Hkv, D, seed=12)
    prefill = torch.tensor([5, 9], dtype=torch.int32)
    k_cache, v_cache = torch.zeros(B, S_max, Hkv, D), torch.zeros(B, S_max, Hkv, D)
    for b, n in enumerate(prefill.tolist()):  # what a prefill stores: keys rotated at their positions
        cos, sin = cos_sin(rope, torch.arange(n))
        k_cache[b, :n] = rotate(k_all[b : b + 1, :n], cos, sin, rope)[0]
        v_cache[b, :n] = v_all[b, :n]
    table = None
    if paged:  # 8 pages of 4 tokens, sequence b on pages in a scrambled order
        table = torch.tensor([[5, 0, 7, 2], [1, 6, 3, 4]], dtype=torch.int32)
        k_pages, v_pages = torch.zeros(8, 4, Hkv, D), torch.zeros(8, 4, Hkv, D)
        for b in range(B):
            k_pages[table[b].long()] = k_cache[b].reshape(4, 4, Hkv, D)
            v_pages[table[b].long()] = v_cache[b].reshape(4, 4, Hkv, D)
        k_cache, v_cache = k_pages, v_pages
    seqlens = prefill.clone()
    for step in range(2):
        q = _randn(B, 2, Hq, D, seed=20 + step)
        new_k = torch.stack([k_all[b, seqlens[b] : seqlens[b] + 2] for b in range(B)])
        new_v = torch.stack([v_all[b, seqlens[b] : seqlens[b] + 2] for b in range(B)])
        out, lse = fa.flash_attn_with_kvcache(
            q, k_cache, v_cache, new_k, new_v, cache_seqlens=seqlens, block_table=table, causal=True,
            rope=rope, return_softmax_lse=True,
        )  # fmt: skip
        lengths = (seqlens + 2).tolist()
        want = _decode_reference(q, k_all, v_all, lengths, rope=rope, causal=True)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=0)
        assert lse.shape == (B, Hq, 2) and torch.isfinite(lse).all()
        seqlens += 2


def test_kvcache_flash_attn_tables_leftpad_batch_idx_and_window():
    """flash-attn's own rotary tables (interleaved), a left-padded cache, rows picked by
    cache_batch_idx and a window, against rotating by hand and attending to the valid keys."""
    B, H, D, S = 2, 2, 16, 12
    cache_k, cache_v = _randn(3, S, H, D, seed=30), _randn(3, S, H, D, seed=31)
    rows, seqlens, leftpad = torch.tensor([2, 0]), torch.tensor([7, 5]), torch.tensor([2, 0])
    angles = torch.arange(S)[:, None] * (1e4 ** (-torch.arange(0, 8, 2) / 8))[None, :]  # rotary_dim 8 of 16
    cos_t, sin_t = angles.cos(), angles.sin()
    q, new_k, new_v = _randn(B, 1, H, D, seed=32), _randn(B, 1, H, D, seed=33), _randn(B, 1, H, D, seed=34)
    ours = fa.flash_attn_with_kvcache(
        q, cache_k.clone(), cache_v.clone(), new_k, new_v, cos_t, sin_t, seqlens, rows, leftpad,
        causal=True, window_size=(3, 0), rotary_interleaved=True,
    )  # fmt: skip
    layout = RoPEConfig(D, partial_rotary_factor=0.5, interleaved=True)
    for b in range(B):
        pos = int(seqlens[b] - leftpad[b])  # the new token's position counts from the left pad
        qr = rotate(q[b : b + 1], cos_t[pos : pos + 1], sin_t[pos : pos + 1], layout)
        kr = rotate(new_k[b : b + 1], cos_t[pos : pos + 1], sin_t[pos : pos + 1], layout)
        keys = torch.cat([cache_k[rows[b], leftpad[b] : seqlens[b]], kr[0]])[None]
        vals = torch.cat([cache_v[rows[b], leftpad[b] : seqlens[b]], new_v[b]])[None]
        want = fa.flash_attn_func(qr, keys, vals, causal=True, window_size=(3, 0))
        torch.testing.assert_close(ours[b : b + 1], want, atol=1e-5, rtol=0)


def test_kvcache_writes_the_new_tokens_in_place_and_nothing_else():
    k_cache, v_cache = _randn(2, 8, 1, 16, seed=40), _randn(2, 8, 1, 16, seed=41)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    new_k, new_v = _randn(2, 2, 1, 16, seed=42), _randn(2, 2, 1, 16, seed=43)
    seqlens = torch.tensor([3, 6], dtype=torch.int32)
    fa.flash_attn_with_kvcache(
        _randn(2, 2, 2, 16, seed=44), k_cache, v_cache, new_k, new_v, cache_seqlens=seqlens
    )
    for b, n in enumerate(seqlens.tolist()):
        assert torch.equal(k_cache[b, n : n + 2], new_k[b]) and torch.equal(v_cache[b, n : n + 2], new_v[b])
        written = torch.zeros(8, dtype=torch.bool)
        written[n : n + 2] = True
        assert torch.equal(k_cache[b, ~written], before_k[b, ~written])
        assert torch.equal(v_cache[b, ~written], before_v[b, ~written])
    with pytest.raises(ValueError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(_randn(2, 1, 2, 16), k_cache, v_cache, new_k, new_v, cache_seqlens=7)
    with pytest.raises(ValueError, match="rotary"):
        fa.flash_attn_with_kvcache(_randn(2, 1, 2, 16), k_cache, v_cache, rope=RoPEConfig(16))


def test_kvcache_without_new_tokens_attends_to_the_cache_prefix():
    k_cache, v_cache = _randn(2, 10, 2, 16, seed=50), _randn(2, 10, 2, 16, seed=51)
    q = _randn(2, 3, 4, 16, seed=52)
    out = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor([4, 10], dtype=torch.int32), causal=True
    )
    want = _decode_reference(q, k_cache, v_cache, [4, 10], causal=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert math.isfinite(float(out.abs().max()))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [2, 5, 40])
def test_kvcache_split_k_decode_equals_one_call_per_sequence(num_splits, paged):
    """One new token per sequence against caches of different lengths (one shorter than the split
    count, so some chunks are empty), with a window and the lse: split-K equals attention per sequence."""
    B, H, D, S = 3, 2, 16, 48
    k_cache, v_cache = _randn(B, S, H, D, seed=60), _randn(B, S, H, D, seed=61)
    seqlens = torch.tensor([40, 3, 17], dtype=torch.int32)
    new_k, new_v, q = (
        _randn(B, 1, H, D, seed=62),
        _randn(B, 1, H, D, seed=63),
        _randn(B, 1, 2 * H, D, seed=64),
    )
    table = None
    if paged:
        table = torch.arange(B * 6, dtype=torch.int32).flip(0).view(B, 6)  # pages of 8, in reverse
        k_pages, v_pages = torch.empty(B * 6, 8, H, D), torch.empty(B * 6, 8, H, D)
        k_pages[table.flatten().long()] = k_cache.reshape(B * 6, 8, H, D)
        v_pages[table.flatten().long()] = v_cache.reshape(B * 6, 8, H, D)
    full_k, full_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(seqlens.tolist()):
        full_k[b, n], full_v[b, n] = new_k[b, 0], new_v[b, 0]
    caches = (k_pages, v_pages) if paged else (k_cache, v_cache)
    out, lse = fa.flash_attn_with_kvcache(
        q, *caches, new_k, new_v, cache_seqlens=seqlens, block_table=table, causal=True, window_size=(20, 0),
        num_splits=num_splits, return_softmax_lse=True,
    )  # fmt: skip
    want, want_lse = [], []
    for b, n in enumerate((seqlens + 1).tolist()):
        o, l = fa.flash_attn_func(q[b : b + 1], full_k[b : b + 1, :n], full_v[b : b + 1, :n], causal=True,
                                  window_size=(20, 0), return_lse=True)  # fmt: skip
        want.append(o)
        want_lse.append(l)
    torch.testing.assert_close(out, torch.cat(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, torch.cat(want_lse), atol=1e-5, rtol=0)


def test_kvcache_default_splits_long_caches_only():
    from ringattn.flash_attn_interface import SPLIT_KEYS, _split_count

    spans = torch.tensor([3 * SPLIT_KEYS + 5, 10])
    assert _split_count(0, 1, None, spans, "cuda") == 3
    assert _split_count(0, 1, None, spans, "cpu") == 1  # the heads keep the cores busy
    assert _split_count(0, 1, None, torch.tensor([SPLIT_KEYS - 1]), "cuda") == 1
    assert _split_count(0, 2, None, spans, "cuda") == 1  # several queries: no split
    assert _split_count(4, 1, torch.ones(2), spans, "cpu") == 1  # ALiBi needs the distances: no split
    assert _split_count(4, 1, None, spans, "cpu") == 4
