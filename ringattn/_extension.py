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
        "attention on CPU tensors in fp32 or bf16 runs on the fp64 reference backend, which is much "
        "slower. Reinstall ringattn with cmake, ninja and a C++17 compiler (ringattn.extension_status() "
        "has the full reason).",
        RuntimeWarning,
        stacklevel=3,
    )


def extension_status() -> dict:
    """What was built: ``{"available", "cuda", "cuda_archs", "nvcc_version", "cpu_march", "cpu_isa",
    "reason", "build_seconds"}``.

    ``nvcc_version`` is the CUDA release the kernels were compiled with (nvcc's ``release`` line; the
    statically linked runtime needs a driver that supports that CUDA version: R580+ for CUDA 13),
    "" without CUDA or for builds that did not record it. ``reason`` explains an unavailable
    extension (skipped with RINGATTN_SKIP_EXT=1, the build failed, or the import failed); it is
    empty when the extension loaded. ``cpu_march`` and ``cpu_isa`` are the ``-march`` the CPU kernels
    were compiled with ("" for the compiler's default) and the vector ISA it enabled (Linux cpuinfo
    flag names); None for builds that did not record them.
    """
    recorded = json.loads(_STATUS_FILE.read_text()) if _STATUS_FILE.exists() else {}
    module, error = _load()
    status = {
        "available": module is not None,
        "cuda": bool(getattr(module, "with_cuda", False)),
        "cuda_archs": getattr(module, "cuda_archs", ""),
        "nvcc_version": recorded.get("nvcc_version", "") if module is not None else "",
        "cpu_march": recorded.get("cpu_march") if module is not None else None,
        "cpu_isa": recorded.get("cpu_isa") if module is not None else None,
        "reason": "",
        "build_seconds": recorded.get("build_seconds"),
    }
    if module is None:
        status["reason"] = recorded.get("reason") or f"import failed: {error}"
    return status
