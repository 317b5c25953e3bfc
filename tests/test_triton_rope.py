"""Standalone Triton RoPE kernel (forward and backward) against ringattn.rope.apply_rope (fp64)."""

from __future__ import annotations

import pytest
import torch
from attention_checks import backend_device, rotate_in_dtype
from harness import assert_within_peer_error, launcher_rope, nan_filled

from ringattn import RoPEConfig
from ringattn.rope import apply_rope
from tritonkernels.rope import rope_apply

CONFIGS = {
    "neox-exact": RoPEConfig(32, theta=1e4),
    "interleaved-partial-exact": RoPEConfig(32, theta=45.2e9, partial_rotary_factor=0.5, interleaved=True),
    "neox-d80-yarn-hf": RoPEConfig(
        80, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, precision="hf"
    ),
}


pytestmark = pytest.mark.gpu  # CUDA tensors on a GPU machine, the interpreter elsewhere
DEVICE = backend_device("triton")


def _tables(x, positions, rope):
    """The kernel's RopeTables for a RoPEConfig, as the Triton backend builds them."""
    return launcher_rope(x, x, rope, q_positions=positions, k_positions=positions)["q_rope"]


def _rotate(x, positions, rope, **kw):
    """The kernel's rotation of CPU ``x`` at ``positions``, run where Triton runs here; on the CPU."""
    x = x.to(DEVICE)
    return rope_apply(x, _tables(x, positions.to(DEVICE), rope), **kw).cpu()


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rope", CONFIGS.values(), ids=CONFIGS.keys())
def test_rope_kernel_matches_reference(rope, dtype, transpose):
    gen = torch.Generator().manual_seed(0)
    B, S, H = 2, 37, 3
    x = torch.randn(B, S, H, rope.dim, generator=gen).to(dtype)
    x_view = x.to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous (B, S, H, D) view
    positions = torch.randint(0, 2**31 - 1, (B, S), generator=gen, dtype=torch.int64)
    positions[0] = torch.arange(4_194_000, 4_194_000 + S)
    before = x_view.clone()
    out = rope_apply(
        x_view,
        _tables(x_view, positions.to(DEVICE), rope),
        transpose=transpose,
        out=nan_filled(*x.shape, dtype=dtype, device=DEVICE),
    ).cpu()
    assert torch.equal(x_view, before), "input must not be modified"
    ref = apply_rope(x, positions, rope, transpose=transpose)
    peer = rotate_in_dtype(x, positions, rope, transpose=transpose)
    assert_within_peer_error(out, ref, peer, name="rope")


def test_rope_backward_is_the_transpose():
    # <R x, g> == <x, R^T g> in fp64 terms, for the kernel's forward and backward.
    rope = RoPEConfig(32, theta=5e5, partial_rotary_factor=0.75)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 20, 2, 32, generator=gen)
    g = torch.randn(1, 20, 2, 32, generator=gen)
    pos = torch.arange(1000, 1020, dtype=torch.int32)
    lhs = (_rotate(x, pos, rope).double() * g.double()).sum()
    rhs = (x.double() * _rotate(g, pos, rope, transpose=True).double()).sum()
    assert abs(lhs - rhs) <= 1e-4 * float(x.abs().sum())


def test_rope_bad_inputs():
    rope = RoPEConfig(16)
    x = torch.randn(1, 4, 1, 16)
    tables = _tables(x, torch.arange(4), rope)
    with pytest.raises(ValueError, match="positions"):
        rope_apply(torch.randn(1, 5, 1, 16), tables)
    with pytest.raises(ValueError, match="rot_dim"):
        rope_apply(torch.randn(1, 4, 1, 8), tables)
    with pytest.raises(TypeError, match="x must be"):
        rope_apply(x.double(), tables)
    with pytest.raises(TypeError, match="tables"):
        rope_apply(x, rope)


@pytest.mark.parametrize(
    "positions", [(0, 64), (4_194_240, 4_194_304), (2**31 - 64, 2**31)], ids=["low", "2^22", "2^31"]
)
def test_exact_phase_at_extreme_positions(positions):
    # Rotating the unit pair (1, 0) gives (cos, sin) of the kernel's angle: compare with fp64.
    rope = RoPEConfig(128, theta=45.2e9)
    pos = torch.arange(*positions, dtype=torch.int64)
    x = torch.zeros(1, len(pos), 1, 128)
    x[..., :64] = 1.0  # NeoX pairs (x[j], x[j + 64]) = (1, 0)
    y = _rotate(x, pos, rope).double()
    ours = torch.atan2(y[..., 64:], y[..., :64])[0, :, 0]
    truth = pos.double().unsqueeze(-1) * rope.inv_freq(torch.float64)
    err = (torch.remainder(ours - truth + torch.pi, 2 * torch.pi) - torch.pi).abs().max().item()
    assert err <= 6e-7, f"phase error {err:.2e} rad"
    # transformers' fp32 angles are far off at 2^22 and beyond (the reason exact mode exists)
    if positions[0] >= 2**22:
        hf = pos.float().unsqueeze(-1) * rope.inv_freq(torch.float32)
        hf_err = (torch.remainder(hf.double() - truth + torch.pi, 2 * torch.pi) - torch.pi).abs().max().item()
        assert hf_err > 100 * err


@pytest.mark.parametrize(
    "positions", [(0, 64), (4_194_240, 4_194_304), (2**31 - 64, 2**31)], ids=["low", "2^22", "2^31"]
)
def test_hf_mode_matches_transformers_fp32_angles_at_any_position(positions):
    # hf mode must reproduce transformers: the fp32 angle pos * inv_freq, then its cos/sin. Compare
    # with fp64 cos/sin of that same fp32 angle, against torch's own fp32 cos/sin as the peer
    # (large arguments: the kernel's exact reduction of the fp32 angle is what is checked).
    rope = RoPEConfig(128, theta=5e5, precision="hf")
    pos = torch.arange(*positions, dtype=torch.int64)
    x = torch.zeros(1, len(pos), 1, 128)
    x[..., :64] = 1.0  # NeoX pairs (x[j], x[j + 64]) = (1, 0): the output is (cos, sin)
    y = _rotate(x, pos, rope)[0, :, 0]
    angle32 = pos.float().unsqueeze(-1) * rope.inv_freq(torch.float32)
    truth = torch.cat((torch.cos(angle32.double()), torch.sin(angle32.double())), -1)
    peer = torch.cat((torch.cos(angle32), torch.sin(angle32)), -1)
    assert_within_peer_error(y, truth, peer, name="hf cos|sin")
