"""Flash-attention forward and backward kernels with RoPE fused into the Q/K tile loads.

Layout (B, S, H, D) with arbitrary element strides; K/V hold only the KV heads (query head h reads
KV head h // GROUP). Head dims pad to BLOCK_D (a power of two) by masking the D axis.

Masks are functions of global token indices: query row m has index ``q_start + q_stride * m``, key
row n ``k_start + k_stride * n``. Causal: q_index >= k_index. Documents: per-token doc ids (-1 =
outside every document, which sees nothing). Fully masked tiles are skipped: the causal bound is
computed here, the document bound per tile is given by the launcher (``TileRange``).

Score features, each a constexpr flag so a kernel without it compiles as before: K_DOCS (keys carry
their own document boundaries; a query's *aligned* index, QAlign from the launcher, is its index +
k_cu[d + 1] - cu[d + 1], and causal, window and ALiBi use it in place of the query index),
HAS_WINDOW (keys in [a - win_left, a + win_right], -1 unbounded; key or query tiles outside every
row's window are never visited), SOFTCAP (cap * tanh(s / cap) on the natural-scale score s, its
derivative in the backward), HAS_ALIBI (- slope * |a - k| added after the softcap; slopes
(B, Hq) fp32) and DROPOUT (attention dropout, ``_dropout_keep``: the mask is drawn from a
counter-based generator, so the backward regenerates it and nothing is stored).

All scores are in log2 units (scale * log2(e) folded in) so exp2 is used; lse is written in
natural log. Rows that see no key get lse = -inf and zero output; no inf - inf is ever formed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rope_tile import load_parts, rotate_back, store_parts

LOG2E = 1.4426950408889634  # log2(e) as a host float: the launchers pass scale * LOG2E
LOG2E_K = tl.constexpr(LOG2E)  # the same inside the kernels (their globals must be constexpr)
LN2 = tl.constexpr(0.6931471805599453)
MAX_INDEX = tl.constexpr(2**31 - 1)
# Dropout's scalars vary from step to step (a fresh seed each): no value specialization (== 1,
# divisible by 16) of them, which would compile new variants of the kernels for some seeds.
_DROPOUT_WORDS = ("seed_lo", "seed_hi", "drop_offset", "drop_threshold")


@triton.jit
def _check_tiles(
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr,
    ROT_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    """Compile-time checks of the tile relations the attention kernels rely on.

    Every tile extent is a tl.arange length (a power of two) and a tl.dot dimension (>= 16); the D
    axis is masked, never looped, so one tile covers the head.
    """
    tl.static_assert(BLOCK_M >= 16 and (BLOCK_M & (BLOCK_M - 1)) == 0, "BLOCK_M: a power of 2, >= 16")
    tl.static_assert(BLOCK_N >= 16 and (BLOCK_N & (BLOCK_N - 1)) == 0, "BLOCK_N: a power of 2, >= 16")
    tl.static_assert(BLOCK_D >= 16 and (BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D: a power of 2, >= 16")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    if ROPE:
        # parts a, b: the ROT_DIM / 2 rotary pairs; part c: the HEAD_DIM - ROT_DIM pass-through columns
        tl.static_assert(ROT_DIM % 2 == 0 and ROT_DIM <= HEAD_DIM, "ROT_DIM: even, at most HEAD_DIM")
        tl.static_assert(HALF_PAD >= 16 and (HALF_PAD & (HALF_PAD - 1)) == 0, "HALF_PAD: a power of 2, >= 16")
        tl.static_assert(HALF_PAD >= ROT_DIM // 2, "HALF_PAD must cover the rotary pairs")
        if ROT_DIM == HEAD_DIM:
            tl.static_assert(PASS_PAD == 0, "PASS_PAD must be 0 without pass-through columns")
        else:
            tl.static_assert(
                PASS_PAD >= 16 and (PASS_PAD & (PASS_PAD - 1)) == 0, "PASS_PAD: a power of 2, >= 16"
            )
            tl.static_assert(ROT_DIM + PASS_PAD >= HEAD_DIM, "PASS_PAD must cover the pass-through columns")
    else:
        tl.static_assert(HALF_PAD == BLOCK_D and PASS_PAD == 0, "without RoPE: one part of BLOCK_D")


@triton.jit
def _row_ptrs(base, b, h, offs, stride_b, stride_h, stride_s):
    """Pointers to rows ``offs`` of head h of batch b, int64 offsets (tensors past 2^31 elements).

    ``offs`` [rows] gives row pointers; a column ``offs[:, None]`` gives [rows, 1] to add D offsets to.
    """
    return base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + offs.to(tl.int64) * stride_s


@triton.jit
def _causal_key_end(q_last_row, q_start, q_stride, k_start, k_stride, Sk):
    # Keys n with k_start + k_stride * n <= q index of the tile's last row: n < (qi - k_start) // ks + 1.
    q_hi = q_start + q_stride * q_last_row
    return tl.minimum(tl.maximum(q_hi - k_start + k_stride, 0) // k_stride, Sk)


@triton.jit
def _causal_query_begin(k_first_row, q_start, q_stride, k_start, k_stride):
    # First query row m with q_start + q_stride * m >= key index of the tile's first row.
    k_lo = k_start + k_stride * k_first_row
    return tl.maximum(k_lo - q_start + q_stride - 1, 0) // q_stride


@triton.jit
def _program_tile(rows, BLOCK: tl.constexpr):
    """(row tile, batch * head) of this program. The grid is 1-D, a head's tiles fastest: grid axis 1
    would cap batch x heads at 65535, axis 0 allows 2^31 - 1 programs."""
    n_tiles = tl.cdiv(rows, BLOCK)
    pid = tl.program_id(0)
    return pid % n_tiles, pid // n_tiles


@triton.jit
def _first_row_at_or_above(index, start, stride, n):
    """First row r >= 0 with start + stride * r >= index, at most n (int64: index may be far out)."""
    num = tl.maximum(index.to(tl.int64) - start, 0)
    return tl.minimum((num + stride - 1) // stride, n).to(tl.int32)


@triton.jit
def _rows_at_or_below(index, start, stride, n):
    """Rows r >= 0 with start + stride * r <= index, at most n (int64; numerators kept >= 0)."""
    num = tl.maximum(index.to(tl.int64) - start + stride, 0)
    return tl.minimum(num // stride, n).to(tl.int32)


@triton.jit
def _key_bounds(a_idx, win_left, win_right, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Per query of aligned index a: the inclusive key-index bounds [lo, hi] of its window (a - left,
    a + right; -1: unbounded) and causal bound (a). Computed in int64 (a - left may leave int32),
    then clamped to [0, 2^31 - 1] and [-1, 2^31 - 1]: key indices lie in [0, 2^31 - 2], so the int32
    comparisons stay exact."""
    a = a_idx.to(tl.int64)
    lo = tl.zeros(a_idx.shape, dtype=tl.int64)
    hi = tl.full(a_idx.shape, MAX_INDEX, dtype=tl.int64)
    if HAS_WINDOW:
        lo = tl.where(win_left >= 0, a - win_left, lo)
        hi = tl.where(win_right >= 0, a + win_right, hi)
    if CAUSAL:
        hi = tl.minimum(hi, a)
    lo = tl.minimum(tl.maximum(lo, 0), MAX_INDEX).to(tl.int32)
    hi = tl.minimum(tl.maximum(hi, -1), MAX_INDEX).to(tl.int32)
    return lo, hi


