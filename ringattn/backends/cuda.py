"""The compiled CUDA backend: ``ringattn._C`` block attention on tensor cores (bf16 and fp16 inputs).

Kernels run on the tensors' device, on torch's current stream. Head dims: any even D up to 256
(tiles are padded to 64, 96, 128 or 256 columns). The backward accumulates dQ with fp32 atomics, whose
order varies from run to run; ``deterministic=True`` runs a separate dQ pass instead (each element
summed by one thread in key order: the same bits every run, for about 40% more backward MMA work:
S and dP are recomputed per query tile). Direct calls: ``torch.ops.ringattn.cuda_block_forward`` /
``cuda_block_backward`` (signatures in ``ringattn.backends.compiled``).

``ringattn._C`` links the CUDA runtime statically, so it needs a driver that supports the CUDA
version it was built with (CUDA 13: driver R580 or newer), and it carries kernels only for the
build's ``cuda_archs``. ``CudaBackend.can_implement`` probes each device once per process
(:func:`probe_device`) and declines with the reason (:func:`device_support`) instead of failing at
launch, so ``backend="auto"`` moves on to the next candidate.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass

import torch

from .._extension import compiled, extension_status
from .compiled import CompiledBackend, define_block_ops

__all__ = [
    "CudaBackend",
    "DeviceProbe",
    "cuda_block_forward",
    "cuda_block_backward",
    "device_support",
    "probe_device",
]

MAX_HEAD_DIM = 256

# The oldest Linux driver branch whose CUDA version covers a runtime major version (NVIDIA's CUDA
# toolkit / driver compatibility table; minor version compatibility covers x.y on any x.0 driver).
MIN_DRIVER_BRANCH = {11: "R450", 12: "R525", 13: "R580"}


@dataclass(frozen=True)
class DeviceProbe:
    """What the CUDA stack says about one device, gathered once (:func:`probe_device`).

    ``device_count``: ``cudaGetDeviceCount`` of ``ringattn._C``'s own (static) runtime, 0 when it
    cannot start (``count_error`` says why, e.g. an insufficient driver). ``driver_version``: the CUDA
    version the installed driver supports (``cuDriverGetVersion``: 12080 for 12.8), 0 when unknown.
    ``capability``: the device's compute capability (major, minor), None when unknown.
    """

    device_count: int
    count_error: str = ""
    driver_version: int = 0
    capability: tuple[int, int] | None = None


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def build_cuda_version(nvcc_version: str) -> int:
    """The CUDA version (1000 * major + 10 * minor) in nvcc's ``release 13.0`` line; 0 if absent."""
    found = re.search(r"release (\d+)\.(\d+)", nvcc_version or "")
    return int(found[1]) * 1000 + int(found[2]) * 10 if found else 0


def arch_runs(arch: str, capability: tuple[int, int]) -> bool | None:
    """Whether code built for one CMake CUDA arch (``80``, ``90a``, ``86-real``, ``90-virtual``) runs on
    a device of ``capability``: SASS on the same major version at an equal or newer minor, PTX
    (plain and ``-virtual`` entries embed it) JIT-compiled on any newer device; arch-specific ``a``
    code only on that exact arch, family ``f`` code within its major. None for entries that name no
    arch (``native``, ``all``): the build alone cannot tell."""
    found = re.fullmatch(r"(?:sm_|compute_)?(\d+)([af]?)(?:-(real|virtual))?", arch.strip())
    if not found:
        return None
    built, suffix, kind = int(found[1]), found[2], found[3]
    device = capability[0] * 10 + capability[1]
    if suffix == "a":
        return device == built
    if device // 10 == built // 10 and device >= built and kind != "virtual":
        return True
    return suffix != "f" and kind != "real" and device >= built


