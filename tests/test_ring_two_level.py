"""Two-level ring (inner ring per node, outer ring across nodes) and ring order, vs the fp64 reference.

The in-process fake runs 8 nodes x 8 ranks (64 virtual ranks, slow tier; 2 x 4 by default) in one
process; gloo runs 4 spawned processes as 2 x 2 and checks that a topology-chosen ring order is
honoured.
"""

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from ring_checks import NAMES, assemble, check_against, launch, local_run, make_inputs, peer, reference

import ringattn.ring.scheduler as scheduler
from ringattn import RoPEConfig
from ringattn.ring import (
    DistRingComm,
    TwoLevelComm,
    comm_from_rings,
    fake_ring,
    fake_two_level,
    ring_attn_func,
    ring_comm,
    run_fake_ring,
    shard,
    shard_indices,
    unshard,
)
from ringattn.ring.comm import HopRecord
from ringattn.ring.dist_comm import _check_order
from ringattn.topology import ring_groups

DOCS = torch.tensor([0, 5, 5, 12, 21, 29])


def two_level_run(inner, outer, q, k, v, dout, layout, timeout=60.0, **kwargs):
    comms = fake_two_level(inner, outer, timeout=timeout)
    per_rank = run_fake_ring(lambda c: local_run(c, q, k, v, dout, layout, **kwargs), comms)
    return assemble(per_rank, q.shape[1], layout), comms


def _check_case(inner, outer, layout, S, Hq, Hkv, dtype, seed=0, **case):
    q, k, v, dout = make_inputs(2, S, Hq, Hkv, 16, dtype, seed=seed)
    before = [t.clone() for t in (q, k, v, dout)]
    ours, _ = two_level_run(inner, outer, q, k, v, dout, layout, **case)
    case.pop("backend", None)
    case.pop("dkv_dtype", None)
    check_against(ours, reference(q, k, v, dout, **case), peer(q, k, v, dout, **case))
    assert all(torch.equal(t, b) for t, b in zip((q, k, v, dout), before, strict=True)), "inputs changed"


# ------------------------------------------------------------------------- 8 x 8 (2 x 4 by default), fake

# 8 x 8 runs 64 virtual ranks (4096 blocks per pass, 10-15 s each here): slow tier. 2 x 4 runs the
# same checks on the same lengths, which do not divide into its chunks either, by default.
GRIDS = [(2, 4), pytest.param((8, 8), marks=pytest.mark.slow)]


def _grid_id(grid):
    return f"{grid[0]}x{grid[1]}"


@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
@pytest.mark.parametrize(
    "layout,causal,S",
    [("zigzag", True, 2 * 64 + 37), ("stripe", False, 64 + 29)],
    ids=["zigzag-causal-S165", "stripe-full-S93"],
)
def test_fake_grid_forward_backward_match_fp64(layout, causal, S, grid):
    # Lengths that do not divide into the chunks: some ranks hold one token fewer than others.
    _check_case(*grid, layout, S, 4, 2, torch.float32, causal=causal, backend="reference")


@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
def test_fake_grid_bf16_rope_docs_with_fp32_dkv(grid):
    cu = torch.tensor([0, 40, 41, 100, 131])
    _check_case(*grid, "zigzag", 131, 4, 2, torch.bfloat16, causal=True, rope=RoPEConfig(16, theta=5e5),
                cu_seqlens=cu, backend="reference", dkv_dtype=torch.float32)  # fmt: skip


SMALL = {
    "causal-gqa-rope-docs-S29": dict(
        S=29,
        Hq=4,
        Hkv=2,
        dtype=torch.float32,
        causal=True,
        rope=RoPEConfig(16, theta=45.2e9),
        cu_seqlens=DOCS,
    ),
    "full-mha-S22": dict(S=22, Hq=2, Hkv=2, dtype=torch.float32, causal=False),
    "causal-bf16-rope-S25": dict(S=25, Hq=4, Hkv=1, dtype=torch.bfloat16, causal=True, rope=RoPEConfig(16)),
    "causal-S5-empty-ranks": dict(S=5, Hq=2, Hkv=1, dtype=torch.float32, causal=True),
}


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (1, 4), (4, 1)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("case", SMALL.values(), ids=SMALL.keys())
def test_small_grids_match_fp64(grid, case):
    _check_case(*grid, "zigzag", **case)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "stripe", "contiguous"])
