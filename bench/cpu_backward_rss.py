"""Peak RSS growth of one compiled-CPU block forward and backward at a given thread count (issue 19's
scratch check: it should not grow with the thread count beyond what the work needs).

    MALLOC_MMAP_THRESHOLD_=65536 python bench/cpu_backward_rss.py THREADS S DTYPE   # e.g. 64 1024 bfloat16

B = 1, Hq = 32, Hkv = 8, D = 128, causal. Prints one JSON line: q's size and the VmHWM growth of the
forward and of the backward (ringattn.examples.peak; freed buffers leave the RSS with the threshold
above, so each figure is that call's own peak). RINGATTN_CPU_ISA picks the kernel variant.
"""

import json
import sys

import torch

from ringattn.block import BlockMask, block_backward, block_forward
from ringattn.examples.peak import PeakMemory


def main(threads: int, S: int, dtype_name: str) -> dict:
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, S, 32, 128, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, S, 8, 128, generator=gen).to(dtype) for _ in range(2))
    mask, meter = BlockMask(True), PeakMemory("cpu")
    meter.reset()
    out, lse = block_forward(q, k, v, mask, backend="cpu")
    fwd = meter.read().above_baseline_bytes
    meter.reset()
    block_backward(dout, q, k, v, out, lse, mask, backend="cpu")
    bwd = meter.read().above_baseline_bytes
    mb = 2.0**20
    return {"threads": threads, "S": S, "dtype": dtype_name, "q_MB": q.numel() * q.element_size() / mb,
            "fwd_MB": round(fwd / mb, 1), "bwd_MB": round(bwd / mb, 1)}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
