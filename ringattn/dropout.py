"""Attention dropout masks from a counter-based generator: the same mask in every backend and tile size.

Each (batch, query head, query, key) element draws one Philox4x32-10 word (Salmon et al., SC'11,
the generator cuRAND and Triton also implement) from

    key     = (seed mod 2^32, seed >> 32)
    counter = (key index, query index, batch * Hq + head, offset)

with *global* token indices, so a ring shard, a key tile or a recomputation in the backward draws
exactly the words the full attention would. The element is kept when its top 24 bits, as a
uniform u in [0, 1), satisfy u >= p; kept probabilities are scaled by 1 / (1 - p). Nothing is
stored: the backward regenerates the mask.

This module is the spec (plain torch integer arithmetic); kernels reimplement ``philox4x32``.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32", "keep_mask", "new_seed"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments
ROUNDS = 10


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product m * x, for uint32 values held in int64.
    Split x in 16-bit halves so no intermediate leaves int64's range."""
    a = m * (x & 0xFFFF)  # < 2^48
    b = m * (x >> 16)  # < 2^48; m * x = b * 2^16 + a
    return (b + (a >> 16)) >> 16, (((b & 0xFFFF) << 16) + a) & _MASK32


def philox4x32(counter: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors (or ints) holding uint32 words; four uint32 words out."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = (int(k) & _MASK32 for k in key)
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def keep_mask(
    p: float,
    seed: int,
    offset: int,
    batch: int,
    heads: int,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
) -> torch.Tensor:
    """(batch, heads, Sq, Sk) bool: which attention probabilities dropout keeps (see the module doc)."""
    b = torch.arange(batch, dtype=torch.int64, device=q_index.device)[:, None, None, None]
    h = torch.arange(heads, dtype=torch.int64, device=q_index.device)[None, :, None, None]
    rows = q_index.to(torch.int64)[None, None, :, None]
    cols = k_index.to(torch.int64)[None, None, None, :]
    word = philox4x32((cols, rows, b * heads + h, offset), (seed, seed >> 32))[0]
    return (word >> 8).double() * 2.0**-24 >= p


def new_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 63-bit seed from torch's CPU generator (``torch.manual_seed`` makes runs repeat)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))
