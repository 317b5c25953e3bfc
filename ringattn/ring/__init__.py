"""Ring attention: sequence layouts (and, as it lands, the scheduler, communication and merge)."""

from .layouts import LAYOUTS, shard_indices

__all__ = ["LAYOUTS", "shard_indices"]
