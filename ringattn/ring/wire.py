"""K/V on the wire in FP8: e4m3 values with one fp32 scale per (K or V, batch, piece, head).

On PCIe links the bytes of a hop are the ring's cost; e4m3 halves them against bf16. A rank encodes its
packed K/V once (``encode``) and every rank decodes what it receives (``decode``) before computing, its
own shard included, so every block of every rank sees the same values: the ring computes attention
of the queries against the *dequantized* K/V, and dK/dV are the gradients at those values (passed
straight through to k and v, in their own dtype). The scale of a piece is its largest magnitude over
448 (e4m3's largest finite value), so nothing saturates.

The message is one uint8 tensor (what every transport carries): the fp32 scales (2, B, pieces, Hkv)
first (4-byte aligned), then the e4m3 values (2, B, rows, Hkv, D).
"""

from __future__ import annotations

import torch

__all__ = ["E4M3_MAX", "Fp8Wire"]

E4M3_MAX = 448.0


class Fp8Wire:
    """Encoder/decoder for packed K/V buffers (2, B, rows, Hkv, D) whose pieces occupy ``row_ranges``."""

    def __init__(self, shape: tuple[int, ...], row_ranges: list[tuple[int, int]], dtype: torch.dtype):
        self.shape, self.row_ranges, self.dtype = tuple(shape), row_ranges, dtype
        two, B, _, H, _ = self.shape
        self.scale_shape = (two, B, len(row_ranges), H)
        self.scale_bytes = 4 * two * B * len(row_ranges) * H
        self.value_bytes = torch.Size(self.shape).numel()

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        x = kv.float()
        scales = torch.empty(self.scale_shape, dtype=torch.float32, device=kv.device)
        values = torch.empty(self.shape, dtype=torch.float8_e4m3fn, device=kv.device)
        for j, (start, stop) in enumerate(self.row_ranges):
            piece = x[:, :, start:stop]
            amax = (
                piece.abs().amax(dim=(2, 4))
                if stop > start
                else piece.new_zeros(self.scale_shape[:2] + (self.shape[3],))
            )
            scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
            scales[:, :, j] = scale
            values[:, :, start:stop] = (piece / scale[:, :, None, :, None]).to(torch.float8_e4m3fn)
        return torch.cat((scales.view(torch.uint8).flatten(), values.view(torch.uint8).flatten()))

    def decode(self, buf: torch.Tensor) -> torch.Tensor:
        scales = buf[: self.scale_bytes].view(torch.float32).view(self.scale_shape)
        values = buf[self.scale_bytes :].view(torch.float8_e4m3fn).view(self.shape).float()
        for j, (start, stop) in enumerate(self.row_ranges):
            values[:, :, start:stop] *= scales[:, :, j, None, :, None]
        return values.to(self.dtype)

    @property
    def message_bytes(self) -> int:
        return self.scale_bytes + self.value_bytes
