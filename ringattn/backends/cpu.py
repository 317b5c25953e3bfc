"""The compiled CPU backend: ``ringattn._C`` block attention (C++17, multithreaded, fp32 accumulation).

Inputs fp32, bf16 or fp16 (converted to fp32 as they are staged, rounded back as they are stored);
fp64 blocks go to the reference backend. The ops ``torch.ops.ringattn.cpu_block_forward``/
``cpu_block_backward`` come from ``ringattn.backends.compiled``; most callers want
``ringattn.block.block_forward(..., backend="cpu")``.

The extension carries the kernels compiled for several ISA levels (``generic``, and on x86-64 ``avx2``,
``avx512``, ``avx512bf16``) and runs the best one this CPU supports. ``RINGATTN_CPU_ISA=<name>``, read
at every call, forces one (tests and benchmarks compare them); ``ringattn.extension_status()`` lists them.
"""

from __future__ import annotations

import os

import torch

from .compiled import CompiledBackend, define_block_ops

__all__ = ["ISA_ENV", "CpuBackend", "cpu_block_backward", "cpu_block_forward", "forced_variant"]

ISA_ENV = "RINGATTN_CPU_ISA"


def forced_variant(module) -> str:
    """The CPU kernel variant ``RINGATTN_CPU_ISA`` names, "" when unset (the best this CPU runs).

    Raises ValueError naming the variable when the extension has no such variant or this CPU cannot
    run it."""
    name = os.environ.get(ISA_ENV, "")
    if not name:
        return ""
    variants = {v[0]: v[2] for v in module.cpu_variants()}  # name -> features this CPU lacks
    runs = ", ".join(n for n, missing in variants.items() if not missing) or "none"
    if name not in variants:
        raise ValueError(
            f"{ISA_ENV}={name!r} is not a CPU kernel variant of this build; compiled: "
            f"{', '.join(variants)}; this CPU runs: {runs}"
        )
    if variants[name]:
        raise ValueError(
            f"{ISA_ENV}={name!r}: this CPU lacks {' '.join(variants[name])} for that variant; it runs: {runs}"
        )
    return name


cpu_block_forward, cpu_block_backward = define_block_ops(
    "cpu",
    run_forward=lambda module, params, q: module.attn_forward_cpu(params, forced_variant(module)),
    run_backward=lambda module, params, q, k: module.attn_backward_cpu(params, forced_variant(module)),
)


class CpuBackend(CompiledBackend):
    """Block attention on CPU tensors with the compiled kernels (fp32, bf16 and fp16)."""

    name = "cpu"
    device_type = "cpu"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    # no atomics, so deterministic: sums depend on the thread count only
    features = CompiledBackend.features | {"deterministic"}
    forward_op = cpu_block_forward
    backward_op = cpu_block_backward
