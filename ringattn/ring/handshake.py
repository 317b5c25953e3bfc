"""What the ranks of a ring agree on before any K/V moves, and where each token sits on the wire.

``ring_attn_func`` checks its inputs locally (``_check_local``), then ``_plan`` runs the handshake and
returns the per-call ``_Plan`` the scheduler walks: every rank's pieces, the wire buffer size, the
masks, and (with explicit RoPE positions) every rank's positions.

Agreement. Each rank describes its call in the user's terms (``_agreement``: shapes, dtypes, documents
and every option that changes the numbers, RoPE field by field) and sends a digest of it, with its shard
length, ring position and rings' keys, in one ``all_gather`` of ints. When the digests differ, a second
``all_gather`` carries the descriptions themselves, so the error names the option, the rank and both
values. Any disagreement raises the same error on every rank before K/V move, so no rank waits on a
message another will never post.

Agree once. A communicator keeps its latest agreement: the key is this rank's description of the call
(the agreement's JSON, which holds every shape, dtype and option that the handshake compares,
``cu_seqlens`` by value, and the ints it gathers) and the value is the gathered table. A call whose key
equals the stored one reuses the table: no collective and no host sync for the agreement (steady state:
every layer of a model calls with the same shapes and options). Only the latest key is kept, and every
agreement is collective, so when every rank hits, every rank calls as in the same agreed call; a rank
whose call changed misses and runs the handshake, so its ranks re-agree together when all of them
changed (e.g. a new sequence length), and when only some did, the misses meet the others' K/V messages
and the ring fails (a timeout, or a schedule error) instead of mixing calls. ``RINGATTN_RING_DEBUG=1``
agrees on every call, so such a rank gets the disagreement's readable error instead. Explicit RoPE
positions are data, not agreement: they are gathered on every call that passes them (one collective).

Dynamic NTK. Its frequencies depend on the whole sequence's length (max position + 1), which no block
sees: ``_sequence_rope`` pins it once per call from every rank's positions (the same on every rank).

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
import hashlib
import json
from dataclasses import dataclass, replace

import torch

from ..block import (
    BlockMask,
    Span,
    block_args,
    check_devices,
    check_dropout_args,
    check_inputs,
    check_score_features,
    check_softmax_scale,
    select_backend,
)
from ..layouts import LAYOUTS, shard_lengths, shard_pieces
from ..rope import RoPEConfig
from .comm import RingComm, TwoLevelComm, _timeout_seconds, debug_enabled
from .wire import Fp8Wire


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
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    dropout_seed: int = 0
    cp_mode: str = "ring"  # "ring", "allgather" or "auto" (resolved per call by _plan)
    wire_dtype: torch.dtype | None = None  # None: K/V travel in k's dtype; torch.float8_e4m3fn: see wire


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
    kv_shape: tuple[int, ...]  # (2, B, rows, Hkv, D): packed K/V (and dK/dV), decoded
    positions: torch.Tensor | None  # (W, [B,] rows) every rank's positions laid out like the wire
    timeout: float | None
    scores: dict  # the blocks' score options: window_size, softcap, alibi_slopes, dropout_p/_seed
    cp_mode: str  # "ring" or "allgather"
    wire: Fp8Wire | None  # K/V encoding on the wire (None: as packed)
    steps: int = 0  # ring steps that carry work: W, or fewer when a window leaves far shards unseen

    def mask(self, qp: _Piece, kp: _Piece) -> BlockMask | None:
        """The block's mask, or None when no (query, key) pair of it can attend."""
        mask = BlockMask(self.causal, qp.span, kp.span, self.cu_seqlens)
        if mask.is_empty(qp.length, kp.length):
            return None
        left, right = self.scores["window_size"]
        q_first, q_last = qp.span.start, qp.span.last(qp.length)
        k_first, k_last = kp.span.start, kp.span.last(kp.length)
        if (left >= 0 and k_last < q_first - left) or (right >= 0 and k_first > q_last + right):
            return None  # every key lies outside every query's window
        if self.cu_list is not None:
            # Document ids grow with the index, so runs whose id ranges do not overlap share none.
            q_first, q_last = self._doc(qp.span.start), self._doc(qp.span.last(qp.length))
            k_first, k_last = self._doc(kp.span.start), self._doc(kp.span.last(kp.length))
            if q_last < k_first or k_last < q_first:
                return None
        return mask

    def last_step(self) -> int:
        """The last ring step at which some rank's queries see some of the K/V it holds (flat rings;
        W - 1 without a window): later steps neither move K/V nor compute."""
        W = self.comm.world_size
        if self.scores["window_size"] == (-1, -1) or len(self.levels) > 1:
            return W - 1
        for step in range(W - 1, 0, -1):
            for rank in range(W):
                src = (rank - step) % W
                if any(self.mask(qp, kp) for qp in self.pieces[rank] for kp in self.pieces[src]):
                    return step
        return 0

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


