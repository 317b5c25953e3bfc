"""The ring attention scheduler: K/V shards travel around the ring while each rank computes.

Every rank holds its shard of Q, K and V (a layout of the global sequence: contiguous, zigzag or
stripe). At step s rank r holds the K/V shard of rank (r - s) mod W, so after W steps (W - 1 hops)
every query has met every key. Math goes only through the block contract (``block_forward``,
``block_backward``) and the guarded ``merge_partials``; which backend runs a block is not known here.

Shards as runs. A rank's shard is one run of tokens (contiguous, stripe) or two (zigzag), each an
arithmetic progression of global indices, i.e. a ``Span``. Each (query run, key run) pair is one
block with an exact ``BlockMask``; a block that is provably fully masked (causal order or disjoint
documents) is skipped in forward and backward alike.

Any length. When the global length S does not divide into the layout's chunks, runs differ by one
token and some may be empty. K/V travel in a fixed-size buffer of ``pieces x capacity`` rows (the
padding rows are zero and never computed on: each block slices out exactly its real rows), so the
wire carries equal-size messages and the math never sees a padding token.

Per step (the same order on every rank; see ``comm`` for the message order):

    forward:  post kv(s+1) | compute blocks of step s, merge in fp32 | wait kv(s+1)
    backward: post kv(s+1) | compute block grads of step s | wait dkv(s) and add | post dkv(s+1)
              | wait kv(s+1);  after the last step, wait dkv(W): each rank's dk/dv is home.

dk/dv accumulators travel one hop behind K/V, W hops in all, in the input dtype by default
(``dkv_dtype=torch.float32`` keeps them unrounded at 2x the bytes for bf16). dq is accumulated
locally in fp32. The sums run in the ring's fixed order, so they are reproducible run to run.

Two levels. A ``TwoLevelComm`` (outer ring of O nodes, inner ring of I ranks per node; position
o * I + i holds shard o * I + i of the N = I * O shards) is walked by the same loop, nested: at outer
step t rank (o, i) holds share i of node (o - t)'s K/V (the super-block), posts the outer exchange of
the next super-block share, and runs the whole inner ring over the current super-block before waiting
for it. In backward the inner ring brings each share's dk/dv (this node's queries) back to the rank
that holds the share, and that sum is what the outer accumulator, one outer hop behind, adds on its
way home. Shards, masks and pieces are those of the flat ring of N ranks.
"""

from __future__ import annotations

import bisect
import math
import struct
from dataclasses import dataclass

import torch

from ..block import DTYPES, BlockMask, Span, block_backward, block_forward, check_inputs
from ..layouts import LAYOUTS, chunk_count, shard_lengths, shard_pieces
from ..merge import merge_partials
from ..rope import RoPEConfig
from .comm import RingComm, TwoLevelComm, _timeout_seconds, nvtx_range, ring_comm

__all__ = ["ring_attn_func"]

# Fields every rank must agree on (checked in one all_gather before any K/V moves).
_META = ("B", "S_local", "Hq", "Hkv", "D", "dtype", "causal", "layout", "rope", "positions", "cu_seqlens",
         "softmax_scale", "dkv_dtype", "inner_size", "position", "outer_key", "inner_key")  # fmt: skip
_PER_RANK = ("S_local", "position", "outer_key", "inner_key")


@dataclass(frozen=True)
class _Piece:
    """A run of a rank's shard: its global indices, length and where it sits locally and on the wire."""

    span: Span
    length: int
    local: slice  # rows of the rank's own (unpadded) shard
    wire: slice  # rows of the fixed-size K/V buffer


@dataclass
class _Plan:
    comm: RingComm | TwoLevelComm
    causal: bool
    scale: float | None
    rope: RoPEConfig | None
    backend: str
    cu_seqlens: torch.Tensor | None
    cu_list: list[int] | None
    pieces: list[list[_Piece]]  # per rank
    rows: int  # rows of a K/V wire buffer
    positions: torch.Tensor | None  # (W, [B,] rows) every rank's positions laid out like the wire
    timeout: float | None

    def mask(self, qp: _Piece, kp: _Piece) -> BlockMask | None:
        """The block's mask, or None when no (query, key) pair of it can attend."""
        mask = BlockMask(self.causal, qp.span, kp.span, self.cu_seqlens)
        if mask.is_empty(qp.length, kp.length):
            return None
        if self.cu_list is not None:
            # Document ids grow with the index, so runs whose id ranges do not overlap share none.
            q_first, q_last = self._doc(qp.span.start), self._doc(qp.span.last(qp.length))
            k_first, k_last = self._doc(kp.span.start), self._doc(kp.span.last(kp.length))
            if q_last < k_first or k_last < q_first:
                return None
        return mask

    def _doc(self, index: int) -> int:
        return bisect.bisect_right(self.cu_list, index) - 1

    def block_positions(self, rank: int, piece: _Piece) -> torch.Tensor | None:
        return None if self.positions is None else self.positions[rank][..., piece.wire]

    @property
    def levels(self) -> tuple[RingComm, ...]:
        return self.comm.levels

    def coords(self) -> tuple[int, ...]:
        """This rank's position in each level's ring, outermost first."""
        return tuple(c.rank for c in self.levels)

    def flat(self, coords: tuple[int, ...]) -> int:
        """The shard index of the rank at ``coords``: positions read as mixed-radix digits."""
        index = 0
        for c, level in zip(coords, self.levels, strict=True):
            index = index * level.world_size + c
        return index


