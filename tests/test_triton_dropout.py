"""Attention dropout in the Triton kernels: the mask is ``ringattn.dropout.keep_mask``, bit for bit.

Three levels, each against the spec (``ringattn.dropout``: plain torch integer Philox4x32-10):

* Triton's generator (``tl.philox_impl``) gives the spec's four words, and the kernels' own
  rounds (``flash_kernels._philox_word0``, widening multiplies) its word 0;
* the kernels' mask helper (``flash_kernels._dropout_keep``) in both orientations, with indices up
  to 2^31 - 2, key words >= 2^31 (negative int32 bit patterns), offsets >= 2^32 (only the low word
  counts) and p at a draw's exact value (kept: u >= p) and just above it (dropped);
* the forward and both backward kernels, for several tile shapes: with Q = K = I (scores 0/1, every
  visible probability > 0), V = I in the forward and dO = I with delta = 0 in the backward, the
  zeros of out, dq, dk and dv are exactly the dropped (or invisible) elements, per query head.

Values (out, lse, dq, dk, dv) with dropout against the fp64 reference are in test_triton_features.py,
and here for every tile shape dropout's own candidates (``configs.get_configs(dropout=True)``) use.
Without a GPU everything runs under the Triton interpreter: shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from attention_checks import Case, assert_matches_reference, backend_device, make_inputs
from harness import nan_filled

from ringattn import RoPEConfig
from ringattn.backends.triton import rope_tables_for
from ringattn.block import block_args
from ringattn.dropout import keep_mask, philox4x32
from tritonkernels import flash_kernels as fk
from tritonkernels.configs import CONFIGS, KERNELS, KernelConfig, get_configs
from tritonkernels.flash import _dropout, flash_attn_bwd, flash_attn_fwd

pytestmark = pytest.mark.gpu  # CUDA tensors on a GPU machine, the interpreter elsewhere
DEVICE = backend_device("triton")
R16 = RoPEConfig(16, theta=1e4)

# (seed, offset): a seed above 2^32 with a low word >= 2^31, the largest seed (both words with the
# top bit pattern of int32 -1 / 2^31 - 1) with an offset above 2^32, and words equal to 1 (a value
# the JIT would specialize)
SEEDS = [(0xDEAD_BEEF_F00D_CAFE & (2**63 - 1), 3), (2**63 - 1, 2**40 + 5), (2**32 + 1, 1)]


@triton.jit
def _philox_words_kernel(C0, C1, C2, C3, Out, Word0, seed_lo, seed_hi, N: tl.constexpr):
    offs = tl.arange(0, N)
    c0 = tl.load(C0 + offs).to(tl.uint32, bitcast=True)
    c1 = tl.load(C1 + offs).to(tl.uint32, bitcast=True)
    c2 = tl.load(C2 + offs).to(tl.uint32, bitcast=True)
    c3 = tl.load(C3 + offs).to(tl.uint32, bitcast=True)
    k0 = tl.to_tensor(seed_lo).to(tl.uint32, bitcast=True)
    k1 = tl.to_tensor(seed_hi).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, c2, c3, k0, k1)
    tl.store(Out + 4 * offs, w0.to(tl.int64))  # uint32 -> int64 zero-extends
    tl.store(Out + 4 * offs + 1, w1.to(tl.int64))
    tl.store(Out + 4 * offs + 2, w2.to(tl.int64))
    tl.store(Out + 4 * offs + 3, w3.to(tl.int64))
    tl.store(Word0 + offs, fk._philox_word0(c0, c1, c2, c3, k0, k1).to(tl.int64))


@triton.jit
def _keep_kernel(
    RowIdx, ColIdx, Out, bh, seed_lo, seed_hi, drop_offset, drop_threshold,
    R: tl.constexpr, C: tl.constexpr, KEYS_ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, R)
    cols = tl.arange(0, C)
    keep = fk._dropout_keep(
        tl.load(RowIdx + rows), tl.load(ColIdx + cols), bh, seed_lo, seed_hi, drop_offset, drop_threshold,
        KEYS_ROWS,
    )  # fmt: skip
    tl.store(Out + rows[:, None] * C + cols[None, :], keep.to(tl.int8))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 tensor with the same bit patterns."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("seed", [s for s, _ in SEEDS])
def test_triton_philox_is_the_spec(seed):
    gen = torch.Generator().manual_seed(1)
    n = 64
    counters = [torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64) for _ in range(4)]
    counters[0][:4] = torch.tensor([0, 1, 2**31 - 1, 2**32 - 1])  # edges of the word
    out = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
    word0 = torch.empty(n, dtype=torch.int64, device=DEVICE)
    seed_lo, seed_hi, _, _, _ = _dropout(0.5, seed, 0)
    _philox_words_kernel[(1,)](
        *(_as_int32(c).to(DEVICE) for c in counters), out, word0, seed_lo, seed_hi, N=n
    )
    expected = torch.stack(philox4x32(tuple(counters), (seed, seed >> 32)), 1)
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(word0.cpu(), expected[:, 0])


def _spec_keep(p, seed, offset, bh, q_idx, k_idx):
    """[q, k] bool from the spec's words and its comparison (u24 * 2^-24 >= p, in fp64)."""
    word = philox4x32((k_idx[None, :], q_idx[:, None], bh, offset), (seed, seed >> 32))[0]
    return (word >> 8).double() * 2.0**-24 >= p