def _pieces(seq_len: int, world_size: int, layout: str, cu_list=None) -> tuple[list[list[_Piece]], int]:
    """Every rank's pieces and the wire buffer's rows: the j-th piece of every rank travels in the same
    rows, as many as the longest j-th piece of any rank."""
    runs_per_rank = shard_pieces(seq_len, world_size, layout, cu_list)
    widths = [max(runs[j][2] for runs in runs_per_rank) for j in range(len(runs_per_rank[0]))]
    offsets = [sum(widths[:j]) for j in range(len(widths))]
    plan = []
    for runs in runs_per_rank:
        pieces, local = [], 0
        for (start, stride, length), offset in zip(runs, offsets, strict=True):
            pieces.append(
                _Piece(
                    Span(start, stride), length, slice(local, local + length), slice(offset, offset + length)
                )
            )
            local += length
        plan.append(pieces)
    return plan, sum(widths)


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
    check_score_features(q, options.window_size, options.softcap, options.alibi_slopes)
    check_dropout_args(options.dropout_p, options.dropout_seed)
    check_devices(q, alibi_slopes=options.alibi_slopes)
    if options.wire_dtype not in (None, k.dtype, torch.float8_e4m3fn):
        raise ValueError(
            f"wire_dtype must be None, k's dtype or torch.float8_e4m3fn, got {options.wire_dtype}"
        )
    if options.cp_mode not in CP_MODES:
        raise ValueError(f"cp_mode must be one of {CP_MODES}, got {options.cp_mode!r}")
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
        if cu_seqlens.device.type == "meta" or (
            cu_seqlens.device != q.device and cu_seqlens.device.type != "cpu"
        ):
            raise ValueError(
                f"cu_seqlens must be on q's device {q.device} or the CPU, got {cu_seqlens.device}"
            )
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


def _agreement(q, k, options: _Options, cu_list: list[int] | None) -> dict:
    """What every rank must agree on, in the user's terms: argument name -> value as given (resolved
    where the default depends on the rank: ``dkv_dtype``, and the backend that ``backend="auto"`` runs
    here). Every option that changes the numbers is here, RoPE field by field; JSON-ready."""
    B, _, Hq, D = q.shape
    backend = repr(options.backend)
    if options.backend == "auto":
        try:
            args = block_args(q, k, k, BlockMask(options.causal))  # k for v: same shape, dtype, device
            backend += f" (runs {select_backend('auto', q, k, k, args).name!r})"
        except Exception:  # no backend runs here: this rank's first block raises
            backend += " (runs none)"
    positions = options.positions
    described = {
        "B": str(B),
        "Hq": str(Hq),
        "Hkv": str(k.shape[2]),
        "D": str(D),
        "dtype": str(q.dtype),
        "causal": str(options.causal),
        "layout": repr(options.layout),
        "softmax_scale": repr(options.softmax_scale),
        "deterministic": str(options.deterministic),
        "backend": backend,
        "dkv_dtype": str(options.dkv_dtype),
        "cu_seqlens": cu_list,
        "positions": "None" if positions is None else ("(S_local,)", "(B, S_local)")[positions.dim() - 1],
        "rope": "None" if options.rope is None else "a RoPEConfig",
        "window_size": repr(tuple(options.window_size)),
        "softcap": repr(options.softcap),
        "alibi_slopes": None if options.alibi_slopes is None else options.alibi_slopes.tolist(),
        "dropout_p": repr(options.dropout_p),
        "dropout_seed": repr(options.dropout_seed),
        "cp_mode": repr(options.cp_mode),
        "wire_dtype": str(options.wire_dtype),
    }
    if options.rope is not None:
        for name, value in json.loads(options.rope.to_json()).items():
            described[f"rope.{name}"] = json.dumps(value) if isinstance(value, dict) else repr(value)
    return described


def _digest(text: str) -> int:
    """63 bits of a hash that is the same in every process (``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _metadata(q, k, comm, options: _Options, cu_list: list[int] | None) -> tuple[dict[str, int], str]:
    """This rank's description of the call: the ints the handshake gathers (its shard length, ring
    position, rings' keys and a digest of its agreement) and the agreement itself as JSON."""
    agreement = json.dumps(_agreement(q, k, options, cu_list))
    meta = {
        "S_local": q.shape[1],
        "inner_size": comm.levels[-1].world_size,
        "position": comm.rank,
        "outer_key": comm.levels[0].ring_key,
        "inner_key": comm.levels[-1].ring_key,
        "agreement": _digest(agreement),
        "agreement_bytes": len(agreement.encode()),
    }
    return meta, agreement


