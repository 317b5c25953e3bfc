"""Loads the optional compiled core ``ringattn._C`` and says why it is missing when it is."""

import importlib
import json
import threading
import warnings
from functools import cache
from pathlib import Path

_STATUS_FILE = Path(__file__).with_name("_C_status.json")
_warned = False
_warn_lock = threading.Lock()


@cache
def _load():
    try:
        return importlib.import_module("ringattn._C"), None
    except ImportError as exc:
        return None, exc


def compiled():
    """The ``ringattn._C`` module, or None when it is not built (then warns once per process: the
    backends ask for it when they choose how to run, so a missing module means a slow fallback)."""
    module = _load()[0]
    if module is None:
        _warn_missing()
    return module


def _warn_missing() -> None:
    """One RuntimeWarning per process: without ``ringattn._C`` CPU attention falls back to the fp64
    reference backend, which is correct but much slower."""
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    reason = next(iter(extension_status()["reason"].splitlines()), "reason unknown")
    warnings.warn(
        f"ringattn._C is not built ({reason}): the compiled CPU and CUDA kernels are unavailable, so "
        "attention on CPU tensors in fp32, bf16 or fp16 runs on the fp64 reference backend, which is much "
        "slower. Reinstall ringattn with cmake, ninja and a C++17 compiler (ringattn.extension_status() "
        "has the full reason).",
        RuntimeWarning,
        stacklevel=3,
    )


def extension_status() -> dict:
    """What was built: ``{"available", "cuda", "cuda_archs", "nvcc_version", "cpu_march", "cpu_variant",
    "cpu_variants", "cpu_isa", "reason", "build_seconds"}``.

    ``nvcc_version`` is the CUDA release the kernels were compiled with (nvcc's ``release`` line; the
    statically linked runtime needs a driver that supports that CUDA version: R580+ for CUDA 13),
    "" without CUDA or for builds that did not record it. ``reason`` explains an unavailable
    extension (skipped with RINGATTN_SKIP_EXT=1, the build failed, or the import failed); it is
    empty when the extension loaded. The CPU kernels are compiled once per ISA variant:
    ``cpu_variants`` maps each compiled variant (least to most capable) to the vector ISA it was
    compiled for (Linux cpuinfo flag names) and the features this CPU lacks to run it;
    ``cpu_variant`` is the one calls use (the most capable this CPU runs; None when none runs here)
    and ``cpu_isa`` its ISA. ``cpu_march`` is the ``RINGATTN_CPU_MARCH`` override the build used
    ("" for the compiler's default flags), None for the portable multi-variant build. Without the
    extension the CPU fields are None.
    """
    recorded = json.loads(_STATUS_FILE.read_text()) if _STATUS_FILE.exists() else {}
    module, error = _load()
    variants = _cpu_variants(module)
    chosen = (
        next((name for name, v in reversed(variants.items()) if not v["missing"]), None) if variants else None
    )
    status = {
        "available": module is not None,
        "cuda": bool(getattr(module, "with_cuda", False)),
        "cuda_archs": getattr(module, "cuda_archs", ""),
        "nvcc_version": recorded.get("nvcc_version", "") if module is not None else "",
        "cpu_march": recorded.get("cpu_march") if module is not None else None,
        "cpu_variant": chosen,
        "cpu_variants": variants,
        "cpu_isa": variants[chosen]["isa"] if chosen is not None else None,
        "reason": "",
        "build_seconds": recorded.get("build_seconds"),
    }
    if module is None:
        status["reason"] = recorded.get("reason") or f"import failed: {error}"
    return status


def _cpu_variants(module) -> dict | None:
    """{name: {"isa": [...], "missing": [...]}} of the module's CPU kernel variants (None without it)."""
    if module is None or not hasattr(module, "cpu_variants"):
        return None
    return {
        name: {"isa": list(isa), "missing": list(missing)} for name, isa, missing in module.cpu_variants()
    }