@pytest.mark.parametrize("keys_rows", [False, True], ids=["queries-rows", "keys-rows"])
@pytest.mark.parametrize("seed,offset", SEEDS)
def test_mask_helper_is_the_spec(seed, offset, keys_rows):
    gen = torch.Generator().manual_seed(2)
    R, C = 16, 32
    rows = torch.randint(0, 2**31 - 1, (R,), generator=gen)
    cols = torch.randint(0, 2**31 - 1, (C,), generator=gen)
    rows[:3] = torch.tensor([0, 1, 2**31 - 2])
    rows, cols = rows.to(torch.int32), cols.to(torch.int32)  # the kernels' token indices are int32
    bh = 12345
    q_idx, k_idx = (cols, rows) if keys_rows else (rows, cols)
    # p at one element's exact draw: that element is kept, and dropped for the next double above
    u = (philox4x32((k_idx[0], q_idx[0], bh, offset), (seed, seed >> 32))[0] >> 8).item() * 2.0**-24
    for p in (0.3, 1e-9, 0.999999, u, torch.nextafter(torch.tensor(u), torch.tensor(1.0)).item()):
        if not 0 <= p < 1:
            continue
        out = torch.empty(R, C, dtype=torch.int8, device=DEVICE)
        words = _dropout(p, seed, offset)
        _keep_kernel[(1,)](
            rows.to(DEVICE), cols.to(DEVICE), out, bh, *words[:4], R=R, C=C, KEYS_ROWS=keys_rows
        )
        expected = _spec_keep(p, seed, offset, bh, q_idx, k_idx)
        kept = out.cpu().bool()
        assert torch.equal(kept.T if keys_rows else kept, expected), f"p={p!r}"
        first = kept[0, 0].item()
        assert first == (p <= u), "the exact-draw edge: kept at p = u, dropped above"


def test_dropout_scalars():
    assert _dropout(0.0, 0, 0) == (0, 0, 0, 0, 1.0)
    lo, hi, off, threshold, scale = _dropout(0.3, 0x7FFF_FFFE_C000_0001, 2**32 + 7)
    assert (lo, hi, off) == (0xC000_0001 - 2**32, 0x7FFF_FFFE, 7)  # int32 bit patterns of the words
    assert threshold == 5033165 and (threshold - 1) * 2.0**-24 < 0.3 <= threshold * 2.0**-24
    assert scale == 1.0 / (1.0 - 0.3)
    assert _dropout(0.5, 2**63 - 1, 0)[:2] == (-1, 2**31 - 1)
    for bad in (dict(p=1.0), dict(p=-0.1), dict(seed=2**63), dict(seed=-1), dict(offset=True)):
        kw = dict(p=0.1, seed=1, offset=0) | bad
        with pytest.raises(ValueError):
            _dropout(kw["p"], kw["seed"], kw["offset"])


# ----------------------------------------------------------------- the kernels' masks, per tile shape

B, HQ, HKV, D, SQ, SK, Q_START, P = 2, 4, 2, 32, 20, 30, 10, 0.4
TILES = [
    KernelConfig(16, 16, 4, 1),
    KernelConfig(32, 16, 4, 1),
    KernelConfig(16, 32, 4, 1),
    KernelConfig(64, 64, 4, 1),
]


def _eye(rows: int, heads: int) -> torch.Tensor:
    return torch.eye(rows, D).expand(B, heads, rows, D).transpose(1, 2).contiguous().to(DEVICE)