def _shown(value) -> str:
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:4]))}, ..., {value[-1]}] ({len(value)} entries)"
    return "nothing (an older ringattn?)" if value is None else str(value)


def _disagreement(name: str, first, theirs, rank: int) -> ValueError:
    """The error for rank ``rank`` disagreeing with rank 0 on ``name`` (both values as described)."""
    text = f"ranks disagree on {name}: rank 0 has {_shown(first)}, rank {rank} has {_shown(theirs)}"
    if isinstance(first, list) and isinstance(theirs, list):
        pairs = enumerate(zip(first, theirs, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(first), len(theirs)))
        text += f" (they first differ at entry {at})"
    return ValueError(text + " (every rank must call ring_attn_func with matching shapes and options)")


def _gather_text(comm, text: str, longest: int, timeout: float | None, device=None) -> list[str]:
    """Every rank's ``text`` (at most ``longest`` bytes of UTF-8), in ring order: one all_gather."""
    data = text.encode()
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    rows = comm.all_gather(buf.to(device), timeout).cpu().tolist()
    return [bytes(row).rstrip(b"\0").decode() for row in rows]


def _handshake(
    comm, meta: dict[str, int], agreement: str, timeout: float | None, device=None
) -> list[dict[str, int]]:
    """Every rank's metadata, in ring order; raises the same error on every rank when they disagree.

    One all_gather of ints carries each rank's digest of its agreement. Only when the digests differ
    (every rank sees that, so all of them take part) does a second one carry the agreements themselves,
    to name the option, the rank and both values. The gathered tensors live on ``device`` (the call's
    tensors' device: NCCL gathers CUDA tensors of the device this rank's inputs are on).
    """
    names = list(meta)  # the wire order: every rank builds ``meta`` with the same code
    ints = torch.tensor([meta[name] for name in names], dtype=torch.int64).to(device)
    rows = comm.all_gather(ints, timeout)
    table = [dict(zip(names, row, strict=True)) for row in rows.tolist()]
    if any(row["agreement"] != table[0]["agreement"] for row in table):
        longest = max(row["agreement_bytes"] for row in table)
        described = [json.loads(text) for text in _gather_text(comm, agreement, longest, timeout, device)]
        first = described[0]
        for j, theirs in enumerate(described):
            for name in [*first, *(n for n in theirs if n not in first)]:
                if first.get(name) != theirs.get(name):
                    raise _disagreement(name, first.get(name), theirs.get(name), j)
        raise ValueError("ranks disagree on the call's options (their digests differ, their values do not)")
    for j, row in enumerate(table):
        if row["inner_size"] != table[0]["inner_size"]:
            raise _disagreement("the inner ring size", table[0]["inner_size"], row["inner_size"], j)
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


def _sequence_rope(rope: RoPEConfig | None, gathered, cu_list: list[int] | None, seq_len: int):
    """``rope`` with dynamic NTK pinned to the whole sequence's length, ``max(positions) + 1`` over
    every rank's positions (as one call on the whole sequence computes it), so that every block of every
    rank rotates with the same frequencies. The inputs are the same on every rank (gathered positions,
    or the agreed cu_seqlens and length), so every rank pins the same length."""
    if rope is None or rope.rope_type != "dynamic" or rope.dynamic_seq_len is not None or seq_len == 0:
        return rope
    if gathered is not None:  # the wire's padding rows hold 0, which never raises the maximum
        n = int(gathered.max()) + 1
        return rope.at_seq_len(n) if 0 < n <= 2**31 else rope  # out of range: the blocks say so
    if cu_list is not None:  # default positions restart at 0 in each document
        return rope.at_seq_len(max(b - a for a, b in zip(cu_list[:-1], cu_list[1:], strict=True)))
    return rope.at_seq_len(seq_len)  # default positions: the global index


CP_MODES = ("ring", "allgather", "auto")


def _cp_mode(mode: str, comm, q, k, seq_len: int, causal: bool) -> str:
    """The mode to run: as asked, or for "auto" the cheaper by the topology model (MODELED). The inputs
    are agreed by every rank, so every rank picks the same."""
    two_level = len(comm.levels) > 1
    if mode == "allgather" and two_level:
        raise NotImplementedError("cp_mode='allgather' on a two-level ring: pass one flat group")
    if mode != "auto":
        return mode
    if two_level or comm.world_size == 1:
        return "ring"
    from ..topology.plan import cp_mode_for

    return cp_mode_for(seq_len, comm.world_size, q.shape[2], k.shape[2], q.shape[3], causal)[0]


