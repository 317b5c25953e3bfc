"""RoPE on tiles as they are loaded: shared @triton.jit helpers of the attention and RoPE kernels.

A head's D columns are loaded as three parts instead of one tile: ``a`` and ``b`` hold the two
members of each rotary pair (NeoX: columns j and j + r/2; interleaved: 2j and 2j + 1), ``c`` the
pass-through columns past the rotary dim (partial rotary). Each part is padded to a power of two
by masking. Rotation is then elementwise on [rows, r/2] tiles, one sin/cos per pair, with no
reshapes, gathers or second loads; q.k is the sum of the parts' dot products (a dot product does
not care about column order), and gradients are rotated back part by part.

Angles, exact mode: each frequency is a 64-bit fixed-point turn count ``r = r_hi * 2^32 + r_lo``
(``RoPEConfig.turns_fixed``, split on the host into two 32-bit halves). Bits 32..63 of
``pos * r mod 2^64``, read as a signed int32, are the turn fraction already centred in
[-1/2, 1/2) times 2^32; they come from 32-bit wrapping products and one umulhi, exactly. sin/cos
then come from a quarter-turn reduction in integers and fp32 polynomials (``sincos_turns``).
Angles never go through tl.dot.
hf mode: fp32 ``pos * inv_freq`` exactly as transformers computes it, then that fp32 angle reduced
exactly the same way: angle = mant * 2^E (24-bit mantissa, E <= 8 below 2^31), and the turn fraction's
top 32 bits are mant * W(E) mod 2^64, W(E) = round(2^(64+E) / 2pi) mod 2^64 from a host table
(one row per E from ``HF_MIN_EXPONENT`` to ``HF_MAX_EXPONENT``). No libdevice sin/cos, whose
large-argument path costs ~3x the loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 2*pi / 2^32: turns in units of 2^-32 to radians.
TWO_PI_OVER_2_32 = tl.constexpr(1.4629180792671596e-09)
# hf reduction table rows: exponents E in [-64, 8] (angles below 2^-40 reduce to 0 turns).
HF_MIN_EXPONENT = tl.constexpr(-64)
HF_MAX_EXPONENT = tl.constexpr(8)


# Polynomials on [-pi/4, pi/4], fitted here for this kernel (iteratively reweighted least squares
# toward minimax): sin a = a (1 + a^2 (S3 + a^2 (S5 + a^2 S7))), cos a = 1 + a^2 (-1/2 + a^2 (C4 +
# a^2 (C6 + a^2 C8))). Error 1.8e-9 (sin) and 1e-10 (cos) in exact arithmetic, below fp32 rounding
# (7.7e-8 / 8.3e-8 evaluated in fp32, the same as degree 9/10 Taylor) with two fewer FMAs per pair.
S3 = tl.constexpr(-0.16666650668891864)
S5 = tl.constexpr(0.008331978644987928)
S7 = tl.constexpr(-0.00019495634288856732)
C4 = tl.constexpr(0.04166664686593338)
C6 = tl.constexpr(-0.0013887367494029561)
C8 = tl.constexpr(2.4438449363473717e-05)


@triton.jit
def sincos_turns(turns, scale):
    """scale * sin and scale * cos of 2*pi * turns / 2^32 for int32 ``turns`` (a centred fraction of
    a turn) and a scalar ``scale`` (the attention factor).

    Reduced to the nearest quarter turn in integers (wrapping arithmetic is exact mod 2^32), then
    the polynomials above with ``scale`` folded into their coefficients (scalar work, once per
    program). The quarter turn then swaps sin and cos (odd quarters) and flips sign bits: no
    libdevice range-reduction path, and the same arithmetic on the GPU and in the interpreter.
    """
    quarter = (turns + 536870912) >> 30  # nearest multiple of 2^30 (a quarter turn)
    rest = turns - (quarter << 30)  # in [-2^29, 2^29): at most an eighth of a turn
    a = rest.to(tl.float32) * TWO_PI_OVER_2_32
    a2 = a * a
    s = a * (scale + a2 * (scale * S3 + a2 * (scale * S5 + a2 * (scale * S7))))
    c = scale + a2 * (scale * -0.5 + a2 * (scale * C4 + a2 * (scale * C6 + a2 * (scale * C8))))
    # quarter q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s) for q = 0, 1, 2, 3 (mod 4)
    odd = (quarter & 1) != 0
    sin_bits = tl.where(odd, c, s).to(tl.int32, bitcast=True) ^ ((quarter & 2) << 30)
    cos_bits = tl.where(odd, s, c).to(tl.int32, bitcast=True) ^ (((quarter + 1) & 2) << 30)
    return sin_bits.to(tl.float32, bitcast=True), cos_bits.to(tl.float32, bitcast=True)


@triton.jit
def rope_cos_sin(pos, TabA, TabB, j, j_mask, attn_factor, EXACT: tl.constexpr):
    """af*cos and af*sin, fp32 [rows, pairs], for int32 positions [rows] and frequency indices j.

    EXACT: TabA/TabB hold the high/low 32-bit halves of the uint64 turn constant r (as int32 bit
    patterns). Bits 32..63 of pos * r mod 2^64 are pos * r_hi + umulhi(pos, r_lo) mod 2^32: the
    32-bit products wrap exactly, and umulhi is the high half of the uint64 product pos * r_lo.
    Otherwise TabA is fp32 inv_freq (transformers' fp32 angle) and TabB the hf reduction table
    (int32 pairs: high, low half of W(E) for E = -64 .. 8).
    """
    if EXACT:
        r_hi = tl.load(TabA + j, mask=j_mask, other=0)
        r_lo = tl.load(TabB + j, mask=j_mask, other=0)
        zero = tl.zeros_like(pos)[:, None] + tl.zeros_like(r_lo)[None, :]
        p = pos[:, None] + zero
        turns = p * r_hi[None, :] + tl.umulhi(p, r_lo[None, :] + zero)
        sin, cos = sincos_turns(turns, attn_factor)
    else:
        inv_freq = tl.load(TabA + j, mask=j_mask, other=0.0)
        angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # >= 0, below 2^31
        bits = angle.to(tl.int32, bitcast=True)
        mant = (bits & 0x7FFFFF) | 0x800000
        row = tl.minimum(tl.maximum((bits >> 23) - 150, HF_MIN_EXPONENT), HF_MAX_EXPONENT) - HF_MIN_EXPONENT
        w_hi = tl.load(TabB + 2 * row)
        w_lo = tl.load(TabB + 2 * row + 1)
        turns = mant * w_hi + tl.umulhi(mant, w_lo)
        sin, cos = sincos_turns(turns, attn_factor)
    return cos, sin


@triton.jit
def pair_columns(ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, HALF_PAD: tl.constexpr):
    """Frequency index j, its mask, and the two columns of each rotary pair."""
    j = tl.arange(0, HALF_PAD)
    j_mask = j < ROT_DIM // 2
    if INTERLEAVED:
        col_a = 2 * j
        col_b = 2 * j + 1
    else:
        col_a = j
        col_b = j + ROT_DIM // 2
    return j, j_mask, col_a, col_b


@triton.jit
def load_raw_parts(
    row_ptrs,
    row_mask,
    stride_d,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    """Unrotated parts (a, b, c) in fp32 of the rows at ``row_ptrs`` [rows]; c = a when no pass part."""
    j, j_mask, col_a, col_b = pair_columns(ROT_DIM, INTERLEAVED, HALF_PAD)
    m2 = row_mask[:, None] & j_mask[None, :]
    a = tl.load(row_ptrs[:, None] + col_a[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
    b = tl.load(row_ptrs[:, None] + col_b[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
    c = a
    if PASS_PAD > 0:
        col_c = ROT_DIM + tl.arange(0, PASS_PAD)
        mc = row_mask[:, None] & (col_c < HEAD_DIM)[None, :]
        c = tl.load(row_ptrs[:, None] + col_c[None, :] * stride_d, mask=mc, other=0.0).to(tl.float32)
    return a, b, c


@triton.jit
def load_parts(
    row_ptrs,
    row_mask,
    stride_d,
    pos,
    TabA,
    TabB,
    attn_factor,
    HEAD_DIM: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    """Rotated parts (a, b, c) in fp32 of the rows at ``row_ptrs`` [rows]; c = a when no pass part."""
    xa, xb, c = load_raw_parts(
        row_ptrs, row_mask, stride_d, HEAD_DIM, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD
    )
    j = tl.arange(0, HALF_PAD)
    cos, sin = rope_cos_sin(pos, TabA, TabB, j, j < ROT_DIM // 2, attn_factor, EXACT)
    a = xa * cos - xb * sin
    b = xb * cos + xa * sin
    if PASS_PAD == 0:
        c = a
    return a, b, c


@triton.jit
def rotate_back(
    ga, gb, pos, TabA, TabB, attn_factor, EXACT: tl.constexpr, ROT_DIM: tl.constexpr, HALF_PAD: tl.constexpr
):
    """RoPE transpose (rotation by -angle, same attention factor) of gradient parts a, b."""
    j = tl.arange(0, HALF_PAD)
    cos, sin = rope_cos_sin(pos, TabA, TabB, j, j < ROT_DIM // 2, attn_factor, EXACT)
    return ga * cos + gb * sin, gb * cos - ga * sin


@triton.jit
def store_parts(
    row_ptrs,
    row_mask,
    stride_d,
    a,
    b,
    c,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    """Store parts (a, b, c) back to their columns, cast to the destination dtype."""
    j, j_mask, col_a, col_b = pair_columns(ROT_DIM, INTERLEAVED, HALF_PAD)
    m2 = row_mask[:, None] & j_mask[None, :]
    dt = row_ptrs.dtype.element_ty
    tl.store(row_ptrs[:, None] + col_a[None, :] * stride_d, a.to(dt), mask=m2)
    tl.store(row_ptrs[:, None] + col_b[None, :] * stride_d, b.to(dt), mask=m2)
    if PASS_PAD > 0:
        col_c = ROT_DIM + tl.arange(0, PASS_PAD)
        mc = row_mask[:, None] & (col_c < HEAD_DIM)[None, :]
        tl.store(row_ptrs[:, None] + col_c[None, :] * stride_d, c.to(dt), mask=mc)
