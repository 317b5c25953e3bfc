"""Ring reliability regressions (issue 14): dynamic-NTK RoPE across ranks, agreement on every option
that changes the numbers, exiting after a timeout, naming the dead peer, and memory per call.

Self-contained on purpose: the fake ring comes from ``ringattn.ring.fake_comm`` and the gloo jobs use
the small launcher below (which lets a rank exit normally, so exit time can be measured).
"""

import gc
import os
import re
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist
from ring_checks import launch_watched

import ringattn.ring.fake_comm as fake_comm
from ringattn import RoPEConfig
from ringattn.block import BlockMask, block_backward, block_forward
from ringattn.reference import attention_ref, ring_attention_ref
from ringattn.ring import (
    DistRingComm,
    RingError,
    RingStats,
    RingTimeoutError,
    handshake,
    ring_attn_func,
    ring_comm,
    shard,
    unshard,
)
from ringattn.ring.dist_comm import _check_nccl_device
from ringattn.ring.fake_comm import FakeRingComm, fake_ring, run_fake_ring

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


def _inputs(B, S, Hq, Hkv, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, S, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, S, Hq, D))
    return [torch.randn(*s, generator=gen, dtype=torch.float64).float() for s in shapes]


def _ring_run(W, q, k, v, dout, layout, positions=None, **options):
    """Forward + backward on a fake ring of W; out, dq, dk, dv of the whole sequence."""

    def rank_fn(comm):
        q_l, k_l, v_l = (shard(t, 1, comm, layout).requires_grad_() for t in (q, k, v))
        if positions is not None:
            options["positions"] = shard(positions, positions.dim() - 1, comm, layout)
        out = ring_attn_func(q_l, k_l, v_l, group=comm, layout=layout, **options)
        out.backward(shard(dout, 1, comm, layout))
        return [unshard(t, 1, comm, layout) for t in (out.detach(), q_l.grad, k_l.grad, v_l.grad)]

    return run_fake_ring(rank_fn, fake_ring(W, timeout=60.0))[0]


# ------------------------------------------------------------------------------ 1. dynamic NTK RoPE


@pytest.mark.parametrize("positions_kind", ["default", "explicit", "documents"])
@pytest.mark.parametrize("rope_type", list(SCALINGS))
def test_ring_equals_one_call_for_every_rope_scaling(rope_type, positions_kind):
    """The ring (and ring_attention_ref) == one call on the whole sequence, forward and backward.

    Dynamic NTK scales by the whole sequence's length (max position + 1): before the fix every block
    used its own pieces' largest position, and the ring was off by 0.1-0.9.
    """
    if positions_kind != "default" and rope_type not in ("default", "dynamic"):
        pytest.skip("positions and documents only change the length that dynamic scaling reads")
    W, B, S, layout = 3, 2, 40, "zigzag"
    rope = RoPEConfig(16, scaling=SCALINGS[rope_type])
    q, k, v, dout = _inputs(B, S, 4, 2, 16, seed=3)
    positions = cu_seqlens = None
    if positions_kind == "explicit":  # per batch row, offset: the maximum is in row 1
        positions = torch.stack((torch.arange(S), torch.arange(S) + 7))
    elif positions_kind == "documents":
        cu_seqlens = torch.tensor([0, 6, 29, 40])  # default positions restart in each document

    # The single call on the whole sequence: fp64 reference with autograd, and the block contract.
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(
        q64, k64, v64, causal=True, rope=rope, cu_seqlens=cu_seqlens, q_positions=positions,
        k_positions=positions,
    )  # fmt: skip
    ref_out.backward(dout.double())
    ref = [ref_out.detach(), q64.grad, k64.grad, v64.grad]
    mask = BlockMask(causal=True, cu_seqlens=cu_seqlens)
    one_out, one_lse = block_forward(
        q, k, v, mask, rope=rope, q_positions=positions, k_positions=positions, out_dtype=torch.float32
    )
    one_grads = block_backward(
        dout, q, k, v, one_out, one_lse, mask, rope=rope, q_positions=positions, k_positions=positions,
        grad_dtype=torch.float32,
    )  # fmt: skip
    for name, a, b in zip(("out", "dq", "dk", "dv"), (one_out, *one_grads), ref, strict=True):
        assert (a.double() - b).abs().max() < 1e-4, f"single call {name} vs fp64 reference"

    ring = _ring_run(W, q, k, v, dout, layout, positions, causal=True, rope=rope, cu_seqlens=cu_seqlens)
    for name, ours, one, r in zip(("out", "dq", "dk", "dv"), ring, (one_out, *one_grads), ref, strict=True):
        assert (ours.double() - r).abs().max() < 1e-4, f"ring {name} vs fp64 single call ({rope_type})"
        assert (ours - one).abs().max() < 1e-4, f"ring {name} vs block_forward/backward single call"

    spec_out, _ = ring_attention_ref(
        q, k, v, world_size=W, layout=layout, causal=True, rope=rope, cu_seqlens=cu_seqlens,
        positions=positions,
    )  # fmt: skip
    assert (spec_out - ref[0]).abs().max() < 1e-10, "ring_attention_ref vs attention_ref"


