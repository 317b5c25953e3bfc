"""Sliding window, softcap, ALiBi and key-side documents in the compiled kernels, forward and backward.

The CPU kernels run through the block contract (``backend="cpu"``); the CUDA kernels' own source runs
under the CPU emulation (``cuda_emulator``: whole grids, checkers on every shared/global access).
Both are held to the fp64 spec (``ringattn.reference``) by the project's tolerance rule
(``attention_checks.assert_matches_reference``), each feature alone and combined with causal masks,
documents, GQA, RoPE and strided spans. Key tiles outside the window must be skipped by the loop
bounds: keys there are NaN in ``test_*_skips_keys_outside_the_window``, and out, lse and every
gradient must stay finite and correct.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import Case, assert_matches_reference, check_block, make_inputs
from cuda_emulator import KERNEL_SOURCE, Emulator, assert_clean, build_library, check_case, run_case

from ringattn import RoPEConfig
from ringattn._extension import compiled
from ringattn.backends import BACKENDS
from ringattn.backends.compiled import FLOAT_FIELDS, INT_FIELDS, MAX_WINDOW, op_inputs
from ringattn.block import Span, block_args, block_backward, block_forward, select_backend

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FEATURES = {"window_size", "softcap", "alibi_slopes", "cu_seqlens_k"}
R32 = RoPEConfig(32, theta=45.2e9)
R64 = RoPEConfig(64, theta=1e4)

needs_extension = pytest.mark.skipif(compiled() is None, reason="ringattn._C not built")

# Several tiles per side where the bounds matter (CPU tiles are 64 x 64; CUDA 64 queries x 64 keys
# forward, 64 keys x 32 queries backward, 32 keys at head dims above 128).
CASES = {
    "window-causal": Case(150, Hq=4, Hkv=2, D=32, causal=True, window=(37, 0)),
    "window-both-sides-sq130-sk150": Case(130, 150, D=32, window=(20, 45)),
    "window-left-only-offset-q": Case(70, 200, D=32, window=(50, -1), q_span=Span(120)),
    "window-right-only": Case(100, D=32, window=(-1, 9)),
    "softcap": Case(100, Hq=4, Hkv=2, D=32, softcap=1.5),
    "alibi-heads-causal": Case(130, Hq=4, Hkv=2, D=32, causal=True, alibi="head"),
    "alibi-per-batch": Case(70, 90, B=2, Hq=4, Hkv=1, D=32, alibi="batch"),
    "softcap-alibi-causal": Case(130, Hq=4, Hkv=2, D=32, causal=True, softcap=2.0, alibi="head"),
    # Per-document lengths differ: queries longer, shorter, absent, and tokens outside every document.
    "cu-seqlens-k-causal": Case(
        150, 170, Hq=4, Hkv=2, D=32, causal=True, cu_seqlens=(0, 30, 30, 90, 140),
        k_cu_seqlens=(0, 50, 60, 100, 165),
    ),
    "cu-seqlens-k-window-alibi-rope": Case(
        130, 160, Hq=4, Hkv=2, D=32, causal=True, cu_seqlens=(0, 70, 130), k_cu_seqlens=(0, 90, 160),
        window=(12, 0), alibi="head", rope=R32,
    ),
    "window-docs-causal": Case(
        150, Hq=2, Hkv=1, D=32, causal=True, cu_seqlens=(5, 60, 60, 140), window=(23, 0)
    ),
    "gqa4-rope-window-softcap-alibi": Case(
        140, Hq=4, Hkv=1, D=64, causal=True, rope=R64, window=(40, 3), softcap=4.0, alibi="head"
    ),
    "zigzag-spans-window-softcap": Case(
        70, 80, Hq=4, Hkv=2, D=32, causal=True, q_span=Span(5, 2), k_span=Span(0, 2), window=(30, 0),
        softcap=3.0,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------- cpu


@needs_extension
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CASES)
def test_cpu_features_match_reference(name, dtype):
    check_block(CASES[name], dtype, "cpu")


def _window_poisoned(case: Case, dtype, poisoned_keys: int, seed=0):
    """Inputs of ``case`` and a copy whose first ``poisoned_keys`` K/V rows are NaN."""
    q, k, v, dout = make_inputs(case, dtype, seed)
    kp, vp = k.clone(), v.clone()
    kp[:, :poisoned_keys] = float("nan")
    vp[:, :poisoned_keys] = float("nan")
    return (q, k, v, dout), (q, kp, vp, dout)


# One query tile far along the sequence with a 40-token window: keys [408, 511] are visible, so key
# rows 0..383 (six whole 64-key tiles: CPU and CUDA forward and backward tiles alike) must never be
# read. Rows 384..407 share a tile with visible keys and stay finite.
SKIP_CASE = Case(64, 512, Hq=2, Hkv=1, D=64, causal=True, q_span=Span(448), window=(40, 0), alibi="head")
POISONED_KEYS = 384


def _assert_skip_result(ours: dict, clean, case: Case):
    for name, t in ours.items():
        assert not torch.isnan(t).any(), f"{name}: NaN from keys outside the window"
    assert (ours["dk"][:, :POISONED_KEYS] == 0).all() and (ours["dv"][:, :POISONED_KEYS] == 0).all()
    assert_matches_reference(ours, *clean, case.spec_kwargs())


@needs_extension
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_cpu_skips_keys_outside_the_window(dtype):
    case = SKIP_CASE
    clean, (q, k, v, dout) = _window_poisoned(case, dtype, POISONED_KEYS)
    kw = dict(backend="cpu", **case.feature_kwargs())
    out, lse = block_forward(q, k, v, case.mask(), **kw)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, case.mask(), **kw)
    _assert_skip_result({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, clean, case)


@needs_extension
def test_cpu_window_wider_than_any_distance_is_unbounded():
    """Sides up to 2^62 and beyond (clamped there by the driver) mean no bound: int64 math, no overflow."""
    case = Case(90, Hq=2, Hkv=1, D=32, causal=True)
    q, k, v, dout = make_inputs(case, FP32)
    plain = block_forward(q, k, v, case.mask(), backend="cpu")
    for window in ((2**62, 2**62), (2**63 - 1, 0), (10**15, -1)):
        out, lse = block_forward(q, k, v, case.mask(), window_size=window, backend="cpu")
        torch.testing.assert_close(out, plain[0], rtol=0, atol=0)
        torch.testing.assert_close(lse, plain[1], rtol=0, atol=0)
    args = block_args(q, k, v, case.mask(), window_size=(2**63 - 1, 0))
    ints = op_inputs(args, q.device)[-2]
    assert [ints[INT_FIELDS.index(n)] for n in ("window_left", "window_right")] == [MAX_WINDOW, 0]


def test_compiled_backends_declare_the_features():
    for name in ("cpu", "cuda"):
        assert FEATURES <= BACKENDS[name].features, name
    assert "deterministic" in BACKENDS["cpu"].features and "deterministic" not in BACKENDS["cuda"].features


@needs_extension
def test_auto_picks_cpu_for_every_feature():
    case = Case(
        20, Hq=4, Hkv=2, D=32, causal=True, cu_seqlens=(0, 7, 20), k_cu_seqlens=(0, 9, 20), window=(4, 0),
        softcap=1.0, alibi="head",
    )  # fmt: skip
    q, k, v, _ = make_inputs(case, BF16)
    args = block_args(q, k, v, case.mask(), **case.feature_kwargs())
    assert args.unsupported(BACKENDS["cpu"].features) == ""
    assert select_backend("auto", q, k, v, args).name == "cpu"


@needs_extension
def test_ops_refuse_malformed_feature_inputs():
    case = Case(8, Hq=4, Hkv=2, D=16, cu_seqlens=(0, 3, 8), k_cu_seqlens=(0, 5, 8), alibi="head")
    q, k, v, _ = make_inputs(case, FP32)
    args = block_args(q, k, v, case.mask(), **case.feature_kwargs())
    cu, k_cu, alibi, *rest = op_inputs(args, q.device)
    op = torch.ops.ringattn.cpu_block_forward
    with pytest.raises(ValueError, match="alibi_slopes must be contiguous fp32"):
        op(q, k, v, cu, k_cu, alibi[:, :3], *rest, False)
    with pytest.raises(ValueError, match="alibi_slopes must be contiguous fp32"):
        op(q, k, v, cu, k_cu, alibi.double(), *rest, False)
    with pytest.raises(ValueError, match="k_cu_seqlens needs cu_seqlens"):
        op(q, k, v, None, k_cu, alibi, *rest, False)
    with pytest.raises(ValueError, match="k_cu_seqlens needs cu_seqlens"):
        op(q, k, v, cu, k_cu[:2], alibi, *rest, False)
    *_, ints, floats = rest

    def with_int(name, value):
        return [value if n == name else x for n, x in zip(INT_FIELDS, ints, strict=True)]

    def with_float(name, value):
        return [value if n == name else x for n, x in zip(FLOAT_FIELDS, floats, strict=True)]

    with pytest.raises(ValueError, match="window sides must be >= -1"):
        op(q, k, v, cu, k_cu, alibi, *rest[:-2], with_int("window_left", -2), floats, False)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        op(q, k, v, cu, k_cu, alibi, *rest[:-2], ints, with_float("softcap", -1.0), False)
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout_p must be a probability"):
            op(q, k, v, cu, k_cu, alibi, *rest[:-2], ints, with_float("dropout_p", p), False)
    with pytest.raises(ValueError, match="dropout_seed must be in"):
        op(q, k, v, cu, k_cu, alibi, *rest[:-2], with_int("dropout_seed", -1), floats, False)
    out, lse = op(q, k, v, cu, k_cu, alibi, *rest, False)  # the well-formed call runs
    assert torch.isfinite(out).all() and lse.shape == (1, 4, 8)


# ------------------------------------------------------------------------- CUDA source, emulated


@pytest.fixture(scope="module")
def emu() -> Emulator:
    return Emulator(build_library())


# Smaller than the CPU cases (every CUDA thread is a fiber here), still over several tiles; head dims
# 32-64 (64-key tiles), 80-128 and 136-256 (32-key backward tiles, columns split over two CTAs).
EMU_CASES = {
    "window-causal-gqa-sq100": (Case(100, Hq=4, Hkv=2, D=32, causal=True, window=(21, 0)), BF16),
    "window-both-sides-sq40-sk110": (Case(40, 110, D=40, window=(9, 30), q_span=Span(50)), FP16),
    "window-right-only-d80": (Case(70, Hq=2, Hkv=1, D=80, window=(-1, 7)), BF16),
    "softcap-d96": (Case(70, 50, Hq=2, Hkv=1, D=96, softcap=1.5), FP16),
    "softcap-alibi-causal": (Case(70, Hq=2, Hkv=1, D=64, causal=True, softcap=2.0, alibi="head"), BF16),
    "alibi-per-batch": (Case(33, 70, B=2, Hq=2, Hkv=1, D=32, alibi="batch"), FP16),
    "cu-seqlens-k-causal-rope": (
        Case(70, 110, Hq=2, Hkv=1, D=32, causal=True, cu_seqlens=(0, 10, 10, 45, 66),
             k_cu_seqlens=(0, 30, 40, 80, 105), rope=R32),
        BF16,
    ),
    # queries longer than keys in document 1 (its first queries see nothing), keys past every document
    "cu-seqlens-k-window-alibi": (
        Case(90, 70, Hq=4, Hkv=2, D=32, causal=True, cu_seqlens=(0, 20, 80), k_cu_seqlens=(0, 30, 60),
             window=(8, 2), alibi="head"),
        FP16,
    ),
    "window-docs-softcap-d136": (
        Case(70, Hq=2, Hkv=1, D=136, causal=True, cu_seqlens=(3, 40, 40, 66), window=(9, 0), softcap=3.0),
        BF16,
    ),
    "gqa4-rope-window-softcap-alibi-d256": (
        Case(70, Hq=4, Hkv=1, D=256, causal=True, rope=RoPEConfig(256, theta=1e4), window=(20, 0), softcap=5.0,
             alibi="head"),
        BF16,
    ),
    "zigzag-spans-window": (
        Case(33, 40, Hq=4, Hkv=2, D=64, causal=True, q_span=Span(5, 2), k_span=Span(0, 3), window=(25, 0)),
        FP16,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", EMU_CASES)
def test_cuda_source_features_match_reference(emu, name):
    case, dtype = EMU_CASES[name]
    run = check_case(emu, case, dtype)
    extra = case.window != (-1, -1) or case.softcap or case.alibi
    assert ("EXTRA = true" in run.reports["forward"]["launches"][0]["site"]) == bool(extra)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_cuda_source_skips_keys_outside_the_window(emu, dtype):
    case = SKIP_CASE
    clean, poisoned = _window_poisoned(case, dtype, POISONED_KEYS)
    run = run_case(emu, case, dtype, inputs=poisoned)
    assert_clean(run)
    ours = {"out": run.out, "lse": run.lse, "dq": run.dq, "dk": run.dk, "dv": run.dv}
    _assert_skip_result(ours, clean, case)


# Planted in attn_cuda.cu: a loop bound that visits every tile again (masking alone would then meet
# the NaN keys outside the window: 0 * NaN in P V and dP).
BOUND_MUTATIONS = {
    "forward-visits-every-key-tile": (
        "for (int64_t k0 = k_begin / BK * BK; k0 < k_end; k0 += BK) {",
        "for (int64_t k0 = 0; k0 < p.seqlen_k; k0 += BK) {",
    ),
    "backward-visits-every-query-tile": (
        "for (int64_t q0 = q_begin / BQ * BQ; q0 < q_end; q0 += BQ) {",
        "for (int64_t q0 = 0; q0 < p.seqlen_q; q0 += BQ) {",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BOUND_MUTATIONS)
def test_window_skip_test_catches_a_full_loop(name):
    original, planted = BOUND_MUTATIONS[name]
    text = KERNEL_SOURCE.read_text()
    assert text.count(original) == 1, f"{name}: the mutated text is no longer in attn_cuda.cu"
    mutant = Emulator(build_library(text.replace(original, planted)))
    clean, poisoned = _window_poisoned(SKIP_CASE, BF16, POISONED_KEYS)
    run = run_case(mutant, SKIP_CASE, BF16, inputs=poisoned)
    ours = {"out": run.out, "lse": run.lse, "dq": run.dq, "dk": run.dk, "dv": run.dv}
    with pytest.raises(AssertionError, match="NaN from keys outside the window"):
        _assert_skip_result(ours, clean, SKIP_CASE)
