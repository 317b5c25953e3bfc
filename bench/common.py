"""Shared machinery of the bench suites: environment record, timing, FLOPs, and result files.

Every row records where and how it was measured; every ratio is computed here from two measured
times taken in the same run, never typed in.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch


def environment() -> dict:
    """Device, library versions, git sha and timestamp for every row."""
    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        sha = ""
    return {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": sys.version.split()[0],
        "git_sha": sha or "unknown",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def attention_flops(B: int, Hq: int, Sq: int, Sk: int, D: int, *, causal: bool, mode: str) -> float:
    """4·B·Hq·Sq·Sk·D for the forward, ×0.5 when causal, ×2.5 for backward, ×3.5 for fwd+bwd."""
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    return 4.0 * B * Hq * Sq * Sk * D * (0.5 if causal else 1.0) * factor


FLOP_FORMULA = "4*B*Hq*Sq*Sk*D, x0.5 causal, x2.5 bwd, x3.5 fwd+bwd"


def time_fn(fn, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call. GPU: triton's do_bench (CUDA events, L2 flushed). CPU: wall clock."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Results:
    """Rows of one suite run, written as JSON, a markdown table and (optionally) PNG plots."""

    suite: str
    env: dict = field(default_factory=environment)
    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> dict:
        row = {"suite": self.suite, **row, **self.env}
        self.rows.append(row)
        return row

    def markdown(self, columns: list[str]) -> str:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
        return "\n".join(lines)

    def save(self, out_dir: Path, columns: list[str]) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{self.suite}.json").write_text(json.dumps(self.rows, indent=1) + "\n")
        header = f"# {self.suite}\n\n{self.env['device']}, torch {self.env['torch']}, git {self.env['git_sha']}\n\n"
        (out_dir / f"{self.suite}.md").write_text(header + self.markdown(columns) + "\n")
        return out_dir


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def progress(items, label: str):
    """A one-line progress counter on stderr for long sweeps."""
    items = list(items)
    for i, item in enumerate(items, 1):
        print(f"\r{label}: {i}/{len(items)}", end="", file=sys.stderr, flush=True)
        yield item
    print(file=sys.stderr)


def plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, tuple[list, list]],
    logx=False,
    logy=False,
):
    """A line plot of named (x, y) series, saved as PNG (matplotlib from the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
