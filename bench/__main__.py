"""`python -m bench {kernels,rope,cpu,ring,gpu-check,all} [--quick] [--out DIR]`: run suites, save results.

Each suite writes <suite>.json (one row per measurement), <suite>.md and PNG plots into --out.

Benchmarks are not tests: they measure and report, comparing with a peer measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import torch

from . import gpu_check, kernels, ring, rope


def _cpu(quick: bool, out_dir: Path):
    """Compiled CPU kernels with fused RoPE vs torch SDPA + transformers RoPE.

    Llama-3-8B attention shapes: B=1, Hq=32, Hkv=8, D=128, causal, fp32 and bf16 at S=2048 and 4096.
    """
    if quick:
        return kernels.run(True, out_dir, device="cpu", backends=None, suite="cpu")
    return kernels.run(
        False,
        out_dir,
        device="cpu",
        dtypes=(torch.float32, torch.bfloat16),
        seq_lens=(2048, 4096),
        suite="cpu",
    )


SUITES = {
    "kernels": lambda quick, out: kernels.run(
        quick, out, device="cuda" if torch.cuda.is_available() else "cpu"
    ),
    "rope": rope.run,
    "cpu": _cpu,
    "ring": ring.run,
    "gpu-check": gpu_check.run,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", choices=[*SUITES, "all"])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes; the whole run takes under 2 minutes"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench_results/<time>)")
    parser.add_argument(
        "--baselines",
        default="sdpa",
        help="comma-separated peers that must be present: sdpa, flash-attn",
    )
    args = parser.parse_args(argv)
    kernels.check_baselines([b for b in args.baselines.split(",") if b])
    out_dir = args.out or Path("bench_results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    names = [args.suite]
    if args.suite == "all":
        # Without a GPU the kernels suite already runs on the CPU, and gpu-check cannot run.
        skip = set() if torch.cuda.is_available() else {"cpu", "gpu-check"}
        names = [n for n in SUITES if n not in skip]
        if skip:
            print("all: no CUDA device, so kernels runs on the CPU and gpu-check is skipped", file=sys.stderr)
    for name in names:
        results = SUITES[name](args.quick, out_dir)
        print(f"\n## {name}\n")
        print((out_dir / f"{name}.md").read_text().split("\n", 3)[-1])
        print(f"{len(results.rows)} rows -> {out_dir}/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
