"""Feature suites: what a sliding window costs, and what each context-parallel mode moves.

``window``: forward+backward seconds of one attention call with a sliding window at growing S, ours
(window tiles skipped) vs ours with plain causal vs torch SDPA with the window as a dense boolean mask
(the way to get a window from SDPA). Skipping makes the window's cost grow with S, not S².

``cp``: exact counts, not timings. Bytes one rank sends per call of each context-parallel mode
(ring, all-gather, FP8 K/V on the wire) on the in-process fake ring, and the busiest rank's causal
work over the average for each layout on a long-tailed mix of packed documents.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ringattn import RoPEConfig, flash_attn_func
from ringattn.layouts import causal_work
from ringattn.ring import fake_ring, ring_attn_func, run_fake_ring, shard

from .common import Results, plot, timing

WINDOW_COLUMNS = {
    "device": "where it ran",
    "dtype": "input dtype",
    "S": "sequence length (B=1)",
    "window": "keys each query sees: itself and window - 1 before it",
    "t_window": "median s, ours fwd+bwd with window_size=(window - 1, 0), causal",
    "t_causal": "median s, ours fwd+bwd with plain causal (every earlier key)",
    "t_sdpa_mask": "median s, torch SDPA fwd+bwd with the window as a dense bool mask",
    "us_per_token": "t_window per query token, microseconds (flat when the cost grows with S)",
    "sdpa_over_ours": "t_sdpa_mask / t_window (> 1: ours faster)",
}
CP_COLUMNS = {
    "W": "ranks (in-process fake ring)",
    "S": "global sequence length",
    "mode": "cp_mode and wire dtype",
    "fwd_bytes": "bytes one rank sends in the forward (K/V)",
    "bwd_bytes": "bytes one rank sends in the backward (K/V and dK/dV)",
    "vs_ring": "fwd+bwd bytes over the bf16 ring's",
}
BALANCE_COLUMNS = {
    "W": "ranks",
    "layout": "how the packed sequence is split",
    "busiest_over_mean": "causal pairs of the busiest rank / the mean over ranks (1: balanced)",
    "docs": "documents in the mix (lognormal lengths, median ~1K, a few of 8K+)",
    "S": "tokens in the mix",
}


def _fwd_bwd(fn, *tensors):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))


def run_window(quick: bool, out_dir: Path, device: str | None = None) -> Results:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    Hq, Hkv, D = (8, 2, 64) if quick else (32, 8, 128)
    seq_lens, window = ((512, 1024, 2048) if quick else (2048, 4096, 8192)), 256
    results = Results("window")
    gen = torch.Generator().manual_seed(0)
    for S in seq_lens:
        q = torch.randn(1, S, Hq, D, generator=gen).to(device, dtype)
        k, v = (torch.randn(1, S, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))
        index = torch.arange(S, device=device)
        band = (index[None, :] <= index[:, None]) & (index[None, :] > index[:, None] - window)

        def sdpa(q, k, v, band=band):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=band, enable_gqa=True
            )
            return out.transpose(1, 2)

        fns = {
            "t_window": lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0)),
            "t_causal": lambda q, k, v: flash_attn_func(q, k, v, causal=True),
            "t_sdpa_mask": sdpa,
        }
        t = {
            name: timing(lambda f=f, qkv=(q, k, v): _fwd_bwd(f, *qkv), repeats=3, max_rounds=3).median
            for name, f in fns.items()
        }
        results.add(device=device, dtype=str(dtype).replace("torch.", ""), S=S, window=window, **t,
                    us_per_token=t["t_window"] / S * 1e6, sdpa_over_ours=t["t_sdpa_mask"] / t["t_window"])  # fmt: skip
    results.save(out_dir, WINDOW_COLUMNS)
    series = {name: ([r["S"] for r in results.rows], [r[name] for r in results.rows]) for name in fns}
    plot(out_dir / "window.png", f"fwd+bwd with a {window}-token window", "S", "seconds", series,
         env=results.env, logx=True, logy=True)  # fmt: skip
    return results


def _sent(W: int, S: int, **options) -> tuple[int, int]:
    """Bytes rank 0 sends in the forward and in the backward of one ring call on the fake ring."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, S, h, 64, generator=gen).to(torch.bfloat16) for h in (8, 2, 2))

    def body(comm):
        comm.stats.clear()
        leaves = [shard(t, 1, comm).requires_grad_() for t in (q, k, v)]
        out = ring_attn_func(*leaves, group=comm, causal=True, rope=RoPEConfig(64), **options)
        forward = sum(t.bytes_sent for t in comm.stats.totals.values())
        out.backward(torch.ones_like(out))
        return forward, sum(t.bytes_sent for t in comm.stats.totals.values()) - forward

    return run_fake_ring(body, fake_ring(W))[0]


def long_tailed_documents(n: int = 60, seed: int = 0) -> torch.Tensor:
    """cu_seqlens of lognormal document lengths (median ~1K tokens, a few of 8K+), as packed data."""
    lengths = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1.2 + 6.8).exp()
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.clamp(16, 32768).long().cumsum(0)])


def run_cp(quick: bool, out_dir: Path) -> Results:
    results = Results("cp")
    modes = {
        "ring": {},
        "ring, fp8 wire": {"wire_dtype": torch.float8_e4m3fn},
        "allgather": {"cp_mode": "allgather"},
        "allgather, fp8 wire": {"cp_mode": "allgather", "wire_dtype": torch.float8_e4m3fn},
    }
    for W in (4,) if quick else (4, 8):
        S = 256 * W
        base = sum(_sent(W, S))
        for name, options in modes.items():
            fwd, bwd = _sent(W, S, **options)
            results.add(W=W, S=S, mode=name, fwd_bytes=fwd, bwd_bytes=bwd, vs_ring=(fwd + bwd) / base)
    results.save(out_dir, CP_COLUMNS)
    balance = Results("layout_balance")
    cu = long_tailed_documents()
    S = int(cu[-1])
    for W in (4, 8, 32):
        for layout in ("contiguous", "zigzag", "stripe", "doc_zigzag"):
            work = torch.tensor(causal_work(S, W, layout, cu), dtype=torch.float64)
            balance.add(
                W=W, layout=layout, busiest_over_mean=float(work.max() / work.mean()), docs=len(cu) - 1, S=S
            )
    balance.save(out_dir, BALANCE_COLUMNS)
    return results
