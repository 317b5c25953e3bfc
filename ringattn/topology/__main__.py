"""Command line: `python -m ringattn.topology detect|plan ...` (see --help)."""

from __future__ import annotations

import argparse
import json
import sys

from .detect import TopologyUnavailable, detect_local, load_topology, synthetic_pcie_node
from .order import count_hops, ring_groups, ring_hops, ring_order, split_two_level
from .plan import DEFAULT_LINK_GBS, MODELS, SCHEMES, Hardware, Plan, launch_spec, plan

MODELED = "MODELED by an analytic cost model (ringattn.topology.plan), not measured"


def _link_gbs(text: str) -> dict:
    values = dict(DEFAULT_LINK_GBS)
    for item in filter(None, text.split(",")):
        name, _, number = item.partition("=")
        if name not in values:
            raise argparse.ArgumentTypeError(f"--link-gbs: unknown class {name!r}, expected {sorted(values)}")
        try:
            values[name] = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--link-gbs: {item!r} is not CLASS=GB/s") from None
    return values


def _ring_text(topo, order) -> str:
    hops = ring_hops(topo, order)
    names = " -> ".join(topo.gpus[g] for g in order)
    if not hops:
        return names
    worst = max(hops, key=lambda link: link.sort_key)
    return f"{names} (ring closes; worst hop {worst}, used {count_hops(topo, order, worst.kind)} time(s))"


def _ranks(ranks: list[int]) -> str:
    return str(ranks) if len(ranks) <= 10 else f"[{', '.join(map(str, ranks[:8]))}, ..., {ranks[-1]}]"


def _detect(args) -> int:
    try:
        topo = load_topology(args.topo) if args.topo else detect_local()
    except TopologyUnavailable as err:
        print(f"no topology: {err}", file=sys.stderr)
        return 2
    print(topo.describe())
    print("ring order:", _ring_text(topo, ring_order(topo)))
    return 0


def _print_plan(p: Plan) -> None:
    hw, m = p.hardware, p.model
    total = p.gpus_per_node * p.nodes
    links = " ".join(f"{k} {v:g}" for k, v in hw.link_gbs.items())
    print(f"ringattn topology plan -- every time and rate below is {MODELED}.")
    print(f"model      {m.describe()}")
    print(f"cluster    {p.nodes} node(s) x {p.gpus_per_node} GPUs = {total} GPUs")
    print(f"topology   {p.topology.source}")
    print(f"ring order {_ring_text(p.topology, p.local_order)}")
    print(
        f"assumed    {hw.peak_tflops:g} TFLOP/s peak x efficiency {hw.efficiency:g} = {hw.flops / 1e12:.0f} TFLOP/s "
        f"per GPU; hop GB/s {links} (NV per link); network {hw.net_gbps:g} Gb/s per node, "
        f"{hw.net_latency_us:g} us per message; {hw.hop_overhead_us:g} us per ring hop; "
        f"dK/dV on the wire in {'fp32' if p.grad_bytes == 4 else 'bf16'}; "
        f"recompute {'full (ring forward runs twice)' if p.recompute else 'none'}; "
        f"{'causal' if p.causal else 'non-causal'}; non-attention 6N FLOPs/token; "
        f"memory {hw.memory_gb:g} GB x {hw.memory_usable:g}"
    )
    print(f"sequence   {p.seq_len:,} tokens per sequence")
    print()
    header = (
        f"{'ring':>5} {'scheme':<15} {'in x out':>9} {'DP':>4} {'tok/rank':>9} {'fwd hop ms':>15} "
        f"{'bwd hop ms':>15} {'step s':>9} {'exposed':>8} {'mem GB':>7} {'tok/s/GPU':>10}"
    )
    print("candidates (compute | slowest wire per hop, modeled)")
    print(header)
    for c in p.candidates:
        fits = "" if c.fits else " (no fit)"
        print(
            f"{c.ring_size:>5} {c.scheme:<15} {f'{c.inner}x{c.outer}':>9} {c.data_parallel:>4} {c.tokens_per_rank:>9} "
            f"{f'{c.hop.compute_fwd * 1e3:.3g}|{c.wire_fwd_s * 1e3:.3g}':>15} "
            f"{f'{c.hop.compute_bwd * 1e3:.3g}|{c.wire_bwd_s * 1e3:.3g}':>15} {c.step_s:>9.3g} "
            f"{c.exposed_s / c.step_s:>8.1%} {c.memory / 1e9:>7.1f} {c.tokens_per_s_per_gpu:>10.1f}{fits}"
        )
    print()
    best = p.best
    if best is None:
        print(
            "recommendation: nothing fits in memory at this sequence length; add GPUs or shorten the sequence."
        )
        return
    print(f"recommendation ({MODELED}):")
    print(
        f"  {best.scheme}, context-parallel size {best.ring_size}"
        + (f" = {best.inner} inside a node x {best.outer} nodes" if best.scheme == "two-level ring" else "")
        + f", data-parallel {best.data_parallel}, {best.tokens_per_rank:,} tokens per GPU"
    )
    print(
        f"  predicts {best.tokens_per_s_per_gpu:.1f} tokens/s per GPU, {best.cluster_tokens_per_s:,.0f} tokens/s "
        f"on {total} GPUs; {best.step_s:.3g} s per sequence; exposed communication and overheads "
        f"{best.exposed_s / best.step_s:.1%} of the step"
    )
    if best.scheme == "all-gather":
        print(
            "  all-gather attention: ring hops would be shorter than their fixed overhead, so overlap cannot pay"
        )
    elif best.wire_fwd_s > best.hop.compute_fwd:
        print(
            f"  the wire is not hidden: forward hop compute {best.hop.compute_fwd * 1e3:.3g} ms "
            f"< wire {best.wire_fwd_s * 1e3:.3g} ms"
        )
    if p.causal:
        others = ", ".join(f"{k} x{v:.2f}" for k, v in p.layout_slowdown.items() if k != "zigzag")
        print(f"  layout zigzag (attention pass time relative to zigzag: {others})")
    else:
        print("  layout contiguous (no causal mask: every layout does equal work)")
    if p.seq_len % (2 * best.ring_size):
        print(
            f"  note: {p.seq_len} is not a multiple of 2 x {best.ring_size}; zigzag shards differ by a token"
        )
    rings = ring_groups(best.local_order, p.gpus_per_node, p.nodes, best.ring_size)
    print(
        f"  local ring order {' '.join(map(str, best.local_order))}; first ring's global ranks {_ranks(rings[0])}"
    )
    if best.scheme == "two-level ring":
        inner, outer = split_two_level(rings[0], best.inner)
        print(
            f"  inner ring {_ranks(inner[0])}, ...; outer ring {_ranks(outer[0])}, ... (one per inner position)"
        )
    print("  set CUDA_DEVICE_ORDER=PCI_BUS_ID so torch's device numbers match nvidia-smi's")


