"""The ring communicator interface: what the scheduler asks of a ring, and how two rings make one.

The scheduler only ever asks a communicator for two things:

* ``exchange(sends, recvs, hop=, label=)``: post every tensor of ``sends`` to the next rank and receive
  every tensor of ``recvs`` from the previous rank; returns a handle whose ``wait()`` blocks until all
  of them completed (or raises ``RingError`` naming the peer and the hop).
* ``all_gather(t)``: a small collective, used to check that ranks agree (on the first call with given
  shapes and options; later identical calls reuse that agreement, see ``handshake``) and to gather
  explicit RoPE positions.

Message order. Every rank posts the same exchanges, with the same list lengths, in the scheduler's
fixed per-step order; an implementation must deliver them in posting order, so the k-th message a rank
sends to ``next`` is the k-th message ``next`` receives from it (``dist_comm`` says how the wire keeps
that promise, ``fake_comm`` checks it message by message).

Ring order. ``rank`` is a rank's *position in the ring*, and that position is also its shard index
(``ringattn.shard`` gives position p the p-th shard). ``all_gather`` returns rows in ring order.

Two levels. ``TwoLevelComm(inner, outer)`` joins an inner ring (the ranks of one node) and an outer
ring (the ranks at the same inner position on every node) into one ring of ``I * O`` ranks; rank
(outer position o, inner position i) has position ``o * I + i``.

Implementations: ``dist_comm.DistRingComm`` (torch.distributed, with the factory ``ring_comm``) and
``fake_comm.FakeRingComm`` (W virtual ranks in one process, for tests).
"""

from __future__ import annotations

import contextlib
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
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
    "HopTotal",
    "RingStats",
    "RingComm",
    "TwoLevelComm",
    "nvtx_range",
    "debug_enabled",
]

DEBUG_ENV = "RINGATTN_RING_DEBUG"


def debug_enabled() -> bool:
    """``RINGATTN_RING_DEBUG=1`` (read per call): every ``ring_attn_func`` call runs the agreement
    handshake (a collective and a host sync) instead of reusing its communicator's cached one, and on
    CUDA every wait with a ``timeout`` blocks the host until that hop completes (a hop that does not
    complete in time raises ``RingTimeoutError`` naming the peer and the hop)."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def nvtx_range(message: str):
    """An NVTX range in the "ringattn" domain (free when no profiler is attached)."""
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(message, domain="ringattn")


class RingError(RuntimeError):
    """A ring exchange failed: the message names this rank, the peer and the hop."""


class RingTimeoutError(RingError, TimeoutError):
    """A ring exchange did not complete within the timeout.

    Over torch.distributed the process group is unusable afterwards (its pending operations were
    abandoned, and gloo closes the connections involved): the communicator refuses later calls, the
    process can still exit at once, and continuing needs a new group (destroy this one first).
    """


@dataclass
class HopRecord:
    """One exchange: what was sent on which hop, and how long this rank waited for it."""

    label: str
    hop: int
    bytes_sent: int
    bytes_received: int
    wait_s: float = 0.0


@dataclass
class HopTotal:
    """Every exchange of one (label, hop) since the last ``clear()``, summed."""

    count: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0


@dataclass
class RingStats:
    """Per-exchange accounting kept by a communicator (for the bench suite); ``clear()`` between runs.

    ``totals`` sums every exchange per (label, hop) since the last ``clear()`` (what ``bytes_per_hop``
    and ``wait_seconds`` read); ``records`` keeps only the latest ``MAX_RECORDS`` exchanges one by one.
    Both are bounded (labels and hops are few), so a communicator's memory does not grow with the
    number of calls. ``wait_s`` is host time spent in ``wait()``: on CUDA without an explicit timeout
    that is only the time to order the streams; the NVTX ranges show the device-side wait in a profiler.
    """

    MAX_RECORDS = 256
    records: deque[HopRecord] = field(default_factory=lambda: deque(maxlen=RingStats.MAX_RECORDS))
    totals: dict[tuple[str, int], HopTotal] = field(default_factory=dict)
    cp_modes: dict[str, int] = field(default_factory=dict)  # calls per context-parallel mode run

    def clear(self) -> None:
        self.records.clear()
        self.totals.clear()
        self.cp_modes.clear()

    def add(self, record: HopRecord) -> None:
        """Account for a posted exchange."""
        self.records.append(record)
        total = self.totals.setdefault((record.label, record.hop), HopTotal())
        total.count += 1
        total.bytes_sent += record.bytes_sent
        total.bytes_received += record.bytes_received

    def waited(self, record: HopRecord, seconds: float) -> None:
        """Account for time spent waiting on ``record``'s exchange."""
        record.wait_s += seconds
        total = self.totals.get((record.label, record.hop))
        if total is not None:  # None: cleared while the exchange was in flight
            total.wait_s += seconds

    def bytes_per_hop(self, label_prefix: str = "") -> dict[int, int]:
        """Bytes this rank sent on each hop, over the exchanges whose label starts with the prefix."""
        out: dict[int, int] = {}
        for (label, hop), total in self.totals.items():
            if label.startswith(label_prefix):
                out[hop] = out.get(hop, 0) + total.bytes_sent
        return dict(sorted(out.items()))

    def wait_seconds(self, label_prefix: str = "") -> float:
        return sum(t.wait_s for (label, _), t in self.totals.items() if label.startswith(label_prefix))


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
        self.comm.stats.waited(self.record, time.perf_counter() - start)
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
        self._agreed = None  # (key, handshake table) of the latest agreement (handshake._plan)

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
        self.stats.add(record)
        return self._exchange(list(sends), list(recvs), record, _timeout_seconds(timeout) or self.timeout)

    @abstractmethod
    def _exchange(self, sends, recvs, record: HopRecord, timeout: float | None) -> Pending: ...

    @abstractmethod
    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """(world_size, *t.shape): every rank's ``t``, in rank order."""

    def _error(self, record: HopRecord, direction: str, peer: int | None, timeout, cause) -> RingError:
        """The error for a failed wire operation: who failed to do what with whom, on which hop, and
        why; a ``RingTimeoutError`` (saying how long it waited) when ``cause`` is a timeout."""
        timed_out = isinstance(cause, TimeoutError) or "imed out" in str(cause)
        within = f" within {timeout:g} s" if timed_out and timeout is not None else ""
        what = f"{direction} {self._name(peer)} on hop {record.hop}" if peer is not None else direction
        cls = RingTimeoutError if timed_out else RingError
        return cls(
            f"ring attention: {self._name(self.rank)} of {self.world_size} failed to {what} ({record.label})"
            f"{within}: {cause}"
        )

    def _name(self, position: int) -> str:
        """How errors name the rank at a ring position."""
        return f"rank {position}"


