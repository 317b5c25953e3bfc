"""Small CUDA-backend calls for compute-sanitizer (memcheck, racecheck): ``python -m bench.sanitize_cases``.

Each case runs the compiled CUDA kernels forward and backward once on shapes that reach the edges
(odd lengths, GQA, documents with an empty one, RoPE far out, strided spans, head dims 64/80/128/256;
the deterministic dQ pass at 80 and 256);
the sanitizer reports any out-of-bounds access or shared-memory race. Exits 0 when every call ran.
"""

from __future__ import annotations

import sys

import torch

from ringattn import RoPEConfig
from ringattn.block import BlockMask, Span, block_backward, block_forward

CASES = {
    "d64-causal-gqa4-odd": dict(Sq=33, Sk=33, Hq=4, Hkv=1, D=64, mask=BlockMask(True)),
    "d80-rope-far-deterministic": dict(
        Sq=17, Sk=40, Hq=2, Hkv=2, D=80, mask=BlockMask(True, Span(23)), far=True, deterministic=True
    ),
    "d128-docs-empty": dict(
        Sq=70, Sk=70, Hq=2, Hkv=1, D=128, mask=BlockMask(True, cu_seqlens=torch.tensor([3, 20, 20, 66]))
    ),
    "d256-strided-spans": dict(
        Sq=9, Sk=12, Hq=2, Hkv=1, D=256, mask=BlockMask(False, Span(1, 2), Span(0, 3))
    ),
    "d256-docs-deterministic": dict(
        Sq=70,
        Sk=70,
        Hq=2,
        Hkv=1,
        D=256,
        mask=BlockMask(True, cu_seqlens=torch.tensor([0, 33, 70])),
        deterministic=True,
    ),
}


def run_case(Sq, Sk, Hq, Hkv, D, mask, far=False, deterministic=False, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, Sq, Hq, D, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(1, Sk, Hkv, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
    rope = RoPEConfig(D, theta=45.2e9) if far else None
    offset = 4_194_000 if far else 0
    kw = dict(rope=rope, deterministic=deterministic, backend="cuda")
    if far:
        kw |= dict(
            q_positions=torch.arange(offset, offset + Sq, device="cuda"),
            k_positions=torch.arange(offset, offset + Sk, device="cuda"),
        )
    out, lse = block_forward(q, k, v, mask, **kw)
    block_backward(torch.randn_like(q), q, k, v, out, lse, mask, **kw)
    torch.cuda.synchronize()


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cases: no CUDA device", file=sys.stderr)
        return 2
    for name, case in CASES.items():
        run_case(**case)
        print(f"ran {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
