"""`python -m ringattn.demo`: what works today, printed for a person.

1. Whether the compiled core was built (and with CUDA or not).
2. RoPE phase accuracy at long-context positions: exact mode vs transformers' fp32 arithmetic.
3. The fp64 reference ring: W virtual ranks in each layout give exactly full attention.
"""

import time

import torch

from . import RoPEConfig, attention_ref, extension_status, ring_attention_ref
from .rope import phase_error

POSITIONS = {"8K": 8_192, "128K": 131_072, "1M": 1_048_576, "4M": 4_194_304}
THETAS = {"Llama-3 (5e5)": 5e5, "Llama-3 4M-context (45.2e9)": 45.2e9}


def _phase_table() -> str:
    lines = [
        "| theta | positions up to | exact mode (rad) | hf / transformers fp32 (rad) |",
        "|---|---|---|---|",
    ]
    for theta_name, theta in THETAS.items():
        for pos_name, end in POSITIONS.items():
            positions = torch.arange(end - 4096, end)  # the last 4096 positions: the worst phases
            exact = phase_error(RoPEConfig(128, theta=theta), positions)
            hf = phase_error(RoPEConfig(128, theta=theta, precision="hf"), positions)
            lines.append(f"| {theta_name} | {pos_name} | {exact:.1e} | {hf:.1e} |")
    return "\n".join(lines)


def _ring_check() -> str:
    gen = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D, W = 1, 96, 8, 2, 64, 4
    q = torch.randn(B, S, Hq, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, S, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    rope = RoPEConfig(D, theta=45.2e9)
    cu = torch.tensor([0, 40, 40, 90])  # three documents (one empty) and 6 padding tokens
    kw = dict(causal=True, cu_seqlens=cu, rope=rope)
    full_out, full_lse = attention_ref(q, k, v, **kw)
    lines = [
        f"B={B} S={S} Hq={Hq} Hkv={Hkv} D={D}, causal, packed documents, RoPE theta=45.2e9, W={W} ranks",
        "| layout | max abs diff out | max abs diff lse (finite rows) |",
        "|---|---|---|",
    ]
    finite = torch.isfinite(full_lse)
    for layout in ("contiguous", "zigzag", "stripe"):
        out, lse = ring_attention_ref(q, k, v, world_size=W, layout=layout, **kw)
        d_out = (out - full_out).abs().max().item()
        d_lse = (lse[finite] - full_lse[finite]).abs().max().item()
        lines.append(f"| {layout} | {d_out:.1e} | {d_lse:.1e} |")
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    print("ringattn demo\n")
    print("Compiled core:", extension_status(), "\n")
    print("RoPE phase error vs fp64 (head dim 128, last 4096 positions before each mark):")
    print(_phase_table(), "\n")
    print("Reference ring attention (fp64) vs full attention:")
    print(_ring_check(), "\n")
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