def _plan(args) -> int:
    if args.topo:
        topo = load_topology(args.topo)
        if args.gpus_per_node not in (None, topo.n_gpus):
            raise ValueError(
                f"--gpus-per-node {args.gpus_per_node} disagrees with {args.topo} ({topo.n_gpus} GPUs)"
            )
    elif args.gpus_per_node is None:
        raise ValueError("give --gpus-per-node or --topo FILE")
    else:
        sockets = args.sockets or (2 if args.gpus_per_node >= 8 and args.gpus_per_node % 2 == 0 else 1)
        topo = synthetic_pcie_node(args.gpus_per_node, sockets)
    hw = Hardware(
        peak_tflops=args.peak_tflops,
        efficiency=args.efficiency,
        link_gbs=args.link_gbs,
        net_gbps=args.net_gbps,
        net_latency_us=args.net_latency_us,
        hop_overhead_us=args.hop_overhead_us,
        memory_gb=args.memory_gb,
    )
    result = plan(
        MODELS[args.model],
        hw,
        topo,
        args.nodes,
        args.seq,
        batch=args.batch,
        ring_size=args.ring_size,
        causal=not args.no_causal,
        recompute=not args.no_recompute,
        grad_bytes=args.grad_bytes,
        scheme=args.scheme,
    )
    _print_plan(result)
    if args.json:
        spec = launch_spec(result)
        with open(args.json, "w") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")
        print(f"launch spec ({spec['scheme']}, rings of {spec['ring_size']}) written to {args.json}")
    return 0


def main(argv: list[str] | None = None, prog: str = "ringattn-topology") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="show this machine's (or a recorded) topology and ring order")
    detect.add_argument("--topo", help="saved `nvidia-smi topo -m` output instead of this machine")
    p = sub.add_parser("plan", help=f"predict step time and recommend a layout ({MODELED})")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    p.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    p.add_argument("--topo", help="saved `nvidia-smi topo -m` output of one node")
    p.add_argument(
        "--sockets",
        type=int,
        help="sockets of the assumed node without --topo (default 2 for 8+ GPUs, else 1)",
    )
    p.add_argument("--batch", type=int, help="sequences per step, if fixed (caps data parallelism)")
    p.add_argument("--ring-size", type=int, help="only this context-parallel size")
    p.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak sustained (default 0.5)")
    p.add_argument("--peak-tflops", type=float, default=362.0, help="per GPU, dense bf16 (L40S: 362)")
    p.add_argument("--net-gbps", type=float, default=200.0, help="network Gb/s per node (default 200)")
    p.add_argument("--net-latency-us", type=float, default=10.0)
    p.add_argument("--hop-overhead-us", type=float, default=20.0)
    p.add_argument("--memory-gb", type=float, default=48.0)
    p.add_argument("--link-gbs", type=_link_gbs, default=dict(DEFAULT_LINK_GBS), help="e.g. SYS=10,PIX=22")
    p.add_argument("--grad-bytes", type=int, choices=(2, 4), default=4, help="dK/dV bytes on the wire")
    p.add_argument("--no-recompute", action="store_true", help="activations kept, no forward recompute")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--scheme", choices=SCHEMES, help="recommend only this scheme (e.g. 'two-level ring')")
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write the recommended rings for a launcher (python -m ringattn.multinode --plan FILE)",
    )
    args = parser.parse_args(argv)
    try:
        return _detect(args) if args.command == "detect" else _plan(args)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main(prog="python -m ringattn.topology"))
