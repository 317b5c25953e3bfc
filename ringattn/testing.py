"""The numerics rule every correctness check uses (tests, and the GPU check of the bench suite).

|ours - ref64| <= factor * |peer - ref64| + eps, in max norm, where the peer is plain torch in the
dtype under test: a kernel is held to the accuracy its dtype allows, never to a hand-picked tolerance.
The project fixes factor 2 for outputs and 3 for gradients (docs/design.md, Conventions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


@dataclass(frozen=True)
class PeerErrorCheck:
    ok: bool
    ours_err: float
    peer_err: float
    bound: float
    finite: bool

    def describe(self, name: str) -> str:
        if not self.finite:
            return f"{name}: non-finite values in ours (unwritten or NaN)"
        verdict = "within" if self.ok else "exceeds"
        return f"{name}: max error {self.ours_err:.3e} {verdict} bound {self.bound:.3e} (peer error {self.peer_err:.3e})"


def peer_error_check(
    ours: torch.Tensor,
    ref64: torch.Tensor,
    peer: torch.Tensor,
    *,
    factor: float = OUTPUT_FACTOR,
    eps: float = 1e-6,
) -> PeerErrorCheck:
    """Compare ours and the peer against the fp64 reference; shapes must match exactly."""
    if ours.shape != ref64.shape or peer.shape != ref64.shape:
        raise ValueError(
            f"shapes differ: ours {tuple(ours.shape)}, ref {tuple(ref64.shape)}, peer {tuple(peer.shape)}"
        )
    ref = ref64.detach().double()
    ours64, peer64 = ours.detach().double(), peer.detach().double()
    finite = bool(torch.isfinite(ours64).all())
    ours_err = float((ours64 - ref).abs().max()) if ref.numel() else 0.0
    peer_err = float((peer64 - ref).abs().max()) if ref.numel() else 0.0
    bound = factor * peer_err + eps
    return PeerErrorCheck(finite and ours_err <= bound, ours_err, peer_err, bound, finite)
