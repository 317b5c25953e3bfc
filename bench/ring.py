"""Ring suite: W local ranks (gloo on CPU, NCCL on GPU); how much of the wire the compute hides.

Per configuration, each measured on every rank and reported as the slowest rank:
  t_compute  ring attention with the wire stubbed (exchanges complete at once, move nothing)
  t_wire     the same W - 1 K/V exchanges alone, no compute
  t_total    the real ring
  exposed = t_total - t_compute, overlap = 1 - exposed / t_wire, efficiency = (t_single / W) / t_total
where t_single is the same attention on one device (the whole sequence in one block call).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringattn import RoPEConfig
from ringattn.ops import attention
from ringattn.ring import ring_attn_func, ring_comm, shard
from ringattn.ring.comm import Pending, RingComm

from .common import Results, plot

COLUMNS = ["W", "layout", "S", "mode", "t_single", "t_compute", "t_wire", "t_total", "overlap", "efficiency"]


class _Done(Pending):
    def _wait(self) -> None:
        pass


class StubComm(RingComm):
    """The K/V wire stubbed out: exchanges finish at once and move nothing (numerics are meaningless).

    The small all_gather of the call's agreement check still runs on the real ring.
    """

    def __init__(self, real: RingComm):
        super().__init__(real.rank, real.world_size, None)
        self.real = real

    def _exchange(self, sends, recvs, record, timeout):
        return _Done(self, record)

    def all_gather(self, t, timeout=None):
        return self.real.all_gather(t, timeout)


def _median_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank, world_size, port, cfg, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # one core per rank: the ranks share this machine
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        gen = torch.Generator().manual_seed(0)
        B, S, Hq, Hkv, D = 1, cfg["S"], cfg["Hq"], cfg["Hkv"], cfg["D"]
        dtype = torch.bfloat16 if cuda else torch.float32
        full = [torch.randn(B, S, h, D, generator=gen).to(device, dtype) for h in (Hq, Hkv, Hkv)]
        layout, rope = cfg["layout"], RoPEConfig(D, theta=5e5)
        q, k, v = (shard(t, 1, None, layout) for t in full)
        comm = ring_comm()
        stub = StubComm(comm)

        def sync():
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()

        def run(group, backward):
            leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            out = ring_attn_func(*leaves, group=group, causal=True, layout=layout, rope=rope)
            if backward:
                out.backward(torch.ones_like(out))

        kv = torch.cat((k, v), dim=2).contiguous()
        # one receive buffer per message: two receives into one buffer in one NCCL group is undefined
        recvs = [torch.empty_like(kv) for _ in range(2)]

        def wire(backward):
            n = 2 if backward else 1
            for hop in range(world_size - 1):
                comm.exchange([kv] * n, recvs[:n], hop=hop, label="wire").wait()

        rows = {}
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            comm.stats.clear()
            run(comm, backward)
            hop_bytes = comm.stats.bytes_per_hop()
            t_total = _median_time(lambda b=backward: run(comm, b), cfg["repeats"], sync)
            t_compute = _median_time(lambda b=backward: run(stub, b), cfg["repeats"], sync)
            t_wire = _median_time(lambda b=backward: wire(b), cfg["repeats"], sync)
            rows[mode] = [t_total, t_compute, t_wire, max(hop_bytes.values(), default=0)]
        times = comm.all_gather(torch.tensor([rows["fwd"], rows["fwd+bwd"]], dtype=torch.float64))
        slowest = times.amax(dim=0).tolist()  # every time is reported for the slowest rank
        if rank == 0:
            single = {}
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):

                def one_device(b=backward):
                    leaves = [t.detach().requires_grad_(b) for t in full]
                    out, _ = attention(*leaves, causal=True, rope=rope)
                    if b:
                        out.backward(torch.ones_like(out))

                single[mode] = _median_time(one_device, cfg["repeats"], lambda: None)
            with open(out_path, "w") as f:
                json.dump(
                    {
                        "device": str(device),
                        "modes": dict(zip(("fwd", "fwd+bwd"), slowest, strict=True)),
                        "single": single,
                    },
                    f,
                )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(
    quick: bool, out_dir, *, world_sizes=None, seq_lens=None, layouts=("zigzag",), timeout_s: float = 600
) -> Results:
    results = Results("ring")
    world_sizes = world_sizes or ((2,) if quick else (2, 4))
    seq_lens = seq_lens or ((1024,) if quick else (2048, 8192))
    shapes = dict(Hq=8, Hkv=2, D=64) if quick else dict(Hq=32, Hkv=8, D=128)
    out_dir.mkdir(parents=True, exist_ok=True)
    for W in world_sizes:
        for layout in layouts:
            for S in seq_lens:
                cfg = dict(S=S, layout=layout, repeats=3 if quick else 5, **shapes)
                raw = _spawn(W, cfg, out_dir / f"ring-raw-W{W}-{layout}-S{S}.json", timeout_s)
                for mode in ("fwd", "fwd+bwd"):
                    t_total, t_compute, t_wire, bytes_per_hop = raw["modes"][mode]
                    exposed = t_total - t_compute
                    t_single = raw["single"][mode]
                    results.add(
                        W=W,
                        layout=layout,
                        S=S,
                        mode=mode,
                        dtype="bf16" if "cuda" in raw["device"] else "fp32",
                        t_single=t_single,
                        t_compute=t_compute,
                        t_wire=t_wire,
                        t_total=t_total,
                        exposed=exposed,
                        overlap=1 - exposed / t_wire if t_wire > 0 else None,
                        efficiency=t_single / W / t_total,
                        bytes_per_hop=bytes_per_hop,
                        **shapes,
                    )
    results.save(out_dir, COLUMNS)
    series = {}
    for row in results.rows:
        xs, ys = series.setdefault(f"{row['mode']} W={row['W']}", ([], []))
        xs.append(row["S"])
        ys.append(row["efficiency"])
    plot(
        out_dir / "ring_efficiency.png",
        "ring efficiency vs ideal (t_single / W)",
        "global sequence length",
        "efficiency",
        series,
        logx=True,
    )
    return results


def _spawn(world_size: int, cfg: dict, out_path, timeout_s: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(
        _worker,
        args=(world_size, port, cfg, str(out_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise RuntimeError(f"ring bench with W={world_size} did not finish within {timeout_s} s")
    with open(out_path) as f:
        return json.load(f)