def _pieces(seq_len: int, world_size: int, layout: str) -> tuple[list[list[_Piece]], int]:
    capacity = -(-seq_len // chunk_count(world_size, layout))
    plan = []
    for runs in shard_pieces(seq_len, world_size, layout):
        pieces, local = [], 0
        for i, (start, stride, length) in enumerate(runs):
            pieces.append(
                _Piece(
                    Span(start, stride),
                    length,
                    slice(local, local + length),
                    slice(i * capacity, i * capacity + length),
                )
            )
            local += length
        plan.append(pieces)
    return plan, capacity * len(plan[0])


def _check_local(q, k, v, causal, layout, rope, positions, cu_seqlens, softmax_scale, backend, dkv_dtype,
                 deterministic, return_lse):  # fmt: skip
    """Every check that needs no other rank: raised before any communication."""
    check_inputs(q, k, v, rope)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in S_local (self-attention shards)"
        )
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if softmax_scale is not None and (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, (int, float))
        or not math.isfinite(softmax_scale)
        or softmax_scale <= 0
    ):
        raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")
    if dkv_dtype is not None and dkv_dtype not in (k.dtype, torch.float32, torch.float64):
        raise TypeError(f"dkv_dtype must be None, k's dtype, float32 or float64, got {dkv_dtype}")
    B, S_local = q.shape[:2]
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
            raise TypeError("positions must be an int32/int64 tensor of this rank's shard (or None)")
        if positions.shape not in ((S_local,), (B, S_local)):
            raise ValueError(
                f"positions must be ({S_local},) or ({B}, {S_local}) (this rank's shard), "
                f"got {tuple(positions.shape)}"
            )
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError("cu_seqlens must be an int32/int64 tensor over the global sequence (or None)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")