def test_pinned_dynamic_length_is_part_of_the_config():
    rope = RoPEConfig(16, scaling=SCALINGS["dynamic"])
    pinned = rope.at_seq_len(40)
    assert pinned.dynamic_seq_len == 40 and rope.dynamic_seq_len is None
    assert pinned != rope and hash(pinned) != hash(rope.at_seq_len(41))
    assert RoPEConfig.from_json(pinned.to_json()) == pinned
    assert torch.equal(pinned.inv_freq(), rope.inv_freq(seq_len=40))
    assert RoPEConfig(16).at_seq_len(40) == RoPEConfig(16)  # other types do not depend on the length
    with pytest.raises(ValueError, match="dynamic_seq_len"):
        rope.at_seq_len(0)
    # A pinned config gives every block the same frequencies, whatever its positions.
    q, k, v, _ = _inputs(1, 6, 2, 2, 16)
    far = torch.arange(6) + 30
    out, _ = block_forward(q, k, v, rope=pinned, q_positions=far, k_positions=far)
    ref, _ = attention_ref(q, k, v, rope=rope.at_seq_len(40), q_positions=far, k_positions=far)
    assert (out.double() - ref).abs().max() < 1e-5


# ------------------------------------------------------------------- 2. agreement on every option


def _options(rank, kind):
    """ring_attn_func options on ``rank``: rank 1 differs from rank 0 in ``kind``."""
    other = rank == 1
    rope = RoPEConfig(16)
    opts = {"rope": rope}
    if kind == "theta":
        opts["rope"] = RoPEConfig(16, theta=5e5 if other else 1e4)
    elif kind == "interleaved":
        opts["rope"] = RoPEConfig(16, interleaved=other)
    elif kind == "precision":
        opts["rope"] = RoPEConfig(16, precision="hf" if other else "exact")
    elif kind == "scaling":
        opts["rope"] = RoPEConfig(16, scaling={"rope_type": "linear", "factor": 2.0 if other else 4.0})
    elif kind == "partial_rotary_factor":
        opts["rope"] = RoPEConfig(16, partial_rotary_factor=0.5 if other else 1.0)
    elif kind == "rope":
        opts["rope"] = None if other else rope
    elif kind == "backend":
        opts["backend"] = "auto" if other else "reference"
    elif kind == "deterministic":
        opts["deterministic"] = other
    elif kind == "dkv_dtype":
        opts["dkv_dtype"] = torch.float32 if other else None
    elif kind == "softmax_scale":
        opts["softmax_scale"] = 0.5 if other else None
    elif kind == "causal":
        opts["causal"] = not other
    elif kind == "layout":
        opts["layout"] = "stripe" if other else "zigzag"
    elif kind == "cu_seqlens":
        opts["cu_seqlens"] = torch.tensor([0, 5, 16] if other else [0, 7, 16])
    return opts


