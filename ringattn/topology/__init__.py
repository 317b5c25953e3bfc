"""GPU topology for ring attention: detect a node's PCIe/NVLink layout, order the ring, plan a run.

    python -m ringattn.topology detect [--topo FILE]
    python -m ringattn.topology plan --gpus-per-node 8 --nodes 64 --seq 1048576 --model llama3-8b

Everything the planner prints is modeled by an analytic cost model, never measured.
"""

from .detect import (
    LINK_CLASSES,
    Link,
    Topology,
    TopologyUnavailable,
    detect_local,
    load_topology,
    parse_topo_matrix,
    synthetic_pcie_node,
)
from .order import count_hops, node_rings, ring_cost, ring_groups, ring_hops, ring_order, split_two_level
from .plan import MODELS, Hardware, ModelShape, cp_mode_for, plan
from .simulate import block_fractions, simulate_ring

__all__ = [
    "LINK_CLASSES",
    "MODELS",
    "Hardware",
    "Link",
    "ModelShape",
    "Topology",
    "TopologyUnavailable",
    "block_fractions",
    "count_hops",
    "detect_local",
    "load_topology",
    "node_rings",
    "parse_topo_matrix",
    "cp_mode_for",
    "plan",
    "ring_cost",
    "ring_groups",
    "ring_hops",
    "ring_order",
    "simulate_ring",
    "split_two_level",
    "synthetic_pcie_node",
]
