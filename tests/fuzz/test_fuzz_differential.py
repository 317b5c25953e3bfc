"""Differential fuzz (issue 14): the public APIs against an independent fp64 oracle (``fuzz_oracle``).

APIs: ``flash_attn_func``, ``flash_attn_varlen_func``, ``scaled_dot_product_attention`` and
``block_forward``/``block_backward`` on every backend that runs here (``reference``, ``cpu``, ``auto``,
and ``triton`` under the interpreter on small shapes), forward and gradients; ``ring_attn_func`` on the
in-process fake ring (W 1..8 and two-level rings, every layout). Cases are drawn from the seed
(``fuzz_cases``): shapes, GQA groups, head dims {16, 32, 64, 80, 128}, causal or not, Sq != Sk,
documents (empty ones, tokens outside every document), RoPE types default/linear/dynamic/yarn/llama3,
exact and hf precision, NeoX and interleaved, partial rotary, positions up to 2^31 - 1, dtypes
fp32/bf16/fp16/fp64, strided views, softmax scales.

Tiers: a short seeded slice by default; the long one under ``-m slow`` (``RINGATTN_FUZZ_CASES`` sets
its size per category). A failure names its seed and case; rerun one with
``RINGATTN_FUZZ_SEED=<seed> pytest "tests/fuzz/test_fuzz_differential.py::<test>[seed_<seed>]" -m "slow or not
slow"`` (the environment variable makes any seed collectable; the failure message prints the line).

The oracle is anchored to outside code first: torch SDPA in fp64 on the no-RoPE subset (forward and
gradients), transformers' own inverse frequencies, and the relative-position property of the rotation.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from fuzz_cases import (
    api_case,
    case_count,
    draw_rope,
    ring_case,
    run_api_case,
    run_ring_case,
    seed_id,
    seeds,
)
from fuzz_oracle import Problem, RopeSpec, hf_inv_freq32, inv_freq64, results, rope_tables, visible

SLOW_CASES = 150  # per category in the long slice, unless RINGATTN_FUZZ_CASES says otherwise
_REPRO = (
    "RINGATTN_FUZZ_SEED={seed} .venv/bin/python -m pytest "
    '"tests/fuzz/test_fuzz_differential.py::{test}[seed_{seed}]" -m "slow or not slow"'
)


def _report(case, failures, test):
    if failures:
        lines = "\n  ".join(failures)
        pytest.fail(
            f"{case.describe()}\n  {lines}\nreproduce: {_REPRO.format(seed=case.seed, test=test)}",
            pytrace=False,
        )


# -------------------------------------------------------------------------------- anchoring the oracle


@pytest.mark.parametrize("seed", range(6), ids=seed_id)
def test_oracle_matches_torch_sdpa_fp64(seed):
    """No-RoPE subset: the oracle equals torch's SDPA (math, fp64) with a boolean mask built the
    same way, forward and gradients, on rows that see a key; empty rows give out 0 and lse -inf."""
    rng = random.Random(f"anchor-{seed}")
    B, Hkv, G = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 3)
    Sq, Sk, D = rng.randint(1, 24), rng.randint(1, 24), rng.choice([16, 32, 80])
    Hq = Hkv * G
    causal = seed % 2 == 0
    cu = sorted({0, Sk, *(rng.randint(0, Sk) for _ in range(2))}) if seed % 3 else None
    q_index, k_index = [Sk - Sq + i for i in range(Sq)], list(range(Sk))
    scale = rng.uniform(0.1, 1.0)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in
                     ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D), (B, Sq, Hq, D)))  # fmt: skip
    prob = Problem(causal, scale, q_index, k_index, cu)
    ours = results(q, k, v, dout, prob, dtype=torch.float64)
    vis = visible(q_index, k_index, causal, cu)
    rows = vis.any(-1)
    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=vis, scale=scale, enable_gqa=True
        ).transpose(1, 2)
    keep = rows[None, :, None, None].expand_as(sdpa)
    torch.testing.assert_close(ours["out"][keep], sdpa[keep], rtol=1e-12, atol=1e-12)
    assert torch.equal(ours["out"][~keep], torch.zeros_like(ours["out"][~keep]))
    assert torch.isneginf(ours["lse"][..., ~rows]).all() and torch.isfinite(ours["lse"][..., rows]).all()
    # Gradients: SDPA's autograd on the rows with a key (empty rows carry no gradient in the oracle).
    (sdpa * keep * dout).sum().backward()
    for name, leaf in (("dq", qs), ("dk", ks), ("dv", vs)):
        torch.testing.assert_close(ours[name], leaf.grad.transpose(1, 2), rtol=1e-10, atol=1e-12, msg=name)
    # lse against a direct logsumexp over the visible scores.
    heads = torch.tensor([h // G for h in range(Hq)])
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.index_select(2, heads)) * scale
    direct = s.masked_fill(~vis, -math.inf).logsumexp(-1)
    torch.testing.assert_close(ours["lse"][..., rows], direct[..., rows], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["default", "linear", "dynamic", "yarn", "llama3"])
def test_oracle_frequencies_match_transformers(kind):
    """The oracle's fp64 inverse frequencies equal transformers' fp32 ones to fp32 rounding."""
    rng = random.Random(kind)
    for _ in range(40):
        D = rng.choice([16, 32, 64, 80, 128])
        spec = draw_rope(rng, D)
        if spec.rope_type != kind:
            continue
        seq_len = rng.choice([None, 3, 1000, 2**20])
        ours = torch.tensor(inv_freq64(spec, seq_len), dtype=torch.float64)
        theirs = hf_inv_freq32(spec, seq_len).double()
        torch.testing.assert_close(ours, theirs, rtol=4e-6, atol=0, msg=spec.short())


def test_oracle_rotation_is_relative_and_exact_at_large_positions():
    """q.k after RoPE depends only on the position difference (default RoPE, exact angles), also
    across 2^31 - 1, and the rotation keeps norms (attention factor 1)."""
    spec = RopeSpec(64, theta=45.2e9, interleaved=False)
    gen = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 1, 1, 64, generator=gen, dtype=torch.float64),
        torch.randn(1, 1, 1, 64, generator=gen, dtype=torch.float64),
    )
    from fuzz_oracle import rotate

    def dot(pq, pk):
        (qc, qs, *_), (kc, ks, *_) = (rope_tables(spec, torch.tensor([p]), None) for p in (pq, pk))
        rq, rk = rotate(q, qc, qs, spec), rotate(k, kc, ks, spec)
        assert math.isclose(float(rq.norm()), float(q.norm()), rel_tol=1e-13)
        return float((rq * rk).sum())

    for delta in (0, 1, 7, 1000):
        near = dot(10 + delta, 10)
        for far in (4_194_303, 2**31 - 1 - delta):
            assert math.isclose(dot(far, far - delta), near, rel_tol=0, abs_tol=2e-12), (delta, far)


# ------------------------------------------------------------------------------------- the fuzz itself

FAST_API = 10
FAST_TRITON = 1
FAST_RING = 3


@pytest.mark.parametrize("seed", seeds(0, FAST_API), ids=seed_id)
def test_fuzz_api(seed):
    case = api_case(seed, backend=None if seed % 5 else "cpu")
    if case.backend == "triton":
        case = api_case(seed, backend="cpu")
    _report(case, run_api_case(case), "test_fuzz_api")


@pytest.mark.parametrize("seed", seeds(0, FAST_TRITON), ids=seed_id)
def test_fuzz_api_triton(seed):
    case = api_case(seed, backend="triton")
    _report(case, run_api_case(case), "test_fuzz_api_triton")


@pytest.mark.parametrize("seed", seeds(0, FAST_RING), ids=seed_id)
def test_fuzz_ring(seed):
    case = ring_case(seed, max_w=4, max_s=24)
    _report(case, run_ring_case(case), "test_fuzz_ring")


# Seeds of the long slice that fail today, pinned in the default tier (strict: each flips when fixed).
KNOWN_API_SEEDS = {
    1049: (
        "csrc/cpu_simd.h:gemm_block (Q K^T) sums q.k over D in one sequential fp32 chain: score error about 2.4x "
        "torch's, out error 5.1e-6 against the fp32 peer's 9.5e-7 (D=128, softmax_scale 0.40)"
    ),
}


@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=r), id=seed_id(s))
        for s, r in KNOWN_API_SEEDS.items()
    ],
)
def test_fuzz_api_known_failures(seed):
    case = api_case(seed)
    _report(case, run_api_case(case), "test_fuzz_api_known_failures")


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(1000, case_count(SLOW_CASES) * 6), ids=seed_id)
def test_fuzz_api_slow(seed):
    case = api_case(seed)
    if case.backend == "triton":
        case = api_case(seed, backend="cpu")
    _report(case, run_api_case(case), "test_fuzz_api_slow")


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(1000, max(case_count(SLOW_CASES) // 3, 1)), ids=seed_id)
def test_fuzz_api_triton_slow(seed):
    case = api_case(seed, backend="triton")
    _report(case, run_api_case(case), "test_fuzz_api_triton_slow")


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(1000, case_count(SLOW_CASES) * 2), ids=seed_id)
def test_fuzz_ring_slow(seed):
    case = ring_case(seed)
    _report(case, run_ring_case(case), "test_fuzz_ring_slow")
