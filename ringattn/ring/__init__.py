"""Ring attention: sequence layouts, communicators, the scheduler and sharding helpers."""

from ..layouts import LAYOUTS, shard_indices, shard_lengths, shard_pieces
from .comm import RingComm, RingError, RingStats, RingTimeoutError, TwoLevelComm
from .dist_comm import DistRingComm, comm_from_rings, ring_comm
from .fake_comm import FakeRingComm, fake_ring, fake_two_level, run_fake_ring
from .scheduler import ring_attn_func
from .sharding import shard, unshard
from .usp import usp_attn_func, usp_shard

__all__ = [
    "LAYOUTS",
    "DistRingComm",
    "FakeRingComm",
    "RingComm",
    "RingError",
    "RingStats",
    "RingTimeoutError",
    "TwoLevelComm",
    "comm_from_rings",
    "fake_ring",
    "fake_two_level",
    "ring_attn_func",
    "ring_comm",
    "run_fake_ring",
    "shard",
    "shard_indices",
    "shard_lengths",
    "shard_pieces",
    "unshard",
    "usp_attn_func",
    "usp_shard",
]
