"""Backends of the block-attention contract (see ringattn.block), by name."""

from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

BACKENDS = {
    backend.name: backend for backend in (ReferenceBackend(), CpuBackend(), CudaBackend(), TritonBackend())
}

__all__ = ["BACKENDS"]
