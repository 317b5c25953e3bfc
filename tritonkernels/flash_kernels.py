"""Flash-attention forward and backward kernels with RoPE fused into the Q/K tile loads.

Layout (B, S, H, D) with arbitrary element strides; K/V hold only the KV heads (query head h reads
KV head h // GROUP). Head dims pad to BLOCK_D (a power of two) by masking the D axis.

Masks are functions of global token indices: query row m has index ``q_start + q_stride * m``, key
row n ``k_start + k_stride * n``. Causal: q_index >= k_index. Documents: per-token doc ids (-1 =
outside every document, which sees nothing). Fully masked tiles are skipped: the causal bound is
computed here, the document bound per tile is given by the launcher (``TileRange``).

All scores are in log2 units (scale * log2(e) folded in) so exp2 is used; lse is written in
natural log. Rows that see no key get lse = -inf and zero output; no inf - inf is ever formed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rope_tile import load_parts, rotate_back, store_parts

LOG2E = 1.4426950408889634  # host-side value (launchers)
LN2 = tl.constexpr(0.6931471805599453)


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
def _visible(q_idx, k_idx, q_doc, k_doc, q_valid, k_valid, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """[rows, cols] visibility; with keys as rows, pass key vectors first and swap inside (KEYS_ROWS)."""
    vis = q_valid[:, None] & k_valid[None, :]
    if CAUSAL:
        vis = vis & (q_idx[:, None] >= k_idx[None, :])
    if HAS_DOCS:
        vis = vis & (q_doc[:, None] == k_doc[None, :]) & (q_doc[:, None] >= 0)
    return vis


@triton.jit
def _load_qk(
    row_ptrs,
    row_mask,
    stride_d,
    pos,
    TabA,
    TabB,
    attn_factor,
    DTYPE: tl.constexpr,
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
            row_ptrs, row_mask, stride_d, pos, TabA, TabB, attn_factor,
            HEAD_DIM, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
        )  # fmt: skip
        a = a.to(DTYPE)
        b = b.to(DTYPE)
        c = c.to(DTYPE)
    else:
        offs_d = tl.arange(0, HALF_PAD)  # without RoPE the launcher sets HALF_PAD = BLOCK_D
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
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m.to(tl.int64) * stride_qs, m_valid, stride_qd, q_pos, QTabA, QTabB,
        attn_factor, Q.dtype.element_ty, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
    )  # fmt: skip

    q_idx = q_start + q_stride * offs_m
    q_doc = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_lo = 0
    n_hi = Sk
    if CAUSAL:
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Sq) - 1
        n_hi = _causal_key_end(last, q_start, q_stride, k_start, k_stride, Sk)
    if HAS_DOCS:
        q_doc = tl.load(QDoc + offs_m, mask=m_valid, other=-1)
        n_lo = tl.maximum(tl.load(TileRange + 2 * pid_m), 0)
        n_hi = tl.minimum(tl.load(TileRange + 2 * pid_m + 1), n_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_hi
        k_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
        if ROPE:
            k_pos = tl.load(KPos + b.to(tl.int64) * stride_pos_kb + offs_n, mask=n_valid, other=0)
        ka, kb, kc = _load_qk(
            k_base + offs_n.to(tl.int64) * stride_ks, n_valid, stride_kd, k_pos, KTabA, KTabB, attn_factor,
            K.dtype.element_ty, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
        )  # fmt: skip
        v = tl.load(
            v_base + offs_n.to(tl.int64)[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=n_valid[:, None] & d_mask[None, :],
            other=0.0,
        )
        s = _scores(qa, qb, qc, ka, kb, kc, ROPE, PASS_PAD, DOT_PREC) * scale_log2
        k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
        if HAS_DOCS:
            k_doc = tl.load(KDoc + offs_n, mask=n_valid, other=-2)
        vis = _visible(q_idx, k_start + k_stride * offs_n, q_doc, k_doc, m_valid, n_valid, CAUSAL, HAS_DOCS)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps -inf - -inf out of exp2
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = (
        Out
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_os
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])
    tl.store(Lse + pid_bh * Sq + offs_m, lse, mask=m_valid)


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
    """delta[b, h, m] = sum_d dout * out in fp32, (B, H, S) contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_os
        + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    g = tl.load(
        DOut
        + b.to(tl.int64) * stride_gb
        + h.to(tl.int64) * stride_gh
        + offs_m.to(tl.int64)[:, None] * stride_gs
        + offs_d[None, :] * stride_gd,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(Delta + pid_bh * S + offs_m, tl.sum(o * g, 1), mask=offs_m < S)


@triton.jit
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
):
    """dq for one query tile of one head: a pass over its keys, no atomics (deterministic)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m.to(tl.int64) * stride_qs, m_valid, stride_qd, q_pos, QTabA, QTabB,
        attn_factor, Q.dtype.element_ty, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
    )  # fmt: skip
    do = tl.load(
        DOut
        + b.to(tl.int64) * stride_gb
        + h.to(tl.int64) * stride_gh
        + offs_m.to(tl.int64)[:, None] * stride_gs
        + offs_d[None, :] * stride_gd,
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
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    scale_log2 = scale * 1.4426950408889634

    q_idx = q_start + q_stride * offs_m
    q_doc = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_lo = 0
    n_hi = Sk
    if CAUSAL:
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Sq) - 1
        n_hi = _causal_key_end(last, q_start, q_stride, k_start, k_stride, Sk)
    if HAS_DOCS:
        q_doc = tl.load(QDoc + offs_m, mask=m_valid, other=-1)
        n_lo = tl.maximum(tl.load(TileRange + 2 * pid_m), 0)
        n_hi = tl.minimum(tl.load(TileRange + 2 * pid_m + 1), n_hi)

    dqa = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    dqb = dqa
    dqc = dqa
    if ROPE:
        dqb = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
        if PASS_PAD > 0:
            dqc = tl.zeros([BLOCK_M, PASS_PAD], dtype=tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_hi
        k_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
        if ROPE:
            k_pos = tl.load(KPos + b.to(tl.int64) * stride_pos_kb + offs_n, mask=n_valid, other=0)
        ka, kb, kc = _load_qk(
            k_base + offs_n.to(tl.int64) * stride_ks, n_valid, stride_kd, k_pos, KTabA, KTabB, attn_factor,
            K.dtype.element_ty, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
        )  # fmt: skip
        v = tl.load(
            v_base + offs_n.to(tl.int64)[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=n_valid[:, None] & d_mask[None, :],
            other=0.0,
        )
        k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
        if HAS_DOCS:
            k_doc = tl.load(KDoc + offs_n, mask=n_valid, other=-2)
        vis = _visible(q_idx, k_start + k_stride * offs_n, q_doc, k_doc, m_valid, n_valid, CAUSAL, HAS_DOCS)
        s = _scores(qa, qb, qc, ka, kb, kc, ROPE, PASS_PAD, DOT_PREC) * scale_log2
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot_nt(do, v, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dqa, dqb, dqc = _acc_parts(ds, ka, kb, kc, dqa, dqb, dqc, ROPE, PASS_PAD, DOT_PREC)

    _store_grad(
        DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m.to(tl.int64) * stride_dqs, m_valid, stride_dqd, dqa, dqb, dqc, scale,
        q_pos, QTabA, QTabB, attn_factor, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
    )  # fmt: skip


@triton.jit
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
):
    """dk, dv for one key tile of one KV head, summed over its GROUP query heads in registers.

    Works transposed (keys as rows): sT = k q^T, so the per-query lse/delta broadcast along columns.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
        K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n.to(tl.int64) * stride_ks, n_valid, stride_kd, k_pos, KTabA, KTabB,
        attn_factor, K.dtype.element_ty, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
    )  # fmt: skip
    v = tl.load(
        V
        + b.to(tl.int64) * stride_vb
        + hk.to(tl.int64) * stride_vh
        + offs_n.to(tl.int64)[:, None] * stride_vs
        + offs_d[None, :] * stride_vd,
        mask=n_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    scale_log2 = scale * 1.4426950408889634

    k_idx = k_start + k_stride * offs_n
    k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
    m_lo = 0
    m_hi = Sq
    if CAUSAL:
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
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < m_hi
            q_pos = tl.zeros([BLOCK_M], dtype=tl.int32)
            if ROPE:
                q_pos = tl.load(QPos + b.to(tl.int64) * stride_pos_qb + offs_m, mask=m_valid, other=0)
            qa, qb, qc = _load_qk(
                q_base + offs_m.to(tl.int64) * stride_qs, m_valid, stride_qd, q_pos, QTabA, QTabB, attn_factor,
                Q.dtype.element_ty, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
            )  # fmt: skip
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
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            # visibility with keys as rows, built directly in [N, M] (no transpose of a mask).
            vis_t = n_valid[:, None] & m_valid[None, :]
            if CAUSAL:
                vis_t = vis_t & ((q_start + q_stride * offs_m)[None, :] >= k_idx[:, None])
            if HAS_DOCS:
                q_doc = tl.load(QDoc + offs_m, mask=m_valid, other=-1)
                vis_t = vis_t & (k_doc[:, None] == q_doc[None, :]) & (q_doc[None, :] >= 0)
            s_t = _scores(ka, kb, kc, qa, qb, qc, ROPE, PASS_PAD, DOT_PREC) * scale_log2
            p_t = tl.where(vis_t, tl.exp2(s_t - lse2[None, :]), 0.0)
            dv = tl.dot(p_t.to(DOut.dtype.element_ty), do, dv, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
            dka, dkb, dkc = _acc_parts(ds_t, qa, qb, qc, dka, dkb, dkc, ROPE, PASS_PAD, DOT_PREC)

    _store_grad(
        DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n.to(tl.int64) * stride_dks, n_valid, stride_dkd, dka, dkb, dkc, scale,
        k_pos, KTabA, KTabB, attn_factor, HEAD_DIM, ROPE, EXACT, ROT_DIM, INTERLEAVED, HALF_PAD, PASS_PAD,
    )  # fmt: skip
    tl.store(
        DV
        + b.to(tl.int64) * stride_dvb
        + hk.to(tl.int64) * stride_dvh
        + offs_n.to(tl.int64)[:, None] * stride_dvs
        + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=n_valid[:, None] & d_mask[None, :],
    )
