"""Ring order of a node's GPUs, and its mapping onto torch.distributed ranks.

All hops of a ring run at once, so a ring pass is as slow as its slowest hop. The order minimises the
worst link class first, then how many hops use it, then the next-worst class and so on (hop classes
sorted worst-first, compared lexicographically). Exact search up to 8 GPUs ((n-1)!/2 distinct rings);
beyond that GPUs go socket by socket, switch by switch, which crosses every slow level the fewest
times when PCIe is a tree, as it is on the servers this targets.

Global rank = node * gpus_per_node + local GPU index, local index as nvidia-smi numbers GPUs
(set CUDA_DEVICE_ORDER=PCI_BUS_ID so torch agrees).
"""

from __future__ import annotations

from itertools import permutations

from .detect import Link, Topology

__all__ = [
    "count_hops",
    "cycle_links",
    "node_rings",
    "ring_cost",
    "ring_groups",
    "ring_hops",
    "ring_order",
    "split_two_level",
]

EXACT_SEARCH_MAX_GPUS = 8


def _check_order(topo: Topology, order) -> list[int]:
    order = list(order)
    if sorted(order) != list(range(topo.n_gpus)):
        raise ValueError(f"order must be a permutation of 0..{topo.n_gpus - 1}, got {order}")
    return order


def ring_hops(topo: Topology, order) -> list[Link]:
    """Link class of each hop order[k] -> order[k+1], the last hop closing the ring."""
    return cycle_links(topo, _check_order(topo, order))


def cycle_links(topo: Topology, group: list[int]) -> list[Link]:
    """Links of the ring group[0] -> group[1] -> ... -> group[0] over any subset of the GPUs."""
    if len(group) < 2:
        return []
    return [topo.link(a, b) for a, b in zip(group, group[1:] + group[:1], strict=True)]


def ring_cost(topo: Topology, order) -> tuple:
    """Sort key of a ring: its hops' link sort keys, worst first (smaller is a better ring)."""
    return tuple(sorted((link.sort_key for link in ring_hops(topo, order)), reverse=True))


def count_hops(topo: Topology, order, kind: str) -> int:
    """How many hops of the ring use link class ``kind`` ("SYS", "NODE", ...)."""
    return sum(link.kind == kind for link in ring_hops(topo, order))


def _best_cycle(topo: Topology, members: list[int]) -> list[int]:
    """Exact search over the cyclic orders of ``members`` (the first one stays first)."""
    if len(members) <= 2:
        return list(members)
    first, others = members[0], members[1:]
    best, best_cost = None, None
    for rest in permutations(others):
        if others.index(rest[0]) > others.index(rest[-1]):
            continue  # the same ring walked backwards
        cycle = [first, *rest]
        cost = tuple(sorted((link.sort_key for link in cycle_links(topo, cycle)), reverse=True))
        if best_cost is None or cost < best_cost:
            best, best_cost = cycle, cost
    return best


def _hierarchical(topo: Topology) -> list[int]:
    """Socket by socket, switch by switch: runs of this order stay inside the fastest domains."""
    socket_of = {g: s for s, group in enumerate(topo.sockets()) for g in group}
    switch_of = {g: s for s, group in enumerate(topo.switches()) for g in group}
    return sorted(range(topo.n_gpus), key=lambda g: (socket_of[g], switch_of[g], g))


def ring_order(topo: Topology) -> list[int]:
    """The local GPU order with the best (smallest) ring_cost; starts at GPU 0 up to 8 GPUs."""
    if topo.n_gpus > EXACT_SEARCH_MAX_GPUS:
        return _hierarchical(topo)
    return _best_cycle(topo, list(range(topo.n_gpus)))


def node_rings(topo: Topology, ring_size: int) -> list[list[int]]:
    """Split one node into rings of ``ring_size`` GPUs that keep to sockets and switches where they
    can (runs of the socket/switch order), each ring ordered by exact search when small enough."""
    if not isinstance(ring_size, int) or ring_size < 1 or topo.n_gpus % ring_size:
        raise ValueError(f"ring_size must divide the node's {topo.n_gpus} GPUs, got {ring_size!r}")
    order = _hierarchical(topo)
    runs = [order[k : k + ring_size] for k in range(0, topo.n_gpus, ring_size)]
    return [_best_cycle(topo, run) if ring_size <= EXACT_SEARCH_MAX_GPUS else run for run in runs]


def ring_groups(local_order, gpus_per_node: int, nodes: int, ring_size: int) -> list[list[int]]:
    """Global ranks of each context-parallel ring, in ring order; one ring per data-parallel replica.

    Nodes are walked in order, each node's GPUs in ``local_order``; a ring of ``ring_size`` takes the
    next ``ring_size`` of them, so a ring spans whole nodes or a run of one node's ring order.
    """
    local_order = list(local_order)
    if sorted(local_order) != list(range(gpus_per_node)):
        raise ValueError(f"local_order must be a permutation of 0..{gpus_per_node - 1}, got {local_order}")
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    total = gpus_per_node * nodes
    fits = (
        gpus_per_node % ring_size == 0
        if ring_size <= gpus_per_node
        else (ring_size % gpus_per_node == 0 and total % ring_size == 0)
    )
    if ring_size < 1 or not fits:
        raise ValueError(
            f"ring_size must divide gpus_per_node ({gpus_per_node}) or be a multiple of it dividing "
            f"{total}, got {ring_size}"
        )
    ordered = [node * gpus_per_node + g for node in range(nodes) for g in local_order]
    return [ordered[k : k + ring_size] for k in range(0, total, ring_size)]


def split_two_level(ring: list[int], inner: int) -> tuple[list[list[int]], list[list[int]]]:
    """Inner rings (consecutive runs of ``inner`` ranks, one per node) and outer rings (the ranks at the
    same inner position across the runs), for a ring listed in ring order."""
    if inner < 1 or len(ring) % inner:
        raise ValueError(f"inner must divide the ring size {len(ring)}, got {inner}")
    inner_rings = [ring[k : k + inner] for k in range(0, len(ring), inner)]
    outer_rings = [ring[i::inner] for i in range(inner)]
    return inner_rings, outer_rings
