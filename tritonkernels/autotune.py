"""Autotuning among the shipped tile configs of a kernel, once per problem class, on the GPU.

Only configs from ``configs.py`` are candidates: every one of them is AOT-checked for shared memory
and spills, so tuning never picks a tile that does not fit. The first candidate is the default,
used without timing when there is one candidate, on the interpreter, while a CUDA graph is being
captured, or when ``RINGATTN_TRITON_AUTOTUNE=0``. Choices are cached per process in the tuner
object (``TUNER``, the launchers' default; ``TUNER.clear()`` forgets them), keyed by what changes
the best tile: kernel, device, dtype, head dim, query group, mask kind, RoPE, power-of-two
buckets of the sizes and the score features.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch

from .configs import KernelConfig

__all__ = ["Tuner", "TUNER", "TuneKey", "autotune_enabled", "size_bucket"]


class TuneKey(NamedTuple):
    """What the launchers key a tuned choice on (sizes as ``size_bucket``s)."""

    kernel: str
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    group: int
    causal: bool
    docs: bool
    rope: str  # "none", or the angle precision and rotary dim, e.g. "exact/128"
    sq: int
    sk: int
    rows: int  # batch x query heads
    features: str = ""  # score features compiled in: "window", "softcap", "alibi", "kdocs", comma-joined


def autotune_enabled() -> bool:
    """False when ``RINGATTN_TRITON_AUTOTUNE`` is 0/false/off (read at each call, not at import)."""
    return os.environ.get("RINGATTN_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def size_bucket(n: int) -> int:
    """The next power of two >= n (0 for 0): sizes in one bucket share a tuned config."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _time_ms(fn: Callable[[], None], reps: int = 10) -> float:
    """Mean milliseconds of ``fn`` on the current CUDA stream after one warm-up (compile) call.

    CUDA events rather than triton.testing.do_bench, which allocates a 256 MB L2-flush buffer: tuning
    happens inside training steps, where memory may be nearly full.
    """
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


class Tuner:
    """Times each candidate once per key and remembers the fastest.

    ``timer(fn) -> ms`` is injectable so the selection logic is testable without a GPU.
    """

    def __init__(self, timer: Callable[[Callable[[], None]], float] = _time_ms):
        self._timer = timer
        self._best: dict[Hashable, KernelConfig] = {}
        self.timings: dict[Hashable, dict[KernelConfig, float]] = {}

    def clear(self) -> None:
        self._best.clear()
        self.timings.clear()

    def choose(
        self,
        key: Hashable,
        candidates: Sequence[KernelConfig],
        launch: Callable[[KernelConfig], None],
        device: torch.device | None = None,
    ) -> KernelConfig:
        """The config to use for ``key``; ``launch(cfg)`` runs the kernel (it must only write outputs)."""
        if not candidates:
            raise ValueError("no candidate configs")
        if len(candidates) == 1 or not autotune_enabled() or _capturing(device):
            return candidates[0]
        best = self._best.get(key)
        if best is None:
            times = {cfg: self._timer(lambda cfg=cfg: launch(cfg)) for cfg in candidates}
            best = min(candidates, key=times.__getitem__)  # ties go to the earlier (default) one
            self.timings[key] = times
            self._best[key] = best
        return best


def _capturing(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing()


TUNER = Tuner()
