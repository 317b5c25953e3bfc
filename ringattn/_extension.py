"""Loads the optional compiled core ``ringattn._C`` and says why it is missing when it is."""

import importlib
import json
from functools import cache
from pathlib import Path

_STATUS_FILE = Path(__file__).with_name("_C_status.json")


@cache
def _load():
    try:
        return importlib.import_module("ringattn._C"), None
    except ImportError as exc:
        return None, exc


def compiled():
    """The ``ringattn._C`` module, or None when it is not built."""
    return _load()[0]


def extension_status() -> dict:
    """What was built: ``{"available", "cuda", "cuda_archs", "reason", "build_seconds"}``.

    ``reason`` explains an unavailable extension (skipped with RINGATTN_SKIP_EXT=1, the build
    failed, or the import failed); it is empty when the extension loaded.
    """
    recorded = json.loads(_STATUS_FILE.read_text()) if _STATUS_FILE.exists() else {}
    module, error = _load()
    status = {
        "available": module is not None,
        "cuda": bool(getattr(module, "with_cuda", False)),
        "cuda_archs": getattr(module, "cuda_archs", ""),
        "reason": "",
        "build_seconds": recorded.get("build_seconds"),
    }
    if module is None:
        status["reason"] = recorded.get("reason") or f"import failed: {error}"
    return status
