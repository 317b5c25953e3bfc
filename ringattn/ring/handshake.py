"""What the ranks of a ring agree on before any K/V moves, and where each token sits on the wire.

``ring_attn_func`` checks its inputs locally (``_check_local``), then ``_plan`` runs the handshake and
returns the per-call ``_Plan`` the scheduler walks: every rank's pieces, the wire buffer size, the
masks, and (with explicit RoPE positions) every rank's positions.

Agreement. Each rank describes its call as a dict of ints keyed by field name (shapes, dtypes, options,
its ring position and its rings' keys); one ``all_gather`` exchanges them, in the dict's key order, and
every field but the per-rank ones (``_PER_RANK``) must be equal on every rank. Any disagreement raises
the same error on every rank before K/V move, so no rank waits on a message another will never post.

Shards as runs. A rank's shard is one run of tokens (contiguous, stripe) or two (zigzag), each an
arithmetic progression of global indices, i.e. a ``Span``. Each (query run, key run) pair is one
block with an exact ``BlockMask``; a block that is provably fully masked (causal order or disjoint
documents) has no mask, and the scheduler skips it in forward and backward alike.

Any length. When the global length S does not divide into the layout's chunks, runs differ by one
token and some may be empty. K/V travel in a fixed-size buffer of ``pieces x capacity`` rows (the
padding rows are zero and never computed on: each block slices out exactly its real rows), so the
wire carries equal-size messages and the math never sees a padding token.

Two levels. Shards, masks and pieces are those of the flat ring of N = I * O ranks; ``_Plan.flat``
turns a rank's (outer, inner) ring positions into its shard index.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, replace

import torch

from ..block import DTYPES, BlockMask, Span, check_inputs, check_softmax_scale
from ..layouts import LAYOUTS, chunk_count, shard_lengths, shard_pieces
from ..rope import RoPEConfig
from .comm import RingComm, TwoLevelComm, _timeout_seconds

# Metadata fields that differ between ranks; every other field must be equal on every rank.
_PER_RANK = ("S_local", "position", "outer_key", "inner_key")


@dataclass(frozen=True)
class _Options:
    """``ring_attn_func``'s keyword options (as given until ``_check_local`` resolves them)."""

    causal: bool
    layout: str
    rope: RoPEConfig | None
    positions: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    softmax_scale: float | None
    deterministic: bool
    return_lse: bool
    backend: str
    dkv_dtype: torch.dtype | None
    timeout: float | None  # seconds once resolved; a timedelta is accepted as given


@dataclass(frozen=True)
class _Piece:
    """A run of a rank's shard: its global indices, length and where it sits locally and on the wire."""

    span: Span
    length: int
    local: slice  # rows of the rank's own (unpadded) shard
    wire: slice  # rows of the fixed-size K/V buffer


@dataclass
class _Plan:
    """One call's plan: the agreed options, every rank's pieces, the wire size, the gathered positions."""

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


