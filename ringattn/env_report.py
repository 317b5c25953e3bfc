"""The environment report of ``python -m ringattn``: what a bug report needs to say about this machine.

Versions (ringattn, python, torch, triton, transformers, CUDA runtime, nvcc, driver), the compiled
extension's status and CPU ISA variant, every device with each backend's verdict on a representative
block (the reasons come from the backends' ``can_implement`` through ``ringattn.block.select_backend``),
and the distributed backends torch offers. Every section is collected on its own: one that fails
reports its error instead of stopping the report. Works without a GPU, without the extension and
without transformers.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# A Llama-3-8B attention block (the project's reference workload), causal with fused RoPE.
REPRESENTATIVE = dict(B=1, S=4096, Hq=32, Hkv=8, D=128, causal=True, rope_theta=5e5)
DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16, torch.float16)}
DIST_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "TRITON_INTERPRET", "OMP_NUM_THREADS")
# cpuinfo flag names of the vector ISAs the CPU kernels may be compiled for (setup.py records the
# same names for the build).
VECTOR_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve", "sve2",
)  # fmt: skip


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a report section must never stop the report
        return {"error": f"{type(exc).__name__}: {exc}"}


def _run_first_line(cmd: list[str], pick: Callable[[str], bool] = lambda line: True) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    if done.returncode:
        return ""
    return next((line.strip() for line in done.stdout.splitlines() if line.strip() and pick(line)), "")


def _module_version(name: str) -> str | None:
    """The version of an importable module, None when it is not installed, or why it fails to import."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == name:
            return None
        return f"installed but fails to import: {exc}"
    except Exception as exc:
        return f"installed but fails to import: {type(exc).__name__}: {exc}"
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
    return str(version)


