"""Backends of the block-attention contract (see ringattn.block), by name."""

from .reference import ReferenceBackend

BACKENDS = {backend.name: backend for backend in (ReferenceBackend(),)}

__all__ = ["BACKENDS"]
