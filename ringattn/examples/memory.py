"""`python -m ringattn.examples.memory`: peak memory of one attention layer's forward + backward vs S.

One transformers Llama attention layer (q/k/v/o projections, RoPE, attention; hidden 512, 8 query
heads over 2 KV heads of dim 64, RoPE theta 45.2e9, causal, one sequence of S tokens, fp32) runs
forward and backward with three attention implementations:

* ``ringattn``: ``attn_implementation="ringattn"`` with RoPE fused into the kernel (``apply``);
* ``sdpa``: transformers' torch SDPA path (its own RoPE);
* ``eager``: transformers' eager attention, which materialises the S x S scores.

Each (implementation, S) runs in a fresh process. Inputs (hidden states, RoPE tables, the eager
path's causal mask, the output gradient) are made first; then the peak is measured over the forward
and backward alone: the CPU's RSS high-water mark above the RSS before (``/proc/self/clear_refs``), or
on a GPU ``torch.cuda.max_memory_allocated`` above the allocation before (CPU processes run with
glibc's ``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors leave the RSS). Attention that keeps O(S)
for backward (q, k, v, out, lse) grows linearly in S; materialised scores grow as S^2, which the
``x2 S`` column (the peak's growth when S doubles) shows as ~2 against ~4.

Output (``--out``): ``memory.json``, ``memory.md`` (the ringattn bench's table format) and ``memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .peak import PeakMemory

IMPLS = ("ringattn", "sdpa", "eager")
HIDDEN, HEADS_Q, HEADS_KV, HEAD_DIM, THETA = 512, 8, 2, 64, 45.2e9
# S per implementation: eager's S x S fp32 scores (and their softmax and gradients) cost
# 8 heads * S^2 * 4 bytes each, 2 GiB at S = 8192: it stops earlier.
SIZES = {
    "quick": {
        "ringattn": (1024, 2048, 4096, 8192),
        "sdpa": (1024, 2048, 4096, 8192),
        "eager": (1024, 2048, 4096),
    },
    "full": {
        "ringattn": (1024, 2048, 4096, 8192, 16384, 32768),
        "sdpa": (1024, 2048, 4096, 8192, 16384, 32768),
        "eager": (1024, 2048, 4096, 8192),
    },
}


def _layer(impl: str, S: int, device: torch.device):
    """The layer and its inputs: (attention module, kwargs of its forward, output gradient)."""
    import transformers

    from ..integrations import transformers as ra_hf

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS_Q,
        num_key_value_heads=HEADS_KV,
        head_dim=HEAD_DIM,
        max_position_embeddings=S,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        attn_implementation="sdpa" if impl == "ringattn" else impl,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device)
    if impl == "ringattn":
        ra_hf.apply(model)  # attn_implementation="ringattn", RoPE fused into the kernel
    attn = model.model.layers[0].self_attn
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(1, S, HIDDEN, device=device, generator=gen).requires_grad_()
    positions = torch.arange(S, device=device)[None]
    cos, sin = model.model.rotary_emb(hidden, positions)
    mask = None
    if impl == "eager":  # what the model's mask builder gives eager: additive causal (1, 1, S, S)
        mask = torch.full((S, S), torch.finfo(torch.float32).min, device=device).triu(1)[None, None]
    kwargs = dict(
        hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=mask, position_ids=positions
    )
    dout = torch.randn(1, S, HIDDEN, device=device, generator=gen)
    return attn, kwargs, dout


def measure_one(impl: str, S: int, device: str = "cpu") -> dict:
    """Peak memory of one forward + backward of the layer, in this process."""
    dev = torch.device(device)
    attn, kwargs, dout = _layer(impl, S, dev)
    meter = PeakMemory(dev)
    meter.reset()
    out, _ = attn(**kwargs)
    out.backward(dout)
    reading = meter.read()
    assert kwargs["hidden_states"].grad is not None
    return {"impl": impl, "S": S, "device": str(dev), **reading.as_dict()}


def _run_child(impl: str, S: int, device: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "ringattn.examples.memory", "--one", impl, str(S), "--device", device]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the RSS (glibc)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"impl": impl, "S": S, "device": device, "error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _device(want: str) -> str:
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def run(quick: bool, out_dir: Path, device: str = "auto", timeout: float = 300.0):
    """Every (implementation, S) in a fresh process; writes memory.json/.md/.png; returns the Results."""
    from ..bench.common import Results, plot, progress

    device = _device(device)
    sizes = SIZES["quick" if quick else "full"]
    results = Results("memory")
    cases = [(impl, S) for impl in IMPLS for S in sizes[impl]]
    measured = {}
    for impl, S in progress(cases, "memory"):
        row = _run_child(impl, S, device, timeout)
        measured[(impl, S)] = row
    for impl in IMPLS:
        previous = None
        for S in sizes[impl]:
            row = measured[(impl, S)]
            peak = row.get("above_baseline_bytes")
            growth = None
            if peak and previous and previous[1]:
                growth = peak / previous[1] if S == 2 * previous[0] else None
            results.add(
                impl=impl,
                S=S,
                layer="llama attention: hidden 512, 8q/2kv heads x 64, causal, fp32",
                measured=row.get("kind"),
                peak_mib=None if peak is None else peak / 2**20,
                peak_bytes=peak,
                bytes_per_token=None if peak is None else peak / S,
                growth_x2=growth,
                error=row.get("error"),
            )
            previous = (S, peak)
    results.notes.append(
        "each case runs in a fresh process; the peak is above the memory held before the forward (the "
        "layer's weights and its inputs, the eager path's causal mask included, are not counted)"
    )
    out_dir = Path(out_dir)
    results.save(
        out_dir,
        {
            "impl": "attention implementation of the transformers layer (ringattn: RoPE fused in the kernel)",
            "S": "tokens in the sequence",
            "peak_mib": "peak memory of forward + backward above the start, MiB (CPU RSS or CUDA allocated)",
            "bytes_per_token": "that peak divided by S: flat when memory is linear in S",
            "growth_x2": "peak at S over peak at S/2: ~2 linear, ~4 quadratic",
            "error": "why a case has no number (e.g. out of memory)",
        },
    )
    series = {}
    for impl in IMPLS:
        pts = [(r["S"], r["peak_mib"]) for r in results.rows if r["impl"] == impl and r["peak_mib"]]
        if pts:
            series[impl] = ([p[0] for p in pts], [p[1] for p in pts])
    try:
        plot(
            out_dir / "memory.png",
            f"one attention layer, forward + backward ({results.rows[0]['measured'] or device})",
            "S (tokens)",
            "peak memory above the start (MiB)",
            series,
            env=results.env,
            logx=True,
            logy=True,
        )
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ringattn.examples.memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="S up to 8192 (eager 4096): about a minute on a CPU"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results/memory"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        impl, S = args.one
        if impl not in IMPLS:
            parser.error(f"IMPL must be one of {IMPLS}")
        print(json.dumps(measure_one(impl, int(S), _device(args.device))))
        return 0
    run(args.quick, args.out, args.device)
    print((args.out / "memory.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