class TwoLevelComm:
    """One ring of ``I * O`` ranks run as an inner ring of ``I`` (inside a node) and an outer ring of ``O``
    (across nodes): ``inner`` links this rank to the ranks of its node, ``outer`` to the ranks at the
    same inner position on the other nodes. This rank's position (and shard index) is
    ``outer.rank * I + inner.rank``.

    The scheduler walks ``levels`` = (outer, inner): each outer step brings the K/V of a whole node
    (a super-block, spread over that node's ranks) one node further while the inner ring computes on
    the current one. ``all_gather`` returns rows in position order. The ranks must form a grid:
    ``ring_attn_func`` checks that every position is held by exactly one rank before K/V move.

    ``overlap``: with False (the default) the two levels never have messages in flight at once: each
    outer exchange is waited for right after it is posted, before the inner ring moves, so the outer
    hops' time is exposed. NCCL documents concurrent point-to-point traffic on two communicators as
    deadlock-prone, and no multi-GPU run has shown the overlapped schedule safe yet. With True the
    outer exchange of the next super-block stays in flight while the inner ring runs on the current
    one (hiding the outer hop behind the inner ring's compute); opt in with
    ``TwoLevelComm(ring_comm(inner), ring_comm(outer), overlap=True)`` (or
    ``comm_from_rings(..., overlap=True)``) and pass that as ``group``.
    """

    def __init__(self, inner: RingComm, outer: RingComm, overlap: bool = False):
        for name, comm in (("inner", inner), ("outer", outer)):
            if not isinstance(comm, RingComm):
                raise TypeError(f"{name} must be a RingComm, got {type(comm).__name__}")
        if inner is outer:
            raise ValueError("inner and outer must be different rings")
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {type(overlap).__name__}")
        self.inner, self.outer, self.overlap = inner, outer, overlap
        self._agreed = None  # (key, handshake table) of the latest agreement (handshake._plan)
        self.rank = outer.rank * inner.world_size + inner.rank
        self.world_size = inner.world_size * outer.world_size

    @property
    def levels(self) -> tuple[RingComm, RingComm]:
        return (self.outer, self.inner)

    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """(I * O, *t.shape): every rank's ``t`` in position order (inner gather, then outer)."""
        return self.outer.all_gather(self.inner.all_gather(t, timeout), timeout).flatten(0, 1)