def driver_version() -> str:
    """The NVIDIA driver: nvidia-smi's version and libcuda's CUDA version; "" when there is none."""
    smi = shutil.which("nvidia-smi")
    release = ""
    if smi:
        release = _run_first_line([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
    cuda = 0
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(value)) == 0:
            cuda = value.value
    except (OSError, AttributeError):
        pass
    parts = ([release] if release else []) + (
        [f"supports CUDA {cuda // 1000}.{cuda % 1000 // 10}"] if cuda else []
    )
    return ", ".join(parts)


def versions() -> dict:
    import ringattn

    nvcc = shutil.which("nvcc")
    nvcc_line = _run_first_line([nvcc, "--version"], lambda line: "release" in line) if nvcc else ""
    return {
        "ringattn": f"{ringattn.__version__} ({Path(ringattn.__file__).parent})",
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "transformers": _module_version("transformers"),
        "numpy": _module_version("numpy"),
        "nvtx": _module_version("nvtx"),
        "cuda_runtime": torch.version.cuda,  # torch's; None for a CPU-only torch
        "nvcc": f"{nvcc_line} ({nvcc})" if nvcc_line else None,
        "driver": driver_version() or None,
    }


def host_cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def extension() -> dict:
    from ._extension import _load, extension_status

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = extension_status()
        module = _load()[0]
    host = host_cpu_flags()
    info = {
        **status,
        "host_cpu_isa": [flag for flag in VECTOR_FLAGS if flag in host],
        "torch_cpu_capability": _safe(torch.backends.cpu.get_cpu_capability),
        "cpu_isa_forced": os.environ.get("RINGATTN_CPU_ISA") or None,  # read by the cpu backend per call
    }
    status_fn = getattr(module, "cuda_device_status", None)
    if status_fn is not None:
        count, error = status_fn()
        info["cuda_devices_seen"] = int(count)
        info["cuda_device_error"] = str(error)
    return info


def _verdicts(device: torch.device, dtype: torch.dtype) -> dict:
    """``auto``'s choice and each backend's verdict on the representative block."""
    from .backends import BACKENDS
    from .block import BlockMask, block_args, select_backend
    from .rope import RoPEConfig

    s = REPRESENTATIVE
    q = torch.empty(s["B"], s["S"], s["Hq"], s["D"], device=device, dtype=dtype)
    k, v = (torch.empty(s["B"], s["S"], s["Hkv"], s["D"], device=device, dtype=dtype) for _ in range(2))
    rope = RoPEConfig(s["D"], theta=s["rope_theta"])
    args = block_args(q, k, v, BlockMask(causal=s["causal"]), rope=rope)
    out = {}
    for name in ("auto", *BACKENDS):
        try:
            chosen = select_backend(name, q, k, v, args)
            out[name] = f"-> {chosen.name}" if name == "auto" else "ok"
        except (ValueError, NotImplementedError) as exc:
            out[name] = "no: " + str(exc).removeprefix(f"backend {name!r} cannot run this block: ")
    return out


def devices() -> list[dict]:
    found = [{"device": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            entry: dict[str, Any] = {"device": f"cuda:{index}"}
            try:
                props = torch.cuda.get_device_properties(index)
                entry |= {
                    "name": props.name,
                    "capability": f"sm_{props.major}{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
            found.append(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-extension warning: the report says it already
        for entry in found:
            device = torch.device(entry["device"])
            entry["backends"] = {
                str(dtype).removeprefix("torch."): _safe(lambda dev=device, d=dtype: _verdicts(dev, d))
                for dtype in DTYPES[device.type]
            }
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def distributed() -> dict:
    import torch.distributed as dist

    if not dist.is_available():
        return {"available": False}
    backends = {}
    for name in DIST_BACKENDS:
        check = getattr(dist, f"is_{name}_available", None)
        backends[name] = bool(check()) if check is not None else None
    return {"available": True, "backends": backends}


def collect() -> dict:
    """The whole report as a dict (``python -m ringattn --json`` prints it)."""
    names = [name for name in os.environ if name.startswith("RINGATTN_")] + list(ENV_VARS)
    return {
        "versions": _safe(versions),
        "extension": _safe(extension),
        "representative_block": dict(REPRESENTATIVE),
        "devices": _safe(devices),
        "distributed": _safe(distributed),
        "environment": {name: os.environ[name] for name in sorted(names) if name in os.environ},
    }


def _line(label: str, value: Any) -> str:
    return f"  {label:<22} {value}"


def _shown(value: Any, missing: str = "not installed") -> str:
    return missing if value is None else str(value)


def format_report(info: dict) -> str:
    """The report as text to paste into a bug report."""
    out = ["ringattn environment report (`python -m ringattn`; paste it into a bug report)", ""]
    v = info["versions"]
    out.append("versions")
    if "error" in v:
        out.append(_line("error", v["error"]))
    else:
        for key in ("ringattn", "python", "platform", "torch", "triton", "transformers", "numpy", "nvtx"):
            out.append(_line(key, _shown(v[key])))
        out.append(_line("CUDA runtime (torch)", _shown(v["cuda_runtime"], "none (CPU-only torch)")))
        out.append(_line("nvcc", _shown(v["nvcc"], "not found on PATH")))
        out.append(_line("NVIDIA driver", _shown(v["driver"], "none found")))
    out += ["", "extension ringattn._C"]
    e = info["extension"]
    if "error" in e:
        out.append(_line("error", e["error"]))
    else:
        out.append(_line("available", "yes" if e["available"] else f"no: {e['reason']}"))
        if e["available"]:
            cuda = f"yes, archs {e['cuda_archs']}, {e['nvcc_version'] or 'nvcc release not recorded'}"
            out.append(_line("CUDA kernels", cuda if e["cuda"] else "no (built without nvcc)"))
            if "cuda_devices_seen" in e:
                seen = f"{e['cuda_devices_seen']}" + (
                    f" ({e['cuda_device_error']})" if e["cuda_device_error"] else ""
                )
                out.append(_line("CUDA devices it sees", seen))
        variants = e.get("cpu_variants")
        if variants:
            chosen = e.get("cpu_variant")
            build = (
                "portable build" if e.get("cpu_march") is None else f"-march={e['cpu_march'] or '(default)'}"
            )
            out.append(_line("CPU kernel variants", f"{' '.join(variants)} ({build})"))
            if chosen is not None:
                out.append(
                    _line("CPU variant used", f"{chosen}: {' '.join(e['cpu_isa']) or 'no vector ISA'}")
                )
            else:
                lacks = " ".join(sorted({f for v in variants.values() for f in v["missing"]}))
                out.append(
                    _line(
                        "WARNING",
                        f"no compiled CPU variant runs on this CPU (it lacks {lacks}): the CPU kernels refuse "
                        "to run; reinstall without RINGATTN_CPU_MARCH (the portable build)",
                    )
                )
            if e.get("cpu_isa_forced"):
                out.append(_line("RINGATTN_CPU_ISA", f"{e['cpu_isa_forced']} (forces this variant)"))
        out.append(_line("CPU ISA (this CPU)", " ".join(e["host_cpu_isa"]) or "unknown"))
        out.append(_line("torch CPU capability", e["torch_cpu_capability"]))
    s = info["representative_block"]
    out += [
        "",
        f"backends on a representative block (B={s['B']}, S={s['S']}, Hq={s['Hq']}, Hkv={s['Hkv']}, "
        f"D={s['D']}, causal, RoPE theta {s['rope_theta']:g}); reasons from each backend's can_implement",
    ]
    devs = info["devices"]
    if isinstance(devs, dict):
        out.append(_line("error", devs["error"]))
    else:
        if len(devs) == 1:
            out.append("  (no CUDA device visible to torch)")
        for entry in devs:
            extra = [entry.get("name"), entry.get("capability")]
            extra += [f"{entry['memory_gib']} GiB"] if "memory_gib" in entry else []
            extra += [f"{entry['threads']} threads"] if "threads" in entry else []
            out.append(f"  {entry['device']}: {', '.join(str(x) for x in extra if x)}")
            if "error" in entry:
                out.append(f"    error: {entry['error']}")
            for dtype, verdicts in entry.get("backends", {}).items():
                if "error" in verdicts:
                    out.append(f"    {dtype:<9} error: {verdicts['error']}")
                    continue
                for i, (name, verdict) in enumerate(verdicts.items()):
                    out.append(f"    {dtype if i == 0 else '':<9} {name:<10} {verdict}")
    out += ["", "distributed (torch.distributed)"]
    d = info["distributed"]
    if "error" in d:
        out.append(_line("error", d["error"]))
    elif not d["available"]:
        out.append("  not available in this torch build")
    else:
        for name, ok in d["backends"].items():
            out.append(_line(name, {True: "yes", False: "no", None: "unknown to this torch"}[ok]))
    if info["environment"]:
        out += ["", "environment variables"]
        out += [_line(name, value) for name, value in info["environment"].items()]
    return "\n".join(out)


CHECK_SHAPE = dict(S=65, D=64)  # small, odd length: one quick call per backend, forward and backward


def check(device_names: list[str] | None = None, backends: list[str] | None = None) -> list[dict]:
    """One small attention call (forward and backward, causal and not, with and without RoPE) per
    backend on each device, against the fp64 reference under the project's tolerance rule
    (``ringattn.bench.gpu_check.correctness``). A backend that cannot run there gets a row whose
    verdict is "n/a: <its can_implement reason>". ``backends``: these only (default: all)."""
    from .bench.common import Results
    from .bench.gpu_check import correctness

    if device_names is None:
        device_names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    results = Results("check")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-extension warning: the report says it already
        for name in device_names:
            dtypes = DTYPES[torch.device(name).type]
            before = len(results.rows)
            correctness(results, name, backends=backends, dtypes=dtypes, **CHECK_SHAPE)
            for row in results.rows[before:]:
                row["device"] = name
    return results.rows


def format_check(rows: list[dict]) -> str:
    """One line per device, dtype and backend: PASS (every case and tensor), FAIL (naming the worst
    case), or n/a with the reason."""
    out = [
        f"check: one small call per backend (S={CHECK_SHAPE['S']}, D={CHECK_SHAPE['D']}, GQA, causal and "
        "not, RoPE theta 45.2e9 at 4M), forward and gradients vs the fp64 reference (ringattn.testing rule)"
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["device"], row["dtype"], row["backend"]), []).append(row)
    for (device, dtype, backend), group in groups.items():
        failed = [r for r in group if r["verdict"] == "FAIL"]
        passed = [r for r in group if r["verdict"] == "PASS"]
        if failed:
            worst = max(failed, key=lambda r: r["ours_err"] / max(r["bound"], 1e-30))
            verdict = (
                f"FAIL {len(failed)} of {len(group)} (worst: {worst['tensor']}, causal={worst['causal']}, "
                f"rope={worst['rope']}: err {worst['ours_err']:.3g} > bound {worst['bound']:.3g})"
            )
        elif passed:
            verdict = f"PASS ({len(passed)} tensors)"
        else:
            verdict = group[0]["verdict"]
        out.append(f"  {device:<7} {dtype:<9} {backend:<10} {verdict}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ringattn",
        description="Print ringattn's environment report (versions, extension, backends per device, "
        "distributed backends) for a bug report.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--check",
        action="store_true",
        help="also run one small attention call per backend and device against the fp64 reference "
        "(exit status 1 when one fails)",
    )
    args = parser.parse_args(argv)
    info = collect()
    rows = check() if args.check else None
    if args.json:
        print(json.dumps(info | ({"check": rows} if rows is not None else {}), indent=1, default=str))
    else:
        print(format_report(info))
        if rows is not None:
            print("\n" + format_check(rows))
    return 1 if rows and any(r["verdict"] == "FAIL" for r in rows) else 0