def _check_local(q, k, v, options: _Options) -> _Options:
    """Every check that needs no other rank, raised before any communication. Returns the options
    resolved: timeout in seconds, dkv_dtype defaulted to k's dtype, positions dropped without RoPE."""
    check_inputs(q, k, v, options.rope)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in S_local (self-attention shards)"
        )
    for name in ("causal", "deterministic", "return_lse"):
        flag = getattr(options, name)
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if options.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {options.layout!r}")
    if not isinstance(options.backend, str):
        raise TypeError(f"backend must be a str, got {type(options.backend).__name__}")
    check_softmax_scale(options.softmax_scale)
    dkv_dtype = options.dkv_dtype
    if dkv_dtype is not None and dkv_dtype not in (k.dtype, torch.float32, torch.float64):
        raise TypeError(f"dkv_dtype must be None, k's dtype, float32 or float64, got {dkv_dtype}")
    B, S_local = q.shape[:2]
    positions = options.positions
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
            raise TypeError("positions must be an int32/int64 tensor of this rank's shard (or None)")
        if positions.shape not in ((S_local,), (B, S_local)):
            raise ValueError(
                f"positions must be ({S_local},) or ({B}, {S_local}) (this rank's shard), "
                f"got {tuple(positions.shape)}"
            )
    cu_seqlens = options.cu_seqlens
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError("cu_seqlens must be an int32/int64 tensor over the global sequence (or None)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
    return replace(
        options,
        timeout=_timeout_seconds(options.timeout),
        dkv_dtype=k.dtype if dkv_dtype is None else dkv_dtype,
        positions=positions if options.rope is not None else None,  # positions only feed RoPE
    )


def _float_bits(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _dtype_code(dtype) -> int:
    return -1 if dtype is None else DTYPES.index(dtype)


def _metadata(q, k, comm, options: _Options, cu_list: list[int] | None) -> dict[str, int]:
    """This rank's description of the call, as ints keyed by field name."""
    B, S_local, Hq, D = q.shape
    return {
        "B": B,
        "S_local": S_local,
        "Hq": Hq,
        "Hkv": k.shape[2],
        "D": D,
        "dtype": _dtype_code(q.dtype),
        "causal": int(options.causal),
        "layout": LAYOUTS.index(options.layout),
        "rope": int(options.rope is not None),
        "positions": 0 if options.positions is None else options.positions.dim(),
        "cu_seqlens": -1 if cu_list is None else hash(tuple(cu_list)) & (2**62 - 1),
        "softmax_scale": _float_bits(options.softmax_scale),
        "dkv_dtype": _dtype_code(options.dkv_dtype),
        "inner_size": comm.levels[-1].world_size,
        "position": comm.rank,
        "outer_key": comm.levels[0].ring_key,
        "inner_key": comm.levels[-1].ring_key,
    }


def _handshake(comm, meta: dict[str, int], timeout: float | None) -> list[dict[str, int]]:
    """Every rank's metadata, in ring order; raises the same error on every rank when they disagree."""
    names = list(meta)  # the wire order: every rank builds ``meta`` with the same code
    rows = comm.all_gather(torch.tensor([meta[name] for name in names], dtype=torch.int64), timeout)
    table = [dict(zip(names, row, strict=True)) for row in rows.tolist()]
    for j, row in enumerate(table):
        for name in names:
            if name not in _PER_RANK and row[name] != table[0][name]:
                raise ValueError(
                    f"ranks disagree on {name}: rank 0 has {table[0][name]}, rank {j} has {row[name]} "
                    "(every rank must call ring_attn_func with matching shapes and options)"
                )
    # Row j must come from the rank at position j, and the members of one ring must agree on its order
    # (the inner ring is a node: rows j // inner alike; the outer ring an inner position: rows
    # j % inner alike; a flat ring has inner == W), or K/V would reach ranks that do not expect them.
    claimed = [row["position"] for row in table]
    inner = table[0]["inner_size"]
    agree = all(
        row["inner_key"] == table[j - j % inner]["inner_key"]
        and row["outer_key"] == table[j % inner]["outer_key"]
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


def _plan(q, k, comm, options: _Options) -> _Plan:
    """The handshake and this call's plan; ``options`` as resolved by ``_check_local``."""
    S_local = q.shape[1]
    W, rank, layout, timeout = comm.world_size, comm.rank, options.layout, options.timeout
    cu_seqlens = options.cu_seqlens
    cu_list = None if cu_seqlens is None else cu_seqlens.tolist()
    if cu_list is not None:
        # cu_seqlens claims the global length: a shard that cannot belong to it fails before any wire.
        expected = shard_lengths(cu_list[-1], W, layout)[rank]
        if expected != S_local:
            raise ValueError(
                f"cu_seqlens ends at {cu_list[-1]}, so rank {rank} of {W} ({layout}) should hold {expected} "
                f"tokens, but q has S_local={S_local}: cu_seqlens must end at the global sequence length"
            )
    meta = _metadata(q, k, comm, options, cu_list)
    table = _handshake(comm, meta, timeout) if W > 1 else [meta]
    lengths = [row["S_local"] for row in table]
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
    positions = options.positions
    if positions is not None:
        wire = _wire_layout(
            positions.to(device=q.device, dtype=torch.int64), pieces[rank], rows, positions.dim() - 1
        )
        gathered = comm.all_gather(wire, timeout).to(q.device) if W > 1 else wire.unsqueeze(0)
    return _Plan(
        comm=comm,
        causal=options.causal,
        scale=options.softmax_scale,
        rope=options.rope,
        backend=options.backend,
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


def _unpack(buf: torch.Tensor, pieces: list[_Piece], length: int, dtype) -> torch.Tensor:
    """The inverse of the wire layout along dim 1: a rank's own (unpadded) rows of ``buf``."""
    B, _, H, D = buf.shape
    out = torch.empty(B, length, H, D, dtype=dtype, device=buf.device)
    for p in pieces:
        out[:, p.local] = buf[:, p.wire]
    return out
