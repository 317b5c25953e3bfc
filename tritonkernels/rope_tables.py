"""Host side of the RoPE tiles (``_rope_tile``): what the attention and RoPE kernels take for RoPE.

Plain tensors and ints only: a caller turns its RoPE settings into frequencies (``exact``: the 64-bit
fixed-point turn constants ``round(f / 2pi * 2^64) mod 2^64`` as int64 bit patterns; ``hf``: fp32
inverse frequencies) and positions, and ``rope_tables`` lays them out for the kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import torch

from ._rope_tile import HF_MAX_EXPONENT, HF_MIN_EXPONENT

__all__ = ["RopeTables", "rope_tables", "frequency_tables"]

# 2*pi to 50 digits (~166 bits): the hf reduction words need 64 + 72 bits.
_TWO_PI = Fraction("6.2831853071795864769252867665590057683943387987502")


@dataclass(frozen=True)
class RopeTables:
    """RoPE of one side (q or k) of a launch: positions (int32, (1 or B, S)), tables, constexprs.

    ``tab_a``/``tab_b``: exact mode, the high and low 32-bit halves of the turn constants (int32 bit
    patterns); hf mode, fp32 inv_freq and the fp32 angle's reduction table (int32).
    """

    positions: torch.Tensor
    tab_a: torch.Tensor
    tab_b: torch.Tensor
    exact: bool
    rot_dim: int
    interleaved: bool
    attn_factor: float

    @property
    def stride_b(self) -> int:
        return self.positions.stride(0) if self.positions.shape[0] > 1 else 0


def frequency_tables(freqs: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(tab_a, tab_b) on ``freqs``' device from int64 turn constants (exact) or fp32 inv_freq (hf)."""
    if exact:
        if freqs.dtype != torch.int64:
            raise TypeError(f"exact-mode freqs must be int64 turn constants, got {freqs.dtype}")
        # the two 32-bit halves of each uint64 constant, as int32 bit patterns
        hi, lo = (freqs >> 32) & 0xFFFFFFFF, freqs & 0xFFFFFFFF
        hi, lo = (torch.where(h >= 2**31, h - 2**32, h).to(torch.int32) for h in (hi, lo))
        return hi.contiguous(), lo.contiguous()
    if freqs.dtype != torch.float32:
        raise TypeError(f"hf-mode freqs must be fp32 inverse frequencies, got {freqs.dtype}")
    return freqs.contiguous(), _hf_reduction_table(str(freqs.device))


def rope_tables(
    positions: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    *,
    exact: bool,
    rot_dim: int,
    interleaved: bool,
    attn_factor: float = 1.0,
) -> RopeTables:
    """``RopeTables`` for int positions (S,) or (B, S), already in [0, 2^31 - 1] (not re-checked),
    and ``tables`` from ``frequency_tables``."""
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"positions must be an int32/int64 tensor, got {getattr(positions, 'dtype', positions)}"
        )
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must be (S,) or (B, S), got {tuple(positions.shape)}")
    if rot_dim < 2 or rot_dim % 2 or 2 * tables[0].numel() != rot_dim:
        raise ValueError(f"rot_dim {rot_dim} must be even and twice the table length {tables[0].numel()}")
    rows = positions.shape[0] if positions.dim() == 2 else 1
    pos = positions.to(torch.int32).reshape(rows, positions.shape[-1]).contiguous()
    return RopeTables(pos, *tables, exact, rot_dim, interleaved, float(attn_factor))


@functools.lru_cache(maxsize=8)
def _hf_reduction_table(device: str) -> torch.Tensor:
    """int32 (2 * 73,): high and low halves of W(E) = round(2^(64+E) / 2pi) mod 2^64, E = -64 .. 8
    (the kernels' HF_MIN_EXPONENT .. HF_MAX_EXPONENT).

    An fp32 angle mant * 2^E is mant * W(E) / 2^64 turns mod 1 (see ``_rope_tile``): exact rationals.
    """
    words = []
    for exponent in range(HF_MIN_EXPONENT.value, HF_MAX_EXPONENT.value + 1):
        w = round(Fraction(2 ** (64 + exponent)) / _TWO_PI) % 2**64
        words += [w >> 32, w & 0xFFFFFFFF]
    table = [x - 2**32 if x >= 2**31 else x for x in words]
    return torch.tensor(table, dtype=torch.int32, device=device)