# kind -> (the name in the message, rank 0's value, rank 1's value), as the user wrote them
DISAGREEMENTS = {
    "theta": ("rope.theta", "10000.0", "500000.0"),
    "interleaved": ("rope.interleaved", "False", "True"),
    "precision": ("rope.precision", "'exact'", "'hf'"),
    "scaling": (
        "rope.scaling",
        '{"factor": 4.0, "rope_type": "linear"}',
        '{"factor": 2.0, "rope_type": "linear"}',
    ),
    "partial_rotary_factor": ("rope.partial_rotary_factor", "1.0", "0.5"),
    "rope": ("rope", "a RoPEConfig", "None"),
    "backend": ("backend", "'reference'", "'auto' (runs '"),
    "deterministic": ("deterministic", "False", "True"),
    "dkv_dtype": ("dkv_dtype", "torch.bfloat16", "torch.float32"),
    "softmax_scale": ("softmax_scale", "None", "0.5"),
    "causal": ("causal", "True", "False"),
    "layout": ("layout", "'zigzag'", "'stripe'"),
    "dtype": ("dtype", "torch.bfloat16", "torch.float32"),
    "cu_seqlens": ("cu_seqlens", "[0, 7, 16]", "[0, 5, 16]"),
}


@pytest.mark.parametrize("kind", list(DISAGREEMENTS))
def test_ranks_disagreeing_on_any_option_raise_naming_option_rank_and_values(kind):
    name, first, theirs = DISAGREEMENTS[kind]
    q, k, v, _ = _inputs(1, 8, 2, 1, 16)
    comms = fake_ring(2, timeout=20.0)

    def rank_fn(comm):
        dtype = torch.float32 if kind == "dtype" and comm.rank == 1 else torch.bfloat16
        try:
            ring_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), group=comm, **_options(comm.rank, kind))
        except ValueError as exc:
            return str(exc)
        return None

    for message in run_fake_ring(rank_fn, comms):
        assert message is not None, f"ranks disagreeing on {kind} ran to completion"
        assert message.startswith(f"ranks disagree on {name}: rank 0 has {first}, rank 1 has {theirs}"), (
            message
        )
    for comm in comms:  # decided before any K/V moved
        assert all(entry[0] == "all_gather" for entry in comm.log)
        assert comm.stats.totals == {}


def test_agreeing_ranks_need_one_small_all_gather():
    q, k, v, _ = _inputs(1, 8, 2, 1, 16)
    comms = fake_ring(3)
    run_fake_ring(lambda c: ring_attn_func(q, k, v, group=c, rope=RoPEConfig(16), softmax_scale=0.3), comms)
    for comm in comms:
        gathers = [entry for entry in comm.log if entry[0] == "all_gather"]
        assert len(gathers) == 1 and gathers[0][4] == (7,)  # seven ints, whatever the options


# ------------------------------------------------------------------- agreement once per communicator


def _gathers(comms) -> list[int]:
    return [sum(entry[0] == "all_gather" for entry in comm.log) for comm in comms]


def test_agreement_is_cached_per_communicator_and_redone_when_the_call_changes(monkeypatch):
    """Before: every call ran one all_gather (a barrier) and a .tolist() (a host sync) to agree.
    Now: the first call with given shapes and options agrees; identical calls after it do no collective
    and skip the handshake (its host sync) entirely; a changed option or shape agrees again."""
    handshakes = []
    real = handshake._handshake
    monkeypatch.setattr(handshake, "_handshake", lambda *a, **kw: handshakes.append(1) or real(*a, **kw))
    q, k, v, _ = _inputs(1, 8, 2, 1, 16)
    comms = fake_ring(3)

    def call(q=q, k=k, v=v, **options):
        before = _gathers(comms), len(handshakes)
        run_fake_ring(lambda c: ring_attn_func(q, k, v, group=c, rope=RoPEConfig(16), **options), comms)
        after = _gathers(comms)
        return [a - b for a, b in zip(after, before[0], strict=True)], len(handshakes) - before[1]

    assert call() == ([1, 1, 1], 3)  # first call: one all_gather per rank
    for _ in range(3):
        assert call() == ([0, 0, 0], 0)  # steady state: no collective, no handshake
    assert call(softmax_scale=0.3) == ([1, 1, 1], 3)  # a changed option re-agrees
    assert call(softmax_scale=0.3) == ([0, 0, 0], 0)
    assert call(causal=False, softmax_scale=0.3) == ([1, 1, 1], 3)
    assert call(q=q[:, :5], k=k[:, :5], v=v[:, :5]) == ([1, 1, 1], 3)  # a changed shape too
    assert call(q=q[:, :5], k=k[:, :5], v=v[:, :5]) == ([0, 0, 0], 0)
    docs = torch.tensor([0, 9, 24])
    assert call(cu_seqlens=docs) == ([1, 1, 1], 3)
    assert call(cu_seqlens=torch.tensor([0, 9, 24])) == ([0, 0, 0], 0)  # by value
    assert call(cu_seqlens=torch.tensor([0, 10, 24])) == ([1, 1, 1], 3)
    # Explicit positions are data: gathered on every call, the agreement itself still cached.
    positions = torch.arange(8) * 2
    assert call(positions=positions) == ([2, 2, 2], 3)
    assert call(positions=positions + 1) == ([1, 1, 1], 0)
    monkeypatch.setenv("RINGATTN_RING_DEBUG", "1")  # debug mode: agree on every call
    assert call() == ([1, 1, 1], 3)
    assert call() == ([1, 1, 1], 3)