@triton.jit
def _kv_bounds(
    pid_m,
    QDoc,
    TileRange,
    Sq,
    Sk,
    q_start,
    q_stride,
    k_start,
    k_stride,
    k_lo,
    k_hi,
    m_valid,
    BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BOUNDS: tl.constexpr,
):
    """Key rows [n_lo, n_hi) query tile pid_m can see, and its rows' doc ids (zeros without documents).

    With BOUNDS (a window, or causal on aligned indices) the range is the hull of the valid rows'
    key-index bounds [k_lo, k_hi] (``_key_bounds``), so key tiles outside every row's window are
    never visited; otherwise the causal bound of the tile's last row.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_doc = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_lo = 0
    n_hi = Sk
    if BOUNDS:
        lo = tl.min(tl.where(m_valid, k_lo, MAX_INDEX), 0)
        hi = tl.max(tl.where(m_valid, k_hi, -1), 0)
        n_lo = _first_row_at_or_above(lo, k_start, k_stride, Sk)
        n_hi = _rows_at_or_below(hi, k_start, k_stride, Sk)
    elif CAUSAL:
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Sq) - 1
        n_hi = _causal_key_end(last, q_start, q_stride, k_start, k_stride, Sk)
    if HAS_DOCS:
        q_doc = tl.load(QDoc + offs_m, mask=offs_m < Sq, other=-1)
        n_lo = tl.maximum(tl.load(TileRange + 2 * pid_m), n_lo)
        n_hi = tl.minimum(tl.load(TileRange + 2 * pid_m + 1), n_hi)
    return n_lo, n_hi, q_doc


@triton.jit
def _visible(
    row_idx,
    col_idx,
    row_doc,
    col_doc,
    row_valid,
    col_valid,
    q_lo,
    q_hi,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BOUNDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    KEYS_ROWS: tl.constexpr = False,
):
    """[rows, cols] visibility: rows are queries and columns keys, or the other way with KEYS_ROWS.

    Arguments are the rows' and the columns' token indices, doc ids and validity, and with BOUNDS
    each query's inclusive key-index bounds (``_key_bounds``), which then replace the plain causal
    test (they hold it, on aligned indices).
    """
    vis = row_valid[:, None] & col_valid[None, :]
    if BOUNDS:
        if KEYS_ROWS:
            k = row_idx[:, None]
            lo = q_lo[None, :]
            hi = q_hi[None, :]
        else:
            k = col_idx[None, :]
            lo = q_lo[:, None]
            hi = q_hi[:, None]
        if HAS_WINDOW:
            vis = vis & (k >= lo)
        vis = vis & (k <= hi)
    elif CAUSAL:
        if KEYS_ROWS:
            vis = vis & (col_idx[None, :] >= row_idx[:, None])
        else:
            vis = vis & (row_idx[:, None] >= col_idx[None, :])
    if HAS_DOCS:
        q_doc = col_doc[None, :] if KEYS_ROWS else row_doc[:, None]
        vis = vis & (row_doc[:, None] == col_doc[None, :]) & (q_doc >= 0)
    return vis


@triton.jit
def _query_align(offs_m, m_valid, q_idx, QAlign, K_DOCS: tl.constexpr):
    """Aligned query indices: the global index, or with key-side documents (K_DOCS) the launcher's
    q index + k_cu_seqlens[d + 1] - cu_seqlens[d + 1] of the row's document d (bottom-right aligned)."""
    if K_DOCS:
        return tl.load(QAlign + offs_m, mask=m_valid, other=0)
    return q_idx


