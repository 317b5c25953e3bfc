"""Ring suite: W local ranks (gloo on CPU, NCCL on GPU); how much of the wire the compute hides.

Per configuration, measured on every rank, one iteration at a time with every rank in step (a
barrier around each), and kept as the slowest rank's time per iteration:
  t_compute  ring attention with the wire stubbed (exchanges complete at once, move nothing)
  t_wire     the same W - 1 K/V exchanges alone, no compute
  t_total    the real ring
The three are interleaved (total, compute, wire, total, ...) so they see the same machine load, and
repeated in rounds until each median moves by less than 2 % in a round (or the round limit; the row
then says so). From the medians:
  exposed = t_total - t_compute, overlap = 1 - exposed / t_wire, efficiency = (t_single / W) / t_total
where t_single is the same attention on one device (the whole sequence in one block call). Each
derived value also gets the interval the quartiles of its inputs allow; a value whose interval is too
wide to tell (overlap: wider than half of [0, 1]; efficiency: wider than half its value) is printed
as "within noise" with that interval instead of a number that means nothing. An overlap whose whole
interval is below 0 is printed as such: the real ring costs more than its compute and its wire
measured apart (contention between them), however wide the interval.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringattn import RoPEConfig
from ringattn.ops import attention
from ringattn.ring import ring_attn_func, ring_comm, shard
from ringattn.ring.comm import Pending, RingComm

from .common import Results, Timing, median_is_stable, plot, quartiles, timing

COLUMNS = {
    "W": "ranks in the ring (processes on this machine; gloo on CPU, NCCL on GPUs)",
    "layout": "how the sequence is split over the ranks",
    "S": "global sequence length (one sequence)",
    "mode": "fwd, or fwd+bwd (dk/dv travel back around the ring)",
    "n": "timed iterations per measurement; * when the medians had not settled within the round limit",
    "t_single": "median seconds of the whole sequence on one device (one block call)",
    "t_compute": "median seconds of the ring with the wire stubbed (compute only), slowest rank",
    "t_wire": "median seconds of the W - 1 K/V exchanges alone (no compute), slowest rank",
    "t_total": "median seconds of the real ring, slowest rank",
    "overlap": "share of the wire hidden by compute, 1 - (t_total - t_compute) / t_wire (1: fully hidden)",
    "efficiency": "(t_single / W) / t_total (1: perfect scaling over the W ranks)",
}
OVERLAP_NOISE = 0.5  # an overlap interval wider than half of [0, 1] cannot tell hidden from exposed
EFFICIENCY_NOISE = 0.5  # an efficiency interval wider than half the value


def _shown(row: dict, name: str) -> str:
    lo, hi = row[f"{name}_lo"], row[f"{name}_hi"]
    if row.get(f"{name}_below_zero"):
        return f"below 0: exposed > wire [{lo:.2g}, {hi:.2g}]"
    if row[f"{name}_within_noise"]:
        return f"within noise [{lo:.2g}, {hi:.2g}]"
    return f"{row[name]:.2f} [{lo:.2f}, {hi:.2f}]"


CELLS = {
    "n": lambda row: f"{row['n']}" + ("" if row["stable"] else "*"),
    "overlap": lambda row: _shown(row, "overlap"),
    "efficiency": lambda row: _shown(row, "efficiency"),
}


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


def interleaved_until_stable(fns: dict, sync, gather, *, per_round: int, max_rounds: int, rel_tol: float):
    """Time each of ``fns`` ``per_round`` times per round, interleaved, and gather the rounds'
    samples from every rank (``gather(tensor) -> (W, *shape)``, the slowest rank kept per iteration)
    until every median moves by less than ``rel_tol`` in a round or ``max_rounds`` rounds ran. Every
    rank decides from the same gathered samples, so all stop together. Returns ({name: samples},
    stable)."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(max_rounds):
        mine = {name: [] for name in fns}
        for _ in range(per_round):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                mine[name].append(time.perf_counter() - start)
        local = torch.tensor([mine[name] for name in fns], dtype=torch.float64)
        slowest = gather(local).amax(dim=0).tolist()
        before = {name: list(s) for name, s in samples.items()}
        for name, new in zip(fns, slowest, strict=True):
            samples[name] += new
        if round_ and all(median_is_stable(before[n], samples[n], rel_tol) for n in fns):
            return samples, True
    return samples, False


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

        modes = {}
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            comm.stats.clear()
            run(comm, backward)
            hop_bytes = comm.stats.bytes_per_hop()
            fns = {
                "t_total": lambda b=backward: run(comm, b),
                "t_compute": lambda b=backward: run(stub, b),
                "t_wire": lambda b=backward: wire(b),
            }
            samples, stable = interleaved_until_stable(
                fns,
                sync,
                comm.all_gather,
                per_round=cfg["repeats"],
                max_rounds=cfg["max_rounds"],
                rel_tol=cfg["rel_tol"],
            )
            modes[mode] = {
                **samples,
                "stable": stable,
                "bytes_per_hop": max(hop_bytes.values(), default=0),
            }
        if rank == 0:
            single = {}
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):

                def one_device(b=backward):
                    leaves = [t.detach().requires_grad_(b) for t in full]
                    out, _ = attention(*leaves, causal=True, rope=rope)
                    if b:
                        out.backward(torch.ones_like(out))

                timed = timing(
                    one_device, repeats=cfg["repeats"], max_rounds=cfg["max_rounds"], rel_tol=cfg["rel_tol"]
                )
                single[mode] = list(timed.samples)
            with open(out_path, "w") as f:
                json.dump({"device": str(device), "modes": modes, "single": single}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def derived(t_single: Timing, t_compute: Timing, t_wire: Timing, t_total: Timing, world_size: int) -> dict:
    """Overlap and efficiency from the medians, each with the interval its inputs' quartiles allow
    and whether that interval is too wide to tell (``*_within_noise``)."""

    def overlap(total, compute, wire):
        return 1 - (total - compute) / wire if wire > 0 else float("nan")

    def efficiency(single, total):
        return single / world_size / total

    def span(fn, *timings):
        values = [fn(*corner) for corner in itertools.product(*(quartiles(t.samples) for t in timings))]
        return min(values), max(values)

    row = {
        "exposed": t_total.median - t_compute.median,
        "overlap": overlap(t_total.median, t_compute.median, t_wire.median) if t_wire.median > 0 else None,
        "efficiency": efficiency(t_single.median, t_total.median),
    }
    lo, hi = span(overlap, t_total, t_compute, t_wire)
    below_zero = hi < 0  # surely negative: the real ring costs more than compute plus the wire alone
    row |= {
        "overlap_lo": lo,
        "overlap_hi": hi,
        "overlap_below_zero": below_zero,
        "overlap_within_noise": not below_zero and not hi - lo <= OVERLAP_NOISE,
    }
    lo, hi = span(efficiency, t_single, t_total)
    wide = not hi - lo <= EFFICIENCY_NOISE * abs(row["efficiency"])
    row |= {"efficiency_lo": lo, "efficiency_hi": hi, "efficiency_within_noise": wide}
    return row


def run(
    quick: bool,
    out_dir,
    *,
    world_sizes=None,
    seq_lens=None,
    layouts=("zigzag",),
    timeout_s: float = 600,
    max_rounds: int | None = None,
    rel_tol: float = 0.02,
) -> Results:
    results = Results("ring")
    world_sizes = world_sizes or ((2,) if quick else (2, 4))
    seq_lens = seq_lens or ((1024,) if quick else (2048, 8192))
    shapes = dict(Hq=8, Hkv=2, D=64) if quick else dict(Hq=32, Hkv=8, D=128)
    max_rounds = max_rounds or (4 if quick else 8)
    out_dir.mkdir(parents=True, exist_ok=True)
    for W in world_sizes:
        for layout in layouts:
            for S in seq_lens:
                cfg = dict(
                    S=S, layout=layout, repeats=3 if quick else 5, max_rounds=max_rounds, rel_tol=rel_tol
                )
                cfg |= shapes
                raw = _spawn(W, cfg, out_dir / f"ring-raw-W{W}-{layout}-S{S}.json", timeout_s)
                for mode in ("fwd", "fwd+bwd"):
                    m = raw["modes"][mode]
                    t = {name: Timing(tuple(m[name])) for name in ("t_total", "t_compute", "t_wire")}
                    t["t_single"] = Timing(tuple(raw["single"][mode]))
                    results.add(
                        W=W,
                        layout=layout,
                        S=S,
                        mode=mode,
                        dtype="bf16" if "cuda" in raw["device"] else "fp32",
                        n=len(m["t_total"]),
                        stable=m["stable"],
                        **{name: timing.median for name, timing in t.items()},
                        **{f"{name}_spread": timing.spread for name, timing in t.items()},
                        **derived(t["t_single"], t["t_compute"], t["t_wire"], t["t_total"], W),
                        bytes_per_hop=m["bytes_per_hop"],
                        **shapes,
                    )
    if any(row["overlap_within_noise"] or row["efficiency_within_noise"] for row in results.rows):
        results.notes.append(
            "'within noise': the quartiles of the timings allow values across the interval shown, so the "
            "point value would mean nothing; rerun on a quieter machine or with larger S."
        )
    results.save(out_dir, COLUMNS, CELLS)
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
        env=results.env,
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
