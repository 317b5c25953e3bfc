"""Bad, degenerate and non-finite inputs (issue 14, reliability).

One section per defect, each case named after what it feeds in:

1. softmax_scale: one check (``block.check_softmax_scale``) behind every entry point (D7).
2. Mixed devices: a meta tensor among real ones is refused, by the APIs and by the custom ops'
   fake implementations, which the dispatcher runs on the real tensors too (D4).
3. NaN in, NaN out: out and lse of a row that meets a NaN are NaN on every backend, and in the
   ring merge (D3).
4. Empty shapes: zeros out, lse = -inf, zero gradients (D9, D11, D12).
5. Unhelpful errors: TypeError/ValueError naming the argument (D14, D16, D17).
6. Every bad input of sections 1, 2 and 5 fails before any backend runs and leaves every input
   bitwise unchanged.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from dataclasses import replace

import pytest
import torch

from ringattn import RoPEConfig, attention_ref, merge_partials, ring_attention_ref
from ringattn._extension import compiled
from ringattn.api import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from ringattn.backends import BACKENDS
from ringattn.backends.compiled import op_inputs
from ringattn.block import BlockMask, block_args, block_backward, block_forward
from ringattn.ops import attention
from ringattn.ring import fake_ring, ring_attn_func

NAN, INF = math.nan, math.inf
R16 = RoPEConfig(16)
LOCAL_BACKENDS = ("reference", "cpu", "triton")  # the backends that run on a machine without a GPU


def make_qkv(B=1, Sq=8, Sk=8, Hq=2, Hkv=1, D=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype)
    return q, k, v


def skip_unless_runs(backend: str, q, k, v) -> None:
    ok, why = BACKENDS[backend].can_implement(q, k, v, block_args(q, k, v))
    if not ok:
        pytest.skip(f"{backend} cannot run here: {why}")


# ---- 1. softmax_scale: one validation everywhere ------------------------------------------------

BAD_SCALES = {"nan": NAN, "zero": 0.0, "negative": -0.5, "inf": INF, "minus-inf": -INF}


def _scale_calls(scale):
    """Every entry point that takes a softmax scale, called with ``scale``: (argument name, call)."""
    q, k, v = make_qkv()
    cu = torch.tensor([0, 8])
    out, lse = block_forward(q, k, v, backend="reference")
    return {
        "flash_attn_func": ("softmax_scale", lambda: flash_attn_func(q, k, v, softmax_scale=scale)),
        "flash_attn_varlen_func": (
            "softmax_scale",
            lambda: flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8, softmax_scale=scale),
        ),
        "scaled_dot_product_attention": (
            "scale",
            lambda: scaled_dot_product_attention(
                q, k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1), scale=scale
            ),
        ),
        "ops.attention": ("softmax_scale", lambda: attention(q, k, v, softmax_scale=scale)),
        "block_args": ("softmax_scale", lambda: block_args(q, k, v, softmax_scale=scale)),
        "block_forward": ("softmax_scale", lambda: block_forward(q, k, v, softmax_scale=scale)),
        "block_backward": (
            "softmax_scale",
            lambda: block_backward(torch.ones_like(q), q, k, v, out, lse, softmax_scale=scale),
        ),
        "ring_attn_func": (
            "softmax_scale",
            lambda: ring_attn_func(q, k, v, group=fake_ring(2, timeout=5.0)[0], softmax_scale=scale),
        ),
    }


@pytest.mark.parametrize("entry", list(_scale_calls(1.0)))
@pytest.mark.parametrize("scale_name", list(BAD_SCALES))
def test_bad_softmax_scale_raises_naming_it(entry, scale_name):
    scale = BAD_SCALES[scale_name]
    arg, call = _scale_calls(scale)[entry]
    with pytest.raises(
        ValueError, match=rf"\b{arg} must be a positive finite .* got {re.escape(repr(scale))}"
    ):
        call()


@pytest.mark.parametrize("entry", list(_scale_calls(1.0)))
@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5)], ids=["str", "bool", "tensor"])
def test_softmax_scale_of_the_wrong_type_raises_naming_it(entry, scale):
    arg, call = _scale_calls(scale)[entry]
    with pytest.raises(TypeError, match=rf"\b{arg} must be a positive finite"):
        call()


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_valid_softmax_scales_still_run(backend):
    q, k, v = make_qkv()
    skip_unless_runs(backend, q, k, v)
    for scale in (1, 0.3, 1e-3):  # an int is a valid scale
        out = flash_attn_func(q, k, v, softmax_scale=scale, backend=backend)
        ref, _ = attention_ref(q, k, v, softmax_scale=scale)
        torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)


# ---- 2. Mixed devices and meta tensors ----------------------------------------------------------


def _meta(t):
    return t.to("meta")


def _mixed_device_calls():
    """(call, the argument the error must name): each call has one meta tensor among CPU ones."""
    q, k, v = make_qkv()
    pos, cu = torch.arange(8), torch.tensor([0, 3, 8])
    out, lse = block_forward(q, k, v, backend="reference")
    dout = torch.ones_like(q)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    args = block_args(q, k, v, rope=R16)
    cu_op, k_cu_op, alibi_op, q_freqs, k_freqs, q_pos, k_pos, ints, floats = op_inputs(args, q.device)
    # (causal, q_start, q_stride, k_start, k_stride, deterministic, window left/right, dropout seed/offset)
    mask_ints = [0, 0, 1, 0, 1, 0, -1, -1, 0, 0]
    return {
        "attention/k-v-meta": (lambda: attention(q, _meta(k), _meta(v)), "share a device"),
        "flash_attn_func/k-meta": (lambda: flash_attn_func(q, _meta(k), v), "share a device"),
        "flash_attn_func/positions-meta": (
            lambda: flash_attn_func(q, k, v, rope=R16, positions=_meta(pos)),
            "positions is on meta",
        ),
        "scaled_dot_product_attention/positions-meta": (
            lambda: scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                rope=R16,
                positions=_meta(pos),
                enable_gqa=True,
            ),
            "positions is on meta",
        ),
        "attention/cu_seqlens-meta": (
            lambda: attention(q, k, v, cu_seqlens=_meta(cu)),
            "cu_seqlens is on meta",
        ),
        "attention/q_positions-meta": (
            lambda: attention(q, k, v, rope=R16, q_positions=_meta(pos)),
            "q_positions is on meta",
        ),
        "flash_attn_varlen_func/cu_seqlens-meta": (
            lambda: flash_attn_varlen_func(q[0], k[0], v[0], _meta(cu), _meta(cu), 5, 5),
            "cu_seqlens_q is on meta",
        ),
        "block_forward/k_positions-meta": (
            lambda: block_forward(q, k, v, rope=R16, k_positions=_meta(pos)),
            "k_positions is on meta",
        ),
        "block_forward/cu_seqlens-meta": (
            lambda: block_forward(q, k, v, BlockMask(cu_seqlens=_meta(cu))),
            "cu_seqlens is on meta",
        ),
        "block_backward/dout-meta": (
            lambda: block_backward(_meta(dout), q, k, v, out, lse),
            "dout is on meta",
        ),
        "block_backward/out-meta": (lambda: block_backward(dout, q, k, v, _meta(out), lse), "out is on meta"),
        "block_backward/lse-meta": (lambda: block_backward(dout, q, k, v, out, _meta(lse)), "lse is on meta"),
        "block_backward/delta-meta": (
            lambda: block_backward(dout, q, k, v, None, lse, delta=_meta(delta)),
            "delta is on meta",
        ),
        # The ops themselves: a meta input sends the dispatcher to the fake implementation.
        "op-attention_fwd/cu_seqlens-meta": (
            lambda: torch.ops.ringattn.attention_fwd(
                q, k, v, _meta(cu), None, None, None, None, mask_ints, [0.25, 0.0, 0.0], "", "auto"
            ),
            "cu_seqlens is on meta",
        ),
        "op-attention_bwd/lse-meta": (
            lambda: torch.ops.ringattn.attention_bwd(
                dout,
                q,
                k,
                v,
                out,
                _meta(lse),
                None,
                None,
                None,
                None,
                None,
                mask_ints,
                [0.25, 0.0, 0.0],
                "",
                "auto",
            ),
            "lse is on meta",
        ),
        "op-cpu_block_forward/q_pos-meta": (
            lambda: torch.ops.ringattn.cpu_block_forward(
                q, k, v, cu_op, k_cu_op, alibi_op, q_freqs, k_freqs, _meta(q_pos), k_pos, ints, floats, False
            ),
            "q_pos is on meta",
        ),
        "op-cpu_block_backward/delta-meta": (
            lambda: torch.ops.ringattn.cpu_block_backward(
                dout,
                q,
                k,
                v,
                lse,
                _meta(delta),
                cu_op,
                k_cu_op,
                alibi_op,
                q_freqs,
                k_freqs,
                q_pos,
                k_pos,
                ints,
                floats,
                False,
            ),
            "delta is on meta",
        ),
    }


@pytest.mark.parametrize("name", list(_mixed_device_calls()))
def test_a_meta_tensor_among_cpu_tensors_is_refused(name):
    call, match = _mixed_device_calls()[name]
    with pytest.raises(ValueError, match=match):
        call()


def test_compiled_op_fakes_validate_shapes_and_still_trace():
    q, k, v = (_meta(t) for t in make_qkv())
    args = block_args(*make_qkv())
    cu, k_cu, alibi, q_freqs, k_freqs, q_pos, k_pos, ints, floats = op_inputs(args, q.device)
    out, lse = torch.ops.ringattn.cpu_block_forward(
        q, k, v, cu, k_cu, alibi, q_freqs, k_freqs, q_pos, k_pos, ints, floats, True
    )
    assert (out.device.type, out.shape, out.dtype) == ("meta", q.shape, torch.float32)
    assert lse.shape == (1, 2, 8)
    with pytest.raises(ValueError, match="agree in B and D"):
        torch.ops.ringattn.cpu_block_forward(
            q, k[..., :8], v[..., :8], None, None, None, None, None, None, None, ints, floats, False
        )
    with pytest.raises(ValueError, match="lse must have shape"):
        torch.ops.ringattn.cpu_block_backward(
            q, q, k, v, lse[:, :, :3], lse, None, None, None, None, None, None, None, ints, floats, False
        )
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        torch.ops.ringattn.attention_fwd(
            q,
            k,
            v[:, :3],
            None,
            None,
            None,
            None,
            None,
            [0, 0, 1, 0, 1, 0, -1, -1, 0, 0],
            [0.25, 0.0, 0.0],
            "",
            "auto",
        )


# ---- 3. NaN in, NaN out -------------------------------------------------------------------------

# (where, index, causal, Sk): one NaN element. Rows that meet it must be NaN, out and lse alike.
NAN_CASES = {
    "q-element": ("q", (0, 3, 1, 5), False, 8),
    "first-key-causal": ("k", (0, 0, 0, 0), True, 8),  # row 0 sees only key 0
    "key-in-a-later-tile": ("k", (0, 70, 0, 3), True, 80),  # past the first 64-key tile
    "q-row-across-tiles": ("q", (0, 70, 1, 0), True, 80),  # NaN in every key tile the row visits
    "v-element": ("v", (0, 2, 0, 7), False, 8),
}


def _nan_params():
    for backend in LOCAL_BACKENDS:
        for case in NAN_CASES:
            yield pytest.param(backend, case, id=f"{backend}-{case}")


# The Triton interpreter's numpy warns on the all-NaN row.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize(("backend", "case"), list(_nan_params()))
def test_nan_in_gives_nan_out(backend, case):
    where, index, causal, Sk = NAN_CASES[case]
    q, k, v = make_qkv(Sq=Sk, Sk=Sk)
    skip_unless_runs(backend, q, k, v)
    {"q": q, "k": k, "v": v}[where][index] = NAN
    out, lse = block_forward(q, k, v, BlockMask(causal), backend=backend)
    ref_out, ref_lse = attention_ref(q, k, v, causal=causal)
    assert ref_out.isnan().any() and (where == "v" or ref_lse.isnan().any())  # the case is not vacuous
    assert torch.equal(out.isnan(), ref_out.isnan()), "out: NaN where the reference has NaN, nowhere else"
    assert torch.equal(lse.isnan(), ref_lse.isnan()), "lse: NaN where the reference has NaN, nowhere else"
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=2e-5, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5, equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_query_row_gives_nan_gradient(backend):
    q, k, v = make_qkv()
    skip_unless_runs(backend, q, k, v)
    q[0, 3, 1, 5] = NAN
    out, lse = block_forward(q, k, v, backend=backend)
    dq, dk, dv = block_backward(torch.ones_like(q), q, k, v, out, lse, backend=backend)
    assert dq[0, 3, 1].isnan().all() and not dq[0, 2].isnan().any()
    assert dk.isnan().any() and dv.isnan().any()


M = 0.7  # a finite lse
MERGE_CASES = {
    # (lse1, lse2) -> expected lse; out is NaN exactly when the expected lse is NaN
    "nan+x": (NAN, M, NAN),
    "x+nan": (M, NAN, NAN),
    "nan+empty": (NAN, -INF, NAN),
    "empty+nan": (-INF, NAN, NAN),
    "nan+nan": (NAN, NAN, NAN),
    "empty+empty": (-INF, -INF, -INF),
    "empty+x": (-INF, M, M),
    "x+empty": (M, -INF, M),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_partials_propagates_nan_and_keeps_empty_rows(case):
    l1, l2, expected = MERGE_CASES[case]
    o1 = torch.full((1, 1, 1, 2), NAN if math.isnan(l1) else (0.0 if l1 == -INF else 3.0))
    o2 = torch.full((1, 1, 1, 2), NAN if math.isnan(l2) else (0.0 if l2 == -INF else -1.0))
    out, lse = merge_partials(o1, torch.tensor([[[l1]]]), o2, torch.tensor([[[l2]]]))
    if math.isnan(expected):
        assert lse.isnan().all() and out.isnan().all()
    elif expected == -INF:
        assert lse.item() == -INF and torch.equal(out, torch.zeros_like(out))
    else:
        assert lse.item() == pytest.approx(expected)
        assert torch.equal(out, o1 if l1 == expected else o2)


@pytest.mark.skipif(compiled() is None, reason="ringattn._C is not built")
@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_kernel_merge_lse_propagates_nan(case):
    l1, l2, expected = MERGE_CASES[case]
    lse, w1, w2 = compiled().merge_lse(l1, l2)
    if math.isnan(expected):
        assert math.isnan(lse) and math.isnan(w1) and math.isnan(w2)
    else:
        assert lse == pytest.approx(expected) or lse == expected == -INF
        assert not (math.isnan(w1) or math.isnan(w2))


def test_ring_reference_propagates_nan():
    q, k, v = make_qkv(Sq=12, Sk=12, Hkv=2)
    q[0, 5, 1, 0] = NAN
    out, lse = ring_attention_ref(q, k, v, world_size=3, causal=False)
    ref_out, ref_lse = attention_ref(q, k, v)
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())
    assert lse[0, 1, 5].isnan()


# ---- 4. Empty is a valid shape --------------------------------------------------------------------

EMPTY_SHAPES = {"Sk=0": (1, 5, 0), "Sq=0": (1, 0, 5), "S=0": (1, 0, 0), "B=0": (0, 5, 5)}


@pytest.mark.parametrize("rope", [None, R16], ids=["plain", "rope"])
@pytest.mark.parametrize("shape", list(EMPTY_SHAPES))
@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_empty_shapes_give_zeros_and_empty_lse(backend, shape, rope):
    B, Sq, Sk = EMPTY_SHAPES[shape]
    q, k, v = make_qkv(B=B, Sq=Sq, Sk=Sk)
    skip_unless_runs(backend, q, k, v)
    out, lse = block_forward(q, k, v, BlockMask(causal=True), rope=rope, backend=backend)
    assert out.shape == q.shape and lse.shape == (B, 2, Sq)
    assert torch.equal(out, torch.zeros_like(out))
    if Sk == 0:
        assert (lse == -INF).all()
    dout = torch.randn_like(q)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, BlockMask(causal=True), rope=rope, backend=backend)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    for g in (dq, dk, dv):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_empty_keys_through_autograd(backend):
    q, k, v = make_qkv(Sq=5, Sk=0)
    skip_unless_runs(backend, q, k, v)
    q.requires_grad_(True)
    out, lse = flash_attn_func(q, k, v, rope=R16, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == -INF).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_fp64_inputs_without_keys_run_on_the_reference():
    q, k, v = make_qkv(Sq=4, Sk=0, dtype=torch.float64)
    out, lse = flash_attn_func(q, k, v, return_lse=True)  # auto: fp64 runs on the reference
    assert torch.equal(out, torch.zeros_like(out)) and (lse == -INF).all()
    out, lse = attention_ref(q, k, v, causal=True)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == -INF).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_varlen_with_no_tokens_and_rope(backend):
    q, k, v = make_qkv(Sq=0, Sk=0)
    skip_unless_runs(backend, q, k, v)
    cu = torch.tensor([0, 0], dtype=torch.int32)
    out, lse = flash_attn_varlen_func(
        q[0], k[0], v[0], cu, cu, 0, 0, rope=R16, return_lse=True, backend=backend
    )
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize(("S", "world_size"), [(3, 4), (1, 4), (5, 8), (0, 2)])
def test_ring_reference_with_more_ranks_than_tokens(S, world_size, layout):
    q, k, v = (t.double() for t in make_qkv(Sq=S, Sk=S, Hkv=2))
    out, lse = ring_attention_ref(q, k, v, world_size=world_size, layout=layout, causal=True, rope=R16)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, rope=R16)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("given_delta", [False, True], ids=["delta-computed", "delta-given"])
def test_triton_backward_with_one_query_row(given_delta):
    q, k, v = make_qkv(Sq=1, Sk=5, Hkv=2)
    skip_unless_runs("triton", q, k, v)
    out, lse = block_forward(q, k, v, backend="triton")
    dout = torch.randn_like(q)
    # rowsum(dout * out) as (B, H, S): with S = 1, .contiguous() keeps the transposed strides (2, 1, 2).
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous() if given_delta else None
    grads = block_backward(dout, q, k, v, out, lse, delta=delta, backend="triton")
    ref = block_backward(dout, q, k, v, out, lse, delta=delta, backend="reference")
    for ours, theirs in zip(grads, ref, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


# ---- 5. Errors that name the argument ------------------------------------------------------------


def _unhelpful_error_calls():
    """(call, exception type, message pattern): each once raised an unrelated internal error, or none."""
    q, k, v = make_qkv()
    cu_float = torch.tensor([0.0, 3.9, 8.0])

    def rope(**scaling):
        return lambda: RoPEConfig(16, scaling=scaling)

    return {
        "Hkv=0/flash_attn_func": (
            lambda: flash_attn_func(q, k[:, :, :0], v[:, :, :0]),
            ValueError,
            "Hkv > 0",
        ),
        "Hkv=0/attention_ref": (lambda: attention_ref(q, k[:, :, :0], v[:, :, :0]), ValueError, "Hkv > 0"),
        "D=0/flash_attn_func": (
            lambda: flash_attn_func(q[..., :0], k[..., :0], v[..., :0]),
            ValueError,
            "head dim D",
        ),
        "D=0/block_forward": (
            lambda: block_forward(q[..., :0], k[..., :0], v[..., :0]),
            ValueError,
            "head dim D",
        ),
        "D=0/attention_ref": (
            lambda: attention_ref(q[..., :0], k[..., :0], v[..., :0]),
            ValueError,
            "head dim D",
        ),
        "rope-dict/flash_attn_func": (
            lambda: flash_attn_func(q, k, v, rope={"dim": 16}),
            TypeError,
            "rope must be a RoPEConfig",
        ),
        "rope-dict/ops.attention": (lambda: attention(q, k, v, rope={"dim": 16}), TypeError, "rope must be"),
        "list-q/flash_attn_func": (
            lambda: flash_attn_func(q.tolist(), k, v),
            TypeError,
            "q must be a torch.Tensor",
        ),
        "list-v/flash_attn_func": (
            lambda: flash_attn_func(q, k, v.tolist()),
            TypeError,
            "v must be a torch.Tensor",
        ),
        "list-query/scaled_dot_product_attention": (
            lambda: scaled_dot_product_attention(q.tolist(), k, v),
            TypeError,
            "query must be a torch.Tensor",
        ),
        "3d-key/scaled_dot_product_attention": (
            lambda: scaled_dot_product_attention(q, k[0], v),
            ValueError,
            r"key must be \(B, H, S, D\)",
        ),
        "list-q/block_forward": (
            lambda: block_forward(q.tolist(), k, v),
            TypeError,
            "q must be a torch.Tensor",
        ),
        "list-positions/flash_attn_func": (
            lambda: flash_attn_func(q, k, v, rope=R16, positions=list(range(8))),
            TypeError,
            "positions must be an int32/int64 tensor",
        ),
        "list-cu_seqlens/block_forward": (
            lambda: block_forward(q, k, v, BlockMask(cu_seqlens=[0, 8])),
            TypeError,
            "cu_seqlens must be an int32/int64 tensor",
        ),
        "list-cu_seqlens_q/flash_attn_varlen_func": (
            lambda: flash_attn_varlen_func(q[0], k[0], v[0], [0, 8], [0, 8], 8, 8),
            TypeError,
            "cu_seqlens_q must be a torch.Tensor",
        ),
        "float-cu_seqlens/flash_attn_varlen_func": (
            lambda: flash_attn_varlen_func(q[0], k[0], v[0], cu_float, cu_float, 8, 8),
            TypeError,
            "cu_seqlens_q must be int32/int64",
        ),
        "float-cu_seqlens/ops.attention": (
            lambda: attention(q, k, v, cu_seqlens=cu_float),
            TypeError,
            "cu_seqlens must be an int32/int64 tensor, got torch.float32",
        ),
        "causal-None/flash_attn_func": (
            lambda: flash_attn_func(q, k, v, causal=None),
            TypeError,
            "causal must be a bool, got None",
        ),
        "causal-None/flash_attn_varlen_func": (
            lambda: flash_attn_varlen_func(
                q[0], k[0], v[0], torch.tensor([0, 8]), torch.tensor([0, 8]), 8, 8, causal=None
            ),
            TypeError,
            "causal must be a bool",
        ),
        "causal-str/ops.attention": (
            lambda: attention(q, k, v, causal="yes"),
            TypeError,
            "causal must be a bool",
        ),
        "causal-str/block_forward": (
            lambda: block_forward(q, k, v, BlockMask(causal="yes")),
            TypeError,
            "causal must be a bool",
        ),
        "is_causal-None/scaled_dot_product_attention": (
            lambda: scaled_dot_product_attention(q, k, v, is_causal=None),
            TypeError,
            "is_causal must be a bool",
        ),
        "layout-bogus/flash_attn_func": (
            lambda: flash_attn_func(q, k, v, layout="bogus"),
            ValueError,
            "layout must be one of",
        ),
        "theta-inf/RoPEConfig": (
            lambda: RoPEConfig(16, theta=INF),
            ValueError,
            "theta must be a finite number",
        ),
        "theta-nan/RoPEConfig": (
            lambda: RoPEConfig(16, theta=NAN),
            ValueError,
            "theta must be a finite number",
        ),
        "theta-str/RoPEConfig": (
            lambda: RoPEConfig(16, theta="1e4"),
            ValueError,
            "theta must be a finite number",
        ),
        "linear-factor-0": (
            rope(rope_type="linear", factor=0.0),
            ValueError,
            r"scaling\['factor'\] .* got 0.0",
        ),
        "linear-factor-nan": (
            rope(rope_type="linear", factor=NAN),
            ValueError,
            r"scaling\['factor'\] .* got nan",
        ),
        "linear-factor-negative": (rope(rope_type="linear", factor=-2.0), ValueError, r"scaling\['factor'\]"),
        "dynamic-factor-nan": (
            rope(rope_type="dynamic", factor=NAN, max_position_embeddings=8),
            ValueError,
            r"scaling\['factor'\]",
        ),
        "dynamic-max_position_embeddings-0": (
            rope(rope_type="dynamic", factor=2.0, max_position_embeddings=0),
            ValueError,
            r"scaling\['max_position_embeddings'\]",
        ),
        "yarn-attention_factor-0": (
            rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, attention_factor=0.0),
            ValueError,
            r"scaling\['attention_factor'\]",
        ),
        "llama3-low_freq_factor-negative": (
            rope(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=-1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            ValueError,
            r"scaling\['low_freq_factor'\]",
        ),
        "scaling-list/RoPEConfig": (
            lambda: RoPEConfig(16, scaling=[("rope_type", "linear")]),
            TypeError,
            "scaling",
        ),
    }


@pytest.mark.parametrize("name", list(_unhelpful_error_calls()))
def test_bad_argument_raises_an_error_naming_it(name):
    call, error, match = _unhelpful_error_calls()[name]
    with pytest.raises(error, match=match):
        call()


def test_rope_scaling_is_read_only_and_config_roundtrips():
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    rope = RoPEConfig(16, 1e4, params)
    params["factor"] = 8.0  # the caller's dict is copied, not shared
    assert rope.scaling["factor"] == 4.0
    with pytest.raises(TypeError):
        rope.scaling["factor"] = 8.0  # attention (the cached JSON) and cos_sin would disagree
    with pytest.raises(AttributeError):
        rope.scaling._params = {}
    assert rope.scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    again = RoPEConfig.from_json(rope.to_json())
    assert again == rope and hash(again) == hash(rope) and again.to_json() == rope.to_json()
    for clone in (pickle.loads(pickle.dumps(rope)), copy.deepcopy(rope), replace(rope)):
        assert clone == rope and clone.to_json() == rope.to_json()
    assert replace(rope, precision="hf").scaling == rope.scaling
    assert rope.inv_freq().shape == (8,) and rope.attention_factor > 1.0


# ---- 6. No input is modified, and errors come before any work ---------------------------------


def _all_bad_calls():
    calls = {}
    for scale_name in ("nan", "zero"):
        for entry, (_, call) in _scale_calls(BAD_SCALES[scale_name]).items():
            calls[f"scale-{scale_name}/{entry}"] = call
    for name, (call, _) in _mixed_device_calls().items():
        calls[f"device/{name}"] = call
    for name, (call, _, _) in _unhelpful_error_calls().items():
        calls[f"error/{name}"] = call
    return calls


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().contiguous().view(torch.uint8)


@pytest.mark.parametrize("name", list(_all_bad_calls()))
def test_bad_input_raises_before_any_backend_runs_and_modifies_nothing(name, monkeypatch):
    call = _all_bad_calls()[name]
    # Every tensor the call can reach: the closure's cells (recursively through nested lambdas).
    tensors, seen, todo = [], set(), [call]
    while todo:
        fn = todo.pop()
        for cell in getattr(fn, "__closure__", None) or ():
            value = cell.cell_contents
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and id(value) not in seen:
                seen.add(id(value))
                tensors.append(value)
            elif callable(value) and getattr(value, "__closure__", None):
                todo.append(value)
    before = [_bits(t) for t in tensors]
    ran = []
    for backend in BACKENDS.values():
        for method in ("forward", "backward"):
            original = getattr(backend, method)
            monkeypatch.setattr(
                backend,
                method,
                lambda *a, _n=f"{backend.name}.{method}", _f=original, **kw: ran.append(_n) or _f(*a, **kw),
            )
    with pytest.raises((TypeError, ValueError)):
        call()
    assert ran == [], f"a backend ran before the error: {ran}"
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(_bits(t), b), "an input was modified"
