"""Ring scheduler over torch.distributed gloo: spawned processes on 127.0.0.1, each job under a hard timeout.

Process start-up is the slow part, so one job runs many checks: 4 processes carry rings of W = 4
(the world), W = 3 (ranks 1-3, so group and global ranks differ) and W = 2 (ranks 0 and 3).
"""

import math
import os
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from ring_checks import NAMES, check_against, fp8_roundtrip, launch, local_run, make_inputs, peer, reference
from torch.distributed.device_mesh import init_device_mesh

from ringattn import RoPEConfig
from ringattn.ring import DistRingComm, RingError, RingTimeoutError, ring_attn_func, ring_comm, unshard

LAYOUTS = ("zigzag", "stripe", "contiguous")


# ------------------------------------------------------------------------------------------ correctness


def _cases(W):
    docs = torch.tensor([0, 5, 5, 12, 21, 29])
    return [
        (
            "causal-gqa-rope-docs-S29",
            dict(
                S=29,
                Hq=4,
                Hkv=2,
                dtype=torch.float32,
                causal=True,
                rope=RoPEConfig(16, theta=45.2e9),
                cu_seqlens=docs,
            ),
        ),  # fmt: skip
        ("full-mha-S24", dict(S=24, Hq=2, Hkv=2, dtype=torch.float32, causal=False)),
        (
            "causal-rope-padding-rank",
            dict(S=W - 1, Hq=2, Hkv=1, dtype=torch.float32, causal=True, rope=RoPEConfig(16)),
        ),  # fmt: skip
    ]


def _check_ring(comm, failures, name, layout, case, **extra):
    case = dict(case, **extra)
    S, dtype = case.pop("S"), case.pop("dtype")
    q, k, v, dout = make_inputs(2, S, case.pop("Hq"), case.pop("Hkv"), 16, dtype, seed=S)
    before = [t.clone() for t in (q, k, v, dout)]
    try:
        local = local_run(comm, q, k, v, dout, layout, **case)
        cu = case.get("cu_seqlens")
        full = {n: unshard(local[n], 2 if n == "lse" else 1, comm, layout, cu) for n in (*NAMES, "lse")}
        check_against(full, reference(q, k, v, dout, **case), peer(q, k, v, dout, **case))
        assert all(torch.equal(t, b) for t, b in zip((q, k, v, dout), before, strict=True)), "inputs changed"
    except AssertionError as exc:
        failures.append(f"W={comm.world_size} {name} {layout}: {exc}")


