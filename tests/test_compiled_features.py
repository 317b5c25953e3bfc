"""Sliding window, softcap, ALiBi, key-side documents and dropout in the compiled kernels, forward and backward.

The CPU kernels run through the block contract (``backend="cpu"``); the CUDA kernels' own source runs
under the CPU emulation (``cuda_emulator``: whole grids, checkers on every shared/global access).
Both are held to the fp64 spec (``ringattn.reference``) by the project's tolerance rule
(``attention_checks.assert_matches_reference``), each feature alone and combined with causal masks,
documents, GQA, RoPE and strided spans. Key tiles outside the window must be skipped by the loop
bounds: keys there are NaN in ``test_*_skips_keys_outside_the_window``, and out, lse and every
gradient must stay finite and correct. Dropout's mask (``ringattn.dropout``) must be the spec's bit for
bit (``test_*_dropout_mask_is_the_spec``, V the identity: out's zeros are the dropped elements), and
the kernels' Philox4x32-10 must give Random123's known answers.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import (
    DROPOUT_OFFSET,
    DROPOUT_SEED,
    Case,
    assert_matches_reference,
    check_block,
    make_inputs,
)
from cuda_emulator import Emulator, assert_clean, build_library, check_case, mutant, run_case

from ringattn import RoPEConfig
from ringattn._extension import compiled
from ringattn.backends import BACKENDS
from ringattn.backends.compiled import FLOAT_FIELDS, INT_FIELDS, MAX_WINDOW, op_inputs
from ringattn.block import Span, block_args, block_backward, block_forward, select_backend
from ringattn.dropout import keep_mask
from ringattn.reference import visible_mask

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FEATURES = {"window_size", "softcap", "alibi_slopes", "cu_seqlens_k", "dropout_p"}
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


# Dropout alone and with every other feature; the counter takes global indices (aligned ones differ
# with key-side documents, and strided spans), the seed is above 2^32 (DROPOUT_SEED).
DROPOUT_CASES = {
    "dropout-sq130-sk150": Case(130, 150, D=32, dropout_p=0.2),
    "dropout-causal-gqa2": Case(150, Hq=4, Hkv=2, D=32, causal=True, dropout_p=0.3),
    "dropout-window-rope-gqa4": Case(
        140, Hq=4, Hkv=1, D=64, causal=True, rope=R64, window=(40, 3), dropout_p=0.25
    ),
    "dropout-docs-k-docs-softcap-alibi": Case(
        130, 160, B=2, Hq=4, Hkv=2, D=32, causal=True, cu_seqlens=(0, 70, 130), k_cu_seqlens=(0, 90, 160),
        softcap=2.0, alibi="batch", dropout_p=0.1,
    ),
    "dropout-docs-zigzag-spans": Case(
        70, 80, Hq=4, Hkv=2, D=32, causal=True, q_span=Span(5, 2), k_span=Span(0, 2), rope=R32,
        cu_seqlens=(0, 60, 160), dropout_p=0.5,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------- cpu


@needs_extension
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CASES)
def test_cpu_features_match_reference(name, dtype):
    check_block(CASES[name], dtype, "cpu")


@needs_extension
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_cpu_dropout_matches_reference(name, dtype):
    check_block(DROPOUT_CASES[name], dtype, "cpu")


# Key-side documents make the aligned query index differ from the global one (the counter's); several
# tiles on both sides, a query span offset, GQA and two batch entries (counter word batch * Hq + head).
MASK_CASE = Case(
    100, 120, B=2, Hq=4, Hkv=2, D=128, q_span=Span(30), cu_seqlens=(30, 80, 130), k_cu_seqlens=(0, 70, 120),
    dropout_p=0.4,
)  # fmt: skip


def _identity_values(case: Case, dtype) -> torch.Tensor:
    """V (B, Sk, Hkv, D) with V[b, j, h] = e_j: then out[b, i, h, j] is the dropped probability P Z / (1 - p)."""
    assert case.sk <= case.D
    eye = torch.eye(case.sk, case.D, dtype=dtype)
    return eye[None, :, None, :].expand(case.B, case.sk, case.Hkv, case.D).contiguous()


def _assert_mask_is_the_spec(out: torch.Tensor, case: Case, p: float, seed: int, offset: int):
    spec = case.spec_kwargs()
    q_index, k_index = spec["q_index"], spec["k_index"]
    keep = keep_mask(p, seed, offset, case.B, case.Hq, q_index, k_index)
    visible = visible_mask(
        q_index, k_index, case.causal, spec["cu_seqlens"], k_cu_seqlens=spec["k_cu_seqlens"]
    )
    assert visible.any() and not visible.all()
    kept = out[..., : case.sk].permute(0, 2, 1, 3).float() != 0  # (B, Hq, Sq, Sk)
    assert torch.equal(kept, keep & visible), f"{int((kept != (keep & visible)).sum())} elements differ"


@needs_extension
@pytest.mark.parametrize(
    "p, seed, offset",
    [(0.4, DROPOUT_SEED, DROPOUT_OFFSET), (0.75, 2**63 - 1, 2**32 + 3), (0.05, 12345, 0)],
    ids=["p0.4", "p0.75-max-seed-offset-above-2^32", "p0.05"],
)
def test_cpu_dropout_mask_is_the_spec(p, seed, offset):
    case = MASK_CASE
    q, k, _, _ = make_inputs(case, FP32)
    v = _identity_values(case, FP32)
    out, _ = block_forward(
        q, k, v, case.mask(), dropout_p=p, dropout_seed=seed, dropout_offset=offset, backend="cpu"
    )
    _assert_mask_is_the_spec(out, case, p, seed, offset)


@needs_extension
def test_cpu_dropout_repeats_and_follows_the_seed():
    """The backward regenerates the forward's mask: the same call twice gives the same bits, another
    seed or offset another mask; p = 0 is the plain kernel's result bit for bit."""
    case = DROPOUT_CASES["dropout-causal-gqa2"]
    q, k, v, dout = make_inputs(case, BF16)
    kw = case.feature_kwargs()

    def run(**over):
        out, lse = block_forward(q, k, v, case.mask(), backend="cpu", **(kw | over))
        return (out, lse, *block_backward(dout, q, k, v, out, lse, case.mask(), backend="cpu", **(kw | over)))

    first, again = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for over in ({"dropout_seed": DROPOUT_SEED + 2**32}, {"dropout_offset": DROPOUT_OFFSET + 1}):
        other = run(**over)
        assert torch.equal(other[1], first[1]), "lse is of the probabilities before dropout"
        assert not torch.equal(other[0], first[0]) and not torch.equal(other[4], first[4])
    plain = block_forward(q, k, v, case.mask(), backend="cpu")
    off = run(dropout_p=0.0, dropout_seed=0, dropout_offset=0)
    assert torch.equal(off[0], plain[0]) and torch.equal(off[1], plain[1])


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
        assert "deterministic" in BACKENDS[name].features, name  # cuda: its atomic-free dQ pass


