"""`python -m ringattn.multinode --plan plan.json`: a multi-node launch rehearsal of ring attention.

Every process of a launch (torchrun's, or SLURM's ``srun``) runs this module. It reads the rings the
planner recommended (``ringattn-topology plan ... --json plan.json``), builds this process's
communicator with ``ringattn.ring.comm_from_rings`` (a two-level ring, inner ring per node and outer
ring across nodes, when the plan says so), then runs ring attention forward and backward on one
sequence per ring and checks every rank's shard of the output and of dq, dk, dv against the fp64
reference under the project's tolerance rule (``ringattn.testing``: the ring's error at most a factor
of one device's error in the same dtype), and times a few iterations (slowest rank). Rank 0 prints
the summary and writes it to ``--out``; the exit status is 1 when any rank's check fails.

The launch recipe (README, "Multi-node"), on 2 nodes of 8 GPUs:

    ringattn-topology plan --gpus-per-node 8 --nodes 2 --seq 1048576 --json plan.json
    # on every node (the same plan.json on each):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        --rdzv-id JOB -m ringattn.multinode --plan plan.json

Under SLURM, ``srun --nodes 2 --ntasks-per-node 1 torchrun ...`` (the same line), or one task per GPU
(``srun --nodes 2 --ntasks-per-node 8 python -m ringattn.multinode --plan plan.json``) with
``MASTER_ADDR``/``MASTER_PORT`` exported: the ranks then come from ``SLURM_PROCID``, ``SLURM_NTASKS``
and ``SLURM_LOCALID``. Global rank = node x gpus_per_node + local rank (torchrun's numbering), and
local rank i uses ``cuda:i``. ``tests/test_multinode.py`` rehearses it on one CPU machine: two
torchrun "nodes" of two gloo ranks each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def launch_env(environ=None) -> dict:
    """This process's (rank, world_size, local_rank) from torchrun's variables, else SLURM's.

    Under SLURM the torch.distributed variables are filled in from SLURM's (``env://`` needs them);
    MASTER_ADDR must then be exported by the batch script (the first node of the allocation), and
    MASTER_PORT defaults to 29500.
    """
    environ = os.environ if environ is None else environ
    if all(name in environ for name in LAUNCH_VARS):
        rank, world, local = (int(environ[name]) for name in LAUNCH_VARS)
    elif all(name in environ for name in SLURM_VARS):
        rank, world, local = (int(environ[name]) for name in SLURM_VARS)
        if "MASTER_ADDR" not in environ:
            raise SystemExit(
                "ringattn.multinode under srun without torchrun needs MASTER_ADDR, e.g. "
                'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            )
        environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        environ.setdefault("MASTER_PORT", "29500")
    else:
        raise SystemExit(
            "ringattn.multinode runs under a launcher: torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM's "
            "srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); see python -m ringattn.multinode --help"
        )
    return {"rank": rank, "world_size": world, "local_rank": local}


def load_plan(path: str | Path, world_size: int) -> dict:
    """The planner's launch spec (``ringattn-topology plan --json``), checked against this launch."""
    spec = json.loads(Path(path).read_text())
    if spec.get("format") != "ringattn-plan/1":
        raise SystemExit(f"{path} is not a plan written by ringattn-topology plan --json")
    if spec["world_size"] != world_size:
        raise SystemExit(
            f"{path} plans {spec['nodes']} node(s) x {spec['gpus_per_node']} = {spec['world_size']} ranks, "
            f"but this launch has {world_size}"
        )
    return spec