def test_cached_agreement_gives_the_same_numbers():
    q, k, v, dout = _inputs(1, 8, 2, 1, 16)
    comms = fake_ring(3)

    def rank_fn(comm):
        q_l, k_l, v_l = (shard(t, 1, comm).requires_grad_() for t in (q, k, v))
        out = ring_attn_func(q_l, k_l, v_l, group=comm, rope=RoPEConfig(16))
        out.backward(shard(dout, 1, comm))
        return [t.detach().clone() for t in (out, q_l.grad, k_l.grad, v_l.grad)]

    first = run_fake_ring(rank_fn, comms)
    again = run_fake_ring(rank_fn, comms)
    assert all(comm._agreed is not None for comm in comms)
    for mine, theirs in zip(first, again, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b)


def test_a_lone_rank_changing_its_call_after_agreement_fails_instead_of_mixing_calls(monkeypatch):
    """After an agreement, a rank that alone changes its call misses the cache and runs the handshake
    while the others move K/V: the ring fails (it never runs with mixed calls). In debug mode every
    call agrees, so the error is the readable disagreement."""
    q, k, v, _ = _inputs(1, 8, 2, 1, 16)
    comms = fake_ring(2, timeout=3.0)
    run_fake_ring(lambda c: ring_attn_func(q, k, v, group=c), comms)

    def lone(comm):
        ring_attn_func(q, k, v, group=comm, softmax_scale=0.3 if comm.rank == 1 else None)

    with pytest.raises((RingError, ValueError)):
        run_fake_ring(lone, comms)
    comms = fake_ring(2, timeout=3.0)
    run_fake_ring(lambda c: ring_attn_func(q, k, v, group=c), comms)
    monkeypatch.setenv("RINGATTN_RING_DEBUG", "1")
    with pytest.raises(ValueError, match="ranks disagree on softmax_scale: rank 0 has None, rank 1 has 0.3"):
        run_fake_ring(lone, comms)


def test_two_level_pair_groups_share_one_communicator_and_its_agreement():
    inner, outer = fake_ring(2), fake_ring(2)
    first = ring_comm((inner[0], outer[0]))
    assert ring_comm((inner[0], outer[0])) is first and ring_comm([inner[0], outer[0]]) is first
    assert first.overlap is False and first._agreed is None


# ------------------------------------------------------------------------------------- NCCL devices


def test_nccl_device_check_names_both_devices_and_the_fix():
    cuda = torch.device
    _check_nccl_device("nccl", cuda("cuda", 0), 0)
    _check_nccl_device("nccl", cuda("cuda", 3), 3)
    _check_nccl_device("gloo", cuda("cpu"), None)  # other backends are not checked
    _check_nccl_device("gloo", cuda("cuda", 1), 0)
    for device, current, shown in (
        (cuda("cuda", 1), 0, "cuda:0"),
        (cuda("cuda", 0), 5, "cuda:5"),
        (cuda("cpu"), 0, "cuda:0"),
        (cuda("cuda", 0), None, "none"),
    ):
        with pytest.raises(ValueError) as info:
            _check_nccl_device("nccl", device, current)
        message = str(info.value)
        assert f"tensors are on {device}" in message and f"current CUDA device is {shown}" in message
        assert "torch.cuda.set_device(local_rank)" in message


