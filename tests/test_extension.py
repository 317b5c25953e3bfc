"""The optional compiled core: status reporting, torch-free build, clear errors without a GPU."""

import re
import subprocess
from pathlib import Path

import pytest
import torch

import ringattn
from ringattn._extension import compiled

ROOT = Path(__file__).resolve().parents[1]
STATUS = ringattn.extension_status()


def test_status_reports_availability_and_reason():
    assert set(STATUS) == {"available", "cuda", "cuda_archs", "reason", "build_seconds"}
    if STATUS["available"]:
        assert STATUS["reason"] == ""
    else:
        assert STATUS["reason"], "an unavailable extension must say why"


def test_csrc_never_includes_torch_headers():
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in {".h", ".cuh", ".cpp", ".cu"}]
    assert sources, "csrc/ has no sources"
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    offenders = [p.name for p in sources if pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.skipif(not STATUS["available"], reason="ringattn._C not built")
def test_extension_does_not_link_libtorch():
    linked = subprocess.run(["ldd", compiled().__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in linked and "libc10" not in linked


@pytest.mark.skipif(
    not STATUS["cuda"] or torch.cuda.is_available(), reason="needs a CUDA build on a machine without GPU"
)
def test_cuda_entry_without_gpu_raises_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        compiled().rope_cos_sin_cuda(0, 0, 0, 0, 1.0, 0, 0, 0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not STATUS["cuda"], reason="needs a GPU and a CUDA build"
)
def test_cuda_cos_sin_matches_cpu():
    rope = ringattn.RoPEConfig(128, theta=45.2e9)
    positions = torch.arange(4_194_304 - 4096, 4_194_304, dtype=torch.int32)
    cpu = ringattn.cos_sin(rope, positions, impl="compiled")
    gpu = ringattn.cos_sin(rope, positions.cuda(), impl="compiled")
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-6, rtol=0)
