"""The registry of bench suites: what ``ringattn-bench`` can run, and what each needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import features, gpu_check, kernels, ring, rope
from .common import Results


@dataclass(frozen=True)
class Suite:
    name: str
    run: Callable[[bool, Path], Results]  # (quick, out_dir) -> Results; writes <name>.json and .md
    help: str
    needs: tuple[str, ...] = ("matplotlib",)  # modules it imports (from the `bench` extra)
    needs_cuda: bool = False
    in_all_without_cuda: bool = True  # run by `all` on a machine without a CUDA device
    takes_cpu_isas: bool = False  # run(quick, out_dir, cpu_isas=...) runs the cpu backend per variant


def _kernels(quick: bool, out_dir: Path, cpu_isas: tuple[str, ...] = ("",)) -> Results:
    cuda = torch.cuda.is_available()
    return kernels.run(quick, out_dir, device="cuda" if cuda else "cpu", cpu_isas=cpu_isas)


def _cpu(quick: bool, out_dir: Path, cpu_isas: tuple[str, ...] = ("",)) -> Results:
    """Compiled CPU kernels with fused RoPE vs torch SDPA + transformers RoPE.

    Llama-3-8B attention shapes: B=1, Hq=32, Hkv=8, D=128, causal, fp32, bf16 and fp16 at S=2048 and
    4096; ``cpu_isas``: the kernel variants to run (each its own rows, against the same SDPA runs).
    """
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if quick:
        return kernels.run(True, out_dir, device="cpu", dtypes=dtypes, suite="cpu", cpu_isas=cpu_isas)
    return kernels.run(
        False, out_dir, device="cpu", dtypes=dtypes, seq_lens=(2048, 4096), suite="cpu", cpu_isas=cpu_isas
    )


def _memory(quick: bool, out_dir: Path) -> Results:
    from ..examples import memory  # each case in a fresh process (CPU RSS or CUDA max-allocated)

    return memory.run(quick, out_dir)


_SUITES = (
    Suite(
        "kernels",
        _kernels,
        "every backend vs torch SDPA (and flash-attn on a GPU), fused vs unfused RoPE",
        ("matplotlib", "transformers"),
        takes_cpu_isas=True,
    ),
    Suite(
        "rope",
        rope.run,
        "RoPE phase error vs fp64 and cost, ours vs transformers, to 4M positions",
        ("matplotlib", "transformers"),
    ),
    Suite(
        "cpu",
        _cpu,
        "the kernels suite on the CPU at Llama-3-8B shapes",
        ("matplotlib", "transformers"),
        in_all_without_cuda=False,  # without a GPU `kernels` already runs on the CPU
        takes_cpu_isas=True,
    ),
    Suite("ring", ring.run, "W local ranks: ring overlap and efficiency", ("matplotlib",)),
    Suite(
        "window", features.run_window, "sliding window cost vs S: ours vs plain causal vs SDPA with a mask"
    ),
    Suite("cp", features.run_cp, "bytes per context-parallel mode and layout balance (exact counts)", ()),
    Suite(
        "memory",
        _memory,
        "one attention layer's peak memory (fwd+bwd) vs S: ringattn vs SDPA vs eager",
        ("matplotlib", "transformers"),
    ),
    Suite(
        "gpu-check",
        gpu_check.run,
        "every backend vs fp64 on a GPU, then the kernels suite there",
        ("matplotlib", "transformers"),
        needs_cuda=True,
        in_all_without_cuda=False,
    ),
)
SUITES: dict[str, Suite] = {suite.name: suite for suite in _SUITES}