@pytest.mark.parametrize("tile", TILES, ids=lambda c: f"{c.block_m}x{c.block_n}")
@pytest.mark.parametrize(
    "seed,offset",
    [SEEDS[0], pytest.param(*SEEDS[1], marks=pytest.mark.slow)],  # default tier: one seed
)
def test_kernel_masks_are_keep_mask(tile, seed, offset):
    q_index, k_index = torch.arange(SQ) + Q_START, torch.arange(SK)
    expected = keep_mask(P, seed, offset, B, HQ, q_index, k_index) & (k_index[None, :] <= q_index[:, None])
    assert 0.3 < expected.float().mean() < 0.5  # the case drops and keeps a fair share
    kw = dict(causal=True, q_span=(Q_START, 1), dropout_p=P, dropout_seed=seed, dropout_offset=offset)
    q, k = _eye(SQ, HQ), _eye(SK, HKV)
    # forward, V = I: out[b, q, h, k] = P[q, k] Z / (1 - p)
    out, lse = flash_attn_fwd(q, k, _eye(SK, HKV), config=tile, **kw)
    assert torch.equal(out[..., :SK].permute(0, 2, 1, 3).cpu() != 0, expected)
    assert (out[..., SK:] == 0).all()
    # backward, delta = 0 and dO = I on head g of each KV group: dS = P (dO.v) Z / (1 - p) with
    # dO.v = V[k, q] != 0, so dq (K = I), dk (Q = I) and dv (dO = I) are non-zero where kept
    v = torch.randn(B, SK, HKV, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    delta = torch.zeros(B, HQ, SQ, device=DEVICE)
    group = HQ // HKV
    for g in range(group):
        dout = torch.zeros(B, SQ, HQ, D, device=DEVICE)
        dout[:, :, g::group] = _eye(SQ, HKV)
        dq, dk, dv = flash_attn_bwd(dout, q, k, v, None, lse, delta, config_dq=tile, config_dkdv=tile, **kw)
        heads = expected[:, g::group]  # (B, Hkv, Sq, Sk), the query heads hk * group + g
        assert torch.equal(dq[:, :, g::group, :SK].permute(0, 2, 1, 3).cpu() != 0, heads), f"dq, g={g}"
        other = [h for h in range(HQ) if h % group != g]
        assert (dq[:, :, other] == 0).all()
        for name, grad in (("dk", dk), ("dv", dv)):  # (B, Sk, Hkv, D): [k, q] at column q
            assert torch.equal(grad[..., :SQ].permute(0, 2, 3, 1).cpu() != 0, heads), f"{name}, g={g}"


# ---------------------------------------------------------------------- dropout's own tile candidates


def _tiles(dropout: bool) -> set[tuple[int, int]]:
    tiles = set()
    for arch, bd in CONFIGS:
        for kernel in KERNELS:
            for size in (2, 4):
                for cfg in get_configs(kernel, bd, divmod(arch, 10), size, dropout=dropout):
                    tiles.add((cfg.block_m, cfg.block_n))
    return tiles


def _dropout_tile_params():
    plain = _tiles(False)  # those run every masking path in test_triton_autotune.py already
    for m, n in sorted(_tiles(True)):
        marks = [pytest.mark.slow] if (m, n) in plain else []
        yield pytest.param(KernelConfig(m, n, 4, 1), id=f"{m}x{n}", marks=marks)


@pytest.mark.parametrize("tile", list(_dropout_tile_params()))
def test_dropout_tile_candidates_match_reference(tile):
    # Every tile shape a GPU may pick with dropout (configs.get_configs(dropout=True)): documents
    # (one empty), causal, RoPE, GQA, a length no tile divides, against the fp64 spec.
    case = Case(70, Hq=4, Hkv=2, causal=True, rope=R16, cu_seqlens=(0, 30, 30, 70), dropout_p=0.3)
    check_dropout_launchers(case, torch.float32, tile)


def check_dropout_launchers(case: Case, dtype, tile):
    """The launchers with ``case``'s dropout (and mask, RoPE) into NaN-filled buffers, tile shape
    ``tile`` for all three kernels, against the fp64 reference with the tolerance rule."""
    q, k, v, dout = make_inputs(case, dtype, device=DEVICE)
    mask, features = case.mask(DEVICE), case.feature_kwargs(DEVICE)
    kw = dict(causal=case.causal, q_span=case.q_span, k_span=case.k_span, cu_seqlens=mask.cu_seqlens)
    kw |= {name: features[name] for name in ("dropout_p", "dropout_seed", "dropout_offset")}
    if case.rope is not None:
        args = block_args(q, k, v, mask, rope=case.rope)
        kw |= {
            "q_rope": rope_tables_for(case.rope, args.q_rope),
            "k_rope": rope_tables_for(case.rope, args.k_rope),
        }
    out = nan_filled(*q.shape, dtype=dtype, device=DEVICE)
    lse = nan_filled(case.B, case.Hq, case.Sq, device=DEVICE)
    flash_attn_fwd(q, k, v, out=out, lse=lse, config=tile, **kw)
    dq, dk, dv = (nan_filled(*t.shape, dtype=dtype, device=DEVICE) for t in (q, k, v))
    flash_attn_bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, config_dq=tile, config_dkdv=tile, **kw)
    ours = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    assert_matches_reference(ours, q, k, v, dout, case.spec_kwargs(DEVICE))
