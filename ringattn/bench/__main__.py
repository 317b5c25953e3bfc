"""Run benchmark suites and save their results.

Each suite writes <suite>.json (one row per measurement, with the machine and versions), <suite>.md
(a table whose columns are explained above it) and PNG plots into --out.

Benchmarks are not tests: they measure and report, comparing with a peer measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from datetime import datetime
from pathlib import Path

import torch

from . import kernels
from .suites import SUITES


def _missing(modules) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None, prog: str = "ringattn-bench") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="suites:\n" + "\n".join(f"  {s.name:<10} {s.help}" for s in SUITES.values()),
    )
    parser.add_argument("suite", choices=[*SUITES, "all"])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes; the whole run takes a few minutes on a CPU"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench_results/<time>)")
    parser.add_argument(
        "--baselines",
        default="sdpa",
        help="comma-separated peers that must be present: sdpa, flash-attn",
    )
    parser.add_argument(
        "--cpu-isa",
        default="",
        help="CPU kernel variants ringattn cpu runs in (kernels, cpu suites): comma-separated names "
        "(generic, avx2, avx512, avx512bf16), 'all' for every one this CPU runs; default: the best only",
    )
    args = parser.parse_args(argv)
    kernels.check_baselines([b for b in args.baselines.split(",") if b])
    cpu_isas = kernels.cpu_variants(args.cpu_isa)
    names = [args.suite]
    if args.suite == "all":
        cuda = torch.cuda.is_available()
        names = [s.name for s in SUITES.values() if cuda or s.in_all_without_cuda]
        if not cuda:
            print("all: no CUDA device, so kernels runs on the CPU and gpu-check is skipped", file=sys.stderr)
    missing = _missing(sorted({m for name in names for m in SUITES[name].needs}))
    if missing:
        raise SystemExit(
            f"{prog} {args.suite} needs {', '.join(missing)} (the `bench` extra): "
            "pip install 'ringattn[bench]'"
        )
    out_dir = args.out or Path("bench_results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in names:
        suite = SUITES[name]
        options = {"cpu_isas": cpu_isas} if suite.takes_cpu_isas else {}
        results = suite.run(args.quick, out_dir, **options)
        print(f"\n## {name}\n")
        print((out_dir / f"{name}.md").read_text().split("\n", 2)[-1].strip())
        print(f"\n{len(results.rows)} rows -> {out_dir}/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m ringattn.bench"))