def test_handshake_gathers_on_the_inputs_device(monkeypatch):
    """The agreement's tensors go to the call's tensors' device (not torch.cuda.current_device())."""
    devices = []
    real = FakeRingComm.all_gather

    def all_gather(self, t, timeout=None):
        devices.append(t.device)
        return real(self, t, timeout)

    monkeypatch.setattr(FakeRingComm, "all_gather", all_gather)
    q, k, v, _ = _inputs(1, 8, 2, 1, 16)
    comms = fake_ring(2)
    with pytest.raises(ValueError, match="ranks disagree on softmax_scale"):
        run_fake_ring(lambda c: ring_attn_func(q, k, v, group=c, softmax_scale=0.2 + 0.1 * c.rank), comms)
    assert len(devices) >= 4 and set(devices) == {q.device}  # ints, then the descriptions (mismatch)


# ------------------------------------------------------------------------------ gloo jobs, exit time


# ---------------------------------------------------------------------- 3. exiting after a timeout


def _silent_peer_job(rank, world_size, timeout):
    if rank == 1:  # alive but silent: never calls
        time.sleep(100)
        os._exit(0)
    q, k, v, _ = _inputs(1, 8, 2, 1, 16)
    out = {}
    start = time.time()
    try:
        ring_attn_func(q, k, v, timeout=timeout)
    except RingTimeoutError as exc:
        out["error"] = (time.time() - start, str(exc))
    start = time.time()
    try:
        ring_attn_func(q, k, v, timeout=timeout)  # the group is unusable now: refused at once
    except RingError as exc:
        out["again"] = (time.time() - start, type(exc).__name__, str(exc))
    out["error_at"] = time.time()
    return out


def test_after_a_ring_timeout_the_process_exits_promptly():
    """Before the fix the survivor raised at the timeout, then could not exit until the silent peer
    did (here 100 s) or the group's own timeout (here 120 s; gloo's default is 30 min)."""
    timeout = 3.0
    results, exits = launch_watched(_silent_peer_job, 2, timeout, watch=[0], hard_exit=False, timeout=60.0)
    res = results[0]
    assert res is not None and "error" in res, res
    elapsed, message = res["error"]
    assert 0 in exits, f"the survivor never exited (raised after {elapsed:.2f} s: {message})"
    exit_s = exits[0][0] - res["error_at"]
    print(
        f"silent peer: RingTimeoutError after {elapsed:.2f} s (timeout {timeout:g} s), exit {exit_s:.2f} s later"
    )
    assert exit_s < 20.0, f"the survivor exited {exit_s:.1f} s after its error"
    assert exits[0][1] == 0, f"the survivor's exit code is {exits[0][1]}"  # no abort in teardown
    assert timeout <= elapsed < timeout + 10, f"raised after {elapsed:.2f} s"
    assert "within 3 s" in message and "unusable" in message and "destroy it" in message, message
    again_s, again_type, again = res["again"]
    assert again_type == "RingError" and again_s < 1.0 and "unusable after an earlier timeout" in again


# ---------------------------------------------------------------------- 4. naming the dead peer


def _dead_peer_job(rank, world_size):
    comm = DistRingComm(dist.group.WORLD, timeout=20.0)
    # First, over gloo: a disagreement is found from the digests, and the descriptions gathered as bytes.
    q, k, v, _ = _inputs(1, 4, 2, 1, 16)
    try:
        ring_attn_func(q, k, v, group=comm, rope=RoPEConfig(16, theta=5e5 if rank == 2 else 1e4))
        disagree = None
    except ValueError as exc:
        disagree = str(exc)
    original = comm._exchange

    def exchange(sends, recvs, record, t):
        if record.label == "backward kv" and record.hop == 1:
            if rank == 1:
                os._exit(1)  # dies between forward and backward
            time.sleep(2.0)  # the survivors post after the death is known: the post itself fails
        return original(sends, recvs, record, t)

    comm._exchange = exchange
    q, k, v, dout = _inputs(1, 8 * world_size, 2, 1, 16)
    q_l, k_l, v_l = (shard(t, 1, comm).requires_grad_() for t in (q, k, v))
    out = ring_attn_func(q_l, k_l, v_l, group=comm)
    try:
        out.backward(shard(dout, 1, comm))
    except RingError as exc:
        return {"message": str(exc), "disagree": disagree}
    return {"message": None, "disagree": disagree}


