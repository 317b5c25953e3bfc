"""Peak memory of a region of code, measured: CUDA's max-allocated on a GPU, the RSS high-water mark on CPU.

On the CPU, ``reset()`` clears the kernel's high-water mark of this process (``/proc/self/clear_refs``,
Linux) and records the current RSS as the baseline; ``peak()`` reads ``VmHWM``. The figure therefore
includes every allocation made in between (torch's tensors, the compiled kernels' workspaces, the
allocator's slack), which is what a user of the machine pays. Elsewhere (no procfs) the CPU figure is
``None``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

__all__ = ["PeakMemory", "Reading", "rss_bytes"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now (None where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


@dataclass
class Reading:
    """One measurement: ``peak_bytes`` (absolute), ``baseline_bytes`` (at ``reset``) and their
    difference ``above_baseline_bytes``; ``kind`` says what was measured."""

    kind: str
    peak_bytes: int | None
    baseline_bytes: int | None

    @property
    def above_baseline_bytes(self) -> int | None:
        if self.peak_bytes is None or self.baseline_bytes is None:
            return None
        return self.peak_bytes - self.baseline_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "above_baseline_bytes": self.above_baseline_bytes}


class PeakMemory:
    """``reset()`` before the region, ``read()`` after it. ``device``: where the tensors live."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "cpu rss (VmHWM)"
        self.baseline: int | None = None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.baseline = None
            return
        self.baseline = rss_bytes()

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.baseline is None:
            return None
        kb = _status_kb("VmHWM")
        return None if kb is None else kb * 1024

    def read(self) -> Reading:
        return Reading(self.kind, self.peak(), self.baseline)


def supported(device: torch.device | str = "cpu") -> bool:
    """Whether peak memory can be measured for tensors on ``device`` in this process."""
    if torch.device(device).type == "cuda":
        return True
    return os.path.exists(_CLEAR_REFS) and rss_bytes() is not None
