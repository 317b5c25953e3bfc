"""Communicators for the ring: one interface, a torch.distributed implementation and an in-process fake.

The scheduler only ever asks a communicator for two things:

* ``exchange(sends, recvs, hop=, label=)``: post every tensor of ``sends`` to the next rank and receive
  every tensor of ``recvs`` from the previous rank; returns a handle whose ``wait()`` blocks until all
  of them completed (or raises ``RingError`` naming the peer and the hop).
* ``all_gather(t)``: a small collective used once per call to check that ranks agree.

Message order (the same on every rank, so no rank can wait on a message its peer has not posted):
each exchange posts its sends to ``next`` in list order, then its receives from ``prev`` in list
order, as one ``batch_isend_irecv`` (grouped under NCCL, independent async work handles under gloo),
and exchanges are posted in the scheduler's fixed per-step order. Every rank runs the same code
with the same list lengths, so the k-th message a rank sends to ``next`` is the k-th message
``next`` receives from it.

Ring order. ``rank`` is a rank's *position in the ring*, and that position is also its shard index
(``ringattn.shard`` gives position p the p-th shard). By default the order is the group's own rank
order; ``DistRingComm(group, order=[...])`` (or ``ring_comm(group, order=...)``) takes the group's
global ranks in the ring order a topology chose (``dist.new_group`` sorts its ranks, so the order has
to be given explicitly). Pass that communicator as ``group`` to ``shard``, ``unshard`` and
``ring_attn_func`` so all three agree on it. ``all_gather`` returns rows in ring order.

Two levels. ``TwoLevelComm(inner, outer)`` joins an inner ring (the ranks of one node) and an outer
ring (the ranks at the same inner position on every node) into one ring of ``I * O`` ranks; rank
(outer position o, inner position i) has position ``o * I + i``.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the ranges are a profiling aid only
    _nvtx = None

__all__ = [
    "RingError",
    "RingTimeoutError",
    "HopRecord",
    "RingStats",
    "RingComm",
    "DistRingComm",
    "TwoLevelComm",
    "FakeRingComm",
    "fake_ring",
    "fake_two_level",
    "run_fake_ring",
    "ring_comm",
    "comm_from_rings",
    "nvtx_range",
]


def nvtx_range(message: str):
    """An NVTX range in the "ringattn" domain (free when no profiler is attached)."""
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(message, domain="ringattn")


class RingError(RuntimeError):
    """A ring exchange failed: the message names this rank, the peer and the hop."""


class RingTimeoutError(RingError, TimeoutError):
    """A ring exchange did not complete within the timeout."""


@dataclass
class HopRecord:
    """One exchange: what was sent on which hop, and how long this rank waited for it."""

    label: str
    hop: int
    bytes_sent: int
    bytes_received: int
    wait_s: float = 0.0


@dataclass
class RingStats:
    """Per-exchange accounting kept by a communicator (for the bench suite); ``clear()`` between runs.

    Only the latest ``MAX_RECORDS`` exchanges are kept, so a long training run does not grow it.
    ``wait_s`` is host time spent in ``wait()``: on CUDA without an explicit timeout that is only the
    time to order the streams; the NVTX ranges show the device-side wait in a profiler.
    """

    MAX_RECORDS = 100_000
    records: deque[HopRecord] = field(default_factory=lambda: deque(maxlen=RingStats.MAX_RECORDS))

    def clear(self) -> None:
        self.records.clear()

    def bytes_per_hop(self, label_prefix: str = "") -> dict[int, int]:
        """Bytes this rank sent on each hop, over the exchanges whose label starts with the prefix."""
        out: dict[int, int] = {}
        for rec in self.records:
            if rec.label.startswith(label_prefix):
                out[rec.hop] = out.get(rec.hop, 0) + rec.bytes_sent
        return out

    def wait_seconds(self, label_prefix: str = "") -> float:
        return sum(rec.wait_s for rec in self.records if rec.label.startswith(label_prefix))


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _timeout_seconds(timeout) -> float | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
    return float(seconds)


class Pending(ABC):
    """An exchange in flight."""

    def __init__(self, comm: RingComm, record: HopRecord):
        self.comm, self.record, self.done = comm, record, False

    def wait(self) -> None:
        if self.done:
            return
        start = time.perf_counter()
        with nvtx_range(f"ring wait {self.record.label} hop {self.record.hop}"):
            self._wait()
        self.record.wait_s += time.perf_counter() - start
        self.done = True

    @abstractmethod
    def _wait(self) -> None: ...


class RingComm(ABC):
    """A ring of ``world_size`` ranks seen from ``rank``: who is next, who is previous, how to exchange.

    ``timeout`` (seconds, None = the backend's own) bounds every wait; ``stats`` records each exchange.
    """

    def __init__(self, rank: int, world_size: int, timeout: float | None):
        self.rank, self.world_size = rank, world_size
        self.timeout = _timeout_seconds(timeout)
        self.stats = RingStats()

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def levels(self) -> tuple[RingComm, ...]:
        """The rings the scheduler walks, outermost first (one for a flat ring)."""
        return (self,)

    @property
    def ring_key(self) -> int:
        """Equal on every member of one ring in one order (the scheduler checks it before K/V move)."""
        return 0

    def exchange(
        self,
        sends: Sequence[torch.Tensor],
        recvs: Sequence[torch.Tensor],
        *,
        hop: int,
        label: str,
        timeout: float | None = None,
    ) -> Pending:
        """Send ``sends`` to next and receive ``recvs`` from prev; ``wait()`` the returned handle.

        Send buffers must not be written and receive buffers not read until ``wait()`` returns.
        """
        record = HopRecord(label, hop, _nbytes(sends), _nbytes(recvs))
        self.stats.records.append(record)
        return self._exchange(list(sends), list(recvs), record, _timeout_seconds(timeout) or self.timeout)

    @abstractmethod
    def _exchange(self, sends, recvs, record: HopRecord, timeout: float | None) -> Pending: ...

    @abstractmethod
    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """(world_size, *t.shape): every rank's ``t``, in rank order."""

    def _error(self, record: HopRecord, direction: str, peer: int, timeout, cause) -> RingError:
        cls = RingTimeoutError if isinstance(cause, TimeoutError) or "imed out" in str(cause) else RingError
        within = "" if timeout is None else f" within {timeout:g} s"
        what = f"{direction} {self._name(peer)} on hop {record.hop}" if peer is not None else direction
        return cls(
            f"ring attention: {self._name(self.rank)} of {self.world_size} failed to {what} ({record.label})"
            f"{within}: {cause}"
        )

    def _name(self, position: int) -> str:
        """How errors name the rank at a ring position."""
        return f"rank {position}"


# ---------------------------------------------------------------------------------------- torch.distributed


class _DistPending(Pending):
    def __init__(self, comm, record, works, timeout, stream):
        super().__init__(comm, record)
        self.works, self.timeout, self.stream = works, timeout, stream

    def _wait(self) -> None:
        comm = self.comm
        deadline = time.monotonic() + (self.timeout or comm.default_timeout)  # one budget for the exchange
        for i, (work, direction, peer) in enumerate(self.works):
            try:
                if self.stream is None:  # gloo: a wait with a timeout raises when it expires
                    work.wait(timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
                else:
                    with torch.cuda.stream(self.stream):
                        # NCCL: a timeout blocks the CPU until done; without one the group's
                        # watchdog enforces its timeout and only the streams are ordered.
                        work.wait(timedelta(seconds=self.timeout)) if self.timeout else work.wait()
            except Exception as exc:  # the backend's error types vary; name the peer and hop
                self.works = self.works[i + 1 :]
                raise comm._error(
                    self.record, direction, peer, self.timeout or comm.default_timeout, exc
                ) from exc
        if self.stream is not None:
            done = torch.cuda.Event()
            done.record(self.stream)
            torch.cuda.current_stream(self.stream.device).wait_event(done)


class DistRingComm(RingComm):
    """The ring over a torch.distributed process group (gloo for CPU tensors, NCCL for CUDA tensors).

    ``order``: the group's global ranks in ring order (default: the group's rank order). This rank's
    ``rank`` is its position in ``order``, which is also its shard index; messages go to the next
    position and come from the previous one; ``all_gather`` returns rows in ring order.

    On CUDA the exchange is posted on a dedicated stream that first waits (event) for the compute
    stream, and the compute stream waits (event) for the exchange in ``wait()``.
    """

    def __init__(self, group=None, timeout=None, order=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group=None needs torch.distributed to be initialised (init_process_group)")
        pg = _as_process_group(group)
        self.pg = pg
        self._dist = dist
        if dist.get_rank(pg) < 0:
            raise ValueError("this process is not a member of the given group")
        members = dist.get_process_group_ranks(pg)  # global ranks in group-rank order
        self.order = _check_order(order, members)
        super().__init__(self.order.index(dist.get_rank()), len(members), timeout)
        self.default_timeout = _group_timeout(pg)
        self._next_global = self.order[self.next_rank]
        self._prev_global = self.order[self.prev_rank]
        self._gather_rows = [members.index(g) for g in self.order]  # group rank at each ring position
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def ring_key(self) -> int:
        return hash(self.order) & (2**62 - 1)  # int tuples hash the same in every process

    def _name(self, position: int) -> str:
        # Positions are what the ring knows; the global rank is what finds the process.
        name = f"rank {position}"
        return name if self.order[position] == position else f"{name} (global rank {self.order[position]})"

    def _stream_for(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _exchange(self, sends, recvs, record, timeout):
        dist = self._dist
        device = (sends or recvs)[0].device
        stream = self._stream_for(device)
        ops = [dist.P2POp(dist.isend, t, self._next_global, self.pg) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self._prev_global, self.pg) for t in recvs]
        peers = [("send to", self.next_rank)] * len(sends) + [("receive from", self.prev_rank)] * len(recvs)
        with nvtx_range(f"ring post {record.label} hop {record.hop}"):
            try:
                if stream is None:
                    works = dist.batch_isend_irecv(ops)
                else:
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(device))
                    stream.wait_event(ready)
                    with torch.cuda.stream(stream):
                        works = dist.batch_isend_irecv(ops)
                    for t in (*sends, *recvs):
                        t.record_stream(stream)  # the allocator must not reuse them before the wire is done
            except Exception as exc:
                raise self._error(record, "post an exchange with", self.next_rank, timeout, exc) from exc
        # NCCL returns one work for the whole group; gloo one per op.
        if len(works) != len(ops):
            pairs = [(work, "exchange with", self.next_rank) for work in works]
        else:
            pairs = [(work, d, p) for work, (d, p) in zip(works, peers, strict=True)]
        return _DistPending(self, record, pairs, timeout, stream)

    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        dist = self._dist
        if self.world_size == 1:
            return t.unsqueeze(0).clone()
        if dist.get_backend(self.pg) == "nccl" and t.device.type != "cuda":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        work = dist.all_gather(out, t.contiguous(), group=self.pg, async_op=True)
        timeout = timeout or self.timeout or self.default_timeout
        try:
            work.wait(timedelta(seconds=timeout))
        except Exception as exc:
            record = HopRecord("collective", 0, t.numel() * t.element_size(), 0)
            raise self._error(record, "all_gather with every rank", None, timeout, exc) from exc
        return torch.stack([out[i] for i in self._gather_rows])


def _check_order(order, members: list[int]) -> tuple[int, ...]:
    if order is None:
        return tuple(members)
    if isinstance(order, torch.Tensor) or not isinstance(order, Sequence):
        raise TypeError(f"order must be a sequence of global ranks or None, got {type(order).__name__}")
    if any(isinstance(r, bool) or not isinstance(r, int) for r in order) or sorted(order) != sorted(members):
        raise ValueError(
            f"order must list the group's global ranks {sorted(members)} once each, in ring order; "
            f"got {list(order)}"
        )
    return tuple(order)


def _mesh_class():
    import torch.distributed as dist

    return getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)


def _as_process_group(group):
    import torch.distributed as dist

    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    mesh_cls = _mesh_class()
    if mesh_cls is not None and isinstance(group, mesh_cls):
        if group.ndim != 1:
            raise ValueError(f"group must be a 1-D DeviceMesh, got {group.ndim}-D")
        return group.get_group()
    raise TypeError(f"group must be a ProcessGroup, a 1-D DeviceMesh, a RingComm or None, got {type(group)}")


def _group_timeout(pg) -> float:
    from torch.distributed import distributed_c10d as c10d

    for device in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout.total_seconds()
        except Exception:  # the backend for that device may not exist; private API may move
            continue
    return c10d._get_default_timeout(c10d.get_backend(pg)).total_seconds()


class TwoLevelComm:
    """One ring of ``I * O`` ranks run as an inner ring of ``I`` (inside a node) and an outer ring of ``O``
    (across nodes): ``inner`` links this rank to the ranks of its node, ``outer`` to the ranks at the
    same inner position on the other nodes. This rank's position (and shard index) is
    ``outer.rank * I + inner.rank``.

    The scheduler walks ``levels`` = (outer, inner): each outer step brings the K/V of a whole node
    (a super-block, spread over that node's ranks) one node further while the inner ring computes on
    the current one. ``all_gather`` returns rows in position order. The ranks must form a grid:
    ``ring_attn_func`` checks that every position is held by exactly one rank before K/V move.
    """

    def __init__(self, inner: RingComm, outer: RingComm):
        for name, comm in (("inner", inner), ("outer", outer)):
            if not isinstance(comm, RingComm):
                raise TypeError(f"{name} must be a RingComm, got {type(comm).__name__}")
        if inner is outer:
            raise ValueError("inner and outer must be different rings")
        self.inner, self.outer = inner, outer
        self.rank = outer.rank * inner.world_size + inner.rank
        self.world_size = inner.world_size * outer.world_size

    @property
    def levels(self) -> tuple[RingComm, RingComm]:
        return (self.outer, self.inner)

    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """(I * O, *t.shape): every rank's ``t`` in position order (inner gather, then outer)."""
        return self.outer.all_gather(self.inner.all_gather(t, timeout), timeout).flatten(0, 1)


# One DistRingComm per (group, order, timeout): ring_attn_func(group=g) and ring_comm(g) share one
# communicator (and its stats), and a different timeout or order gets its own instead of a stale one.
_COMMS: dict = {}
# Drop the cached communicators, and with them our references to process groups, while the
# interpreter is still alive: a gloo group destroyed during interpreter finalization can abort the
# process (its worker threads free tensors, which needs the GIL).
atexit.register(_COMMS.clear)


def ring_comm(group=None, timeout=None, order=None) -> RingComm | TwoLevelComm:
    """The communicator for ``group``.

    ``group``: None (the default group), a ProcessGroup or 1-D DeviceMesh (a flat ring; ``order`` its
    global ranks in ring order, default the group's order), a 2-D DeviceMesh of shape (nodes,
    ranks per node) (a two-level ring: dim 1 inner, dim 0 outer), a pair ``(inner, outer)`` of any of
    those or of RingComms (a two-level ring), or a RingComm / TwoLevelComm (returned as is).
    ``timeout`` (seconds) bounds each wait of a newly built communicator.
    """
    if isinstance(group, (RingComm, TwoLevelComm)):
        if order is not None or timeout is not None:
            raise ValueError("order and timeout belong to a process group; this communicator has its own")
        return group
    if isinstance(group, (tuple, list)):
        if len(group) != 2:
            raise ValueError(f"a two-level group must be a pair (inner, outer), got {len(group)} entries")
        if order is not None:
            raise ValueError(
                "order of a two-level ring: pass (ring_comm(inner, order=...), ring_comm(outer, ...))"
            )
        inner, outer = (ring_comm(g, timeout) for g in group)
        if not (isinstance(inner, RingComm) and isinstance(outer, RingComm)):
            raise TypeError("the inner and outer groups of a two-level ring must each be one ring")
        return TwoLevelComm(inner, outer)
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group=None needs torch.distributed to be initialised (init_process_group)")
    mesh_cls = _mesh_class()
    if mesh_cls is not None and isinstance(group, mesh_cls) and group.ndim == 2:
        if order is not None:
            raise ValueError("order cannot be combined with a 2-D DeviceMesh (its layout is the order)")
        return ring_comm((group.get_group(1), group.get_group(0)), timeout)
    pg = _as_process_group(group)
    members = dist.get_process_group_ranks(pg)
    order = _check_order(order, members)
    key = (pg, None if list(order) == members else order, _timeout_seconds(timeout))
    comm = _COMMS.get(key)
    if comm is None:
        comm = _COMMS[key] = DistRingComm(pg, timeout, order)
    return comm


def comm_from_rings(rings, inner: int | None = None, timeout=None) -> RingComm | TwoLevelComm:
    """This process's communicator for context-parallel rings listed as global ranks in ring order
    (e.g. ``ringattn.topology.ring_groups(ring_order(topo), ...)``): a flat ring in that order, or with
    ``inner`` a two-level ring whose inner rings are runs of ``inner`` consecutive ranks of it (a node's
    run of the order) and whose outer rings join the ranks at the same inner position
    (``ringattn.topology.split_two_level``). Creating process groups is collective: every process
    calls this with the same ``rings``, and each process must be in exactly one of them.
    """
    import torch.distributed as dist

    from ..topology.order import split_two_level

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("comm_from_rings needs torch.distributed to be initialised (init_process_group)")
    rings = [list(ring) for ring in rings]
    me = dist.get_rank()
    mine = [ring for ring in rings if me in ring]
    if len(mine) != 1:
        raise ValueError(f"rings must hold global rank {me} exactly once, got {rings}")
    if inner is None:
        stages = [rings]
    else:  # every inner ring, then every outer ring
        split = [split_two_level(ring, inner) for ring in rings]
        stages = [
            [r for inner_rings, _ in split for r in inner_rings],
            [r for _, outer in split for r in outer],
        ]
    comms = []
    for stage in stages:  # the same new_group calls in the same order on every process
        for ranks in stage:
            pg = dist.new_group(sorted(ranks))
            if me in ranks:
                comms.append(ring_comm(pg, timeout, order=ranks))
    return comms[0] if inner is None else TwoLevelComm(*comms)


# ------------------------------------------------------------------------------------------ in-process fake


class _FakeHub:
    """Mailboxes between W virtual ranks living in one process (one thread each)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.boxes = {(src, (src + 1) % world_size): queue.Queue() for src in range(world_size)}
        self.lock = threading.Lock()
        self.gather_slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size)
        self.failed: str | None = None
        self.logs: list[list[tuple]] = [[] for _ in range(world_size)]

    def fail(self, why: str) -> None:
        with self.lock:
            if self.failed is None:
                self.failed = why
        self.barrier.abort()


class _FakePending(Pending):
    def __init__(self, comm, record, sends, recvs, timeout):
        super().__init__(comm, record)
        self.sends, self.recvs, self.timeout = sends, recvs, timeout

    def _wait(self) -> None:
        comm, hub = self.comm, self.comm.hub
        for t, snapshot in self.sends:
            if not torch.equal(t.view(torch.uint8), snapshot.view(torch.uint8)):
                raise RingError(
                    f"rank {comm.rank}: a send buffer of hop {self.record.hop} ({self.record.label}) "
                    "was written while in flight"
                )
        deadline = time.monotonic() + (self.timeout or math.inf)
        box = hub.boxes[(comm.prev_rank, comm.rank)]
        for t in self.recvs:
            while True:
                if hub.failed:
                    raise comm._error(self.record, "receive from", comm.prev_rank, None, hub.failed)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise comm._error(
                        self.record, "receive from", comm.prev_rank, self.timeout, TimeoutError("timed out")
                    )
                try:
                    hop, label, data = box.get(timeout=min(left, 0.05))
                    break
                except queue.Empty:
                    continue
            if (hop, label, data.shape, data.dtype) != (self.record.hop, self.record.label, t.shape, t.dtype):
                raise RingError(
                    f"rank {comm.rank}: schedule mismatch on hop {self.record.hop} ({self.record.label}): "
                    f"rank {comm.prev_rank} sent hop {hop} ({label}) {tuple(data.shape)} {data.dtype}, "
                    f"expected {tuple(t.shape)} {t.dtype}"
                )
            t.copy_(data)


class FakeRingComm(RingComm):
    """One of W virtual ranks in this process (see ``fake_ring``/``run_fake_ring``).

    Stricter than a real wire: receive buffers are poisoned with NaN when an exchange is posted
    (reading one early shows up), a send buffer written before ``wait()`` raises, each receive is
    checked against the sender's hop, label, shape and dtype, and every post is logged in ``log``.
    """

    def __init__(self, hub: _FakeHub, rank: int, timeout: float | None):
        super().__init__(rank, hub.world_size, timeout)
        self.hub = hub

    @property
    def ring_key(self) -> int:
        return id(self.hub) & (2**62 - 1)

    @property
    def log(self) -> list[tuple]:
        return self.hub.logs[self.rank]

    def _exchange(self, sends, recvs, record, timeout):
        box = self.hub.boxes[(self.rank, self.next_rank)] if self.world_size > 1 else None
        snapshots = []
        for t in sends:
            self.log.append(("send", self.next_rank, record.hop, record.label, tuple(t.shape), t.dtype))
            snapshots.append((t, t.clone()))
            box.put((record.hop, record.label, t.clone()))
        for t in recvs:
            self.log.append(("recv", self.prev_rank, record.hop, record.label, tuple(t.shape), t.dtype))
            if t.is_floating_point():
                t.fill_(math.nan)
        return _FakePending(self, record, snapshots, recvs, timeout)

    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        hub, timeout = self.hub, timeout or self.timeout
        self.log.append(("all_gather", None, 0, "all_gather", tuple(t.shape), t.dtype))
        hub.gather_slots[self.rank] = t.clone()
        try:
            hub.barrier.wait(timeout)
            out = torch.stack(hub.gather_slots)
            hub.barrier.wait(timeout)  # nobody overwrites a slot before everyone has read them
        except threading.BrokenBarrierError as exc:
            record = HopRecord("collective", 0, 0, 0)
            raise self._error(record, "all_gather with every rank", None, timeout, hub.failed or exc) from exc
        return out


def fake_ring(world_size: int, timeout: float | None = 60.0) -> list[FakeRingComm]:
    """W connected virtual ranks; drive each from its own thread (``run_fake_ring`` does this)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    hub = _FakeHub(world_size)
    return [FakeRingComm(hub, rank, timeout) for rank in range(world_size)]


def fake_two_level(inner_size: int, outer_size: int, timeout: float | None = 60.0) -> list[TwoLevelComm]:
    """``outer_size`` nodes of ``inner_size`` virtual ranks as two-level rings, in position order
    (``comms[o * inner_size + i]`` is inner position i of node o); drive them with ``run_fake_ring``."""
    for name, size in (("inner_size", inner_size), ("outer_size", outer_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    inner = [fake_ring(inner_size, timeout) for _ in range(outer_size)]  # one ring per node
    outer = [fake_ring(outer_size, timeout) for _ in range(inner_size)]  # one ring per inner position
    return [TwoLevelComm(inner[o][i], outer[i][o]) for o in range(outer_size) for i in range(inner_size)]


def run_fake_ring(fn: Callable, comms: Sequence[FakeRingComm | TwoLevelComm]) -> list:
    """Run ``fn(comm)`` for every virtual rank at once (one thread each); results in ``comms`` order.

    If any rank raises, the others are released (their waits raise) and the first error is re-raised.
    """
    results: list = [None] * len(comms)
    errors: list = [None] * len(comms)
    hubs = list({id(c.hub): c.hub for comm in comms for c in comm.levels}.values())
    lock, first = threading.Lock(), []  # the index whose error started a cascade

    def body(index, comm):
        try:
            results[index] = fn(comm)
        except BaseException as exc:
            errors[index] = exc
            with lock:
                first.append(index)  # before any hub fails: a released rank's error comes later
            for hub in hubs:
                hub.fail(f"rank {comm.rank} raised {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=body, args=(i, c), daemon=True) for i, c in enumerate(comms)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if first:
        raise errors[first[0]]
    return results