def _float_bits(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _dtype_code(dtype) -> int:
    return -1 if dtype is None else DTYPES.index(dtype)


def _handshake(comm, meta: list[int], timeout: float | None) -> list[list[int]]:
    """Every rank's metadata; raises the same error on every rank when they disagree."""
    table = comm.all_gather(torch.tensor(meta, dtype=torch.int64), timeout).tolist()
    for j, row in enumerate(table):
        for name, mine, theirs in zip(_META, table[0], row, strict=True):
            if name not in _PER_RANK and mine != theirs:
                raise ValueError(
                    f"ranks disagree on {name}: rank 0 has {mine}, rank {j} has {theirs} "
                    "(every rank must call ring_attn_func with matching shapes and options)"
                )
    # Row j must come from the rank at position j, and the members of one ring must agree on its order
    # (the inner ring is a node: rows j // inner alike; the outer ring an inner position: rows
    # j % inner alike; a flat ring has inner == W), or K/V would reach ranks that do not expect them.
    claimed = [row[_META.index("position")] for row in table]
    inner = table[0][_META.index("inner_size")]
    inner_col, outer_col = _META.index("inner_key"), _META.index("outer_key")
    agree = all(
        row[inner_col] == table[j - j % inner][inner_col] and row[outer_col] == table[j % inner][outer_col]
        for j, row in enumerate(table)
    )
    if claimed != list(range(len(table))) or not agree:
        raise ValueError(
            f"ranks disagree on the ring order: the ranks gathered in ring order claim positions {claimed}"
            f"{'' if agree else ' and members of one ring were given different orders'} (give every rank "
            "of a ring the same order; inner and outer rings must form a grid)"
        )
    return table


def _wire_layout(x: torch.Tensor, pieces: list[_Piece], rows: int, dim: int) -> torch.Tensor:
    """``x`` with its runs placed at their wire rows along ``dim`` (zeros in between)."""
    shape = list(x.shape)
    shape[dim] = rows
    out = x.new_zeros(shape)
    for p in pieces:
        out.narrow(dim, p.wire.start, p.length).copy_(x.narrow(dim, p.local.start, p.length))
    return out


def _plan(q, k, v, comm, causal, layout, rope, positions, cu_seqlens, softmax_scale, backend, dkv_dtype,
          timeout) -> _Plan:  # fmt: skip
    B, S_local, Hq, D = q.shape
    W, rank = comm.world_size, comm.rank
    cu_list = None if cu_seqlens is None else cu_seqlens.tolist()
    if cu_list is not None:
        # cu_seqlens claims the global length: a shard that cannot belong to it fails before any wire.
        expected = shard_lengths(cu_list[-1], W, layout)[rank]
        if expected != S_local:
            raise ValueError(
                f"cu_seqlens ends at {cu_list[-1]}, so rank {rank} of {W} ({layout}) should hold {expected} "
                f"tokens, but q has S_local={S_local}: cu_seqlens must end at the global sequence length"
            )
    pos_mode = 0 if positions is None else positions.dim()
    cu_code = -1 if cu_list is None else hash(tuple(cu_list)) & (2**62 - 1)
    meta = [B, S_local, Hq, k.shape[2], D, _dtype_code(q.dtype), int(causal), LAYOUTS.index(layout),
            int(rope is not None), pos_mode, cu_code, _float_bits(softmax_scale), _dtype_code(dkv_dtype),
            comm.levels[-1].world_size, rank, comm.levels[0].ring_key, comm.levels[-1].ring_key]  # fmt: skip
    table = _handshake(comm, meta, timeout) if W > 1 else [meta]
    lengths = [row[1] for row in table]
    seq_len = sum(lengths)
    expected = shard_lengths(seq_len, W, layout)
    if lengths != expected:
        raise ValueError(
            f"shard lengths {lengths} are not a {layout} split of a global length {seq_len} over {W} ranks "
            f"(expected {expected}); shard the sequence with ringattn.shard"
        )
    if cu_list is not None and cu_list[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at the global sequence length {seq_len}, got {cu_list[-1]}")
    pieces, rows = _pieces(seq_len, W, layout)
    gathered = None
    if positions is not None:
        wire = _wire_layout(
            positions.to(device=q.device, dtype=torch.int64), pieces[rank], rows, positions.dim() - 1
        )
        gathered = comm.all_gather(wire, timeout).to(q.device) if W > 1 else wire.unsqueeze(0)
    return _Plan(
        comm=comm,
        causal=causal,
        scale=softmax_scale,
        rope=rope,
        backend=backend,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(q.device),
        cu_list=cu_list,
        pieces=pieces,
        rows=rows,
        positions=gathered,
        timeout=timeout,
    )


def _pack_kv(plan: _Plan, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(2, B, rows, Hkv, D): this rank's K and V as one wire message."""
    mine = plan.pieces[plan.comm.rank]
    return torch.stack((_wire_layout(k, mine, plan.rows, 1), _wire_layout(v, mine, plan.rows, 1)))


def _shifted(coords: tuple[int, ...], level: int, position: int) -> tuple[int, ...]:
    return (*coords[:level], position, *coords[level + 1 :])


def _receive_buffers(kv: torch.Tensor, level: int, ring: bool) -> tuple[torch.Tensor, ...]:
    """Buffers K/V hops of a level receive into, alternately. At the outermost level ``kv`` is this
    rank's own packed copy and serves as one of them; an inner level's ``kv`` is an outer buffer that
    is still on the outer wire, so it is never written."""
    if not ring:
        return ()
    return (torch.empty_like(kv), kv) if level == 0 else (torch.empty_like(kv), torch.empty_like(kv))


def _walk_forward(plan: _Plan, level: int, kv: torch.Tensor, owner: tuple[int, ...], compute) -> None:
    """Bring every K/V shard of this level's ring past this rank, starting from ``kv`` (the shard of the
    rank at ``owner``), and ``compute(src, buffer)`` on each at the innermost level."""
    comm = plan.levels[level]
    W = comm.world_size
    ring = W > 1 and plan.rows > 0  # an empty sequence has nothing to send
    bufs, cur = _receive_buffers(kv, level, ring), kv
    for step in range(W):
        pending = recv = None
        if ring and step < W - 1:
            recv = bufs[step % 2]
            pending = comm.exchange([cur], [recv], hop=step + 1, label="forward kv", timeout=plan.timeout)
        src = _shifted(owner, level, (owner[level] - step) % W)
        if level + 1 < len(plan.levels):
            _walk_forward(plan, level + 1, cur, src, compute)
        else:
            compute(plan.flat(src), cur)
        if pending is not None:
            pending.wait()
            cur = recv


def _walk_backward(plan, level, kv, owner, compute, acc, dkv_dtype) -> torch.Tensor:
    """Like ``_walk_forward``, with ``compute(src, buffer, local)`` adding that shard's dk/dv into
    ``local``; returns the dk/dv of ``kv`` summed over this level's ring, back at this rank."""
    comm = plan.levels[level]
    W = comm.world_size
    ring = W > 1 and plan.rows > 0
    innermost = level + 1 == len(plan.levels)
    kv_bufs, cur = _receive_buffers(kv, level, ring), kv
    dkv_bufs = tuple(
        torch.zeros(kv.shape, dtype=dkv_dtype, device=kv.device) for _ in range(2 if ring else 1)
    )
    local = torch.zeros(kv.shape, dtype=acc, device=kv.device) if innermost else None
    pending_dkv = None
    for step in range(W):
        pending_kv = recv = None
        if ring and step < W - 1:
            recv = kv_bufs[step % 2]
            pending_kv = comm.exchange([cur], [recv], hop=step + 1, label="backward kv", timeout=plan.timeout)
        src = _shifted(owner, level, (owner[level] - step) % W)
        if innermost:
            local.zero_()
            compute(plan.flat(src), cur, local)
        else:  # this node's contribution to the super-block share, already home within the node
            local = _walk_backward(plan, level + 1, cur, src, compute, acc, dkv_dtype)
        # The accumulator for shard src arrived from prev (it left there one step ago); add ours.
        travelling = dkv_bufs[step % len(dkv_bufs)]
        if pending_dkv is None:
            travelling.copy_(local)
        else:
            pending_dkv.wait()
            travelling.copy_(travelling.to(acc) + local)
        if ring:
            pending_dkv = comm.exchange([travelling], [dkv_bufs[(step + 1) % 2]], hop=step + 1,
                                        label="backward dkv", timeout=plan.timeout)  # fmt: skip
        if pending_kv is not None:
            pending_kv.wait()
            cur = recv
    if pending_dkv is not None:
        pending_dkv.wait()
    return dkv_bufs[W % len(dkv_bufs)]  # after W hops the travelling buffer is this rank's own


def _ring_forward(plan: _Plan, q: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rank = plan.comm.rank
    acc = torch.promote_types(q.dtype, torch.float32)
    B, S_local, Hq, D = q.shape
    out = torch.zeros(B, S_local, Hq, D, dtype=acc, device=q.device)
    lse = torch.full((B, Hq, S_local), -math.inf, dtype=torch.float32, device=q.device)
    mine = plan.pieces[rank]

    def compute(src: int, cur: torch.Tensor) -> None:
        with nvtx_range(f"ring forward compute (kv of rank {src})"):
            for qp in mine:
                for kp in plan.pieces[src]:
                    mask = plan.mask(qp, kp)
                    if mask is None:
                        continue
                    o, l = block_forward(
                        q[:, qp.local],
                        cur[0][:, kp.wire],
                        cur[1][:, kp.wire],
                        mask,
                        softmax_scale=plan.scale,
                        rope=plan.rope,
                        q_positions=plan.block_positions(rank, qp),
                        k_positions=plan.block_positions(src, kp),
                        out_dtype=acc,
                        backend=plan.backend,
                    )
                    o_acc, l_acc = merge_partials(out[:, qp.local], lse[:, :, qp.local], o, l.to(lse.dtype))
                    out[:, qp.local], lse[:, :, qp.local] = o_acc, l_acc

    _walk_forward(plan, 0, kv, plan.coords(), compute)
    return out, lse


def _ring_backward(plan, dout, q, kv, out, lse, dkv_dtype):
    rank = plan.comm.rank
    acc = torch.promote_types(q.dtype, torch.float32)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, S_local)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    mine = plan.pieces[rank]

    def compute(src: int, cur: torch.Tensor, local: torch.Tensor) -> None:
        with nvtx_range(f"ring backward compute (kv of rank {src})"):
            for qp in mine:
                for kp in plan.pieces[src]:
                    mask = plan.mask(qp, kp)
                    if mask is None:
                        continue
                    dq_b, dk_b, dv_b = block_backward(
                        dout[:, qp.local],
                        q[:, qp.local],
                        cur[0][:, kp.wire],
                        cur[1][:, kp.wire],
                        None,
                        lse[:, :, qp.local],
                        mask,
                        delta=delta[:, :, qp.local],
                        softmax_scale=plan.scale,
                        rope=plan.rope,
                        q_positions=plan.block_positions(rank, qp),
                        k_positions=plan.block_positions(src, kp),
                        grad_dtype=acc,
                        backend=plan.backend,
                    )
                    dq[:, qp.local] += dq_b
                    local[0][:, kp.wire] += dk_b
                    local[1][:, kp.wire] += dv_b

    dkv = _walk_backward(plan, 0, kv, plan.coords(), compute, acc, dkv_dtype)
    return dq, dkv


def _unpack(buf: torch.Tensor, pieces: list[_Piece], length: int, dtype) -> torch.Tensor:
    B, _, H, D = buf.shape
    out = torch.empty(B, length, H, D, dtype=dtype, device=buf.device)
    for p in pieces:
        out[:, p.local] = buf[:, p.wire]
    return out


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, dkv_dtype):
        kv = _pack_kv(plan, k, v)
        out, lse = _ring_forward(plan, q, kv)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.dkv_dtype = plan, dkv_dtype
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        kv = _pack_kv(plan, k, v)  # the forward's buffers were reused by the wire
        dq, dkv = _ring_backward(plan, dout.contiguous(), q, kv, out, lse, ctx.dkv_dtype)
        mine, S_local = plan.pieces[plan.comm.rank], q.shape[1]
        dk = _unpack(dkv[0], mine, S_local, k.dtype)
        dv = _unpack(dkv[1], mine, S_local, v.dtype)
        return dq.to(q.dtype), dk, dv, None, None


def ring_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = True,
    layout: str = "zigzag",
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    dkv_dtype: torch.dtype | None = None,
    timeout: float | None = None,
):
    """Ring attention over the ranks of ``group`` on this rank's shard of the sequence.

    Args:
        q: (B, S_local, Hq, D); k, v: (B, S_local, Hkv, D), Hq % Hkv == 0 (only KV heads travel).
            The shard is ``ringattn.shard(x, 1, group, layout)`` of the global sequence; any global
            length works (shards then differ by a token; a rank may hold none).
        group: the ring. A flat ring: a ProcessGroup, a 1-D DeviceMesh, a ``RingComm`` (e.g. the
            in-process fake, or ``ring_comm(pg, order=...)`` for a topology-chosen order), or None for
            the default group. A two-level ring of N = I * O ranks: a pair ``(inner, outer)`` of such
            groups (inner: the I ranks of this node; outer: the O ranks at this inner position on
            every node), a 2-D DeviceMesh of shape (O, I), or a ``TwoLevelComm``; the rank at inner
            position i of node o holds shard o * I + i of the N shards (``ringattn.shard`` with the
            same ``group`` gives it). Either way a rank's shard index is its position in the ring.
        causal: mask by global token index (query index >= key index).
        layout: "zigzag", "stripe" or "contiguous": how the shards were cut.
        rope: rotate Q and K inside the blocks (fused); positions default to the global index, or the
            index within the document when ``cu_seqlens`` is given.
        positions: this rank's shard of the RoPE positions, (S_local,) or (B, S_local), int
            (``ringattn.shard(positions, -1, group, layout)``); unused without ``rope``.
        cu_seqlens: document boundaries over the *global* sequence (same tensor on every rank);
            starts at 0, non-decreasing, ends at the global length.
        softmax_scale: default 1 / sqrt(D).
        deterministic: the ring's own sums always run in a fixed order; results are then as
            reproducible as the block backend (the flag is accepted for API compatibility).
        return_lse: also return lse (B, Hq, S_local), fp32, natural log (-inf for rows seeing no key).
        backend: block backend name, or "auto".
        dkv_dtype: dtype of the dk/dv accumulators on the wire in backward (default: k's dtype;
            torch.float32 avoids one rounding per hop at twice the bf16 bytes).
        timeout: seconds (or timedelta) for each wait on the wire; default the group's timeout.

    Returns:
        out (B, S_local, Hq, D) in q's dtype, and lse when ``return_lse``.
    """
    _check_local(q, k, v, causal, layout, rope, positions, cu_seqlens, softmax_scale, backend, dkv_dtype,
                 deterministic, return_lse)  # fmt: skip
    timeout = _timeout_seconds(timeout)
    dkv_dtype = k.dtype if dkv_dtype is None else dkv_dtype
    positions = positions if rope is not None else None  # positions only feed RoPE: nothing to gather
    comm = ring_comm(group)
    plan = _plan(q, k, v, comm, causal, layout, rope, positions, cu_seqlens, softmax_scale, backend,
                 dkv_dtype, timeout)  # fmt: skip
    out, lse = _RingAttention.apply(q, k, v, plan, dkv_dtype)
    return (out, lse) if return_lse else out
