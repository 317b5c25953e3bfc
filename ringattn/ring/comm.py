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
"""

from __future__ import annotations

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
    "FakeRingComm",
    "fake_ring",
    "run_fake_ring",
    "ring_comm",
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
        what = f"{direction} rank {peer} on hop {record.hop}" if peer is not None else direction
        return cls(
            f"ring attention: rank {self.rank} of {self.world_size} failed to {what} ({record.label}){within}: {cause}"
        )


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

    On CUDA the exchange is posted on a dedicated stream that first waits (event) for the compute
    stream, and the compute stream waits (event) for the exchange in ``wait()``.
    """

    def __init__(self, group=None, timeout=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group=None needs torch.distributed to be initialised (init_process_group)")
        pg = _as_process_group(group)
        self.pg = pg
        self._dist = dist
        super().__init__(dist.get_rank(pg), dist.get_world_size(pg), None)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given group")
        self.default_timeout = _group_timeout(pg)
        self.timeout = _timeout_seconds(timeout)
        self._next_global = dist.get_global_rank(pg, self.next_rank)
        self._prev_global = dist.get_global_rank(pg, self.prev_rank)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

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
        return torch.stack(out)


def _as_process_group(group):
    import torch.distributed as dist

    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    mesh_cls = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
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


_COMMS: dict = {}


def ring_comm(group=None, timeout=None) -> RingComm:
    """The communicator for ``group`` (a RingComm is returned as is; one DistRingComm per group)."""
    if isinstance(group, RingComm):
        return group
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group=None needs torch.distributed to be initialised (init_process_group)")
    pg = _as_process_group(group)
    comm = _COMMS.get(pg)
    if comm is None:
        comm = _COMMS[pg] = DistRingComm(pg, timeout)
    return comm


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
        self.first_failure: int | None = None  # the rank whose error started a cascade
        self.logs: list[list[tuple]] = [[] for _ in range(world_size)]

    def fail(self, why: str, rank: int) -> None:
        with self.lock:
            if self.failed is None:
                self.failed, self.first_failure = why, rank
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


def run_fake_ring(fn: Callable[[FakeRingComm], object], comms: Sequence[FakeRingComm]) -> list:
    """Run ``fn(comm)`` for every virtual rank at once (one thread each); results in rank order.

    If any rank raises, the others are released (their waits raise) and the first error is re-raised.
    """
    results: list = [None] * len(comms)
    errors: list = [None] * len(comms)
    hub = comms[0].hub

    def body(comm):
        try:
            results[comm.rank] = fn(comm)
        except BaseException as exc:
            errors[comm.rank] = exc
            hub.fail(f"rank {comm.rank} raised {type(exc).__name__}: {exc}", comm.rank)

    threads = [threading.Thread(target=body, args=(c,), daemon=True) for c in comms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if hub.first_failure is not None:
        raise errors[hub.first_failure]
    return results
