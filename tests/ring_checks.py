"""Helpers shared by the ring tests (fake communicator, gloo, two-level): full-sequence inputs, the
fp64 reference and the peer on the full sequence, one rank's run, reassembly of every rank's shard,
and spawned gloo jobs.

The reference is ``ringattn.reference`` and the peer is ``attention_checks.peer_attention`` (plain
torch in the dtype under test), both on the whole sequence with the same positions and documents.
"""

import math
import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attention_checks import peer_results, reference_results
from harness import GRAD_FACTOR, OUTPUT_FACTOR, assert_within_peer_error, install_nan_poisoning

from ringattn.ring import fake_ring, ring_attn_func, run_fake_ring, shard, shard_indices, shard_pieces

NAMES = ("out", "dq", "dk", "dv")


def make_inputs(B, S, Hq, Hkv, D, dtype, seed=0):
    """q, k, v, dout of the full sequence: standard normal drawn in fp64, then cast."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, S, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, S, Hq, D))
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _spec(
    *, causal, cu_seqlens=None, rope=None, positions=None, softmax_scale=None, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0, cp_mode="ring",
):  # fmt: skip
    """The ring's options on the full sequence, as ``attention_ref``/``peer_attention`` take them
    (``cp_mode`` changes how the ring runs, not what it computes)."""
    return dict(
        causal=causal, cu_seqlens=cu_seqlens, rope=rope, q_positions=positions, k_positions=positions,
        softmax_scale=softmax_scale, window=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, dropout_seed=dropout_seed,
    )  # fmt: skip


def fp8_roundtrip(x, W, layout, cu_seqlens=None):
    """x (B, S, H, D) as the FP8 wire delivers it, written from the wire's definition: e4m3 with one
    scale (largest magnitude / 448) per (batch, head) over each rank's piece of the layout."""
    out = torch.empty_like(x)
    for runs in shard_pieces(x.shape[1], W, layout, cu_seqlens):
        for start, stride, length in (run for run in runs if run[2]):
            rows = start + stride * torch.arange(length)
            piece = x[:, rows].float()
            amax = piece.abs().amax(dim=(1, 3), keepdim=True)
            scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
            out[:, rows] = ((piece / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
    return out


def reference(q, k, v, dout, **options):
    """fp64 out, lse and gradients of the full sequence (the spec), by name."""
    return reference_results(q, k, v, dout, **_spec(**options))


def peer(q, k, v, dout, **options):
    """Plain torch in the inputs' dtype on the full sequence: the accuracy that dtype allows."""
    return peer_results(q, k, v, dout, **_spec(**options))


def check_against(ours, ref, peer_result, names=NAMES, lse=True):
    for name in names:
        factor = OUTPUT_FACTOR if name == "out" else GRAD_FACTOR
        assert_within_peer_error(ours[name], ref[name], peer_result[name], factor=factor, name=name)
    if lse:
        assert_within_peer_error(ours["lse"], ref["lse"], peer_result["lse"], name="lse", eps=1e-5)


def local_run(comm, q, k, v, dout, layout, positions=None, **kwargs):
    """One rank's forward + backward on its shard; returns its out, lse, dq, dk, dv."""
    cu = kwargs.get("cu_seqlens")
    q_l, k_l, v_l = (shard(t, 1, comm, layout, cu).requires_grad_() for t in (q, k, v))
    if positions is not None:
        kwargs["positions"] = shard(positions, positions.dim() - 1, comm, layout, cu)
    out, lse = ring_attn_func(q_l, k_l, v_l, group=comm, layout=layout, return_lse=True, **kwargs)
    out.backward(shard(dout, 1, comm, layout, cu))
    return {"out": out.detach(), "lse": lse, "dq": q_l.grad, "dk": k_l.grad, "dv": v_l.grad}


def assemble(per_rank, seq_len, layout, cu_seqlens=None):
    """Full-sequence tensors from every rank's shard, in NaN-filled buffers (unwritten rows fail)."""
    W = len(per_rank)
    index = shard_indices(seq_len, W, layout, cu_seqlens=cu_seqlens)
    full = {}
    for name in (*NAMES, "lse"):
        dim = 2 if name == "lse" else 1
        shape = list(per_rank[0][name].shape)
        shape[dim] = seq_len
        buf = torch.full(shape, math.nan, dtype=per_rank[0][name].dtype)
        for rank, res in enumerate(per_rank):
            assert res[name].shape[dim] == len(index[rank]), f"{name} of rank {rank} has a wrong length"
            buf.index_copy_(dim, index[rank], res[name])
        full[name] = buf
    return full


def fake_run(W, q, k, v, dout, layout, timeout=60.0, **kwargs):
    """Every rank of an in-process fake ring of W; the assembled results and the communicators."""
    comms = fake_ring(W, timeout=timeout)
    per_rank = run_fake_ring(lambda c: local_run(c, q, k, v, dout, layout, **kwargs), comms)
    return assemble(per_rank, q.shape[1], layout, kwargs.get("cu_seqlens")), comms


# --------------------------------------------------------------------------------- spawned gloo jobs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(target, rank, world_size, port, out_dir, args, hard_exit=True, group_timeout=60):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    install_nan_poisoning()  # a spawned rank never runs conftest
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=group_timeout),
        )  # fmt: skip
        result = target(rank, world_size, *args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    if result is not None:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    if hard_exit:
        os._exit(0)  # skip teardown: a group whose peers died can block in destroy
    # Otherwise a normal interpreter exit (atexit, process group teardown): what a user's script gets.


def _results(out_dir, world_size) -> list:
    results = []
    for r in range(world_size):
        path = os.path.join(out_dir, f"rank{r}.pkl")
        results.append(pickle.load(open(path, "rb")) if os.path.exists(path) else None)
    for r, res in enumerate(results):
        assert not (isinstance(res, dict) and "crash" in res), f"rank {r} crashed:\n{res['crash']}"
    return results


def launch(target, world_size, *args, timeout=150.0):
    """Run ``target(rank, world_size, *args)`` in ``world_size`` spawned processes; results by rank.

    Processes still running after ``timeout`` seconds are killed and the test fails.
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_entry, args=(target, r, world_size, port, out_dir, args), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        assert not hung, f"ranks {hung} still running after the hard timeout of {timeout:g} s"
        return _results(out_dir, world_size)


def launch_watched(target, world_size, *args, watch, hard_exit=True, timeout=120.0):
    """``launch`` for fault trials: (results by rank, exits). ``watch``: ranks whose exit
    (``time.time()``, exit code) is recorded; once they have all exited the others are killed, and
    every process still running after ``timeout`` seconds is. ``hard_exit=False``: ranks leave
    through a normal interpreter exit (atexit, group teardown), as a user's script would."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    exits: dict[int, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_entry, args=(target, r, world_size, port, out_dir, args, hard_exit, 120), daemon=True)
            for r in range(world_size)
        ]  # fmt: skip
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(r not in exits for r in watch):
            for r in watch:
                if r not in exits and not procs[r].is_alive():
                    exits[r] = (time.time(), procs[r].exitcode)
            time.sleep(0.02)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        return _results(out_dir, world_size), exits
