"""flash-attn's score features in the Triton kernels: sliding window, softcap, ALiBi, key-side
documents (cross-length varlen) and dropout, alone and combined, forward and backward, against the
fp64 spec (dropout's mask itself, bit for bit: test_triton_dropout.py).

The launchers (``tritonkernels.flash``) run with explicit tile shapes into NaN-filled buffers and are
held to the tolerance rule by ``attention_checks.assert_matches_reference`` (out, lse, dq, dk, dv
against ``ringattn.reference`` with the case's window/softcap/ALiBi/k_cu_seqlens); one case goes
through the block contract (``backend="triton"``). The window's promise that cost follows the window,
not the sequence, is tested by poisoning: K/V (or Q/dO/lse/delta) rows in tiles outside a tile's
window are set to NaN, which any visit would spread into the result (0 * NaN = NaN in P @ V).
Without a GPU everything runs under the Triton interpreter: shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import Case, assert_matches_reference, backend_device, check_block, make_inputs
from harness import nan_filled

from ringattn import RoPEConfig
from ringattn.backends.triton import TritonBackend, rope_tables_for
from ringattn.block import Span, block_args
from ringattn.indexing import aligned_query_index
from tritonkernels.configs import KernelConfig
from tritonkernels.flash import flash_attn_bwd, flash_attn_fwd

pytestmark = pytest.mark.gpu  # CUDA tensors on a GPU machine, the interpreter elsewhere
DEVICE = backend_device("triton")
BF16, FP32 = torch.bfloat16, torch.float32
TILE16 = KernelConfig(16, 16, 4, 1)
TILE32 = KernelConfig(32, 32, 4, 1)
R16 = RoPEConfig(16, theta=1e4)
R32_INTERLEAVED = RoPEConfig(32, 1e4, partial_rotary_factor=0.5, interleaved=True)
DOCS_Q = (0, 12, 12, 30, 45)  # an empty document, and per document fewer queries than keys
DOCS_K = (0, 20, 26, 60, 77)


def _launcher_kwargs(case: Case, q, k, v):
    """The launchers' keyword arguments for ``case``: masks, spans, features and RoPE tables resolved
    the way the block contract resolves them (query positions aligned with key-side documents)."""
    mask = case.mask(DEVICE)
    qp, kp = case.positions(DEVICE)
    kw = dict(
        causal=case.causal,
        q_span=case.q_span,
        k_span=case.k_span,
        cu_seqlens=mask.cu_seqlens,
        k_cu_seqlens=mask.k_cu_seqlens,
        window=case.window,
        softcap=case.softcap,
        alibi_slopes=case.alibi_slopes(DEVICE),
    )
    features = case.feature_kwargs(DEVICE)
    kw |= {name: features[name] for name in ("dropout_p", "dropout_seed", "dropout_offset")}
    if case.rope is not None:
        args = block_args(q, k, v, mask, rope=case.rope, q_positions=qp, k_positions=kp)
        kw |= {
            "q_rope": rope_tables_for(case.rope, args.q_rope),
            "k_rope": rope_tables_for(case.rope, args.k_rope),
        }
    return kw


def _run_launchers(case: Case, dtype, config, seed=0, inputs=None):
    """Forward and backward through the launchers into NaN-filled buffers; returns the results by
    name, the inputs and the launch kwargs."""
    q, k, v, dout = make_inputs(case, dtype, seed, DEVICE) if inputs is None else inputs
    kw = _launcher_kwargs(case, q, k, v)
    out = nan_filled(*q.shape, dtype=dtype, device=DEVICE)
    lse = nan_filled(case.B, case.Hq, case.Sq, device=DEVICE)
    flash_attn_fwd(q, k, v, out=out, lse=lse, config=config, **kw)
    dq, dk, dv = (nan_filled(*t.shape, dtype=dtype, device=DEVICE) for t in (q, k, v))
    flash_attn_bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, config_dq=config, config_dkdv=config, **kw)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, (q, k, v, dout), kw


# name: (case, tile, dtypes)
CASES = {
    "window-causal-gqa": (Case(80, Hq=4, Hkv=2, causal=True, window=(11, 0)), TILE16, (FP32, BF16)),
    "window-both-sides-offset-q": (Case(48, 80, window=(7, 5), q_span=Span(20)), TILE16, (FP32,)),
    "window-left-only": (Case(50, window=(9, -1)), TILE16, (FP32,)),
    "window-right-only": (Case(50, window=(-1, 4)), TILE16, (FP32,)),
    "window-wider-than-block": (Case(40, causal=True, window=(1000, 2000)), TILE16, (FP32,)),
    "window-stride-spans": (
        Case(30, 40, q_span=Span(1, 2), k_span=Span(0, 3), window=(7, 4)),
        TILE16,
        (FP32,),
    ),
    "window-misses-every-key": (Case(16, 40, q_span=Span(100), window=(5, 5)), TILE16, (FP32,)),
    "softcap-d32": (Case(64, D=32, softcap=1.5), TILE32, (FP32, BF16)),
    "alibi-per-batch-sq40-sk56": (Case(40, 56, B=2, alibi="batch"), TILE16, (FP32,)),
    "softcap-alibi-causal-gqa4-rope": (
        Case(48, Hq=4, Hkv=1, causal=True, softcap=4.0, alibi="head", rope=R16),
        TILE16,
        (FP32, BF16),
    ),
    "kdocs-full": (Case(45, 77, Hq=4, Hkv=2, cu_seqlens=DOCS_Q, k_cu_seqlens=DOCS_K), TILE16, (FP32,)),
    "kdocs-causal-rope": (
        Case(45, 77, Hq=4, Hkv=2, causal=True, rope=R16, cu_seqlens=DOCS_Q, k_cu_seqlens=DOCS_K),
        TILE16,
        (FP32, BF16),
    ),
    # document 0 has more queries than keys: its first queries align before every key (empty rows)
    "kdocs-more-queries-causal-window": (
        Case(60, 40, cu_seqlens=(0, 30, 60), k_cu_seqlens=(0, 10, 40), causal=True, window=(5, -1)),
        TILE16,
        (FP32,),
    ),
    "kdocs-stride2-spans-causal-window": (
        Case(
            30,
            40,
            q_span=Span(1, 2),
            k_span=Span(0, 2),
            cu_seqlens=(0, 25, 61),
            k_cu_seqlens=(0, 40, 80),
            causal=True,
            window=(10, 3),
        ),
        TILE16,
        (FP32,),
    ),  # fmt: skip
    "window-docs-causal-rope": (
        Case(80, Hq=2, Hkv=1, causal=True, rope=R16, cu_seqlens=(3, 30, 30, 70), window=(6, 0)),
        TILE16,
        (BF16,),
    ),
    "everything-d32-interleaved-partial-rope": (
        Case(
            45,
            77,
            B=2,
            Hq=2,
            Hkv=1,
            D=32,
            causal=True,
            rope=R32_INTERLEAVED,
            cu_seqlens=DOCS_Q,
            k_cu_seqlens=DOCS_K,
            window=(8, 2),
            softcap=2.5,
            alibi="batch",
        ),
        TILE16,
        (FP32, BF16),
    ),  # fmt: skip
    # dropout (mask from ringattn.dropout, regenerated in the backward): alone, and with causal,
    # GQA, the window, RoPE and the other features
    "dropout-sq40-sk56-batch2": (Case(40, 56, B=2, dropout_p=0.25), TILE16, (FP32,)),
    "dropout-causal-gqa-offset-q": (
        Case(40, 56, Hq=4, Hkv=2, causal=True, q_span=Span(16), dropout_p=0.3),
        TILE16,
        (FP32, BF16),
    ),
    "dropout-window-rope-gqa": (
        Case(48, Hq=2, Hkv=1, rope=R16, window=(7, 3), dropout_p=0.2),
        TILE16,
        (FP32, BF16),
    ),
    "dropout-d32-tile32-causal": (Case(64, D=32, causal=True, dropout_p=0.5), TILE32, (BF16,)),
    "dropout-everything-kdocs-softcap-alibi": (
        Case(
            45,
            77,
            Hq=2,
            Hkv=1,
            causal=True,
            rope=R16,
            cu_seqlens=DOCS_Q,
            k_cu_seqlens=DOCS_K,
            window=(8, 2),
            softcap=2.5,
            alibi="head",
            dropout_p=0.15,
        ),
        TILE16,
        (FP32,),
    ),  # fmt: skip
}


def _params():
    """Each case in its first dtype in the default tier, its other dtypes in the slow tier (the
    interpreter takes 1-3 s a case; the backend table in test_attention.py runs these features too)."""
    for name, (case, tile, dtypes) in CASES.items():
        for index, dtype in enumerate(dtypes):
            marks = [pytest.mark.slow] if index else []
            yield pytest.param(
                case, tile, dtype, id=f"{'bf16' if dtype == BF16 else 'fp32'}-{name}", marks=marks
            )


@pytest.mark.parametrize("case,tile,dtype", list(_params()))
def test_features_match_reference(case, tile, dtype):
    ours, (q, k, v, dout), _ = _run_launchers(case, dtype, tile)
    assert_matches_reference(ours, q, k, v, dout, case.spec_kwargs(DEVICE))


def test_feature_cases_have_empty_rows_where_expected():
    # The spec and the kernels agree on rows that see no key (-inf lse, zero output): the case with
    # more queries than keys must have them, or its check above proves nothing about them.
    # Document 0: queries 0-29 align to q - 20 (keys 0-9), so queries 0-19 precede every key.
    case = CASES["kdocs-more-queries-causal-window"][0]
    q, k, v, _ = make_inputs(case, FP32, device=DEVICE)
    out, lse = flash_attn_fwd(q, k, v, config=TILE16, **_launcher_kwargs(case, q, k, v))
    empty = torch.isneginf(lse)
    assert empty[..., :20].all() and not empty[..., 20:].any()
    assert (out[:, :20] == 0).all()


def test_through_the_block_contract():
    # the adapter hands the features (and key-side documents) to the kernels; TritonBackend declares them
    case = Case(45, 77, B=2, Hq=2, Hkv=1, causal=True, rope=R16, cu_seqlens=DOCS_Q, k_cu_seqlens=DOCS_K,
                window=(8, 1), softcap=3.0, alibi="batch")  # fmt: skip
    q, k, v, _ = make_inputs(case, FP32, device=DEVICE)
    args = block_args(q, k, v, case.mask(DEVICE), rope=case.rope, **case.feature_kwargs(DEVICE))
    assert args.unsupported(TritonBackend.features) == "" and args.unsupported() == "cu_seqlens_k"
    check_block(case, FP32, "triton", DEVICE)


# ------------------------------------------------------------------------- tiles outside the window


def _outside_key_tiles(case: Case, q_rows: slice, block: int) -> list[int]:
    """Key tiles (of ``block`` rows) entirely outside the window hull of query rows ``q_rows``:
    every key index below min(aligned - left) or above max(aligned + right, or aligned if causal)."""
    cu, k_cu = case.cu(), case.mask().k_cu_seqlens
    aligned = aligned_query_index(case.q_span.indices(case.Sq), cu, k_cu)[q_rows]
    left, right = case.window
    lo = (aligned - left).min().item() if left >= 0 else -(2**62)
    hi_each = aligned + right if right >= 0 else torch.full_like(aligned, 2**62)
    hi = (torch.minimum(hi_each, aligned) if case.causal else hi_each).max().item()
    k_index = case.k_span.indices(case.sk)
    tiles = []
    for t in range(-(-case.sk // block)):
        idx = k_index[t * block : (t + 1) * block]
        if (idx < lo).all() or (idx > hi).all():
            tiles.append(t)
    return tiles


def _outside_query_tiles(case: Case, k_rows: slice, block: int) -> list[int]:
    """Query tiles whose every row's window (and causal bound) misses all keys of ``k_rows``."""
    cu, k_cu = case.cu(), case.mask().k_cu_seqlens
    aligned = aligned_query_index(case.q_span.indices(case.Sq), cu, k_cu)
    keys = case.k_span.indices(case.sk)[k_rows]
    left, right = case.window
    k_first, k_last = keys.min().item(), keys.max().item()
    reach = torch.ones_like(aligned, dtype=torch.bool)
    if left >= 0:
        reach &= aligned - left <= k_last
    if right >= 0:
        reach &= aligned + right >= k_first
    if case.causal:
        reach &= aligned >= k_first
    return [t for t in range(-(-case.Sq // block)) if not reach[t * block : (t + 1) * block].any()]


POISON_CASES = {
    "window-causal": Case(80, Hq=2, Hkv=1, causal=True, window=(8, 0)),
    "window-both-sides": Case(80, window=(5, 6)),
    "kdocs-window-softcap-alibi": Case(
        45, 77, causal=True, cu_seqlens=DOCS_Q, k_cu_seqlens=DOCS_K, window=(6, 0), softcap=2.0, alibi="head"
    ),
}


@pytest.mark.parametrize("case", POISON_CASES.values(), ids=POISON_CASES.keys())
def test_forward_and_dq_never_visit_key_tiles_outside_the_window(case):
    rows = slice(32, 48)  # query tile 2 of TILE16
    skipped = _outside_key_tiles(case, rows, TILE16.block_n)
    assert len(skipped) >= 2, "the case must leave key tiles outside the window"
    q, k, v, dout = make_inputs(case, FP32, device=DEVICE)
    clean, _, _ = _run_launchers(case, FP32, TILE16, inputs=(q, k, v, dout))
    k_bad, v_bad = k.clone(), v.clone()
    for t in skipped:
        k_bad[:, t * 16 : (t + 1) * 16] = float("nan")
        v_bad[:, t * 16 : (t + 1) * 16] = float("nan")
    poisoned, _, _ = _run_launchers(case, FP32, TILE16, inputs=(q, k_bad, v_bad, dout))
    for name in ("out", "dq"):
        assert torch.equal(poisoned[name][:, rows], clean[name][:, rows]), f"{name}: a skipped tile was read"
    assert torch.equal(poisoned["lse"][..., rows], clean["lse"][..., rows])
    # the poison is live: rows whose windows reach it turn NaN (0 * NaN in P @ V)
    assert poisoned["out"].isnan().any()


@pytest.mark.parametrize("case", POISON_CASES.values(), ids=POISON_CASES.keys())
def test_dkdv_never_visits_query_tiles_outside_the_window(case):
    keys = slice(16, 32)  # key tile 1 of TILE16
    skipped = _outside_query_tiles(case, keys, TILE16.block_m)
    assert len(skipped) >= 2, "the case must leave query tiles outside the window"
    q, k, v, dout = make_inputs(case, FP32, device=DEVICE)
    kw = _launcher_kwargs(case, q, k, v)
    out, lse = flash_attn_fwd(q, k, v, config=TILE16, **kw)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    grads = dict(config_dq=TILE16, config_dkdv=TILE16, **kw)
    _, dk, dv = flash_attn_bwd(dout, q, k, v, None, lse, delta, **grads)
    q_bad, dout_bad, lse_bad, delta_bad = q.clone(), dout.clone(), lse.clone(), delta.clone()
    for t in skipped:
        rows = slice(t * 16, (t + 1) * 16)
        q_bad[:, rows] = dout_bad[:, rows] = float("nan")
        lse_bad[..., rows] = delta_bad[..., rows] = float("nan")
    _, dk_p, dv_p = flash_attn_bwd(dout_bad, q_bad, k, v, None, lse_bad, delta_bad, **grads)
    assert torch.equal(dk_p[:, keys], dk[:, keys]) and torch.equal(dv_p[:, keys], dv[:, keys])
    assert dv_p.isnan().any()  # the poison is live for key tiles whose windows reach it
