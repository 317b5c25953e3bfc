"""Event-by-event model of one ring pass, for uneven work (layouts) and uneven links.

W ranks, W steps; at step s rank r computes with the block that started on rank (r - s) mod W and
meanwhile forwards the block it holds to rank r + 1 (two buffers per rank: the one being computed
on, the one being received into). So:

    arrive[r][s] = max(start[r-1][s-1], start[r][s-1]) + link[r-1]     (sender has it, buffer free)
    start[r][s]  = max(start[r][s-1] + compute[r][s-1], arrive[r][s]) + overhead
    finish[r]    = start[r][W-1] + compute[r][W-1] + overhead

The overhead (launches, the per-hop synchronisation) is paid after both the compute and the block
are done, so it is never hidden. With equal compute a and links b this is
(W-1)·(max(a, b) + overhead) + a + overhead, the closed form the planner uses. Times are modeled.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RingSim", "block_fractions", "simulate_ring"]


@dataclass(frozen=True)
class RingSim:
    total_s: float
    finish_s: tuple[float, ...]  # per rank
    busy_s: tuple[float, ...]  # per rank: compute plus per-hop overhead

    @property
    def exposed_s(self) -> float:
        """Time the busiest rank waits: the part of the pass not covered by its own work."""
        return self.total_s - max(self.busy_s)


def block_fractions(
    layout: str, world_size: int, tokens_per_rank: int, causal: bool = True
) -> list[list[float]]:
    """Fraction of a full (c x c) block rank r computes at step s, the block coming from (r - s) mod W.

    contiguous: earlier source 1, own 1/2 (triangle), later 0. zigzag (chunks r and 2W-1-r):
    exactly 1/2 at every step. stripe (tokens r, r+W, ...): (c(c-1)/2 + c·[r >= source]) / c².
    """
    if layout not in ("contiguous", "zigzag", "stripe"):
        raise ValueError(f"layout must be contiguous, zigzag or stripe, got {layout!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if tokens_per_rank < 1:
        raise ValueError(f"tokens_per_rank must be >= 1, got {tokens_per_rank}")
    c = tokens_per_rank

    def fraction(rank, source):
        if not causal:
            return 1.0
        if layout == "zigzag":
            return 0.5
        if layout == "stripe":
            return (c * (c - 1) / 2 + c * (rank >= source)) / (c * c)
        return 1.0 if source < rank else (0.5 if source == rank else 0.0)

    return [[fraction(r, (r - s) % world_size) for s in range(world_size)] for r in range(world_size)]


def simulate_ring(compute, link_s, overhead_s: float = 0.0) -> RingSim:
    """One ring pass. compute[r][s]: seconds of rank r at step s; link_s[r]: seconds to move one block
    from rank r to rank r + 1; overhead_s: fixed cost of every step (launches, synchronisation)."""
    world = len(compute)
    if world == 0 or any(len(row) != world for row in compute):
        raise ValueError(f"compute must be W x W (W ranks by W steps), got {len(compute)} rows")
    if len(link_s) != world:
        raise ValueError(f"link_s must have one entry per rank ({world}), got {len(link_s)}")
    if overhead_s < 0 or min(link_s) < 0 or min(min(row) for row in compute) < 0:
        raise ValueError("compute, link_s and overhead_s must be >= 0")
    start = [0.0] * world
    for s in range(1, world):
        arrive = [max(start[r - 1], start[r]) + link_s[r - 1] for r in range(world)]
        start = [max(start[r] + compute[r][s - 1], arrive[r]) + overhead_s for r in range(world)]
    finish = tuple(start[r] + compute[r][world - 1] + overhead_s for r in range(world))
    busy = tuple(sum(row) + world * overhead_s for row in compute)
    return RingSim(max(finish), finish, busy)
