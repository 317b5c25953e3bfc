"""The ring over torch.distributed: ``DistRingComm``, the factory ``ring_comm`` and ``comm_from_rings``.

Message order (the same on every rank, so no rank can wait on a message its peer has not posted):
each exchange posts its sends to ``next`` in list order, then its receives from ``prev`` in list
order, as one ``batch_isend_irecv`` (grouped under NCCL, independent async work handles under gloo),
and exchanges are posted in the scheduler's fixed per-step order. Every rank runs the same code
with the same list lengths, so the k-th message a rank sends to ``next`` is the k-th message
``next`` receives from it.

Ring order. By default the order is the group's own rank order; ``DistRingComm(group, order=[...])``
(or ``ring_comm(group, order=...)``) takes the group's global ranks in the ring order a topology chose
(``dist.new_group`` sorts its ranks, so the order has to be given explicitly). Pass that communicator
as ``group`` to ``shard``, ``unshard`` and ``ring_attn_func`` so all three agree on it.

``ring_comm(group)`` is how the rest of the library turns a ``group`` argument into a communicator: it
returns a given ``RingComm``/``TwoLevelComm`` as is and caches one ``DistRingComm`` per (process group,
order, timeout) and one ``TwoLevelComm`` per pair of them, so a communicator's cached agreement
(``handshake``) serves every later call with the same ``group``.

Devices. Collectives and exchanges run on the call's tensors' device; under NCCL that must be the
current CUDA device (``torch.cuda.set_device(local_rank)`` before ``init_process_group``), which is
checked before anything is posted.

Failures. A wire error names the peer of the operation that failed: under gloo every send and receive
is posted and waited on by itself, so a dead previous rank is named as such even when the post fails.
A timeout (``RingTimeoutError``) leaves the process group unusable: gloo closes the connections of an
operation that timed out, and a peer that is only late would now be out of step. The communicator
refuses every later call at once (``RingError``), and the process can still exit at once (under gloo,
``all_gather`` passes the timeout to the collective itself, so no worker thread stays blocked on a
silent peer until the group's own timeout); to continue, destroy the group
(``torch.distributed.destroy_process_group``) and create a new one.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Sequence
from datetime import timedelta

import torch

from ..topology.order import split_two_level
from .comm import (
    HopRecord,
    Pending,
    RingComm,
    RingError,
    RingTimeoutError,
    TwoLevelComm,
    _timeout_seconds,
    debug_enabled,
    nvtx_range,
)

__all__ = ["DistRingComm", "ring_comm", "comm_from_rings"]


def _check_nccl_device(backend: str, device: torch.device, current: int | None) -> None:
    """Under NCCL a collective or P2P runs on the communicator of the *current* CUDA device, so the
    tensors must live there: raise when ``device`` (a tensor's) is not ``cuda:current``. ``current``
    is ``torch.cuda.current_device()`` (None when CUDA is unavailable). Other backends pass."""
    if backend != "nccl":
        return
    if device.type != "cuda" or current is None or device.index not in (None, current):
        raise ValueError(
            f"ring attention over NCCL: the tensors are on {device} but the current CUDA device is "
            f"{'none' if current is None else f'cuda:{current}'}; call torch.cuda.set_device(local_rank) "
            "(e.g. int(os.environ['LOCAL_RANK']) under torchrun) before init_process_group and create the "
            "tensors on that device, so that every rank uses its own GPU"
        )


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
                        # NCCL: only the streams are ordered (no host sync), and the group's watchdog
                        # enforces its own timeout; in debug mode a timeout blocks the host per hop.
                        if self.timeout and debug_enabled():
                            work.wait(timedelta(seconds=self.timeout))
                        else:
                            work.wait()
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
    stream, and the compute stream waits (event) for the exchange in ``wait()``: no host sync. Under
    NCCL the tensors must be on the current CUDA device (``torch.cuda.set_device(local_rank)``), or
    the call raises naming both devices. A ``timeout`` blocks the host per hop only in debug mode
    (``RINGATTN_RING_DEBUG=1``); otherwise NCCL's watchdog enforces the process group's timeout.

    After a ``RingTimeoutError`` the group is unusable (see the module docstring): every later call on
    this communicator raises ``RingError`` at once; destroy the group and create a new one.
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
        self.broken: str | None = None  # the timeout that made the group unusable, once one happened
        self.backend = str(dist.get_backend(pg))

    @property
    def ring_key(self) -> int:
        return hash(self.order) & (2**62 - 1)  # int tuples hash the same in every process

    def _name(self, position: int) -> str:
        # Positions are what the ring knows; the global rank is what finds the process.
        name = f"rank {position}"
        return name if self.order[position] == position else f"{name} (global rank {self.order[position]})"

    def _error(self, record, direction, peer, timeout, cause):
        err = super()._error(record, direction, peer, timeout, cause)
        if isinstance(err, RingTimeoutError):
            self.broken = str(err)
            return RingTimeoutError(
                f"{str(err).rstrip('.!')}. The process group is unusable now: its pending operations "
                "were abandoned (and gloo closes the connections of an operation that timed out); "
                "destroy it (torch.distributed.destroy_process_group) and create a new one to continue"
            )
        if peer is not None:
            name = self._name(peer)
            err = RingError(
                f"{err} ({name} exited or its link failed; if {name} raised a ring error too, the rank "
                "that failed first is named there)"
            )
        return err

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise RingError(
                f"ring attention: {self._name(self.rank)} of {self.world_size}: this ring's process group "
                f"is unusable after an earlier timeout ({self.broken.split(': ', 1)[-1]}); destroy it "
                "(torch.distributed.destroy_process_group) and create a new one"
            )

    def _stream_for(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _check_device(self, device: torch.device) -> None:
        if self.backend == "nccl":
            available = torch.cuda.is_available()
            _check_nccl_device(self.backend, device, torch.cuda.current_device() if available else None)

    def _exchange(self, sends, recvs, record, timeout):
        self._check_usable()
        dist = self._dist
        device = (sends or recvs)[0].device
        self._check_device(device)
        stream = self._stream_for(device)
        ops = [dist.P2POp(dist.isend, t, self._next_global, self.pg) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self._prev_global, self.pg) for t in recvs]
        peers = [("send to", self.next_rank)] * len(sends) + [("receive from", self.prev_rank)] * len(recvs)
        both = f"exchange with {self._name(self.next_rank)} and {self._name(self.prev_rank)}"
        with nvtx_range(f"ring post {record.label} hop {record.hop}"):
            if stream is None:
                # gloo: each op is posted by itself anyway (batch_isend_irecv loops over them), so a
                # failed post names its own peer (a dead previous rank fails the receive's post).
                works = []
                for op, (direction, peer) in zip(ops, peers, strict=True):
                    try:
                        works += dist.batch_isend_irecv([op])
                    except Exception as exc:
                        raise self._error(record, f"post the {direction}", peer, None, exc) from exc
            else:
                try:
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(device))
                    stream.wait_event(ready)
                    with torch.cuda.stream(stream):
                        works = dist.batch_isend_irecv(ops)
                    for t in (*sends, *recvs):
                        t.record_stream(stream)  # the allocator must not reuse them before the wire is done
                except Exception as exc:  # one grouped launch: the failing peer is not known
                    raise self._error(
                        record, f"post the {both} on hop {record.hop}", None, None, exc
                    ) from exc
        # NCCL returns one work for the whole group; gloo one per op.
        if len(works) != len(ops):
            pairs = [(work, f"complete the {both} on hop {record.hop}", None) for work in works]
        else:
            pairs = [(work, d, p) for work, (d, p) in zip(works, peers, strict=True)]
        return _DistPending(self, record, pairs, timeout, stream)

    def all_gather(self, t: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        dist = self._dist
        if self.world_size == 1:
            return t.unsqueeze(0).clone()
        if self.backend == "nccl" and t.device.type != "cuda" and torch.cuda.is_available():
            t = t.to(torch.device("cuda", torch.cuda.current_device()))  # a CPU tensor from a caller
        self._check_device(t.device)
        self._check_usable()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        timeout = timeout or self.timeout or self.default_timeout
        if t.device.type == "cpu":
            # The collective itself gets the timeout: under gloo it runs on a worker thread, which
            # would otherwise stay blocked on a silent peer (and keep the process from exiting)
            # until the group's own timeout, long after our wait has given up.
            from torch._C._distributed_c10d import AllgatherOptions

            opts = AllgatherOptions()
            opts.asyncOp = True
            opts.timeout = timedelta(seconds=timeout)
            work = self.pg.allgather([out], [t.contiguous()], opts)
        else:
            work = dist.all_gather(out, t.contiguous(), group=self.pg, async_op=True)
        try:
            work.wait(timedelta(seconds=timeout))
        except Exception as exc:
            if t.device.type == "cpu":  # the collective's own timeout fires about now: let it finish
                settle = time.monotonic() + 5.0
                while not work.is_completed() and time.monotonic() < settle:
                    time.sleep(0.005)
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
        key = ("two-level", inner, outer)  # one per pair: it keeps the agreement (handshake)
        comm = _COMMS.get(key)
        if comm is None:
            comm = _COMMS[key] = TwoLevelComm(inner, outer)
        return comm
    import torch.distributed as dist

    mesh_cls = _mesh_class()
    known = (dist.ProcessGroup,) + (() if mesh_cls is None else (mesh_cls,)) if dist.is_available() else ()
    if group is not None and not isinstance(group, known):
        raise TypeError(
            "group must be None, a ProcessGroup, a DeviceMesh, a RingComm or an (inner, outer) pair, "
            f"got {group!r} ({type(group).__name__})"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group=None needs torch.distributed to be initialised (init_process_group)")
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


def comm_from_rings(
    rings, inner: int | None = None, timeout=None, overlap: bool = False
) -> RingComm | TwoLevelComm:
    """This process's communicator for context-parallel rings listed as global ranks in ring order
    (e.g. ``ringattn.topology.ring_groups(ring_order(topo), ...)``): a flat ring in that order, or with
    ``inner`` a two-level ring whose inner rings are runs of ``inner`` consecutive ranks of it (a node's
    run of the order) and whose outer rings join the ranks at the same inner position
    (``ringattn.topology.split_two_level``; ``overlap`` as in ``TwoLevelComm``, off by default).
    Creating process groups is collective: every process
    calls this with the same ``rings``, and each process must be in exactly one of them.
    """
    import torch.distributed as dist

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
    return comms[0] if inner is None else TwoLevelComm(*comms, overlap=overlap)
