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
    assert set(STATUS) == {
        "available", "cuda", "cuda_archs", "nvcc_version", "cpu_march", "cpu_variant", "cpu_variants", "cpu_isa",
        "reason", "build_seconds",
    }  # fmt: skip
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


# The CUDA device probe (issue 13 item 5): the decision is a function of the probe results, so the
# driver and arch rules are checked here without a GPU; the wiring into can_implement with a fake
# module and a fake CUDA tensor.

NVCC_13 = "Cuda compilation tools, release 13.0, V13.0.88"
INSUFFICIENT = "CUDA driver version is insufficient for CUDA runtime version"


def test_build_cuda_version_reads_nvcc_release_line():
    from ringattn.backends.cuda import build_cuda_version

    assert build_cuda_version(NVCC_13) == 13000
    assert build_cuda_version("Cuda compilation tools, release 12.8, V12.8.93") == 12080
    assert build_cuda_version("") == 0


def test_device_support_declines_a_driver_older_than_the_build():
    from ringattn.backends.cuda import DeviceProbe, device_support

    probe = DeviceProbe(device_count=0, count_error=INSUFFICIENT, driver_version=12080, capability=(8, 9))
    ok, reason = device_support(probe, NVCC_13, "80;86;89;90")
    assert not ok
    assert "CUDA 12.8" in reason and "CUDA 13.0" in reason and "R580" in reason
    # the driver version unknown: the runtime's own error is the reason
    ok, reason = device_support(DeviceProbe(0, INSUFFICIENT, 0, None), NVCC_13, "80;86;89;90")
    assert not ok and INSUFFICIENT in reason and "R580" in reason
    # a build that did not record its nvcc: still declines on the device count
    ok, reason = device_support(DeviceProbe(0, INSUFFICIENT, 12080, None), "", "80;86;89;90")
    assert not ok and "no usable device" in reason and "CUDA 12.8" in reason


def test_device_support_accepts_a_new_enough_driver_and_a_built_arch():
    from ringattn.backends.cuda import DeviceProbe, device_support

    for driver in (13000, 13020):  # minor version compatibility: 13.x on any 13.0 driver
        assert device_support(DeviceProbe(1, "", driver, (8, 9)), NVCC_13, "80;86;89;90") == (True, "")
    # the CUDA 12 build on a CUDA 12.2 driver, module attribute style (comma separated)
    nvcc_12 = "Cuda compilation tools, release 12.8, V12.8.93"
    assert device_support(DeviceProbe(2, "", 12020, (9, 0)), nvcc_12, "80,86,89,90") == (True, "")


def test_device_support_declines_an_arch_the_build_has_no_kernels_for():
    from ringattn.backends.cuda import DeviceProbe, device_support

    ok, reason = device_support(DeviceProbe(1, "", 13000, (7, 5)), NVCC_13, "80;86;89;90")
    assert not ok and "sm_75" in reason and "80;86;89;90" in reason and "RINGATTN_CUDA_ARCHS=75" in reason
    # SASS only (-real) for Ampere: no kernel for Hopper; plain entries embed PTX, JIT-compiled on newer
    assert not device_support(DeviceProbe(1, "", 13000, (9, 0)), NVCC_13, "80-real;86-real")[0]
    assert device_support(DeviceProbe(1, "", 13000, (12, 0)), NVCC_13, "80;86;89;90")[0]
    # arch-specific code runs only on its own arch
    assert not device_support(DeviceProbe(1, "", 13000, (10, 0)), NVCC_13, "90a")[0]
    assert device_support(DeviceProbe(1, "", 13000, (9, 0)), NVCC_13, "90a")[0]
    # a capability torch could not read, or archs that name none ("native"): the build cannot tell
    assert device_support(DeviceProbe(1, "", 13000, None), NVCC_13, "80")[0]
    assert device_support(DeviceProbe(1, "", 13000, (7, 0)), NVCC_13, "native")[0]


def test_arch_runs_rules():
    from ringattn.backends.cuda import arch_runs

    assert arch_runs("80", (8, 6)) and arch_runs("80-real", (8, 9)) and not arch_runs("86", (8, 0))
    assert arch_runs("90-virtual", (10, 0)) and not arch_runs("90-real", (10, 0))
    assert arch_runs("100f", (10, 3)) and not arch_runs("100f", (12, 0))
    assert arch_runs("all", (8, 0)) is None


def test_cuda_backend_declines_with_the_probe_reason_and_probes_each_device_once(monkeypatch):
    from types import SimpleNamespace

    from ringattn.backends import compiled as compiled_mod
    from ringattn.backends import cuda as cuda_mod
    from ringattn.block import BACKENDS

    calls = []
    fake = SimpleNamespace(
        with_cuda=True,
        cuda_archs="80,86,89,90",
        cuda_device_status=lambda: calls.append("count") or (0, INSUFFICIENT),
    )
    monkeypatch.setattr(compiled_mod, "compiled", lambda: fake)
    monkeypatch.setattr(cuda_mod, "compiled", lambda: fake)
    monkeypatch.setattr(
        cuda_mod, "extension_status", lambda: {"nvcc_version": NVCC_13, "cuda_archs": "80,86,89,90"}
    )
    monkeypatch.setattr(cuda_mod, "_driver_version", lambda: 12080)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 9))
    monkeypatch.setattr(cuda_mod, "_support", {})
    q = SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.bfloat16, shape=(1, 4, 2, 64))
    backend = BACKENDS["cuda"]
    for _ in range(3):
        ok, reason = backend.can_implement(q, q, q, None)
        assert not ok and "CUDA 12.8" in reason and "R580" in reason
    assert calls == ["count"]  # once per device per process
    q0 = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 4, 2, 64))
    backend.can_implement(q0, q0, q0, None)
    assert calls == ["count", "count"]
    # a driver new enough and a built arch: the probe passes, the remaining checks run
    monkeypatch.setattr(cuda_mod, "_driver_version", lambda: 13000)
    monkeypatch.setattr(cuda_mod, "_support", {})
    fake.cuda_device_status = lambda: (1, "")
    assert backend.can_implement(q, q, q, None) == (True, "")


@pytest.mark.skipif(not STATUS["cuda"] or torch.cuda.is_available(), reason="needs a CUDA build without GPU")
def test_real_probe_without_gpu_declines():
    from ringattn.backends.cuda import device_support, probe_device

    probe = probe_device(0)
    assert probe.device_count == 0 and probe.capability is None
    ok, reason = device_support(probe, STATUS["nvcc_version"], STATUS["cuda_archs"])
    assert not ok and reason


def test_status_records_nvcc_version():
    assert isinstance(STATUS["nvcc_version"], str)
    if STATUS["cuda"] and STATUS["nvcc_version"]:
        assert "release" in STATUS["nvcc_version"]