@triton.jit
def _alibi_log2(Alibi, b, h, Hq, HAS_ALIBI: tl.constexpr):
    """-slope * log2(e) of head h of batch b (slopes (B, Hq) fp32 contiguous), 0 without ALiBi."""
    slope = 0.0
    if HAS_ALIBI:
        slope = -tl.load(Alibi + b.to(tl.int64) * Hq + h) * LOG2E_K
    return slope


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (libdevice is not available to the interpreter): Cephes' tanhf, an
    odd polynomial below |x| = 0.625 (no cancellation near 0), else 1 - 2 / (e^(2|x|) + 1)."""
    z = x * x
    p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
    small = x + x * z * (p - 3.33332819422e-1)
    # div.full (2 ulp) rather than IEEE division: the quotient is at most 2 / (e^1.25 + 1) ~ 0.45
    # of a result >= 0.55, so its error stays within an ulp or two of tanh
    big = 1.0 - tl.fdiv(2.0, tl.exp2(tl.abs(x) * (2.0 * LOG2E_K)) + 1.0)
    return tl.where(tl.abs(x) < 0.625, small, tl.where(x < 0, -big, big))


@triton.jit
def _score_mod(
    s,
    q_rel,
    k_rel,
    scale_log2,
    softcap_in,
    softcap_out,
    slope_log2,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    KEYS_ROWS: tl.constexpr = False,
):
    """Raw dot products q.k -> final scores in log2 units, and tanh of the capped score (SOFTCAP).

    Softcap acts on the natural-scale score scale * q.k: cap * tanh(scale * q.k / cap), so
    softcap_in = scale / cap and softcap_out = cap * log2(e). ALiBi then adds -slope * |a - k| (a:
    the query's aligned index), slope_log2 = -slope * log2(e), from fp32 indices relative to the key
    tile's first index (``_alibi_rel``): exact integers for every pair within 2^24 of it, and one
    subtraction and FMA per score.
    """
    t = s
    if SOFTCAP:
        t = _tanh(s * softcap_in)
        s = t * softcap_out
    else:
        s = s * scale_log2
    if HAS_ALIBI:
        if KEYS_ROWS:
            dist = k_rel[:, None] - q_rel[None, :]
        else:
            dist = q_rel[:, None] - k_rel[None, :]
        s = s + slope_log2 * tl.abs(dist)
    return s, t


@triton.jit
def _alibi_rel(q_align, k_first, HAS_ALIBI: tl.constexpr):
    """Aligned query indices relative to the key tile's first index k_first, in fp32 (int64 first:
    a negative aligned index minus k_first may leave int32). A dummy without ALiBi."""
    if HAS_ALIBI:
        return (q_align.to(tl.int64) - k_first).to(tl.float32)
    return q_align.to(tl.float32)


PHILOX_M0 = tl.constexpr(0xD2511F53)  # Philox4x32 round multipliers
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)  # key schedule (Weyl) increments
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _mulhilo(m: tl.constexpr, x):
    """(high, low) uint32 words of m * x, one 32 x 32 -> 64-bit multiply (IMAD.WIDE.U32)."""
    prod = x.to(tl.uint64) * m
    return (prod >> 32).to(tl.uint32), prod.to(tl.uint32)


@triton.jit
def _philox_word0(c0, c1, c2, c3, k0, k1):
    """Word 0 of Philox4x32-10 (uint32 counter words and key, broadcastable): the rounds of
    ``tl.philox_impl`` (same constants and key schedule), each multiply a widening one that yields
    both halves, where ``tl.philox_impl`` issues a mul.hi and a mul.lo: on sm_80 the forward with
    every score feature and dropout went from 851 to 532 IMADs per loop iteration and stopped
    spilling inside its loop."""
    for _ in tl.static_range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0


@triton.jit
def _dropout_keep(
    row_idx, col_idx, bh, seed_lo, seed_hi, drop_offset, drop_threshold, KEYS_ROWS: tl.constexpr = False
):
    """[rows, cols] bool: the attention probabilities dropout keeps (rows are queries and columns
    keys, or the other way with KEYS_ROWS), bit for bit ``ringattn.dropout.keep_mask``.

    One Philox4x32-10 draw per element (``_philox_word0``: Triton's ``tl.philox_impl`` rounds, word
    0 only) with counter (key index, query index, bh = batch * Hq + head, drop_offset) of global
    token indices, so tiles, shards and the backward's recomputation draw the same words, and key
    (seed_lo, seed_hi) = (seed mod 2^32, seed >> 32), the split ``tl.philox`` itself makes of a
    64-bit seed; the launcher passes the words as int32 bit patterns. Kept when the top 24 bits of
    word 0, an integer u24, satisfy u24 * 2^-24 >= p, i.e. u24 >= drop_threshold = ceil(p * 2^24)
    (exact: no float rounding of p). About 45 integer instructions per element, in the forward and
    again in each backward kernel.
    """
    # Counters stay [rows, 1] / [1, cols] / scalars: the first rounds mix only one of them into
    # each word, so they run on vectors and broadcast where the words meet (the compiler finds this
    # too: the generated code is the same as for full tiles).
    if KEYS_ROWS:
        k = row_idx[:, None]
        q = col_idx[None, :]
    else:
        q = row_idx[:, None]
        k = col_idx[None, :]
    c2 = tl.to_tensor(bh).to(tl.uint32, bitcast=True)
    c3 = tl.to_tensor(drop_offset).to(tl.uint32, bitcast=True)
    k0 = tl.to_tensor(seed_lo).to(tl.uint32, bitcast=True)
    k1 = tl.to_tensor(seed_hi).to(tl.uint32, bitcast=True)
    word = _philox_word0(k.to(tl.uint32, bitcast=True), q.to(tl.uint32, bitcast=True), c2, c3, k0, k1)
    return (word >> 8).to(tl.int32, bitcast=True) >= drop_threshold


@triton.jit
def _load_qk(
    row_ptrs,
    row_mask,
    stride_d,
    pos,
    TabA,
    TabB,
    attn_factor,
    HEAD_DIM: tl.constexpr,
    ROPE: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    """Q or K rows as dot operands (a, b, c): rotated parts, or the plain tile (as a) without RoPE.

    Rotated values are rounded to the input dtype, as an unfused model would store them.
    """
    if ROPE:
        a, b, c = load_parts(
            row_ptrs,
            row_mask,
            stride_d,
            pos,
            TabA,
            TabB,
            attn_factor,
            HEAD_DIM,
            EXACT,
            ROT_DIM,
            INTERLEAVED,
            HALF_PAD,
            PASS_PAD,
        )
        dtype = row_ptrs.dtype.element_ty
        a = a.to(dtype)
        b = b.to(dtype)
        c = c.to(dtype)
    else:
        offs_d = tl.arange(0, HALF_PAD)  # without RoPE HALF_PAD = BLOCK_D (_check_tiles)
        mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        a = tl.load(row_ptrs[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0)
        b = a
        c = a
    return a, b, c


@triton.jit
def _dot_nt(x, y, acc, DOT_PREC: tl.constexpr):
    """acc + x @ y^T for x [M, K], y [N, K], fp32 accumulation.

    fp32 inputs take Triton's FMA path, which holds a thread's whole K extent of both operands in
    registers: those dots are cut along K (interleaved halves, column order does not matter to a
    dot product) down to 32 columns, which is what keeps the fp32 backward free of spills.
    """
    K: tl.constexpr = x.shape[1]
    if DOT_PREC == "ieee" and K > 32:
        x0, x1 = tl.split(tl.reshape(x, [x.shape[0], K // 2, 2]))
        y0, y1 = tl.split(tl.reshape(y, [y.shape[0], K // 2, 2]))
        acc = _dot_nt(x0, y0, acc, DOT_PREC)
        acc = _dot_nt(x1, y1, acc, DOT_PREC)
    else:
        acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _scores(qa, qb, qc, ka, kb, kc, ROPE: tl.constexpr, PASS_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """[rows of q, rows of k] = q . k summed over the parts."""
    s = _dot_nt(qa, ka, tl.zeros([qa.shape[0], ka.shape[0]], dtype=tl.float32), DOT_PREC)
    if ROPE:
        s = _dot_nt(qb, kb, s, DOT_PREC)
        if PASS_PAD > 0:
            s = _dot_nt(qc, kc, s, DOT_PREC)
    return s


@triton.jit
def _acc_parts(w, xa, xb, xc, ga, gb, gc, ROPE: tl.constexpr, PASS_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """(ga, gb, gc) += w @ (xa, xb, xc), fp32 accumulators."""
    ga = tl.dot(w, xa, ga, input_precision=DOT_PREC)
    if ROPE:
        gb = tl.dot(w, xb, gb, input_precision=DOT_PREC)
        if PASS_PAD > 0:
            gc = tl.dot(w, xc, gc, input_precision=DOT_PREC)
    return ga, gb, gc


@triton.jit
def _store_grad(
    row_ptrs,
    row_mask,
    stride_d,
    ga,
    gb,
    gc,
    scale,
    pos,
    TabA,
    TabB,
    attn_factor,
    HEAD_DIM: tl.constexpr,
    ROPE: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    """Scale a dq/dk accumulator, rotate it back (RoPE backward) and store it."""
    if ROPE:
        ga, gb = rotate_back(ga * scale, gb * scale, pos, TabA, TabB, attn_factor, EXACT, ROT_DIM, HALF_PAD)
        store_parts(
            row_ptrs,
            row_mask,
            stride_d,
            ga,
            gb,
            gc * scale,
            HEAD_DIM,
            ROT_DIM,
            INTERLEAVED,
            HALF_PAD,
            PASS_PAD,
        )
    else:
        offs_d = tl.arange(0, HALF_PAD)
        mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(
            row_ptrs[:, None] + offs_d[None, :] * stride_d,
            (ga * scale).to(row_ptrs.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _attn_fwd_inner(
    m_i,
    l_i,
    acc,
    qa,
    qb,
    qc,
    q_idx,
    q_doc,
    m_valid,
    q_align,
    k_lo,
    k_hi,
    k_base,
    v_base,
    k_pos_base,
    KTabA,
    KTabB,
    KDoc,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    n_lo,
    n_hi,
    k_start,
    k_stride,
    scale_log2,
    attn_factor,
    softcap_in,
    softcap_out,
    slope_log2,
    bh,
    seed_lo,
    seed_hi,
    drop_offset,
    drop_threshold,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    ROPE: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BOUNDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """The forward's loop over key tiles [n_lo, n_hi): online softmax into (m_i, l_i, acc).

    Per tile of BLOCK_N keys (rows at ``k_base``/``v_base``, positions at ``k_pos_base``): load K
    with RoPE and V, scores q.k in log2 units, mask, rescale the running max m_i, sum l_i and the
    unnormalized output acc [BLOCK_M, BLOCK_D], and add P.V. Returns the updated (m_i, l_i, acc).
    With DROPOUT, l_i sums the probabilities before dropout (the lse's) and acc adds only the kept
    ones (``_dropout_keep``, counter word bh = batch * Hq + head); the caller scales by 1 / (1 - p).
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k_rel = (k_stride * tl.arange(0, BLOCK_N)).to(tl.float32)  # ALiBi: key indices from the tile's first
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_hi
        k_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
        if ROPE:
            k_pos = tl.load(k_pos_base + offs_n, mask=n_valid, other=0)
        ka, kb, kc = _load_qk(
            k_base + offs_n.to(tl.int64) * stride_ks,
            n_valid,
            stride_kd,
            k_pos,
            KTabA,
            KTabB,
            attn_factor,
            HEAD_DIM,
            ROPE,
            EXACT,
            ROT_DIM,
            INTERLEAVED,
            HALF_PAD,
            PASS_PAD,
        )
        v = tl.load(
            v_base + offs_n.to(tl.int64)[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=n_valid[:, None] & d_mask[None, :],
            other=0.0,
        )
        k_idx = k_start + k_stride * offs_n
        s = _scores(qa, qb, qc, ka, kb, kc, ROPE, PASS_PAD, DOT_PREC)
        q_rel = _alibi_rel(q_align, k_start + k_stride * start_n, HAS_ALIBI)
        s, _ = _score_mod(
            s, q_rel, k_rel, scale_log2, softcap_in, softcap_out, slope_log2, SOFTCAP, HAS_ALIBI
        )
        k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
        if HAS_DOCS:
            k_doc = tl.load(KDoc + offs_n, mask=n_valid, other=-2)
        vis = _visible(
            q_idx, k_idx, q_doc, k_doc, m_valid, n_valid, k_lo, k_hi, CAUSAL, HAS_DOCS, BOUNDS, HAS_WINDOW
        )
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps -inf - -inf out of exp2
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(q_idx, k_idx, bh, seed_lo, seed_hi, drop_offset, drop_threshold)
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v_base.dtype.element_ty), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit(do_not_specialize=_DROPOUT_WORDS)
def flash_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    QPos,
    KPos,
    QTabA,
    QTabB,
    KTabA,
    KTabB,
    QDoc,
    KDoc,
    TileRange,
    QAlign,
    Alibi,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_pos_qb,
    stride_pos_kb,
    Sq,
    Sk,
    Hq,
    q_start,
    q_stride,
    k_start,
    k_stride,
    scale_log2,
    attn_factor,
    win_left,
    win_right,
    softcap_in,
    softcap_out,
    seed_lo,
    seed_hi,
    drop_offset,
    drop_threshold,
    drop_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    ROPE: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    K_DOCS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Attention output and lse for one query tile of one head.

    Grid (cdiv(Sq, BLOCK_M) * B * Hq,), see _program_tile: program (pid_m, pid_bh) takes query rows
    [pid_m * BLOCK_M, +BLOCK_M) of query head h = pid_bh % Hq of batch b = pid_bh // Hq, rotates them
    on load, and runs the online softmax (``_attn_fwd_inner``) over the key tiles of KV head
    h // GROUP it can see: keys [n_lo, n_hi) from the causal bound and the tile's document range.

    Inputs: Q (B, Sq, Hq, HEAD_DIM), K and V (B, Sk, Hq // GROUP, HEAD_DIM), any strides; with ROPE
    the int32 positions QPos (B or 1, Sq) and KPos (B or 1, Sk) (batch strides stride_pos_qb/kb) and
    the frequency tables QTabA/QTabB, KTabA/KTabB (``_rope_tile.rope_cos_sin``); with HAS_DOCS the
    int32 doc ids QDoc (Sq,) and KDoc (Sk,) and TileRange (cdiv(Sq, BLOCK_M), 2) int32, each query
    tile's [lo, hi) key rows. scale_log2 = softmax scale * log2(e); attn_factor scales cos and sin.
    Score features (module docstring): QAlign (Sq,) int32 aligned query indices (K_DOCS), Alibi
    (B, Hq) fp32 slopes (HAS_ALIBI), win_left/win_right (HAS_WINDOW), softcap_in = scale / cap and
    softcap_out = cap * log2(e) (SOFTCAP). DROPOUT: the key words seed_lo/seed_hi, the counter word
    drop_offset and drop_threshold of ``_dropout_keep``, drop_scale = 1 / (1 - p).
    Outputs: Out (B, Sq, Hq, HEAD_DIM), normalized, in Out's dtype; Lse (B, Hq, Sq) fp32 contiguous,
    the natural-log logsumexp of the scaled scores per row (-inf, with zero output, for rows that
    see no key).
    """
    _check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ROPE, ROT_DIM, HALF_PAD, PASS_PAD)
    pid_m, pid_bh = _program_tile(Sq, BLOCK_M)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Sq
    d_mask = offs_d < HEAD_DIM

    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32)
    if ROPE:
        q_pos = tl.load(QPos + b.to(tl.int64) * stride_pos_qb + offs_m, mask=m_valid, other=0)
    qa, qb, qc = _load_qk(
        _row_ptrs(Q, b, h, offs_m, stride_qb, stride_qh, stride_qs),
        m_valid,
        stride_qd,
        q_pos,
        QTabA,
        QTabB,
        attn_factor,
        HEAD_DIM,
        ROPE,
        EXACT,
        ROT_DIM,
        INTERLEAVED,
        HALF_PAD,
        PASS_PAD,
    )

    # window / causal on aligned indices: per-row key bounds, which also bound the loop
    BOUNDS: tl.constexpr = HAS_WINDOW or (K_DOCS and CAUSAL)
    q_idx = q_start + q_stride * offs_m
    q_align = _query_align(offs_m, m_valid, q_idx, QAlign, K_DOCS)
    k_lo = q_align
    k_hi = q_align
    if BOUNDS:
        k_lo, k_hi = _key_bounds(q_align, win_left, win_right, CAUSAL, HAS_WINDOW)
    n_lo, n_hi, q_doc = _kv_bounds(
        pid_m, QDoc, TileRange, Sq, Sk, q_start, q_stride, k_start, k_stride, k_lo, k_hi, m_valid,
        BLOCK_M, CAUSAL, HAS_DOCS, BOUNDS,
    )  # fmt: skip
    slope_log2 = _alibi_log2(Alibi, b, h, Hq, HAS_ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _attn_fwd_inner(
        m_i,
        l_i,
        acc,
        qa,
        qb,
        qc,
        q_idx,
        q_doc,
        m_valid,
        q_align,
        k_lo,
        k_hi,
        K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh,
        V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh,
        KPos + b.to(tl.int64) * stride_pos_kb,
        KTabA,
        KTabB,
        KDoc,
        stride_ks,
        stride_kd,
        stride_vs,
        stride_vd,
        n_lo,
        n_hi,
        k_start,
        k_stride,
        scale_log2,
        attn_factor,
        softcap_in,
        softcap_out,
        slope_log2,
        pid_bh,
        seed_lo,
        seed_hi,
        drop_offset,
        drop_threshold,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        CAUSAL,
        HAS_DOCS,
        ROPE,
        EXACT,
        ROT_DIM,
        INTERLEAVED,
        HALF_PAD,
        PASS_PAD,
        DOT_PREC,
        BOUNDS,
        HAS_WINDOW,
        SOFTCAP,
        HAS_ALIBI,
        DROPOUT,
    )

    # A row that saw no key has l_i == 0: out 0, lse -inf. A NaN score makes l_i NaN, which must
    # reach out and lse (tl.max drops NaN, so m_i cannot carry it).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        out = tl.where(empty[:, None], 0.0, acc * (drop_scale / l_safe)[:, None])  # kept: P / (1 - p)
    else:
        out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    o_ptrs = (
        _row_ptrs(Out, b, h, offs_m[:, None], stride_ob, stride_oh, stride_os) + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=m_valid)


@triton.jit
def flash_bwd_delta_kernel(
    Out,
    DOut,
    Delta,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_gb,
    stride_gs,
    stride_gh,
    stride_gd,
    S,
    H,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, m] = sum_d dout * out in fp32, (B, H, S) contiguous.

    Grid (cdiv(S, BLOCK_M) * B * H,), see _program_tile: BLOCK_M rows of one head per program.
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    pid_m, pid_bh = _program_tile(S, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = (
        _row_ptrs(Out, b, h, offs_m[:, None], stride_ob, stride_oh, stride_os) + offs_d[None, :] * stride_od
    )
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    g_ptrs = (
        _row_ptrs(DOut, b, h, offs_m[:, None], stride_gb, stride_gh, stride_gs) + offs_d[None, :] * stride_gd
    )
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * S + offs_m, tl.sum(o * g, 1), mask=offs_m < S)


@triton.jit(do_not_specialize=_DROPOUT_WORDS)
def flash_bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DQ,
    QPos,
    KPos,
    QTabA,
    QTabB,
    KTabA,
    KTabB,
    QDoc,
    KDoc,
    TileRange,
    QAlign,
    Alibi,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_gb,
    stride_gs,
    stride_gh,
    stride_gd,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_dqd,
    stride_lb,
    stride_lh,
    stride_db,
    stride_dh,
    stride_pos_qb,
    stride_pos_kb,
    Sq,
    Sk,
    Hq,
    q_start,
    q_stride,
    k_start,
    k_stride,
    scale,
    attn_factor,
    win_left,
    win_right,
    softcap_in,
    softcap_out,
    seed_lo,
    seed_hi,
    drop_offset,
    drop_threshold,
    drop_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    ROPE: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    K_DOCS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dq for one query tile of one head: a pass over its keys, no atomics (deterministic).

    Grid (cdiv(Sq, BLOCK_M) * B * Hq,) as flash_fwd_kernel's: program (pid_m, pid_bh) recomputes the
    probabilities of query rows [pid_m * BLOCK_M, +BLOCK_M) of head h = pid_bh % Hq of batch
    b = pid_bh // Hq from lse over the same key tiles [n_lo, n_hi) of KV head h // GROUP, and sums
    dq = scale * sum_n p * (dO.v - delta) k in the rotated frame, rotated back on store.

    Inputs as flash_fwd_kernel's (TileRange per query tile), plus DOut (B, Sq, Hq, HEAD_DIM); Lse
    (natural log) and Delta (``flash_bwd_delta_kernel``), both (B, Hq, Sq) fp32 with unit stride
    along Sq (batch/head strides stride_lb/lh, stride_db/dh); scale is the softmax scale (not in
    log2 units). Output: DQ (B, Sq, Hq, HEAD_DIM) in DQ's dtype. With DROPOUT (scalars as
    flash_fwd_kernel's) dO.v is taken through the regenerated mask: ds = p * (Z dO.v / (1 - p) - delta).
    """
    _check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ROPE, ROT_DIM, HALF_PAD, PASS_PAD)
    pid_m, pid_bh = _program_tile(Sq, BLOCK_M)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Sq
    d_mask = offs_d < HEAD_DIM

    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32)
    if ROPE:
        q_pos = tl.load(QPos + b.to(tl.int64) * stride_pos_qb + offs_m, mask=m_valid, other=0)
    qa, qb, qc = _load_qk(
        _row_ptrs(Q, b, h, offs_m, stride_qb, stride_qh, stride_qs),
        m_valid,
        stride_qd,
        q_pos,
        QTabA,
        QTabB,
        attn_factor,
        HEAD_DIM,
        ROPE,
        EXACT,
        ROT_DIM,
        INTERLEAVED,
        HALF_PAD,
        PASS_PAD,
    )
    do = tl.load(
        _row_ptrs(DOut, b, h, offs_m[:, None], stride_gb, stride_gh, stride_gs) + offs_d[None, :] * stride_gd,
        mask=m_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    lse = tl.load(
        Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m,
        mask=m_valid,
        other=float("-inf"),
    )
    delta = tl.load(
        Delta + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m, mask=m_valid, other=0.0
    )
    # lse = -inf: the row saw no key; +inf makes every exp2 exactly 0 without -inf - -inf.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_K)
    scale_log2 = scale * LOG2E_K

    BOUNDS: tl.constexpr = HAS_WINDOW or (K_DOCS and CAUSAL)
    q_idx = q_start + q_stride * offs_m
    q_align = _query_align(offs_m, m_valid, q_idx, QAlign, K_DOCS)
    k_lo = q_align
    k_hi = q_align
    if BOUNDS:
        k_lo, k_hi = _key_bounds(q_align, win_left, win_right, CAUSAL, HAS_WINDOW)
    n_lo, n_hi, q_doc = _kv_bounds(
        pid_m, QDoc, TileRange, Sq, Sk, q_start, q_stride, k_start, k_stride, k_lo, k_hi, m_valid,
        BLOCK_M, CAUSAL, HAS_DOCS, BOUNDS,
    )  # fmt: skip
    slope_log2 = _alibi_log2(Alibi, b, h, Hq, HAS_ALIBI)

    dqa = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    dqb = dqa
    dqc = dqa
    if ROPE:
        dqb = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
        if PASS_PAD > 0:
            dqc = tl.zeros([BLOCK_M, PASS_PAD], dtype=tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k_rel = (k_stride * tl.arange(0, BLOCK_N)).to(tl.float32)  # ALiBi: key indices from the tile's first
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_hi
        k_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
        if ROPE:
            k_pos = tl.load(KPos + b.to(tl.int64) * stride_pos_kb + offs_n, mask=n_valid, other=0)
        ka, kb, kc = _load_qk(
            k_base + offs_n.to(tl.int64) * stride_ks,
            n_valid,
            stride_kd,
            k_pos,
            KTabA,
            KTabB,
            attn_factor,
            HEAD_DIM,
            ROPE,
            EXACT,
            ROT_DIM,
            INTERLEAVED,
            HALF_PAD,
            PASS_PAD,
        )
        v = tl.load(
            v_base + offs_n.to(tl.int64)[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=n_valid[:, None] & d_mask[None, :],
            other=0.0,
        )
        k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
        if HAS_DOCS:
            k_doc = tl.load(KDoc + offs_n, mask=n_valid, other=-2)
        k_idx = k_start + k_stride * offs_n
        vis = _visible(
            q_idx, k_idx, q_doc, k_doc, m_valid, n_valid, k_lo, k_hi, CAUSAL, HAS_DOCS, BOUNDS, HAS_WINDOW
        )
        s = _scores(qa, qb, qc, ka, kb, kc, ROPE, PASS_PAD, DOT_PREC)
        q_rel = _alibi_rel(q_align, k_start + k_stride * start_n, HAS_ALIBI)
        s, t = _score_mod(
            s, q_rel, k_rel, scale_log2, softcap_in, softcap_out, slope_log2, SOFTCAP, HAS_ALIBI
        )
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot_nt(do, v, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PREC)
        if DROPOUT:  # dP = (dO V^T) Z / (1 - p), the mask regenerated
            keep = _dropout_keep(q_idx, k_idx, pid_bh, seed_lo, seed_hi, drop_offset, drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # d(cap * tanh(s / cap)) / ds
        ds = ds.to(K.dtype.element_ty)
        dqa, dqb, dqc = _acc_parts(ds, ka, kb, kc, dqa, dqb, dqc, ROPE, PASS_PAD, DOT_PREC)

    _store_grad(
        _row_ptrs(DQ, b, h, offs_m, stride_dqb, stride_dqh, stride_dqs),
        m_valid,
        stride_dqd,
        dqa,
        dqb,
        dqc,
        scale,
        q_pos,
        QTabA,
        QTabB,
        attn_factor,
        HEAD_DIM,
        ROPE,
        EXACT,
        ROT_DIM,
        INTERLEAVED,
        HALF_PAD,
        PASS_PAD,
    )


@triton.jit(do_not_specialize=_DROPOUT_WORDS)
def flash_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    QPos,
    KPos,
    QTabA,
    QTabB,
    KTabA,
    KTabB,
    QDoc,
    KDoc,
    TileRange,
    QAlign,
    Alibi,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_gb,
    stride_gs,
    stride_gh,
    stride_gd,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_dvd,
    stride_lb,
    stride_lh,
    stride_db,
    stride_dh,
    stride_pos_qb,
    stride_pos_kb,
    Sq,
    Sk,
    Hkv,
    q_start,
    q_stride,
    k_start,
    k_stride,
    scale,
    attn_factor,
    win_left,
    win_right,
    softcap_in,
    softcap_out,
    seed_lo,
    seed_hi,
    drop_offset,
    drop_threshold,
    drop_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    ROPE: tl.constexpr,
    EXACT: tl.constexpr,
    ROT_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    K_DOCS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dk, dv for one key tile of one KV head, summed over its GROUP query heads in registers.

    Grid (cdiv(Sk, BLOCK_N) * B * Hkv,): program (pid_n, pid_bh) keeps key rows
    [pid_n * BLOCK_N, +BLOCK_N) of KV head hk = pid_bh % Hkv of batch b = pid_bh // Hkv (K rotated
    on load, and V) and, for each query head hk * GROUP + g, steps BLOCK_M query rows at a time over
    the rows [m_lo, m_hi) that can see them (causal bound, and the tile's document range). Works
    transposed (keys as rows): sT = k q^T, so the per-query lse/delta broadcast along columns.

    Inputs as flash_bwd_dq_kernel's, except that TileRange (cdiv(Sk, BLOCK_N), 2) int32 holds each
    key tile's [lo, hi) query rows (with K_DOCS also bounded by causal and the window, which the
    kernel cannot bound itself: aligned indices jump between documents). Outputs, in their own dtypes: DK (B, Sk, Hkv, HEAD_DIM), scaled
    by the softmax scale and rotated back (RoPE backward), and DV (B, Sk, Hkv, HEAD_DIM). With
    DROPOUT the mask is regenerated per (key, query) element: dv sums the kept probabilities (scaled
    by 1 / (1 - p) once, on store) and ds takes dO.v through the mask as flash_bwd_dq_kernel's.
    """
    _check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ROPE, ROT_DIM, HALF_PAD, PASS_PAD)
    pid_n, pid_bh = _program_tile(Sk, BLOCK_N)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Sk
    d_mask = offs_d < HEAD_DIM

    k_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    if ROPE:
        k_pos = tl.load(KPos + b.to(tl.int64) * stride_pos_kb + offs_n, mask=n_valid, other=0)
    ka, kb, kc = _load_qk(
        _row_ptrs(K, b, hk, offs_n, stride_kb, stride_kh, stride_ks),
        n_valid,
        stride_kd,
        k_pos,
        KTabA,
        KTabB,
        attn_factor,
        HEAD_DIM,
        ROPE,
        EXACT,
        ROT_DIM,
        INTERLEAVED,
        HALF_PAD,
        PASS_PAD,
    )
    v = tl.load(
        _row_ptrs(V, b, hk, offs_n[:, None], stride_vb, stride_vh, stride_vs) + offs_d[None, :] * stride_vd,
        mask=n_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    scale_log2 = scale * LOG2E_K

    k_idx = k_start + k_stride * offs_n
    k_rel = (k_stride * tl.arange(0, BLOCK_N)).to(tl.float32)  # ALiBi: key indices from the tile's first
    k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
    m_lo = 0
    m_hi = Sq
    BOUNDS: tl.constexpr = HAS_WINDOW or (K_DOCS and CAUSAL)
    if K_DOCS:
        # Aligned indices are not monotone across documents: TileRange (the launcher's) carries
        # the causal and window bounds per key row.
        pass
    elif HAS_WINDOW:
        # Aligned index = query index, monotone in the row: queries whose window reaches the tile.
        k_first = (k_start + k_stride * (pid_n * BLOCK_N)).to(tl.int64)
        k_last = (k_start + k_stride * (tl.minimum(pid_n * BLOCK_N + BLOCK_N, Sk) - 1)).to(tl.int64)
        a_lo = tl.where(win_right >= 0, k_first - win_right, 0)
        if CAUSAL:
            a_lo = tl.maximum(a_lo, k_first)
        a_hi = tl.where(win_left >= 0, k_last + win_left, MAX_INDEX)
        m_lo = _first_row_at_or_above(a_lo, q_start, q_stride, Sq)
        m_hi = _rows_at_or_below(a_hi, q_start, q_stride, Sq)
    elif CAUSAL:
        m_lo = _causal_query_begin(pid_n * BLOCK_N, q_start, q_stride, k_start, k_stride)
    if HAS_DOCS:
        k_doc = tl.load(KDoc + offs_n, mask=n_valid, other=-1)
        m_lo = tl.maximum(tl.load(TileRange + 2 * pid_n), m_lo)
        m_hi = tl.minimum(tl.load(TileRange + 2 * pid_n + 1), m_hi)

    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dka = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dkb = dka
    dkc = dka
    if ROPE:
        dkb = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
        if PASS_PAD > 0:
            dkc = tl.zeros([BLOCK_N, PASS_PAD], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * (Hkv * GROUP) + h  # dropout's counter word: batch * Hq + query head
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
        slope_log2 = _alibi_log2(Alibi, b, h, Hkv * GROUP, HAS_ALIBI)
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < m_hi
            q_pos = tl.zeros([BLOCK_M], dtype=tl.int32)
            if ROPE:
                q_pos = tl.load(QPos + b.to(tl.int64) * stride_pos_qb + offs_m, mask=m_valid, other=0)
            qa, qb, qc = _load_qk(
                q_base + offs_m.to(tl.int64) * stride_qs,
                m_valid,
                stride_qd,
                q_pos,
                QTabA,
                QTabB,
                attn_factor,
                HEAD_DIM,
                ROPE,
                EXACT,
                ROT_DIM,
                INTERLEAVED,
                HALF_PAD,
                PASS_PAD,
            )
            do = tl.load(
                do_base + offs_m.to(tl.int64)[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                mask=m_valid[:, None] & d_mask[None, :],
                other=0.0,
            )
            lse = tl.load(
                Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m,
                mask=m_valid,
                other=float("-inf"),
            )
            delta = tl.load(
                Delta + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m,
                mask=m_valid,
                other=0.0,
            )
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_K)
            q_doc = tl.zeros([BLOCK_M], dtype=tl.int32)
            if HAS_DOCS:
                q_doc = tl.load(QDoc + offs_m, mask=m_valid, other=-1)
            # [keys, queries], built directly (no transpose of a mask)
            q_idx = q_start + q_stride * offs_m
            q_align = _query_align(offs_m, m_valid, q_idx, QAlign, K_DOCS)
            q_lo = q_align
            q_hi = q_align
            if BOUNDS:
                q_lo, q_hi = _key_bounds(q_align, win_left, win_right, CAUSAL, HAS_WINDOW)
            vis_t = _visible(
                k_idx, q_idx, k_doc, q_doc, n_valid, m_valid, q_lo, q_hi, CAUSAL, HAS_DOCS, BOUNDS, HAS_WINDOW,
                KEYS_ROWS=True,
            )  # fmt: skip
            s_t = _scores(ka, kb, kc, qa, qb, qc, ROPE, PASS_PAD, DOT_PREC)
            s_t, t_t = _score_mod(
                s_t, _alibi_rel(q_align, k_start + k_stride * (pid_n * BLOCK_N), HAS_ALIBI), k_rel, scale_log2, softcap_in, softcap_out, slope_log2, SOFTCAP, HAS_ALIBI,
                KEYS_ROWS=True,
            )  # fmt: skip
            p_t = tl.where(vis_t, tl.exp2(s_t - lse2[None, :]), 0.0)
            if DROPOUT:  # dV += (P Z)^T dO (1 / (1 - p) applied on store), dP = dO V^T Z / (1 - p)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                keep_t = _dropout_keep(
                    k_idx, q_idx, bh, seed_lo, seed_hi, drop_offset, drop_threshold, KEYS_ROWS=True
                )
                p_kept = tl.where(keep_t, p_t, 0.0)
                dv = tl.dot(p_kept.to(DOut.dtype.element_ty), do, dv, input_precision=DOT_PREC)
                dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
            else:
                dv = tl.dot(p_t.to(DOut.dtype.element_ty), do, dv, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            ds_t = ds_t.to(Q.dtype.element_ty)
            dka, dkb, dkc = _acc_parts(ds_t, qa, qb, qc, dka, dkb, dkc, ROPE, PASS_PAD, DOT_PREC)

    _store_grad(
        _row_ptrs(DK, b, hk, offs_n, stride_dkb, stride_dkh, stride_dks),
        n_valid,
        stride_dkd,
        dka,
        dkb,
        dkc,
        scale,
        k_pos,
        KTabA,
        KTabB,
        attn_factor,
        HEAD_DIM,
        ROPE,
        EXACT,
        ROT_DIM,
        INTERLEAVED,
        HALF_PAD,
        PASS_PAD,
    )
    if DROPOUT:
        dv = dv * drop_scale
    tl.store(
        _row_ptrs(DV, b, hk, offs_n[:, None], stride_dvb, stride_dvh, stride_dvs)
        + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=n_valid[:, None] & d_mask[None, :],
    )
