"""The compiled CUDA backend: ``ringattn._C`` block attention on tensor cores (bf16 and fp16 inputs).

Kernels run on the tensors' device, on torch's current stream. Head dims: any even D up to 256
(tiles are padded to 64, 128 or 256 columns). The backward accumulates dQ with fp32 atomics, so its
dq is not bitwise reproducible across runs. Direct calls: ``torch.ops.ringattn.cuda_block_forward`` /
``cuda_block_backward`` (signatures in ``ringattn.backends.compiled``).
"""

from __future__ import annotations

import torch

from .._extension import compiled
from .compiled import CompiledBackend, define_block_ops

__all__ = ["CudaBackend", "cuda_block_forward", "cuda_block_backward"]

MAX_HEAD_DIM = 256


def _run_forward(module, params, q):
    with torch.cuda.device(q.device):
        params.stream = torch.cuda.current_stream(q.device).cuda_stream
        module.attn_forward_cuda(params)


def _run_backward(module, params, q, k):
    # fp32 workspaces in rotated coordinates: dq gathers atomics from every key tile.
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_accum = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    params.dq_accum, params.dk_accum = dq_accum.data_ptr(), dk_accum.data_ptr()
    with torch.cuda.device(q.device):
        params.stream = torch.cuda.current_stream(q.device).cuda_stream
        module.attn_backward_cuda(params)


cuda_block_forward, cuda_block_backward = define_block_ops("cuda", _run_forward, _run_backward)


class CudaBackend(CompiledBackend):
    """Block attention on CUDA tensors with the compiled tensor-core kernels (bf16 and fp16)."""

    name = "cuda"
    device_type = "cuda"
    dtypes = (torch.bfloat16, torch.float16)
    forward_op = cuda_block_forward
    backward_op = cuda_block_backward

    def can_implement(self, q, k, v, args):
        ok, reason = super().can_implement(q, k, v, args)
        if not ok:
            return ok, reason
        if not compiled().with_cuda:
            return False, "ringattn._C was built without CUDA kernels"
        if q.shape[3] % 2 or q.shape[3] > MAX_HEAD_DIM:
            return False, f"head dim must be even and <= {MAX_HEAD_DIM}, got {q.shape[3]}"
        return True, ""
