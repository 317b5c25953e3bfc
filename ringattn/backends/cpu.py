"""The compiled CPU backend: ``ringattn._C`` block attention (C++17, multithreaded, fp32 accumulation).

Inputs fp32 or bf16; fp64 blocks go to the reference backend, fp16 is not supported on the CPU. The
ops ``torch.ops.ringattn.cpu_block_forward``/``cpu_block_backward`` come from
``ringattn.backends.compiled``; most callers want ``ringattn.block.block_forward(..., backend="cpu")``.
"""

from __future__ import annotations

import torch

from .compiled import CompiledBackend, define_block_ops

__all__ = ["CpuBackend", "cpu_block_forward", "cpu_block_backward"]

cpu_block_forward, cpu_block_backward = define_block_ops(
    "cpu",
    run_forward=lambda module, params, q: module.attn_forward_cpu(params),
    run_backward=lambda module, params, q, k: module.attn_backward_cpu(params),
)


class CpuBackend(CompiledBackend):
    """Block attention on CPU tensors with the compiled kernels (fp32 and bf16)."""

    name = "cpu"
    device_type = "cpu"
    dtypes = (torch.float32, torch.bfloat16)
    # no atomics, so deterministic: sums depend on the thread count only
    features = CompiledBackend.features | {"deterministic"}
    forward_op = cpu_block_forward
    backward_op = cpu_block_backward