def device_support(probe: DeviceProbe, nvcc_version: str, cuda_archs: str) -> tuple[bool, str]:
    """Whether the compiled CUDA kernels can run on the probed device: ``(True, "")`` or
    ``(False, reason)`` naming the driver found and needed, or the device arch and the built ones.
    ``nvcc_version`` and ``cuda_archs`` describe the build (``extension_status()``)."""
    built = build_cuda_version(nvcc_version)
    if built:
        branch = MIN_DRIVER_BRANCH.get(built // 1000, "a newer driver")
        needs = (
            f"ringattn._C is built with CUDA {_cuda_version_text(built)} (static runtime: driver {branch}+)"
        )
    else:
        needs = "ringattn._C's static CUDA runtime needs a driver as new as its build's CUDA version"
    driver = probe.driver_version
    found = f"the driver supports CUDA {_cuda_version_text(driver)}" if driver else "driver version unknown"
    if built and driver and driver // 1000 < built // 1000:
        return False, f"{found}, but {needs}; update the NVIDIA driver or rebuild with an older CUDA"
    if probe.device_count <= 0:
        error = f" ({probe.count_error})" if probe.count_error else ""
        return False, f"ringattn._C's CUDA runtime finds no usable device{error}; {found}; {needs}"
    if probe.capability is not None:
        archs = [a for a in re.split(r"[;,\s]+", cuda_archs or "") if a]
        verdicts = [arch_runs(a, probe.capability) for a in archs]
        if archs and None not in verdicts and not any(verdicts):
            major, minor = probe.capability
            return False, (
                f"the device is sm_{major}{minor} but ringattn._C carries kernels only for "
                f"cuda_archs {';'.join(archs)}; rebuild with RINGATTN_CUDA_ARCHS={major}{minor}"
            )
    return True, ""


def _driver_version() -> int:
    """``cuDriverGetVersion`` from libcuda (the driver API needs no initialisation); 0 if unknown."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0
    except (OSError, AttributeError):
        return 0


def probe_device(index: int) -> DeviceProbe:
    """Ask ``ringattn._C``'s runtime, the driver and torch about CUDA device ``index``."""
    module = compiled()
    status = getattr(module, "cuda_device_status", None)  # (count, error); builds before it: count only
    count, error = status() if status is not None else (module.cuda_device_count(), "")
    try:
        capability = tuple(torch.cuda.get_device_capability(index))
    except Exception:  # torch without CUDA, or a device torch cannot open: the count decides
        capability = None
    return DeviceProbe(int(count), str(error), _driver_version(), capability)


_support: dict[int, tuple[bool, str]] = {}
_support_lock = threading.Lock()


def _device_support(index: int) -> tuple[bool, str]:
    """:func:`device_support` of device ``index``, probed once per process."""
    with _support_lock:
        if index not in _support:
            status = extension_status()
            _support[index] = device_support(
                probe_device(index), status["nvcc_version"], status["cuda_archs"]
            )
        return _support[index]


def _rope_work(params, numel, q):
    """RoPE's workspace (attn_params.h rope_work) of ``numel`` elements: the rows the kernels' sweeps
    read rotated, each rotated once ahead of the sweep; None (address 0) without RoPE."""
    work = torch.empty(numel, dtype=q.dtype, device=q.device) if params.rope_mode else None
    params.rope_work = work.data_ptr() if work is not None else 0
    return work


def _run_forward(module, params, q):
    work = _rope_work(params, params.batch * params.seqlen_k * params.heads_kv * params.head_dim, q)  # noqa: F841 (alive until the launches are queued)
    with torch.cuda.device(q.device):
        params.stream = torch.cuda.current_stream(q.device).cuda_stream
        module.attn_forward_cuda(params)


def _run_backward(module, params, q, k):
    # fp32 workspaces in rotated coordinates: dq gathers atomics from every key tile, or (deterministic)
    # its pass writes every row.
    dq_accum = (torch.empty if params.deterministic else torch.zeros)(
        q.shape, dtype=torch.float32, device=q.device
    )
    dk_accum = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    params.dq_accum, params.dk_accum = dq_accum.data_ptr(), dk_accum.data_ptr()
    rows = q.numel() + (k.numel() if params.deterministic else 0)  # Q's rows, then K's for the dQ pass
    work = _rope_work(params, rows, q)  # noqa: F841 (alive until the launches are queued)
    with torch.cuda.device(q.device):
        params.stream = torch.cuda.current_stream(q.device).cuda_stream
        module.attn_backward_cuda(params)


cuda_block_forward, cuda_block_backward = define_block_ops("cuda", _run_forward, _run_backward)


class CudaBackend(CompiledBackend):
    """Block attention on CUDA tensors with the compiled tensor-core kernels (bf16 and fp16)."""

    name = "cuda"
    device_type = "cuda"
    dtypes = (torch.bfloat16, torch.float16)
    features = CompiledBackend.features | {"deterministic"}  # the atomic-free dQ pass
    forward_op = cuda_block_forward
    backward_op = cuda_block_backward

    def can_implement(self, q, k, v, args):
        ok, reason = super().can_implement(q, k, v, args)
        if not ok:
            return ok, reason
        if not compiled().with_cuda:
            return False, "ringattn._C was built without CUDA kernels"
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        ok, reason = _device_support(index)
        if not ok:
            return ok, reason
        if q.shape[3] % 2 or q.shape[3] > MAX_HEAD_DIM:
            return False, f"head dim must be even and <= {MAX_HEAD_DIM}, got {q.shape[3]}"
        return True, ""