@pytest.mark.parametrize("grid", [(8, 8), (4, 4), (2, 8), (8, 2), (3, 5)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("case", SMALL.values(), ids=SMALL.keys())
def test_grid_sweep_matches_fp64(grid, layout, case):
    _check_case(*grid, layout, **dict(case, backend="reference"))


# --------------------------------------------------------------------------- schedule and messages


def test_outer_exchange_is_posted_before_the_inner_ring_computes(monkeypatch):
    inner, outer = 3, 2
    events: dict[int, list] = {}  # thread id -> this rank's posts and block computations in order
    real_fwd = scheduler.block_forward

    def fwd(q, k, v, mask, **kw):
        events.setdefault(threading.get_ident(), []).append(("compute", mask.k_span.start))
        return real_fwd(q, k, v, mask, **kw)

    monkeypatch.setattr(scheduler, "block_forward", fwd)
    comms = fake_two_level(inner, outer)
    for comm in comms:
        for name, level in (("outer", comm.outer), ("inner", comm.inner)):
            original = level._exchange

            def post(sends, recvs, record, timeout, name=name, original=original):
                events.setdefault(threading.get_ident(), []).append((name, record.label, record.hop))
                return original(sends, recvs, record, timeout)

            level._exchange = post
    q, k, v, _ = make_inputs(1, 2 * inner * outer, 2, 1, 16, torch.float32)  # contiguous, 2 tokens each

    def forward(comm):
        ring_attn_func(*(shard(t, 1, comm, "contiguous") for t in (q, k, v)), group=comm, causal=False,
                       layout="contiguous")  # fmt: skip
        return threading.get_ident()

    idents = run_fake_ring(forward, comms)
    for comm, ident in zip(comms, idents, strict=True):
        o, i = comm.outer.rank, comm.inner.rank
        expected = []
        for t in range(outer):
            if t < outer - 1:
                expected.append(("outer", "forward kv", t + 1))
            for s in range(inner):
                if s < inner - 1:
                    expected.append(("inner", "forward kv", s + 1))
                src = ((o - t) % outer) * inner + (i - s) % inner
                expected.append(("compute", 2 * src))  # the key shard's first global index
        assert events[ident] == expected, (o, i)


def _in_flight_trace(comms):
    """Wrap every level's posts and waits: per thread, the ordered ("post"|"wait", level) events."""
    events: dict[int, list] = {}
    for comm in comms:
        for name, level in (("outer", comm.outer), ("inner", comm.inner)):
            original = level._exchange

            def post(sends, recvs, record, timeout, name=name, original=original):
                mine = events.setdefault(threading.get_ident(), [])
                mine.append(("post", name))
                pending = original(sends, recvs, record, timeout)
                wait = pending._wait

                def waited():
                    wait()
                    mine.append(("wait", name))  # Pending.wait runs _wait once per exchange

                pending._wait = waited
                return pending

            level._exchange = post
    return events


def _levels_in_flight_at_once(trace) -> bool:
    flying = {"outer": 0, "inner": 0}
    for kind, level in trace:
        flying[level] += 1 if kind == "post" else -1
        assert flying[level] >= 0
        if flying["outer"] and flying["inner"]:
            return True
    assert flying == {"outer": 0, "inner": 0}  # every exchange was waited for
    return False


@pytest.mark.parametrize("overlap", [False, True])
def test_two_levels_are_never_in_flight_at_once_unless_overlap_is_asked_for(overlap):
    """NCCL documents concurrent P2P on two communicators as deadlock-prone: by default no message of
    one level is posted while the other level's is in flight; ``overlap=True`` is the old schedule
    (the outer exchange in flight across the inner ring). Both give bitwise the same results."""
    inner, outer = 2, 3
    q, k, v, dout = make_inputs(1, 24, 2, 1, 16, torch.float32)
    results = {}
    for mode in (False, True):
        comms = fake_two_level(inner, outer, overlap=mode)
        assert all(comm.overlap is mode for comm in comms)
        events = _in_flight_trace(comms) if mode is overlap else None
        per_rank = run_fake_ring(
            lambda c: (threading.get_ident(), local_run(c, q, k, v, dout, "zigzag", rope=RoPEConfig(16))),
            comms,
        )
        results[mode] = [res for _, res in per_rank]
        if events is not None:
            for ident, _ in per_rank:
                trace = events[ident]
                assert trace.count(("post", "outer")) == 2 * (outer - 1) + outer  # fwd kv, bwd kv, bwd dkv
                assert _levels_in_flight_at_once(trace) is overlap
    for ours, theirs in zip(results[False], results[True], strict=True):
        for name in (*NAMES, "lse"):
            assert torch.equal(ours[name], theirs[name]), name
    full = assemble(results[False], 24, "zigzag")
    spec = dict(causal=True, rope=RoPEConfig(16))
    check_against(full, reference(q, k, v, dout, **spec), peer(q, k, v, dout, **spec))


def test_two_level_overlap_must_be_a_bool():
    a, b = fake_ring(2), fake_ring(2)
    with pytest.raises(TypeError, match="overlap must be a bool"):
        TwoLevelComm(a[0], b[0], overlap="yes")


def test_messages_go_to_grid_neighbours_and_pair_up():
    inner, outer = 4, 3
    q, k, v, dout = make_inputs(1, 24, 2, 1, 16, torch.float32)
    _, comms = two_level_run(inner, outer, q, k, v, dout, "zigzag")
    for comm in comms:
        o, i = comm.outer.rank, comm.inner.rank
        assert comm.rank == o * inner + i
        # The inner ring's next is the next rank of this node; the outer ring's the same position
        # on the next node; and what this rank sends is exactly what that neighbour receives.
        neighbours = (
            (comm.inner, comms[o * inner + (i + 1) % inner].inner),
            (comm.outer, comms[((o + 1) % outer) * inner + i].outer),
        )
        for mine, nxt in neighbours:
            assert nxt.hub is mine.hub and nxt.rank == mine.next_rank
            sends = [e[2:] for e in mine.log if e[0] == "send"]
            assert {e[1] for e in mine.log if e[0] == "send"} == {nxt.rank}
            assert sends and sends == [e[2:] for e in nxt.log if e[0] == "recv"]
        # Per outer step the inner ring makes I - 1 K/V hops and I dk/dv hops in backward.
        labels = [e[3] for e in comm.inner.log if e[0] == "send"]
        assert labels.count("forward kv") == outer * (inner - 1)
        assert labels.count("backward dkv") == outer * inner
        outer_labels = [e[3] for e in comm.outer.log if e[0] == "send"]
        assert outer_labels.count("forward kv") == outer - 1 and outer_labels.count("backward dkv") == outer


def test_two_level_shard_unshard_and_all_gather_in_position_order():
    x = torch.randn(2, 23, 3)

    def fn(comm):
        ranks = comm.all_gather(torch.tensor([comm.rank]))
        return unshard(shard(x, 1, comm, "zigzag"), 1, comm, "zigzag"), ranks.flatten().tolist()

    for back, ranks in run_fake_ring(fn, fake_two_level(3, 2)):
        assert torch.equal(back, x) and ranks == list(range(6))


def test_rings_that_do_not_form_a_grid_raise_on_every_rank_before_kv_moves():
    comms = fake_two_level(2, 2, timeout=10.0)
    a, b = comms[0], comms[1]  # node 0, inner positions 0 and 1: swap their outer rings
    comms[0], comms[1] = TwoLevelComm(a.inner, b.outer), TwoLevelComm(b.inner, a.outer)
    q, k, v, _ = make_inputs(1, 2, 2, 1, 16, torch.float32)

    def fn(comm):
        try:
            ring_attn_func(q, k, v, group=comm)
        except ValueError as exc:
            return str(exc)
        return None

    for message in run_fake_ring(fn, comms):
        assert message is not None and "members of one ring were given different orders" in message
    for comm in comms:
        assert all(e[0] == "all_gather" for level in comm.levels for e in level.log)


def test_bad_two_level_groups_raise():
    a, b = fake_ring(2)
    with pytest.raises(ValueError, match="pair"):
        ring_comm((a, b, a))
    with pytest.raises(TypeError, match="inner must be a RingComm"):
        TwoLevelComm("a", b)
    with pytest.raises(ValueError, match="different rings"):
        TwoLevelComm(a, a)
    with pytest.raises(ValueError, match="inner_size"):
        fake_two_level(0, 2)
    q, k, v, _ = make_inputs(1, 4, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="pair"):
        ring_attn_func(q, k, v, group=(a, b, a))
    assert a.log == [] and b.log == []


# ------------------------------------------------------------------------------ gloo, 4 processes


def _cases():
    """(layout, case): causal GQA with RoPE and documents at a length 4 ranks do not divide, and full MHA."""
    return [
        (
            "zigzag",
            dict(S=29, Hq=4, Hkv=2, dtype=torch.float32, causal=True, rope=RoPEConfig(16), cu_seqlens=DOCS),
        ),
        ("stripe", dict(S=22, Hq=2, Hkv=2, dtype=torch.float32, causal=False)),
    ]


def _check(group, failures, what, layout, case):
    case = dict(case)
    S, dtype = case.pop("S"), case.pop("dtype")
    q, k, v, dout = make_inputs(2, S, case.pop("Hq"), case.pop("Hkv"), 16, dtype, seed=S)
    try:
        comm = ring_comm(group)
        local = local_run(comm, q, k, v, dout, layout, **case)
        full = {n: unshard(local[n], 2 if n == "lse" else 1, comm, layout) for n in (*NAMES, "lse")}
        check_against(full, reference(q, k, v, dout, **case), peer(q, k, v, dout, **case))
    except AssertionError as exc:
        failures.append(f"{what} {layout}: {exc}")


def _record_p2p(log):
    """Wrap batch_isend_irecv so every posted op's direction and global peer is logged."""
    original = dist.batch_isend_irecv

    def recording(ops):
        log.extend(("send" if op.op is dist.isend else "recv", op.peer) for op in ops)
        return original(ops)

    dist.batch_isend_irecv = recording


def _gloo_job(rank, world_size):
    failures, out = [], {}
    # Flat ring in a topology-chosen order: position = index in order = shard index.
    order = [2, 0, 3, 1]
    comm = ring_comm(None, order=order)
    pos = order.index(rank)
    out["position"] = (comm.rank, pos)
    out["gathered"] = comm.all_gather(torch.tensor([rank])).flatten().tolist()
    p2p: list = []
    _record_p2p(p2p)
    for layout, case in _cases():
        _check(comm, failures, "ordered", layout, case)
    nxt, prv = order[(pos + 1) % 4], order[(pos - 1) % 4]
    out["peers_ok"] = bool(p2p) and all(p == (nxt if d == "send" else prv) for d, p in p2p)
    # Errors name ring positions and, where they differ, the global rank that finds the process.
    err = comm._error(
        HopRecord("forward kv", 1, 0, 0), "receive from", comm.prev_rank, 3.0, TimeoutError("x")
    )
    out["error"] = (type(err).__name__, str(err))
    x = torch.arange(13.0).reshape(1, 13)
    local = shard(x, 1, comm, "zigzag")
    out["shard_ok"] = torch.equal(local, x[:, shard_indices(13, 4, "zigzag")[pos]])
    # Ranks disagreeing on the order (ranks 2, 3 swap the first two, so their positions still look
    # consistent to ranks 0, 1): every rank raises before any K/V moves.
    bad = DistRingComm(None, order=[0, 1, 2, 3] if rank < 2 else [1, 0, 2, 3])
    q, k, v, _ = make_inputs(1, 2, 2, 1, 16, torch.float32)
    try:
        ring_attn_func(q, k, v, group=bad)
    except ValueError as exc:
        out["disagree"] = str(exc)
    out["disagree_records"] = len(bad.stats.records)
    # The cache: one communicator per (group, order, timeout); a timeout is never silently dropped.
    out["cache"] = (
        ring_comm() is ring_comm(),
        ring_comm(None, order=[0, 1, 2, 3]) is ring_comm(),
        ring_comm(None, order=order) is comm,
        ring_comm(None, timeout=7).timeout,
        ring_comm(None, timeout=timedelta(seconds=7)) is ring_comm(None, timeout=7),
        ring_comm().timeout,
    )
    # Two levels, 2 x 2: nodes {0, 1} and {2, 3}; outer rings {0, 2} and {1, 3}.
    inner_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    outer_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    inner, outer = inner_groups[rank // 2], outer_groups[rank % 2]
    for layout, case in _cases():
        _check((inner, outer), failures, "2x2", layout, case)
    # The same two levels from a 2-D DeviceMesh (dim 0 across nodes, dim 1 inside a node).
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2))
    q, k, v, _ = make_inputs(1, 3, 2, 1, 16, torch.float32)
    out["mesh_same"] = torch.equal(
        ring_attn_func(q, k, v, group=mesh), ring_attn_func(q, k, v, group=(inner, outer))
    )
    # Two levels with a permuted inner order: global ranks 1, 0 and 3, 2 lead their nodes.
    inner_order = [[1, 0], [3, 2]][rank // 2]
    permuted = (ring_comm(inner, order=inner_order), ring_comm(outer))
    out["permuted_position"] = ring_comm(permuted).rank
    for layout, case in _cases():
        _check(permuted, failures, "2x2-permuted", layout, case)
    # A topology's order end to end: node-local GPU order [1, 0] on 2 nodes, one ring of 4.
    rings = ring_groups([1, 0], gpus_per_node=2, nodes=2, ring_size=4)
    flat, two = comm_from_rings(rings), comm_from_rings(rings, inner=2)
    out["from_rings"] = (flat.rank, two.rank, two.inner.order, two.outer.order)
    for layout, case in _cases():
        _check(two, failures, "2x2-from-rings", layout, case)
    out["failures"] = failures
    return out


@pytest.fixture(scope="module")
def gloo_two_level():
    return launch(_gloo_job, 4, timeout=150.0)


def test_gloo_2x2_and_ordered_ring_match_fp64(gloo_two_level):
    for rank, res in enumerate(gloo_two_level):
        assert res is not None, f"rank {rank} wrote no result"
        assert res["failures"] == [], "\n".join(res["failures"])
        assert res["mesh_same"]


def test_gloo_ring_order_is_honoured(gloo_two_level):
    order = [2, 0, 3, 1]
    for rank, res in enumerate(gloo_two_level):
        assert res["position"] == (order.index(rank), order.index(rank))
        assert res["gathered"] == order  # rows in ring order
        assert res["peers_ok"], "a message went to a rank that is not the ring neighbour"
        assert res["shard_ok"]
        err_type, message = res["error"]
        pos, prev = order.index(rank), order[(order.index(rank) - 1) % 4]
        me = f"rank {pos}" + ("" if pos == rank else f" (global rank {rank})")
        assert err_type == "RingTimeoutError"
        assert (
            f"{me} of 4 failed to receive from rank {(pos - 1) % 4} (global rank {prev}) on hop 1" in message
        )
        assert "ranks disagree on the ring order" in res["disagree"] and res["disagree_records"] == 0
        assert res["cache"] == (True, True, True, 7.0, True, None)
        assert res["permuted_position"] == 2 * (rank // 2) + (1 - rank % 2)
        # Ring [1, 0, 3, 2]: inner rings [1, 0], [3, 2]; outer rings [1, 3], [0, 2].
        position = [1, 0, 3, 2].index(rank)
        assert res["from_rings"] == (
            position,
            position,
            ((1, 0), (3, 2))[rank // 2],
            ((0, 2), (1, 3))[rank % 2],
        )


def test_order_must_list_the_groups_ranks():
    members = [0, 1, 2, 3]
    with pytest.raises(TypeError, match="order must be a sequence"):
        _check_order(5, members)
    with pytest.raises(ValueError, match="order must list"):
        _check_order([0, 1, 1, 3], members)
    with pytest.raises(ValueError, match="order must list"):
        _check_order([0, 1, 2], members)
    assert _check_order([3, 1, 2, 0], members) == (3, 1, 2, 0)
    assert _check_order(None, members) == (0, 1, 2, 3)