def test_errors_after_a_kill_name_the_dead_rank():
    """Before the fix a failed post was blamed on the next rank: rank 2, whose previous rank died,
    said it failed to post an exchange with rank 0 (alive)."""
    results, _ = launch_watched(_dead_peer_job, 3, watch=range(3), timeout=120.0)
    assert results[1] is None
    for rank in (0, 2):
        assert results[rank]["disagree"].startswith(
            "ranks disagree on rope.theta: rank 0 has 10000.0, rank 2 has 500000.0"
        ), results[rank]["disagree"]
    for rank in (2, 0):
        message = results[rank]["message"]
        assert message is not None, f"rank {rank} did not raise"
        print(f"rank {rank}: {message}")
        # Rank 0 sends to rank 1, rank 2 receives from it: both name rank 1, and only rank 1.
        direction = "send to" if rank == 0 else "receive from"
        # The post fails (the survivors posted after the death was known); should the closed
        # connection be noticed only later, the wait fails instead: either way rank 1 is named.
        assert re.search(
            rf"rank {rank} of 3 failed to (post the )?{direction} rank 1 on hop 1 \(backward kv\)", message
        )
        assert "rank 0 on hop" not in message and "rank 2 on hop" not in message
        assert "within" not in message  # it failed at once, it did not time out


# ----------------------------------------------------------------------------- 5. memory per call


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _retained_bytes(*roots) -> int:
    """Bytes of the Python objects reachable from ``roots`` (not through modules, classes or code)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
    seen, stack, total = set(), list(roots), 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def test_ring_calls_do_not_grow_memory(monkeypatch):
    """What a communicator keeps stays bounded, however many calls it serves.

    Before the fix each call added 4 HopRecords per rank (kept up to 100,000 per communicator, for
    the bench's byte counts) and 9 fake-log entries per rank (kept forever): the communicators of a
    W=2 fake ring grew by about 4 KB per call, and gloo processes' RSS by about 1 KB per call.
    """
    monkeypatch.setattr(fake_comm, "LOG_LIMIT", 16, raising=False)  # reach the fake log's bound early
    q, k, v, dout = _inputs(1, 8, 2, 1, 16)
    comms = fake_ring(2)

    def rank_fn(comm):
        q_l, k_l, v_l = (shard(t, 1, comm).requires_grad_() for t in (q, k, v))
        ring_attn_func(q_l, k_l, v_l, group=comm, rope=RoPEConfig(16)).backward(shard(dout, 1, comm))

    for _ in range(70):  # past every bound: 70 calls x 4 exchanges > 256 records
        run_fake_ring(rank_fn, comms)
    gc.collect()
    kept, rss = _retained_bytes(comms), _rss()
    calls = 100
    for _ in range(calls):
        run_fake_ring(rank_fn, comms)
    gc.collect()
    grown, rss_grown = _retained_bytes(comms) - kept, _rss() - rss
    print(
        f"{calls} calls: communicators {kept} B -> {grown:+} B, RSS {rss_grown:+} B ({rss_grown / calls:+.0f} B/call)"
    )
    assert grown < 16 * 1024, f"the communicators grew by {grown} B over {calls} calls"
    assert rss_grown < 4 * 1024 * 1024, f"RSS grew by {rss_grown} B over {calls} calls"
    for comm in comms:
        assert len(comm.stats.records) <= RingStats.MAX_RECORDS
        assert len(comm.stats.totals) == 4  # (label, hop): forward kv 1, backward kv 1, backward dkv 1-2
        # The totals stay exact past the records' bound: 170 calls of one forward hop each.
        assert comm.stats.bytes_per_hop("forward") == {1: 170 * 2 * 1 * 4 * 1 * 16 * 4}
