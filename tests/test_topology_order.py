"""Ring order on small hand-made topologies and the recorded fixtures; rank mapping."""

from pathlib import Path

import pytest

from ringattn.topology.detect import Link, Topology, load_topology
from ringattn.topology.order import (
    count_hops,
    node_rings,
    ring_groups,
    ring_hops,
    ring_order,
    split_two_level,
)

DATA = Path(__file__).parent / "data"


def make_topology(classes: dict) -> Topology:
    """Topology from {(i, j): "CLASS"} for every pair i < j."""
    n = 1 + max(j for _, j in classes)
    links = [[None] * n for _ in range(n)]
    for (i, j), kind in classes.items():
        links[i][j] = links[j][i] = Link.parse(kind)
    return Topology(tuple(f"GPU{i}" for i in range(n)), tuple(map(tuple, links)))


def hop_classes(topo, order):
    """Link class of each hop, read straight from the matrix."""
    return [str(topo.links[a][b]) for a, b in zip(order, order[1:] + order[:1], strict=True)]


def test_dual_socket_ring_crosses_the_socket_link_exactly_twice():
    topo = load_topology(DATA / "topo_l40s_8gpu_dual_socket.txt")
    order = ring_order(topo)
    assert sorted(order) == list(range(8))
    classes = hop_classes(topo, order)
    assert classes.count("SYS") == 2
    assert classes.count("PIX") == 4  # every switch pair sits next to each other
    # in bus order the sockets interleave: the naive ring crosses four times
    assert hop_classes(topo, list(range(8))).count("SYS") == 4
    assert count_hops(topo, order, "SYS") == 2


def test_four_gpu_hand_case_prefers_one_sys_hop():
    # A-B PIX, C-D PIX, A-C NODE, everything else SYS. Rings: ABCD has 2 SYS, ACBD 3 SYS, ABDC 1 SYS.
    topo = make_topology(
        {(0, 1): "PIX", (2, 3): "PIX", (0, 2): "NODE", (1, 3): "SYS", (0, 3): "SYS", (1, 2): "SYS"}
    )
    assert ring_order(topo) == [0, 1, 3, 2]


def test_slowest_hop_first_then_count():
    # ring 0-1-2-3 has one SYS hop; any ring avoiding SYS must use NODE hops only: prefer it
    classes = {(0, 1): "PIX", (1, 2): "PIX", (2, 3): "PIX", (0, 3): "SYS", (0, 2): "NODE", (1, 3): "NODE"}
    topo = make_topology(classes)
    order = ring_order(topo)
    assert "SYS" not in hop_classes(topo, order)
    assert sorted(hop_classes(topo, order)) == ["NODE", "NODE", "PIX", "PIX"]


def test_single_socket_fixture_and_nvlink():
    topo = load_topology(DATA / "topo_l40s_4gpu_single_socket.txt")
    assert sorted(hop_classes(topo, ring_order(topo))) == ["NODE", "NODE", "PIX", "PIX"]
    nv = load_topology(DATA / "topo_nvlink_8gpu.txt")
    assert set(hop_classes(nv, ring_order(nv))) == {"NV12"}


def test_more_than_eight_gpus_go_socket_by_socket():
    # 12 GPUs, sockets interleaved in bus order (socket = i % 2), switches of 2 within a socket
    classes = {}
    for i in range(12):
        for j in range(i + 1, 12):
            same_socket = i % 2 == j % 2
            same_switch = same_socket and i // 4 == j // 4
            classes[(i, j)] = "PIX" if same_switch else ("NODE" if same_socket else "SYS")
    topo = make_topology(classes)
    order = ring_order(topo)
    assert sorted(order) == list(range(12))
    assert hop_classes(topo, order).count("SYS") == 2
    assert hop_classes(topo, list(range(12))).count("SYS") == 12


def test_bad_order_rejected():
    topo = make_topology({(0, 1): "PIX"})
    with pytest.raises(ValueError, match="order must be a permutation of 0..1"):
        ring_hops(topo, [0, 0])


def test_ring_groups_map_local_order_onto_ranks():
    assert ring_groups([0, 2, 1, 3], 4, 2, 8) == [[0, 2, 1, 3, 4, 6, 5, 7]]
    assert ring_groups([0, 2, 1, 3], 4, 2, 2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert ring_groups([0, 1], 2, 3, 6) == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="ring_size must divide gpus_per_node"):
        ring_groups([0, 1, 2, 3], 4, 2, 3)
    with pytest.raises(ValueError, match="ring_size"):
        ring_groups([0, 1, 2, 3], 4, 3, 8)  # 8 does not divide 12
    with pytest.raises(ValueError, match="local_order must be a permutation"):
        ring_groups([0, 1, 1, 3], 4, 1, 4)


def test_split_two_level():
    inner, outer = split_two_level(list(range(16)), 8)
    assert inner == [list(range(8)), list(range(8, 16))]
    assert outer == [[i, i + 8] for i in range(8)]
    with pytest.raises(ValueError, match="inner must divide the ring size 16"):
        split_two_level(list(range(16)), 3)


def test_node_rings_stay_inside_sockets_and_switches():
    topo = load_topology(DATA / "topo_l40s_8gpu_dual_socket.txt")
    halves = node_rings(topo, 4)
    assert sorted(map(sorted, halves)) == [[0, 1, 4, 5], [2, 3, 6, 7]]  # one ring per socket
    assert all("SYS" not in hop_classes(topo, ring) for ring in halves)
    pairs = node_rings(topo, 2)
    assert sorted(map(sorted, pairs)) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # one ring per switch
    assert sorted(map(sorted, node_rings(topo, 8))) == [list(range(8))]
    with pytest.raises(ValueError, match="ring_size must divide the node's 8 GPUs"):
        node_rings(topo, 3)