def _correctness_job(rank, world_size, ring_sizes):
    groups = {world_size: dist.group.WORLD}
    if 3 in ring_sizes:
        groups[3] = dist.new_group([1, 2, 3])
    if 2 in ring_sizes:
        groups[2] = dist.new_group([0, 3])
    failures, checks = [], 0
    for W in ring_sizes:
        if dist.get_rank(groups[W]) < 0:
            continue
        comm = ring_comm(groups[W])
        assert comm.world_size == W
        for layout in LAYOUTS:
            for name, case in _cases(W):
                _check_ring(comm, failures, name, layout, case)
                checks += 1
        docs_case = _cases(W)[0][1]
        for layout, mode in (("doc_zigzag", "ring"), ("doc_zigzag", "allgather"), ("stripe", "allgather")):
            _check_ring(comm, failures, f"docs-{mode}", layout, docs_case, cp_mode=mode)
            checks += 1
        # FP8 K/V on the wire (uint8 messages over gloo): attention on the dequantized K/V exactly.
        case = dict(docs_case)
        S, cu = case.pop("S"), case["cu_seqlens"]
        q, k, v, dout = make_inputs(2, S, case.pop("Hq"), case.pop("Hkv"), 16, case.pop("dtype"), seed=S)
        k8, v8 = fp8_roundtrip(k, W, "doc_zigzag", cu), fp8_roundtrip(v, W, "doc_zigzag", cu)
        local = local_run(comm, q, k, v, dout, "doc_zigzag", wire_dtype=torch.float8_e4m3fn, **case)
        full = {n: unshard(local[n], 2 if n == "lse" else 1, comm, "doc_zigzag", cu) for n in (*NAMES, "lse")}
        try:
            check_against(full, reference(q, k8, v8, dout, **case), peer(q, k8, v8, dout, **case))
        except AssertionError as exc:
            failures.append(f"W={W} fp8 wire: {exc}")
        checks += 1
        scores = dict(window_size=(6, 0), softcap=2.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
        _check_ring(comm, failures, "docs-window-softcap-alibi", "doc_zigzag", docs_case, **scores)
        checks += 1
        _check_ring(comm, failures, "bf16-causal-gqa-rope", "zigzag",
                    dict(S=4 * W + 1, Hq=4, Hkv=2, dtype=torch.bfloat16, causal=True, rope=RoPEConfig(16)))  # fmt: skip
        checks += 1
        # Bytes on the wire per hop: 2 * B * S_local * Hkv * D * element size.
        comm.stats.clear()
        q, k, v, _ = make_inputs(2, 2, 4, 2, 16, torch.bfloat16)  # every rank's shard: 2 of 2W tokens
        ring_attn_func(q, k, v, group=groups[W])
        expected = {h: 2 * 2 * 2 * 2 * 16 * 2 for h in range(1, W)}
        if comm.stats.bytes_per_hop("forward") != expected:
            failures.append(f"W={W} bytes per hop {comm.stats.bytes_per_hop('forward')} != {expected}")
        checks += 1
        if W == world_size:  # a 1-D DeviceMesh is the same ring as its group
            mesh = init_device_mesh("cpu", (world_size,))
            q, k, v, _ = make_inputs(1, 3, 2, 1, 16, torch.float32)
            if not torch.equal(ring_attn_func(q, k, v, group=mesh), ring_attn_func(q, k, v, group=groups[W])):
                failures.append("DeviceMesh and ProcessGroup results differ")
            checks += 1
    usp = _usp_checks(rank) if world_size == 4 else {}
    return {"failures": failures, "checks": checks, **usp, **(_error_checks(rank) if 4 in ring_sizes else {})}


def _usp_checks(rank):
    """Ulysses x ring on a 2 x 2 mesh: rank o * 2 + i is member i of Ulysses group o and position o of
    ring i; each rank checks its own tokens against the fp64 reference of the whole sequence."""
    from ringattn.ring import shard_indices, usp_attn_func, usp_shard

    ulysses = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    ring = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    S, cu = 32, torch.tensor([0, 11, 11, 32])
    q, k, v, dout = make_inputs(2, S, 4, 1, 16, torch.float32, seed=7)  # one KV head: replicated to both
    opts = dict(causal=True, cu_seqlens=cu, rope=RoPEConfig(16))
    parts = [usp_shard(t, 1, ulysses, ring, "doc_zigzag", cu).requires_grad_() for t in (q, k, v)]
    out, lse = usp_attn_func(*parts, ulysses_group=ulysses, ring_group=ring, layout="doc_zigzag",
                             return_lse=True, **opts)  # fmt: skip
    out.backward(usp_shard(dout, 1, ulysses, ring, "doc_zigzag", cu))
    mine = shard_indices(S, 2, "doc_zigzag", cu_seqlens=cu)[rank // 2].tensor_split(2)[rank % 2]
    ref, peer_result = reference(q, k, v, dout, **opts), peer(q, k, v, dout, **opts)
    ours = {"out": out.detach(), "dq": parts[0].grad, "dk": parts[1].grad, "dv": parts[2].grad, "lse": lse}
    try:
        check_against(
            ours,
            {n: t[:, :, mine] if n == "lse" else t[:, mine] for n, t in ref.items()},
            {n: t[:, :, mine] if n == "lse" else t[:, mine] for n, t in peer_result.items()},
        )
    except AssertionError as exc:
        return {"usp": f"rank {rank}: {exc}"}
    return {"usp": "ok"}


def _error_checks(rank):
    """Bad input on the world group, after the correctness checks (one spawn serves both)."""
    out = {}
    q, k, v, _ = make_inputs(1, 4, 4, 2, 16, torch.float32)
    # A local error raises at once (a rank that communicated would wait for peers that never come).
    start = time.monotonic()
    try:
        ring_attn_func(q, k, v[:, :, :1])
    except ValueError as exc:
        out["local"] = (str(exc), time.monotonic() - start)
    # Ranks disagreeing on a shape: every rank raises the same clear error.
    q, k, v, _ = make_inputs(1, 4, 8 if rank == 1 else 4, 2, 16, torch.float32)
    ring_comm().stats.clear()
    try:
        ring_attn_func(q, k, v)
    except ValueError as exc:
        out["disagree"] = str(exc)
    out["records"] = len(ring_comm().stats.records)
    return out


def _expected_checks(rank, ring_sizes):
    members = {4: {0, 1, 2, 3}, 3: {1, 2, 3}, 2: {0, 3}, 8: set(range(8))}
    # 3 layouts x 3 cases, 5 document/mode/wire/score checks, bf16, bytes, and the mesh check on the world
    return sum(3 * 3 + 5 + 2 + (W == ring_sizes[0]) for W in ring_sizes if rank in members[W])


_RING_SIZES = (4, 3, 2)


@pytest.fixture(scope="module")
def gloo_world():
    """One spawned job of 4 processes serves the correctness and bad-input tests."""
    return launch(_correctness_job, 4, _RING_SIZES)


def test_gloo_rings_w2_w3_w4_match_fp64_reference(gloo_world):
    ring_sizes = _RING_SIZES
    for rank, res in enumerate(gloo_world):
        assert res is not None, f"rank {rank} wrote no result"
        assert res["failures"] == [], "\n".join(res["failures"])
        assert res["checks"] == _expected_checks(rank, ring_sizes)
        assert res["usp"] == "ok"  # Ulysses x ring, 2 x 2


def test_gloo_bad_input_errors_and_disagreeing_ranks(gloo_world):
    for res in gloo_world:
        message, elapsed = res["local"]
        assert "same shape" in message and elapsed < 1.0
        assert "ranks disagree on Hq: rank 0 has 4, rank 1 has 8" in res["disagree"]
        assert res["records"] == 0  # no K/V exchange was posted


@pytest.mark.slow
def test_gloo_ring_w8_matches_fp64_reference():
    results = launch(_correctness_job, 8, (8,), timeout=400.0)
    for rank, res in enumerate(results):
        assert res["failures"] == [], "\n".join(res["failures"])
        assert res["checks"] == _expected_checks(rank, (8,))


# ------------------------------------------------------------------------- errors, faults, timeouts


def _fault_job(rank, world_size, mode, timeout, marker):
    comm = DistRingComm(dist.group.WORLD, timeout=timeout)
    if rank == 1:
        original = comm._exchange

        def misbehave(sends, recvs, record, t):
            if mode == "die":
                os._exit(1)  # the process dies mid-forward, on its first hop
            deadline = time.monotonic() + timeout + 30
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.05)  # alive but silent until a survivor has given up
            return original(sends, recvs, record, t)

        comm._exchange = misbehave
    q, k, v, _ = make_inputs(1, 8 * world_size, 2, 1, 16, torch.float32)
    start = time.monotonic()
    try:
        ring_attn_func(q[:, :8], k[:, :8], v[:, :8], group=comm)
    except RingError as exc:
        elapsed = time.monotonic() - start
        open(marker, "w").close()
        return {"type": type(exc).__name__, "message": str(exc), "elapsed": elapsed}
    return {"type": None, "elapsed": time.monotonic() - start}


def test_gloo_dead_peer_makes_survivors_raise_within_timeout_plus_10s(tmp_path):
    timeout = 20.0
    results = launch(_fault_job, 3, "die", timeout, tmp_path / "given-up", timeout=120.0)
    assert results[1] is None  # rank 1 died without a result
    for rank in (0, 2):
        res = results[rank]
        assert res["type"] is not None, f"rank {rank} did not raise"
        assert res["elapsed"] < timeout + 10, res
        assert re.search(rf"rank {rank} of 3 failed to (send to|receive from) rank \d on hop \d \(forward kv\)",
                         res["message"]), res["message"]  # fmt: skip
    # Rank 1 is rank 2's previous peer: its pending receive fails at once.
    assert "failed to receive from rank 1 on hop 1 (forward kv)" in results[2]["message"]


def test_gloo_silent_peer_times_out_naming_peer_and_hop(tmp_path):
    timeout = 3.0
    results = launch(_fault_job, 2, "silent", timeout, tmp_path / "given-up", timeout=90.0)
    res = results[0]
    assert res["type"] == RingTimeoutError.__name__, res
    # With W = 2 rank 1 is both peers; whichever of the send and receive is waited on first times out.
    assert re.search(r"rank 0 of 2 failed to (send to|receive from) rank 1 on hop 1 \(forward kv\) within 3 s",
                     res["message"]), res["message"]  # fmt: skip
    assert timeout <= res["elapsed"] < timeout + 10
    assert math.isfinite(res["elapsed"])


# ----------------------------------------------------------------- NCCL on one GPU (make gpu-check)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not dist.is_nccl_available(), reason="needs NCCL")
def test_nccl_group_of_one_matches_fp64_reference(tmp_path):
    """ring_attn_func over a real NCCL process group of one (FileStore): the communicator, the device
    check and the collective path on CUDA tensors, vs the fp64 reference."""
    import ringattn.ring.dist_comm as dist_comm

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        comm = ring_comm()
        assert isinstance(comm, DistRingComm) and comm.backend == "nccl" and comm.world_size == 1
        comm._check_device(device)  # the current device passes
        if torch.cuda.device_count() > 1:
            other = torch.device("cuda", (device.index + 1) % torch.cuda.device_count())
            with pytest.raises(ValueError, match="torch.cuda.set_device"):
                comm._check_device(other)
        gathered = comm.all_gather(torch.arange(3, device=device))
        assert gathered.device == device and gathered.cpu().tolist() == [[0, 1, 2]]
        case = dict(causal=True, rope=RoPEConfig(16))
        q, k, v, dout = make_inputs(2, 37, 4, 2, 16, torch.float32)
        ours = local_run(
            comm, *(t.to(device) for t in (q, k, v, dout)), "zigzag", backend="reference", **case
        )
        ours = {name: t.cpu() for name, t in ours.items()}
        check_against(ours, reference(q, k, v, dout, **case), peer(q, k, v, dout, **case))
    finally:
        for key in [key for key in dist_comm._COMMS if key[0] is dist.group.WORLD]:
            del dist_comm._COMMS[key]
        dist.destroy_process_group()
