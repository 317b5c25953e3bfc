"""Analytic cost model of ring attention training on PCIe GPUs. Every number it gives is MODELED.

Per layer, one sequence of S tokens on a ring of W ranks, c = S / W tokens per rank, batch 1:
    attention forward FLOPs per hop  F = 4·c²·d·Hq · m       m = 1/2 causal (zigzag), 1 otherwise
    compute per hop                   t = F / (η · peak);  backward 2.5·t   (docs/design.md FLOP formula)
    bytes per hop, forward            K and V in bf16:      2·c·Hkv·d·2
    bytes per hop, backward           K, V plus dK, dV:     2·c·Hkv·d·(2 + grad_bytes)
    ring pass                         (W-1)·(max(t, wire) + o) + t + o    o = per-hop overhead, not hidden
    two-level pass (inner i, outer n) (n-1)·max(P_inner, i·chunk/net + latency) + P_inner
        the node sends its i chunks of the next super-block over the network while the inner ring
        computes on the current one; PCIe traffic of the NIC itself is not modeled.
    all-gather attention              (W-1)·wire + W·t + o      (nothing overlapped, one launch)
        so all-gather wins exactly when o > min(t, wire): hops too short to pay for their overhead.
Per step: layers · (fwd pass · (1 + recompute) + bwd pass) + c·(6 + 2·recompute)·N / (η·peak), the
non-attention part being ≈ 6·N FLOPs per token (N parameters) plus a forward again when activations
are recomputed. Tokens/s per GPU = c / step. Not modeled: data-parallel gradient reduction and
ZeRO-3 parameter gathers (assumed hidden), optimizer step, pipeline parallelism, kernel efficiency
changing with block size.

Memory per GPU (bf16 activations, full per-layer checkpointing): 16 bytes/parameter of weights,
gradients and Adam state sharded over all GPUs (ZeRO-3), L·c·hidden·2 bytes of checkpoints, one
layer's saved tensors ≈ c·2·(6·hidden + 3·intermediate) plus the ring's K/V and dK/dV buffers, and one
fp32 copy of the logits c·vocab·4 (no chunked loss). All-gather adds the whole sequence's K, V and
dK, dV of one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

from .detect import Link, Topology
from .order import cycle_links, node_rings, ring_groups, ring_hops, ring_order
from .simulate import block_fractions, simulate_ring

__all__ = [
    "DEFAULT_LINK_GBS",
    "MODELS",
    "Candidate",
    "Hardware",
    "HopTimes",
    "ModelShape",
    "Plan",
    "hop_times",
    "memory_bytes",
    "cp_mode_for",
    "plan",
    "ring_pass_s",
    "two_level_pass_s",
]


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads_q: int
    heads_kv: int
    head_dim: int
    intermediate: int
    vocab: int
    params: float

    def describe(self) -> str:
        return (
            f"{self.name}: {self.layers} layers, hidden {self.hidden}, Hq {self.heads_q}, Hkv {self.heads_kv}, "
            f"d {self.head_dim}, intermediate {self.intermediate}, vocab {self.vocab}, {self.params / 1e9:.2f}B params"
        )


# Shapes from the published Llama 3 configs (config.json of meta-llama/Meta-Llama-3-8B and -70B).
MODELS = {
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8.03e9),
    "llama3-70b": ModelShape("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256, 70.55e9),
}

# Effective GB/s per direction of one ring hop by link class. PIX/PXB: PCIe Gen4 x16 carries ≈32 GB/s
# each way nominal, ≈24 GB/s measured with NCCL in public reports. PHB/NODE/SYS are assumptions: P2P
# through the host bridge a little slower, and across sockets NCCL usually stages through host memory.
# NV is per bonded NVLink.
DEFAULT_LINK_GBS = {"NV": 20.0, "PIX": 24.0, "PXB": 24.0, "PHB": 20.0, "NODE": 20.0, "SYS": 12.0}


@dataclass(frozen=True)
class Hardware:
    peak_tflops: float = 362.0  # L40S dense bf16, fp32 accumulate (datasheet)
    efficiency: float = 0.5  # fraction of peak the kernels sustain (assumed)
    link_gbs: dict = field(default_factory=lambda: dict(DEFAULT_LINK_GBS))
    net_gbps: float = 200.0  # network per node, Gb/s, used at line rate (assumed)
    net_latency_us: float = 10.0  # per network message (assumed, RDMA-class)
    hop_overhead_us: float = 20.0  # per ring hop: kernel launches and synchronisation (assumed)
    memory_gb: float = 48.0  # L40S
    memory_usable: float = 0.9  # allocator slack and fragmentation (assumed)

    def __post_init__(self):
        for name in ("peak_tflops", "net_gbps", "memory_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("efficiency", "memory_usable"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("net_latency_us", "hop_overhead_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if set(self.link_gbs) != set(DEFAULT_LINK_GBS) or min(self.link_gbs.values()) <= 0:
            raise ValueError(f"link_gbs must give a positive GB/s for each of {sorted(DEFAULT_LINK_GBS)}")

    @property
    def flops(self) -> float:
        return self.peak_tflops * 1e12 * self.efficiency

    def link_bytes_per_s(self, link: Link) -> float:
        scale = link.nvlinks if link.kind == "NV" else 1
        return self.link_gbs[link.kind] * scale * 1e9

    @property
    def net_bytes_per_s(self) -> float:
        return self.net_gbps * 1e9 / 8


@dataclass(frozen=True)
class HopTimes:
    """Modeled seconds of one hop of one layer: compute and wire, forward and backward."""

    compute_fwd: float
    compute_bwd: float
    bytes_fwd: float
    bytes_bwd: float


def hop_times(
    model: ModelShape, hw: Hardware, tokens_per_rank: int, causal: bool = True, grad_bytes: int = 4
):
    if not isinstance(tokens_per_rank, int) or tokens_per_rank < 1:
        raise ValueError(f"tokens_per_rank must be a positive int, got {tokens_per_rank!r}")
    if grad_bytes not in (2, 4):
        raise ValueError(f"grad_bytes must be 2 (bf16) or 4 (fp32), got {grad_bytes!r}")
    c = tokens_per_rank
    flops = 4 * c * c * model.head_dim * model.heads_q * (0.5 if causal else 1.0)
    kv_elems = 2 * c * model.heads_kv * model.head_dim
    return HopTimes(flops / hw.flops, 2.5 * flops / hw.flops, kv_elems * 2, kv_elems * (2 + grad_bytes))


def ring_pass_s(compute: float, wire: float, world: int, overhead: float) -> float:
    return (world - 1) * (max(compute, wire) + overhead) + compute + overhead


def two_level_pass_s(compute, wire_inner, net_chunk, inner, outer, overhead, net_latency) -> float:
    inner_pass = ring_pass_s(compute, wire_inner, inner, overhead)
    return (outer - 1) * max(inner_pass, inner * net_chunk + net_latency) + inner_pass


def memory_bytes(
    model: ModelShape, tokens_per_rank: int, total_gpus: int, grad_bytes: int = 4, gathered_seq=0
):
    """Modeled bytes per GPU (see the module docstring); gathered_seq > 0 adds all-gather buffers."""
    c = tokens_per_rank
    kv_row = model.heads_kv * model.head_dim
    states = 16 * model.params / total_gpus
    checkpoints = model.layers * c * model.hidden * 2
    # K, V in bf16 three times (own, computing, receiving); dK, dV twice (accumulating, in flight)
    layer = c * 2 * (6 * model.hidden + 3 * model.intermediate) + c * kv_row * (
        3 * 2 * 2 + 2 * 2 * grad_bytes
    )
    logits = c * model.vocab * 4
    gathered = gathered_seq * 2 * kv_row * (2 + grad_bytes)
    return states + checkpoints + layer + logits + gathered


SCHEMES = ("ring", "two-level ring", "flat ring", "all-gather")


@dataclass(frozen=True)
class Candidate:
    scheme: str  # "ring", "two-level ring", "flat ring", "all-gather"
    ring_size: int
    inner: int
    outer: int
    data_parallel: int
    tokens_per_rank: int
    hop: HopTimes
    wire_fwd_s: float  # slowest ring hop, forward
    wire_bwd_s: float
    net_fwd_s: float  # network time per outer step (two-level) or per hop (flat); 0 inside a node
    step_s: float
    compute_s: float  # attention compute plus non-attention compute, nothing else
    memory: float
    memory_limit: float
    local_order: tuple[int, ...]  # node's GPUs in ring order; runs of ring_size are the rings

    @property
    def fits(self) -> bool:
        return self.memory <= self.memory_limit

    @property
    def exposed_s(self) -> float:
        return self.step_s - self.compute_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_rank / self.step_s

    @property
    def cluster_tokens_per_s(self) -> float:
        return self.tokens_per_s_per_gpu * self.ring_size * self.data_parallel


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    hardware: Hardware
    topology: Topology
    gpus_per_node: int
    nodes: int
    seq_len: int
    causal: bool
    recompute: bool
    grad_bytes: int
    local_order: list[int]
    candidates: list[Candidate]
    best: Candidate | None
    layout_slowdown: dict  # layout -> modeled attention-pass time relative to zigzag, at best's ring size


def _ring_sizes(gpus_per_node: int, nodes: int) -> list[int]:
    total = gpus_per_node * nodes
    inside = [w for w in range(1, gpus_per_node + 1) if gpus_per_node % w == 0]
    across = [gpus_per_node * k for k in range(2, nodes + 1) if nodes % k == 0]
    return inside + [w for w in across if total % w == 0]


def _worst(links) -> Link | None:
    return max(links, key=lambda link: link.sort_key, default=None)


def plan(
    model: ModelShape,
    hw: Hardware,
    topo: Topology,
    nodes: int,
    seq_len: int,
    *,
    batch: int | None = None,
    ring_size: int | None = None,
    causal: bool = True,
    recompute: bool = True,
    grad_bytes: int = 4,
    scheme: str | None = None,
) -> Plan:
    """Model every ring size and scheme for ``seq_len``-token sequences and pick the fastest that fits.

    batch: sequences per optimizer step, if fixed (data parallel degree must not exceed it).
    ring_size: consider only this context-parallel degree.
    scheme: recommend only this scheme (one of ``SCHEMES``); every candidate is still listed.
    """
    if not isinstance(model, ModelShape):
        raise TypeError(f"model must be a ModelShape, got {type(model).__name__}")
    if not isinstance(topo, Topology):
        raise TypeError(f"topo must be a Topology, got {type(topo).__name__}")
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int or None, got {batch!r}")
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES} or None, got {scheme!r}")
    wanted = scheme
    gpn = topo.n_gpus
    total = gpn * nodes
    sizes = _ring_sizes(gpn, nodes)
    if ring_size is not None:
        if ring_size not in sizes:
            raise ValueError(f"ring_size must be one of {sizes} for {nodes} x {gpn} GPUs, got {ring_size!r}")
        sizes = [ring_size]
    sizes = [w for w in sizes if w <= seq_len and (batch is None or total // w <= batch)]
    if not sizes:
        raise ValueError(f"no ring size fits seq_len={seq_len}, batch={batch} on {total} GPUs")
    order = ring_order(topo)
    overhead = hw.hop_overhead_us * 1e-6
    latency = hw.net_latency_us * 1e-6
    limit = hw.memory_gb * 1e9 * hw.memory_usable
    net = hw.net_bytes_per_s
    candidates = []
    for w in sizes:
        c = math.ceil(seq_len / w)
        hop = hop_times(model, hw, c, causal, grad_bytes)
        local = order if w >= gpn else [g for ring in node_rings(topo, w) for g in ring]
        if w <= gpn:
            links = [link for g in ring_groups(local, gpn, 1, w) for link in cycle_links(topo, g)]
            bw = hw.link_bytes_per_s(_worst(links)) if links else math.inf
            schemes = [("ring", w, bw, 0.0, partial(_ring, bw=bw, world=w, overhead=overhead))]
            if w > 1:
                schemes.append(
                    ("all-gather", w, bw, 0.0, partial(_gather, bw=bw, world=w, overhead=overhead))
                )
        else:
            inner, outer = gpn, w // gpn
            inner_bw = hw.link_bytes_per_s(_worst(ring_hops(topo, order))) if gpn > 1 else math.inf
            # a flat ring walks each node along the ring order and leaves it over the network
            path = cycle_links(topo, order)[:-1]
            path_bw = min(hw.link_bytes_per_s(_worst(path)) if path else math.inf, net)
            two = partial(
                _two_level, bw=inner_bw, net=net, inner=inner, outer=outer, overhead=overhead, latency=latency
            )
            flat = partial(_ring, bw=path_bw, world=w, overhead=overhead, latency=latency)
            gather = partial(_gather, bw=path_bw, world=w, overhead=overhead)
            net_hop = hop.bytes_fwd / net + latency
            schemes = [
                ("two-level ring", inner, inner_bw, inner * hop.bytes_fwd / net + latency, two),
                ("flat ring", w, path_bw, net_hop, flat),
                ("all-gather", w, path_bw, net_hop, gather),
            ]
        for scheme, inner, bw, net_s, pass_s in schemes:
            candidates.append(
                _candidate(
                    model=model,
                    hw=hw,
                    hop=hop,
                    tokens_per_rank=c,
                    scheme=scheme,
                    ring_size=w,
                    inner=inner,
                    total_gpus=total,
                    bw=bw,
                    net_s=net_s,
                    pass_s=pass_s,
                    recompute=recompute,
                    grad_bytes=grad_bytes,
                    gathered=seq_len if scheme == "all-gather" else 0,
                    memory_limit=limit,
                    local_order=tuple(local),
                )
            )
    if wanted is not None and not any(cand.scheme == wanted for cand in candidates):
        raise ValueError(
            f"no candidate uses scheme {wanted!r} for ring sizes {sizes} on {nodes} x {gpn} GPUs "
            "(rings inside a node are 'ring' or 'all-gather'; across nodes 'two-level ring', 'flat ring' "
            "or 'all-gather')"
        )
    fitting = [cand for cand in candidates if cand.fits and wanted in (None, cand.scheme)]
    # fastest first; between near-equals (0.5 %) the smaller ring and the ring over all-gather
    best = None
    for cand in fitting:
        if best is None or cand.cluster_tokens_per_s > best.cluster_tokens_per_s * 1.005:
            best = cand
    slowdown = _layout_slowdown(best, causal, overhead) if best else {}
    return Plan(
        model, hw, topo, gpn, nodes, seq_len, causal, recompute, grad_bytes, order, candidates, best, slowdown
    )


def launch_spec(p: Plan) -> dict:
    """The recommendation as a launcher needs it (``ringattn-topology plan --json``, read by
    ``python -m ringattn.multinode``): every context-parallel ring as global ranks in ring order
    (rank = node x gpus_per_node + local rank, as torchrun numbers them), and for a two-level ring
    the inner ring size to pass to ``ringattn.ring.comm_from_rings(rings, inner=...)``."""
    from .order import ring_groups

    best = p.best
    if best is None:
        raise ValueError("the plan has no recommendation: nothing fits in memory at this sequence length")
    two_level = best.scheme == "two-level ring"
    return {
        "format": "ringattn-plan/1",
        "modeled": "every number here comes from ringattn.topology.plan's cost model, not a measurement",
        "model": p.model.name,
        "seq_len": p.seq_len,
        "gpus_per_node": p.gpus_per_node,
        "nodes": p.nodes,
        "world_size": p.gpus_per_node * p.nodes,
        "scheme": best.scheme,
        "ring_size": best.ring_size,
        "inner": best.inner if two_level else None,
        "outer": best.outer if two_level else None,
        "data_parallel": best.data_parallel,
        "tokens_per_rank": best.tokens_per_rank,
        "causal": p.causal,
        "layout": "zigzag" if p.causal else "contiguous",
        "local_order": list(best.local_order),
        "rings": ring_groups(best.local_order, p.gpus_per_node, p.nodes, best.ring_size),
        "predicted_tokens_per_s_per_gpu": best.tokens_per_s_per_gpu,
    }


def _ring(compute, nbytes, *, bw, world, overhead, latency=0.0):
    return ring_pass_s(compute, nbytes / bw + latency, world, overhead)


def _two_level(compute, nbytes, *, bw, net, inner, outer, overhead, latency):
    return two_level_pass_s(compute, nbytes / bw, nbytes / net, inner, outer, overhead, latency)


def _gather(compute, nbytes, *, bw, world, overhead):
    return (world - 1) * nbytes / bw + world * compute + overhead


def _candidate(
    *,
    model: ModelShape,
    hw: Hardware,
    hop: HopTimes,
    tokens_per_rank: int,
    scheme: str,
    ring_size: int,
    inner: int,  # ranks per inner ring (== ring_size for one-level schemes)
    total_gpus: int,
    bw: float,  # bytes/s of the slowest ring hop
    net_s: float,  # network seconds per outer step (two-level) or per hop (flat); 0 inside a node
    pass_s,  # (compute_s, bytes) -> seconds of one attention pass of the scheme
    recompute: bool,
    grad_bytes: int,
    gathered: int,  # sequence length whose K/V all-gather buffers count in memory, 0 if none
    memory_limit: float,
    local_order: tuple[int, ...],
) -> Candidate:
    c, w = tokens_per_rank, ring_size
    mult = 1 + int(recompute)  # the attention forward runs again when activations are recomputed
    non_attn = c * (6 + 2 * int(recompute)) * model.params / hw.flops
    attn = pass_s(hop.compute_fwd, hop.bytes_fwd) * mult + pass_s(hop.compute_bwd, hop.bytes_bwd)
    compute = model.layers * w * (hop.compute_fwd * mult + hop.compute_bwd) + non_attn
    return Candidate(
        scheme=scheme,
        ring_size=w,
        inner=inner,
        outer=w // inner,
        data_parallel=total_gpus // w,
        tokens_per_rank=c,
        hop=hop,
        wire_fwd_s=hop.bytes_fwd / bw,
        wire_bwd_s=hop.bytes_bwd / bw,
        net_fwd_s=net_s,
        step_s=model.layers * attn + non_attn,
        compute_s=compute,
        memory=memory_bytes(model, c, total_gpus, grad_bytes, gathered),
        memory_limit=memory_limit,
        local_order=local_order,
    )


def _layout_slowdown(best: Candidate, causal: bool, overhead: float) -> dict:
    """Forward attention pass of each layout relative to zigzag, simulated on the best ring size."""
    w = best.ring_size
    wire = max(best.wire_fwd_s, best.net_fwd_s / max(best.inner, 1) if best.outer > 1 else 0.0)
    times = {}
    for layout in ("zigzag", "stripe", "contiguous"):
        fractions = block_fractions(layout, w, best.tokens_per_rank, causal)
        full = 2 * best.hop.compute_fwd if causal else best.hop.compute_fwd
        compute = [[f * full for f in row] for row in fractions]
        times[layout] = simulate_ring(compute, [wire] * w, overhead).total_s
    return {layout: t / times["zigzag"] for layout, t in times.items()}


def cp_mode_for(
    seq_len: int,
    world_size: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    causal: bool = True,
    hw: Hardware | None = None,
    link: str = "PIX",
) -> tuple[str, dict]:
    """ "ring" or "allgather" for one attention call, by the model above (MODELED): the forward plus
    backward pass of each scheme over a ring of ``world_size`` ranks joined by ``link``-class hops.
    Returns the choice and the modeled seconds of both."""
    hw = Hardware() if hw is None else hw
    if link not in hw.link_gbs:
        raise ValueError(f"link must be one of {sorted(hw.link_gbs)}, got {link!r}")
    c = max(1, -(-seq_len // world_size))
    shape = ModelShape("call", 1, heads_q * head_dim, heads_q, heads_kv, head_dim, 0, 0, 0.0)
    hop = hop_times(shape, hw, c, causal)
    bw, o = hw.link_gbs[link] * 1e9, hw.hop_overhead_us * 1e-6
    seconds = {
        "ring": _ring(hop.compute_fwd, hop.bytes_fwd, bw=bw, world=world_size, overhead=o)
        + _ring(hop.compute_bwd, hop.bytes_bwd, bw=bw, world=world_size, overhead=o),
        "allgather": _gather(hop.compute_fwd, hop.bytes_fwd, bw=bw, world=world_size, overhead=o)
        + _gather(hop.compute_bwd, hop.bytes_bwd, bw=bw, world=world_size, overhead=o),
    }
    return min(seconds, key=seconds.get), seconds