def _timed(fn, iters: int, sync) -> list[float]:
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ringattn.multinode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--plan", required=True, help="the JSON of ringattn-topology plan --json")
    parser.add_argument("--seq", type=int, default=2048, help="tokens of the checked sequence (default 2048)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--iters", type=int, default=3, help="timed forward+backward iterations")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for collectives and ring hops")
    parser.add_argument("--out", help="rank 0 writes the summary here (JSON)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from . import RoPEConfig
    from .ops import attention
    from .reference import attention_backward_ref, attention_ref
    from .ring import TwoLevelComm, comm_from_rings, ring_attn_func, shard
    from .testing import GRAD_FACTOR, OUTPUT_FACTOR, peer_error_check

    env = launch_env()
    rank, world, local = env["rank"], env["world_size"], env["local_rank"]
    spec = load_plan(args.plan, world)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)  # before any CUDA work: NCCL needs each rank on its own device
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    try:
        inner = spec["inner"] if spec["scheme"] == "two-level ring" else None
        notes = []
        if spec["scheme"] == "all-gather":
            notes.append("the plan recommends all-gather attention; ringattn runs these ranks as a flat ring")
        comm = comm_from_rings(spec["rings"], inner=inner, timeout=args.timeout)
        ring_index = next(i for i, ring in enumerate(spec["rings"]) if rank in ring)
        layout = spec["layout"]
        causal = spec["causal"]
        dtype = torch.bfloat16 if cuda else torch.float32
        D = args.head_dim
        rope = RoPEConfig(D, theta=5e5)
        gen = torch.Generator().manual_seed(1000 + ring_index)  # one sequence per ring (data parallel)
        q, dout = (torch.randn(1, args.seq, args.heads, D, generator=gen) for _ in range(2))
        k, v = (torch.randn(1, args.seq, args.kv_heads, D, generator=gen) for _ in range(2))
        full = [t.to(dtype) for t in (q, k, v, dout)]

        # fp64 reference and one device in this dtype (the peer of the tolerance rule), whole sequence
        kw = dict(causal=causal, rope=rope)
        ref_out, ref_lse = attention_ref(*full[:3], **kw)
        ref = [ref_out, *attention_backward_ref(full[3], *full[:3], ref_lse, out=ref_out, **kw)]
        leaves = [t.detach().to(device).requires_grad_() for t in full[:3]]
        peer_out, _ = attention(*leaves, **kw)
        peer_out.backward(full[3].to(device))
        peer = [peer_out.detach(), *(t.grad for t in leaves)]

        def run(backward: bool = True):
            mine = [shard(t, 1, comm, layout).detach().to(device).requires_grad_(backward) for t in full[:3]]
            out = ring_attn_func(*mine, group=comm, causal=causal, layout=layout, rope=rope)
            if backward:
                out.backward(shard(full[3], 1, comm, layout).to(device))
            return [out.detach(), *(t.grad for t in mine)]

        ours = run()
        checks = {}
        for name, o, r, p in zip(("out", "dq", "dk", "dv"), ours, ref, peer, strict=True):
            factor = OUTPUT_FACTOR if name == "out" else GRAD_FACTOR
            check = peer_error_check(
                o.cpu(), shard(r, 1, comm, layout), shard(p.cpu(), 1, comm, layout), factor=factor
            )
            checks[name] = {"ok": check.ok, "ours_err": check.ours_err, "bound": check.bound}

        def sync():
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()

        times = _timed(run, args.iters, sync)
        mine = torch.tensor(
            [rank, all(c["ok"] for c in checks.values()), statistics.median(times)], dtype=torch.float64
        )
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        per_rank = {int(g[0]): {"ok": bool(g[1]), "median_s": float(g[2])} for g in gathered}
        ok = all(r["ok"] for r in per_rank.values())
        summary = {
            "ok": ok,
            "world_size": world,
            "backend": dist.get_backend(),
            "device": str(device),
            "scheme": spec["scheme"],
            "rings": spec["rings"],
            "inner": inner,
            "communicator": type(comm).__name__,
            "levels": [comm.inner.world_size, comm.outer.world_size]
            if isinstance(comm, TwoLevelComm)
            else [comm.world_size],
            "seq": args.seq,
            "dtype": str(dtype).removeprefix("torch."),
            "layout": layout,
            "rank0_checks": checks,
            "per_rank": per_rank,
            "fwd_bwd_median_s_slowest_rank": max(r["median_s"] for r in per_rank.values()),
            "notes": notes,
        }
        if rank == 0:
            print(
                f"ringattn.multinode: {world} ranks ({dist.get_backend()}), {spec['scheme']} "
                f"{summary['levels']} from {args.plan}; S={args.seq} {summary['dtype']} {layout}: "
                f"check {'PASS' if ok else 'FAIL'} on "
                f"{sum(r['ok'] for r in per_rank.values())}/{world} ranks; fwd+bwd "
                f"{summary['fwd_bwd_median_s_slowest_rank'] * 1e3:.1f} ms (median, slowest rank)"
            )
            for note in notes:
                print("note:", note)
            if args.out:
                Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
