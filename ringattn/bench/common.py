"""Shared machinery of the bench suites: environment record, timing, FLOPs, and result files.

Every row records where and how it was measured; every ratio is computed here from two measured
times taken in the same run, never typed in. Every markdown table starts with one line per column
saying what it means (``Results.save`` refuses a column without one), and every plot carries the
machine and the versions it was measured with.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import torch


@cache
def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo), else the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_sha() -> str:
    """The commit of the checkout this package runs from; "" when it is installed (not a checkout)."""
    package_root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=package_root,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = done.stdout.split()
    # Only this repository's own checkout: an installed copy inside someone else's repository has none.
    if done.returncode or len(lines) != 2 or Path(lines[0]).resolve() != package_root:
        return ""
    return lines[1]


def environment() -> dict:
    """Device, library versions, git sha and timestamp for every row."""
    from .. import __version__

    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({cpu_model()})",
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "ringattn": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": sys.version.split()[0],
        "git_sha": _git_sha() or "unknown",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe_environment(env: dict) -> str:
    """One line naming the machine and versions (the header of every table and the footer of every plot)."""
    parts = [env["device"], f"{env['cpu_threads']} CPU threads", f"ringattn {env['ringattn']}"]
    parts += [f"torch {env['torch']}"] + ([f"triton {env['triton']}"] if env.get("triton") else [])
    parts += [f"CUDA {env['cuda']}"] if env.get("cuda") else []
    parts += [f"python {env['python']}", f"git {env['git_sha']}", env["timestamp"]]
    return ", ".join(parts)


def attention_flops(B: int, Hq: int, Sq: int, Sk: int, D: int, *, causal: bool, mode: str) -> float:
    """4·B·Hq·Sq·Sk·D for the forward, ×0.5 when causal, ×2.5 for backward, ×3.5 for fwd+bwd."""
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    return 4.0 * B * Hq * Sq * Sk * D * (0.5 if causal else 1.0) * factor


FLOP_FORMULA = "4*B*Hq*Sq*Sk*D, x0.5 causal, x2.5 bwd, x3.5 fwd+bwd"


@dataclass(frozen=True)
class Timing:
    """Seconds per call over repeated runs: the median and the quartiles of the samples.

    ``stable`` says the median moved by less than the tolerance over the last round of repeats (see
    ``repeat_until_stable``); an unstable timing is still reported, with its spread.
    """

    samples: tuple[float, ...]
    stable: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return quartiles(self.samples)[0]

    @property
    def q3(self) -> float:
        return quartiles(self.samples)[1]

    @property
    def spread(self) -> float:
        """Half the interquartile range relative to the median (0.05: the middle half of the samples
        lies within about ±5 % of the median)."""
        return (self.q3 - self.q1) / 2 / self.median if self.median > 0 else 0.0


def quartiles(samples: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (the samples themselves when there are fewer than two)."""
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[2]


def median_is_stable(previous: Sequence[float], now: Sequence[float], rel_tol: float) -> bool:
    """True when the median of ``now`` (all samples so far) is within ``rel_tol`` of the median of
    ``previous`` (the samples before the last round)."""
    if not previous:
        return False
    before, after = statistics.median(previous), statistics.median(now)
    return abs(after - before) <= rel_tol * abs(after)


def repeat_until_stable(
    measure_round: Callable[[], None],
    samples: Callable[[], list[list[float]]],
    *,
    max_rounds: int,
    rel_tol: float = 0.02,
    budget_s: float = float("inf"),
) -> bool:
    """Call ``measure_round`` (which appends one round of samples to every series ``samples()``
    returns) until every series' median moves by less than ``rel_tol`` in a round, ``max_rounds``
    rounds were run, or ``budget_s`` seconds passed. At least two rounds run. Returns whether the
    medians settled."""
    start = time.monotonic()
    measure_round()
    for _ in range(max_rounds - 1):
        before = [list(s) for s in samples()]
        measure_round()
        if all(median_is_stable(b, s, rel_tol) for b, s in zip(before, samples(), strict=True)):
            return True
        if time.monotonic() - start > budget_s:
            break
    return False


def timing(
    fn, *, warmup: int = 1, repeats: int = 5, max_rounds: int = 4, rel_tol: float = 0.02, budget_s: float = 30
) -> Timing:
    """Time ``fn``. GPU: triton's do_bench (CUDA events, L2 flushed), all its samples. CPU: wall
    clock, ``repeats`` calls per round, rounds until the median is stable (``repeat_until_stable``)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        times_ms = do_bench(fn, warmup=25, rep=100, return_mode="all")
        return Timing(tuple(t / 1e3 for t in times_ms))
    for _ in range(warmup):
        fn()
    collected: list[float] = []

    def one_round():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            collected.append(time.perf_counter() - start)

    stable = repeat_until_stable(
        one_round, lambda: [collected], max_rounds=max_rounds, rel_tol=rel_tol, budget_s=budget_s
    )
    return Timing(tuple(collected), stable)


def time_fn(fn, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call (``timing(fn).median``)."""
    return timing(fn, warmup=warmup, repeats=repeats).median


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


@dataclass
class Results:
    """Rows of one suite run, written as JSON, a markdown table and (optionally) PNG plots.

    ``columns`` passed to ``save``/``markdown`` map each table column to a one-line meaning, printed
    above the table; ``cells`` may format a column from its whole row (e.g. a value with its spread).
    ``notes`` are printed below the table.
    """

    suite: str
    env: dict = field(default_factory=environment)
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row) -> dict:
        row = {"suite": self.suite, **row, **self.env}
        self.rows.append(row)
        return row

    def markdown(self, columns: dict[str, str], cells: dict[str, Callable[[dict], str]] | None = None) -> str:
        if not isinstance(columns, dict):
            raise TypeError("columns must map each column to its one-line meaning")
        undocumented = [name for name, meaning in columns.items() if not meaning or "\n" in meaning]
        if undocumented:
            raise ValueError(f"columns need a one-line meaning: {undocumented}")
        cells = cells or {}
        lines = ["Columns:", ""] + [f"- `{name}`: {meaning}" for name, meaning in columns.items()] + [""]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            shown = [cells[c](row) if c in cells else _fmt(row.get(c)) for c in columns]
            lines.append("| " + " | ".join(shown) + " |")
        if self.notes:
            lines += [""] + [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    def save(
        self, out_dir: Path, columns: dict[str, str], cells: dict[str, Callable[[dict], str]] | None = None
    ) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{self.suite}.json").write_text(json.dumps(self.rows, indent=1) + "\n")
        header = f"# {self.suite}\n\n{describe_environment(self.env)}\n\n"
        (out_dir / f"{self.suite}.md").write_text(header + self.markdown(columns, cells) + "\n")
        return out_dir


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
    *,
    env: dict,
    logx=False,
    logy=False,
):
    """A line plot of named (x, y) series, saved as PNG (matplotlib from the `bench` extra), with the
    machine and versions of ``env`` printed under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.text(0.01, 0.01, _wrap(describe_environment(env), 110), fontsize=6.5, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])
