"""ringattn: ring attention and blockwise flash-attention kernels with exact fused RoPE.

Layout convention: public tensors are (B, S, H, D); lse is fp32/fp64 (B, H, S) in natural log.
"""

from . import flash_attn_interface, reference, rope
from ._extension import extension_status
from .api import scaled_dot_product_attention
from .block import BlockMask, Span, block_backward, block_forward
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .merge import merge_partials
from .reference import attention_ref, ring_attention_ref
from .ring import ring_attn_func, shard, unshard, usp_attn_func, usp_shard
from .rope import RoPEConfig, apply_rope, cos_sin


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, via the package metadata); a marked
    placeholder when ringattn runs from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ringattn")
    except PackageNotFoundError:
        return "0+unknown"


__version__: str = _version()

__all__ = [
    "BlockMask",
    "RoPEConfig",
    "Span",
    "apply_rope",
    "attention_ref",
    "block_backward",
    "block_forward",
    "cos_sin",
    "extension_status",
    "flash_attn_func",
    "flash_attn_interface",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "merge_partials",
    "reference",
    "ring_attention_ref",
    "ring_attn_func",
    "rope",
    "scaled_dot_product_attention",
    "shard",
    "unshard",
    "usp_attn_func",
    "usp_shard",
]
