"""The in-process fake ring: W virtual ranks in one process, one thread each, for tests.

``fake_ring(W)`` (or ``fake_two_level(I, O)``) builds the ranks and ``run_fake_ring(fn, comms)`` runs
``fn(comm)`` on each at once. The fake is stricter than a real wire, so a test on it proves:

* message order: every post is logged (``FakeRingComm.log``: the latest ``LOG_LIMIT`` posts or more,
  so a long run does not grow it) and each receive is checked against the hop, label, shape and dtype
  its sender posted, so a schedule whose k-th send to ``next`` is not the k-th receive there fails at
  that receive's ``wait()``, naming both sides;
* buffer discipline: receive buffers are poisoned with NaN when an exchange is posted (reading one
  before ``wait()`` shows up in the result), and a send buffer written before ``wait()`` raises;
* scale: mailboxes are in-process queues, so W=64 rings (and 8 x 8 two-level rings) run in seconds;
* failure handling: when one rank raises, the others' waits raise instead of hanging.

CUDA tensors move the way ``DistRingComm`` moves them under NCCL: each rank posts on its own side
stream that first waits (event) for the rank's current stream; a message carries an event recorded
after its copy, which the receiver's side stream waits on before copying it into the receive buffer;
and ``wait()`` makes the current stream wait (event) for the side stream. So a fake ring on one GPU
exercises the scheduler's CUDA stream ordering with real copies on real streams.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from .comm import HopRecord, Pending, RingComm, RingError, TwoLevelComm

__all__ = ["FakeRingComm", "fake_ring", "fake_two_level", "run_fake_ring"]

LOG_LIMIT = 4096  # posts kept per rank: at least the latest LOG_LIMIT, at most twice as many


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


def _on(stream):
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


class _FakePending(Pending):
    def __init__(self, comm, record, sends, recvs, timeout, stream=None):
        super().__init__(comm, record)
        self.sends, self.recvs, self.timeout, self.stream = sends, recvs, timeout, stream

    def _wait(self) -> None:
        stream = self.stream
        if stream is not None:  # see the current stream's writes to the send buffers, and order after them
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        with _on(stream):
            self._check_sends()
            self._receive()
        if stream is not None:
            done = torch.cuda.Event()
            done.record(stream)
            torch.cuda.current_stream(stream.device).wait_event(done)

    def _check_sends(self) -> None:
        comm = self.comm
        for t, snapshot in self.sends:
            if not torch.equal(t.view(torch.uint8), snapshot.view(torch.uint8)):
                raise RingError(
                    f"rank {comm.rank}: a send buffer of hop {self.record.hop} ({self.record.label}) "
                    "was written while in flight"
                )

    def _receive(self) -> None:
        comm, hub, stream = self.comm, self.comm.hub, self.stream
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
                    hop, label, data, copied = box.get(timeout=min(left, 0.05))
                    break
                except queue.Empty:
                    continue
            if (hop, label, data.shape, data.dtype) != (self.record.hop, self.record.label, t.shape, t.dtype):
                raise RingError(
                    f"rank {comm.rank}: schedule mismatch on hop {self.record.hop} ({self.record.label}): "
                    f"rank {comm.prev_rank} sent hop {hop} ({label}) {tuple(data.shape)} {data.dtype}, "
                    f"expected {tuple(t.shape)} {t.dtype}"
                )
            if copied is not None:  # the sender's copy into the message is done on its side stream
                stream.wait_event(copied)
                data.record_stream(stream)  # allocated on the sender's stream, read on ours
            t.copy_(data)


class FakeRingComm(RingComm):
    """One of W virtual ranks in this process (see ``fake_ring``/``run_fake_ring``).

    Stricter than a real wire: receive buffers are poisoned with NaN when an exchange is posted
    (reading one early shows up), a send buffer written before ``wait()`` raises, each receive is
    checked against the sender's hop, label, shape and dtype, and every post is logged in ``log``
    (the latest ``LOG_LIMIT`` posts at least: older ones are dropped in bulk, so memory stays bounded).
    """

    def __init__(self, hub: _FakeHub, rank: int, timeout: float | None):
        super().__init__(rank, hub.world_size, timeout)
        self.hub = hub
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream_for(self, device: torch.device):
        """This rank's side stream on a CUDA device (None for CPU tensors), as ``DistRingComm``'s."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @property
    def ring_key(self) -> int:
        return id(self.hub) & (2**62 - 1)

    @property
    def log(self) -> list[tuple]:
        return self.hub.logs[self.rank]

    def _log(self, entry: tuple) -> None:
        log = self.log
        log.append(entry)
        if len(log) >= 2 * LOG_LIMIT:
            del log[:-LOG_LIMIT]

    def _exchange(self, sends, recvs, record, timeout):
        box = self.hub.boxes[(self.rank, self.next_rank)] if self.world_size > 1 else None
        stream = self._stream_for((sends or recvs)[0].device) if (sends or recvs) else None
        if stream is not None:  # as DistRingComm: the side stream waits for the compute stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(stream.device))
            stream.wait_event(ready)
        snapshots = []
        with _on(stream):
            for t in sends:
                self._log(("send", self.next_rank, record.hop, record.label, tuple(t.shape), t.dtype))
                snapshots.append((t, t.clone()))
                message, copied = t.clone(), None
                if stream is not None:
                    copied = torch.cuda.Event()
                    copied.record(stream)
                box.put((record.hop, record.label, message, copied))
            for t in recvs:
                self._log(("recv", self.prev_rank, record.hop, record.label, tuple(t.shape), t.dtype))
                if t.is_floating_point():
                    t.fill_(math.nan)
        if stream is not None:
            for t in (*sends, *recvs):
                t.record_stream(stream)  # the allocator must not reuse them before the side stream is done
        return _FakePending(self, record, snapshots, recvs, timeout, stream)

    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        hub, timeout = self.hub, timeout or self.timeout
        self._log(("all_gather", None, 0, "all_gather", tuple(t.shape), t.dtype))
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


def fake_two_level(
    inner_size: int, outer_size: int, timeout: float | None = 60.0, overlap: bool = False
) -> list[TwoLevelComm]:
    """``outer_size`` nodes of ``inner_size`` virtual ranks as two-level rings, in position order
    (``comms[o * inner_size + i]`` is inner position i of node o); drive them with ``run_fake_ring``.
    ``overlap`` as in ``TwoLevelComm`` (off by default)."""
    for name, size in (("inner_size", inner_size), ("outer_size", outer_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    inner = [fake_ring(inner_size, timeout) for _ in range(outer_size)]  # one ring per node
    outer = [fake_ring(outer_size, timeout) for _ in range(inner_size)]  # one ring per inner position
    return [
        TwoLevelComm(inner[o][i], outer[i][o], overlap=overlap)
        for o in range(outer_size)
        for i in range(inner_size)
    ]


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
