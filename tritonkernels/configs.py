"""Tile configs per GPU arch and padded head dim, for the attention kernels.

Every shipped entry (each autotuning candidate, autotune.py) is AOT-compiled for its arch by
tests/test_triton_aot.py, which asserts that shared memory fits the arch's per-block limit, that the
hot loop has no spill traffic, and that spills outside it (ptxas parks a few loop-invariant values)
stay within COLD_SPILL_LIMIT = 64 B. sm_89 is the tuning target (L40S: 101,376 B shared per block,
64K registers and 48 warps per SM); sm_80 and sm_90 get entries of their own. Choices follow the
published FlashAttention-2 sm_89 tiles where they apply (forward 128x32 / 64x64, 4 warps; backward
64x64 with 8 warps; head dim 256 with smaller tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "KernelConfig",
    "CONFIGS",
    "SHARED_LIMIT",
    "get_configs",
    "block_d",
    "rope_pads",
    "KERNELS",
    "AUX_KERNELS",
    "aux_rows",
]

KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
AUX_KERNELS = ("delta", "rope")  # elementwise: the backward's delta preprocess, the standalone RoPE

# Per-block shared memory limits (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166_912, 89: 101_376, 90: 232_448}


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def block_d(head_dim: int) -> int:
    """The D axis tile: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def rope_pads(head_dim: int, rot_dim: int | None) -> tuple[int, int]:
    """(HALF_PAD, PASS_PAD): widths of the pair parts and the pass-through part (0: none).

    Without RoPE the whole head is one part of BLOCK_D columns.
    """
    if rot_dim is None:
        return block_d(head_dim), 0
    return block_d(rot_dim // 2), (0 if rot_dim == head_dim else block_d(head_dim - rot_dim))


_C = KernelConfig
# (arch, BLOCK_D) -> {kernel: candidates}, the first candidate being the default; the autotuner
# (autotune.py) times the others on the GPU. bwd_dq tiles are (query rows, key rows) of one pass
# over keys; bwd_dkdv tiles are (query rows per step, key rows kept). Every candidate is checked
# by AOT compile (tests/test_triton_aot.py): on sm_80/89/90 with exact RoPE + documents + causal,
# and on sm_89 in every variant of aot.VARIANTS (ptxas' register allocation is heuristic: a
# lighter variant can spill where a heavier one does not): shared memory within the limit,
# registers <= 255, no spills in the hot loop and at most 64 B of spills outside it, under triton
# 3.9 and 3.6 (`make compat`; GPU images ship 3.6). The fused RoPE
# costs registers (the K tile is rotated in registers before it is staged for the MMA), which is
# why these tiles are smaller than FA2's for the same head dim.
_SM89 = {
    16: {"fwd": (_C(64, 64, 4, 2),), "bwd_dq": (_C(64, 64, 4, 1),), "bwd_dkdv": (_C(64, 64, 4, 1),)},
    32: {"fwd": (_C(64, 64, 4, 2),), "bwd_dq": (_C(64, 64, 4, 1),), "bwd_dkdv": (_C(64, 64, 4, 1),)},
    # Forward defaults with 128 (D <= 128) or 64 (D = 256) query rows: the K tile's rotation is shared by
    # more rows; `aot --mix` models their RoPE forward as tensor-bound on sm_89 (64x64 at D = 64: +7.5%
    # issue-bound; 32x32 at D = 256: +16%).
    64: {
        # (64, 64, 4, 3 stages) left the list: under triton 3.6 it spills into the hot loop on sm_89
        "fwd": (_C(128, 32, 4, 2), _C(64, 64, 4, 2)),
        "bwd_dq": (_C(64, 32, 4, 1), _C(32, 32, 4, 1)),
        "bwd_dkdv": (_C(32, 64, 4, 1),),
    },
    128: {
        "fwd": (_C(128, 32, 8, 2),),  # the 4-warp tiles spill with hf RoPE + documents
        "bwd_dq": (_C(32, 64, 8, 1),),
        "bwd_dkdv": (_C(64, 32, 8, 1), _C(32, 32, 4, 1)),
    },
    256: {
        "fwd": (_C(64, 32, 8, 1), _C(32, 32, 8, 1)),
        "bwd_dq": (_C(32, 32, 8, 1),),
        "bwd_dkdv": (_C(32, 32, 8, 1),),
    },
}
# sm_80 (164 KB per block) and sm_90 (227 KB) are register-bound at these tiles, not shared-memory
# bound, so they take the sm_89 candidates (each AOT-checked there too).
CONFIGS: dict[tuple[int, int], dict[str, tuple[KernelConfig, ...]]] = {
    (arch, bd): dict(kernels) for arch in (80, 89, 90) for bd, kernels in _SM89.items()
}


# fp32 inputs double every staged tile and the fp32 dot runs on FMA units: smaller tiles, one
# stage, one config, the same on every arch except where _FP32_ARCH says (each is AOT-checked).
_FP32 = {
    16: {"fwd": _C(32, 32, 4, 1), "bwd_dq": _C(32, 32, 4, 1), "bwd_dkdv": _C(32, 32, 4, 1)},
    32: {"fwd": _C(32, 32, 4, 1), "bwd_dq": _C(32, 32, 4, 1), "bwd_dkdv": _C(32, 32, 4, 1)},
    64: {"fwd": _C(32, 32, 4, 1), "bwd_dq": _C(32, 32, 4, 1), "bwd_dkdv": _C(16, 16, 4, 1)},
    # dkdv 16x32: 32x32x8 spills ~200 B into the hot loop on sm_89/90 under triton 3.6
    128: {"fwd": _C(32, 32, 8, 1), "bwd_dq": _C(32, 32, 8, 1), "bwd_dkdv": _C(16, 32, 8, 1)},
    256: {"fwd": _C(16, 32, 8, 1), "bwd_dq": _C(16, 16, 8, 1), "bwd_dkdv": _C(16, 16, 4, 1)},
}


def aux_rows(kernel: str, head_dim: int) -> int:
    """Rows per program of an elementwise kernel (4 warps, any arch): delta holds two row tiles of
    BLOCK_D columns, so it takes at most 8K elements (64 rows spill at head dim 256); RoPE holds
    rows, cos and sin, 32 rows up to head dim 256. AOT-checked with the tile configs."""
    if kernel == "delta":
        return min(64, 8192 // block_d(head_dim))
    if kernel == "rope":
        return 32
    raise ValueError(f"kernel must be one of {AUX_KERNELS}, got {kernel!r}")


_FP32_ARCH = {(90, 256, "bwd_dkdv"): _C(16, 32, 8, 1)}  # 16x16x4 spills 4 B on sm_90

# Dropout's 16-bit candidates where they differ from CONFIGS' (every arch): a Philox draw per score
# (~45 integer instructions and their registers) is more than the head-dim-64 tiles at 4 warps
# can hold. Measured with every score feature + exact RoPE (aot.DROPOUT_VARIANTS), triton 3.9:
# fwd 128x32x4 spills into the hot loop on sm_90 (64x64x4: on sm_80), dkdv 32x64x4 spills 84-100 B
# outside it on sm_80; the tiles below compile clean on sm_80/89/90.
_DROPOUT = {
    64: {"fwd": (_C(128, 32, 8, 2), _C(64, 32, 4, 2)), "bwd_dkdv": (_C(16, 64, 4, 1),)},
}
# fp32: bwd_dq 32x32x4 at head dim 64 spills into the hot loop on sm_89 (3 local loads/stores)
_DROPOUT_FP32 = {(64, "bwd_dq"): _C(32, 32, 8, 1)}

# The interpreter runs numpy per tile op: larger tiles mean fewer ops. Any size is valid there.
INTERPRETER_CONFIG = _C(32, 32, 4, 1)


def _arch_key(capability: tuple[int, int]) -> int:
    major, minor = capability
    arch = 10 * major + minor
    if arch >= 90:
        return 90
    if arch >= 89:
        return 89
    return 80  # sm_80/86/87 (86 has sm_89's 99 KB limit; its table is the sm_89 one, below)


def get_configs(
    kernel: str,
    head_dim: int,
    capability: tuple[int, int] | None,
    element_size: int = 2,
    dropout: bool = False,
) -> tuple[KernelConfig, ...]:
    """The shipped candidates for ``kernel`` at ``head_dim`` on a device of ``capability``
    (None: the interpreter) for inputs of ``element_size`` bytes, with or without attention
    ``dropout`` (the kernels' DROPOUT variant); the first is the default."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if capability is None:
        return (INTERPRETER_CONFIG,)
    arch = _arch_key(capability)
    if capability in ((8, 6), (8, 7)):
        arch = 89  # same 99 KB per-block shared memory as sm_89
    bd = block_d(head_dim)
    if element_size > 2:
        if dropout and (bd, kernel) in _DROPOUT_FP32:
            return (_DROPOUT_FP32[bd, kernel],)
        return (_FP32_ARCH.get((arch, bd, kernel), _FP32[bd][kernel]),)
    if dropout and kernel in _DROPOUT.get(bd, {}):
        return _DROPOUT[bd][kernel]
    return CONFIGS[(arch, bd)][kernel]