def _plan(q, k, comm, options: _Options) -> _Plan:
    """The handshake and this call's plan; ``options`` as resolved by ``_check_local``."""
    S_local = q.shape[1]
    W, rank, layout, timeout = comm.world_size, comm.rank, options.layout, options.timeout
    cu_seqlens = options.cu_seqlens
    cu_list = None if cu_seqlens is None else cu_seqlens.tolist()
    if cu_list is not None:
        # cu_seqlens claims the global length: a shard that cannot belong to it fails before any wire.
        expected = shard_lengths(cu_list[-1], W, layout, cu_list)[rank]
        if expected != S_local:
            raise ValueError(
                f"cu_seqlens ends at {cu_list[-1]}, so rank {rank} of {W} ({layout}) should hold {expected} "
                f"tokens, but q has S_local={S_local}: cu_seqlens must end at the global sequence length"
            )
    meta, agreement = _metadata(q, k, comm, options, cu_list)
    key = (agreement, tuple(meta.items()))  # this rank's call, as the handshake would compare it
    cached = getattr(comm, "_agreed", None)
    if W == 1:
        table = [meta]
    elif cached is not None and cached[0] == key and not debug_enabled():
        table = cached[1]  # agreed on an earlier call (module docstring): no collective, no host sync
    else:
        table = _handshake(comm, meta, agreement, timeout, q.device)
    lengths = [row["S_local"] for row in table]
    seq_len = sum(lengths)
    expected = shard_lengths(seq_len, W, layout, cu_list)
    if lengths != expected:
        raise ValueError(
            f"shard lengths {lengths} are not a {layout} split of a global length {seq_len} over {W} ranks "
            f"(expected {expected}); shard the sequence with ringattn.shard"
        )
    if cu_list is not None and cu_list[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at the global sequence length {seq_len}, got {cu_list[-1]}")
    if W > 1:
        comm._agreed = (key, table)  # after every check that reads the table: only a sound agreement
    pieces, rows = _pieces(seq_len, W, layout, cu_list)
    gathered = None
    positions = options.positions
    if positions is not None:
        wire = _wire_layout(
            positions.to(device=q.device, dtype=torch.int64), pieces[rank], rows, positions.dim() - 1
        )
        gathered = comm.all_gather(wire, timeout).to(q.device) if W > 1 else wire.unsqueeze(0)
    cp_mode = _cp_mode(options.cp_mode, comm, q, k, seq_len, options.causal)
    wire = None
    if options.wire_dtype == torch.float8_e4m3fn:
        ranges = [(p.wire.start, max(r[j].wire.stop for r in pieces)) for j, p in enumerate(pieces[0])]
        wire = Fp8Wire((2, q.shape[0], rows, k.shape[2], k.shape[3]), ranges, k.dtype)
    plan = _Plan(
        comm=comm,
        cp_mode=cp_mode,
        wire=wire,
        kv_shape=(2, q.shape[0], rows, k.shape[2], k.shape[3]),
        causal=options.causal,
        scale=options.softmax_scale,
        rope=_sequence_rope(options.rope, gathered, cu_list, seq_len),
        backend=options.backend,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(q.device),
        cu_list=cu_list,
        pieces=pieces,
        rows=rows,
        positions=gathered,
        timeout=timeout,
        scores={
            "window_size": tuple(int(w) for w in options.window_size),
            "softcap": float(options.softcap),
            "alibi_slopes": options.alibi_slopes,
            "dropout_p": float(options.dropout_p),
            "dropout_seed": int(options.dropout_seed),
        },
    )
    plan.steps = plan.last_step() + 1
    return plan


def _pack_kv(plan: _Plan, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """This rank's K and V as one wire message: (2, B, rows, Hkv, D), or its ``plan.wire`` encoding."""
    mine = plan.pieces[plan.comm.rank]
    kv = torch.stack((_wire_layout(k, mine, plan.rows, 1), _wire_layout(v, mine, plan.rows, 1)))
    return kv if plan.wire is None else plan.wire.encode(kv)


def _kv_of(plan: _Plan, message: torch.Tensor) -> torch.Tensor:
    """The (2, B, rows, Hkv, D) K/V of a received (or own) wire message."""
    return message if plan.wire is None else plan.wire.decode(message)


def _unpack(buf: torch.Tensor, pieces: list[_Piece], length: int, dtype) -> torch.Tensor:
    """The inverse of the wire layout along dim 1: a rank's own (unpadded) rows of ``buf``."""
    B, _, H, D = buf.shape
    out = torch.empty(B, length, H, D, dtype=dtype, device=buf.device)
    for p in pieces:
        out[:, p.local] = buf[:, p.wire]
    return out