@needs_extension
def test_auto_picks_cpu_for_every_feature():
    case = Case(
        20, Hq=4, Hkv=2, D=32, causal=True, cu_seqlens=(0, 7, 20), k_cu_seqlens=(0, 9, 20), window=(4, 0),
        softcap=1.0, alibi="head", dropout_p=0.1,
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
# 32-64 (the 64-column tile), 80-96 (the 96-column one) and 136-256 (256: backward columns split over
# two CTAs).
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


# Dropout alone and combined, each head-dim tile (64-key and 32-key backward tiles, split columns).
EMU_DROPOUT_CASES = {
    "dropout-causal-gqa2-d32": (Case(70, Hq=4, Hkv=2, D=32, causal=True, dropout_p=0.3), BF16),
    "dropout-k-docs-window-rope-d64": (
        Case(70, 90, Hq=2, Hkv=1, D=64, causal=True, cu_seqlens=(0, 30, 70), k_cu_seqlens=(0, 40, 90),
             window=(20, 0), rope=R64, dropout_p=0.2),
        FP16,
    ),
    "dropout-spans-softcap-alibi-d80": (
        Case(33, 40, Hq=4, Hkv=2, D=80, causal=True, q_span=Span(5, 2), k_span=Span(0, 3), softcap=3.0,
             alibi="head", dropout_p=0.5),
        BF16,
    ),
    "dropout-docs-d256": (Case(40, 70, Hq=2, Hkv=1, D=256, cu_seqlens=(0, 25, 70), dropout_p=0.15), FP16),
}  # fmt: skip


def _assert_variant(run, case: Case):
    """The launches ran the variant the case needs: EXTRA for any score feature, DROPOUT for dropout."""
    extra = case.window != (-1, -1) or case.softcap or case.alibi or case.dropout_p
    for entry in ("forward", "backward"):
        # the attention launch (with RoPE, a rotate_rows pass runs before it)
        site = next(x["site"] for x in run.reports[entry]["launches"] if "with_rotated_rows" not in x["site"])
        assert ("EXTRA = true" in site) == bool(extra), site
        assert ("DROPOUT = true" in site) == bool(case.dropout_p), site


@pytest.mark.parametrize("name", EMU_CASES)
def test_cuda_source_features_match_reference(emu, name):
    case, dtype = EMU_CASES[name]
    _assert_variant(check_case(emu, case, dtype), case)


@pytest.mark.parametrize("name", EMU_DROPOUT_CASES)
def test_cuda_source_dropout_matches_reference(emu, name):
    case, dtype = EMU_DROPOUT_CASES[name]
    _assert_variant(check_case(emu, case, dtype), case)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_cuda_source_dropout_mask_is_the_spec(emu, dtype):
    case = MASK_CASE
    q, k, _, dout = make_inputs(case, dtype)
    run = run_case(emu, case, dtype, inputs=(q, k, _identity_values(case, dtype), dout))
    assert_clean(run)
    _assert_mask_is_the_spec(run.out, case, case.dropout_p, DROPOUT_SEED, DROPOUT_OFFSET)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-pass"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_cuda_source_skips_keys_outside_the_window(emu, dtype, deterministic):
    case = SKIP_CASE
    clean, poisoned = _window_poisoned(case, dtype, POISONED_KEYS)
    run = run_case(emu, case, dtype, inputs=poisoned, deterministic=deterministic)
    assert_clean(run)
    ours = {"out": run.out, "lse": run.lse, "dq": run.dq, "dk": run.dk, "dv": run.dv}
    _assert_skip_result(ours, clean, case)


# Planted in attn_cuda.cu: a loop bound that visits every tile again (masking alone would then meet
# the NaN keys outside the window: 0 * NaN in P V and dP).
# (original, planted, deterministic: run the backward's dQ pass)
BOUND_MUTATIONS = {
    "forward-visits-every-key-tile": (
        "  int64_t k0 = k_begin / BK * BK, f_begin = k0, f_end = k0;\n",
        "  k_end = p.seqlen_k;\n  int64_t k0 = 0, f_begin = k0, f_end = k0;\n",
        False,
    ),
    "backward-visits-every-query-tile": (
        "  const int64_t q_first = q_begin / BQ * BQ;\n",
        "  q_end = p.seqlen_q;\n  const int64_t q_first = 0;\n",
        False,
    ),
    "dq-pass-visits-every-key-tile": (
        "  int64_t k0 = k_begin / BK * BK;\n",
        "  int64_t k0 = 0;\n  k_end = p.seqlen_k;\n",
        True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BOUND_MUTATIONS)
def test_window_skip_test_catches_a_full_loop(name):
    original, planted, deterministic = BOUND_MUTATIONS[name]
    emulator = mutant((original, planted))
    clean, poisoned = _window_poisoned(SKIP_CASE, BF16, POISONED_KEYS)
    run = run_case(emulator, SKIP_CASE, BF16, inputs=poisoned, deterministic=deterministic)
    ours = {"out": run.out, "lse": run.lse, "dq": run.dq, "dk": run.dk, "dv": run.dv}
    with pytest.raises(AssertionError, match="NaN from keys outside the window"):
        _assert_skip_result(ours, clean, SKIP_CASE)


# Planted in attn_cuda.cu: dropout's counter with the aligned query index (differs from the global one
# with key-side documents) in the backward only, and the forward's lse of the kept probabilities. The
# dropout cases' tolerance checks must catch each.
DROPOUT_MUTATIONS = {
    "backward-counter-takes-the-aligned-index": (
        "const int64_t q_global = qs.start + qs.stride * (q0 + qr);",
        "const int64_t q_global = q_index[qr];",
    ),
    "forward-lse-after-dropout": (
        "          l[e >> 1] += s[nt][e];\n",
        "",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", DROPOUT_MUTATIONS)
def test_dropout_cases_catch_a_wrong_mask(name):
    edits = [DROPOUT_MUTATIONS[name]]
    if name == "forward-lse-after-dropout":  # the sum moves after the mask
        mask_end = "s[nt][e] = 0.0f;\n          }\n"
        edits.append((mask_end, mask_end + "          l[e >> 1] += s[nt][e];\n"))
    emulator = mutant(*edits)
    case, dtype = EMU_DROPOUT_CASES["dropout-k-docs-window-rope-d64"]
    with pytest.raises(AssertionError, match="exceeds bound"):
        check_case(emulator, case, dtype)
