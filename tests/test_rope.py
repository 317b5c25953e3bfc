"""RoPE core: frequencies vs transformers, exact-phase accuracy, hf parity, reference rotation."""

import dataclasses
import math

import pytest
import torch

from ringattn import RoPEConfig, apply_rope, cos_sin, extension_status
from ringattn.rope import phase_error, reference_angles

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

HAS_EXT = extension_status()["available"]
IMPLS = ["torch", pytest.param("compiled", marks=pytest.mark.skipif(not HAS_EXT, reason="no ringattn._C"))]

# (id, rope_parameters, extra LlamaConfig kwargs)
HF_CASES = [
    ("default-llama2", {"rope_type": "default", "rope_theta": 10000.0}, {}),
    ("default-theta45e9", {"rope_type": "default", "rope_theta": 45.2e9}, {}),
    ("linear-x4", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, {}),
    ("dynamic-x2", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, {}),
    (
        "yarn-x4",
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
        {},
    ),
    (
        "yarn-mscale-notruncate",
        {
            "rope_type": "yarn",
            "rope_theta": 5e5,
            "factor": 8.0,
            "original_max_position_embeddings": 2048,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16,
            "truncate": False,
        },
        {},
    ),
    (
        "llama3-8b-128k",
        {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {},
    ),
    # Llama's default RoPE ignores partial_rotary_factor; the scaled types honour it
    (
        "linear-partial-half",
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
        {},
    ),
]


def _llama_config(rope_parameters, **extra):
    return LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        max_position_embeddings=4096,
        rope_parameters=dict(rope_parameters),
        **extra,
    )


def _hf_inv_freq(config, seq_len=None):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_frequencies_equal_transformers(case):
    _, params, extra = case
    config = _llama_config(params, **extra)
    rope = RoPEConfig.from_hf(config)
    seq_lens = [None, 10000] if rope.rope_type == "dynamic" else [None]
    for seq_len in seq_lens:
        hf_inv_freq, hf_factor = _hf_inv_freq(config, seq_len)
        assert torch.equal(rope.inv_freq(torch.float32, seq_len), hf_inv_freq), "fp32 path differs"
        torch.testing.assert_close(
            rope.inv_freq(torch.float64, seq_len), hf_inv_freq.double(), rtol=1e-6, atol=0
        )
        assert rope.attention_factor == pytest.approx(hf_factor, rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "theta,max_pos",
    [(45.2e9, 4_194_303), (5e5, 2**24 - 1), (10000.0, 2**24 - 1)],
    ids=["theta45.2e9-4M", "theta5e5-16M", "theta1e4-16M"],
)
def test_exact_phase_error_below_1e6_rad(theta, max_pos, impl):
    gen = torch.Generator().manual_seed(0)
    positions = torch.cat(
        (
            torch.arange(0, 4096),
            torch.arange(max_pos - 65535, max_pos + 1),
            torch.randint(0, max_pos + 1, (65536,), generator=gen),
        )
    )
    rope = RoPEConfig(128, theta=theta)
    assert phase_error(rope, positions, impl=impl) <= 1e-6


def test_hf_mode_error_is_what_transformers_gets():
    # The case exact mode exists for: fp32 angles at 4M positions are off by about 0.16 rad.
    positions = torch.arange(4_194_304 - 4096, 4_194_304)
    hf = RoPEConfig(128, theta=45.2e9, precision="hf")
    assert phase_error(hf, positions) > 0.1
    assert phase_error(dataclasses.replace(hf, precision="exact"), positions) <= 1e-6


@pytest.mark.parametrize(
    "case",
    [c for c in HF_CASES if c[0] in ("default-llama2", "yarn-x4", "llama3-8b-128k", "dynamic-x2")],
    ids=lambda c: c[0],
)
def test_hf_mode_matches_transformers_cos_sin(case):
    _, params, extra = case
    config = _llama_config(params, **extra)
    rope = RoPEConfig.from_hf(config, precision="hf")
    position_ids = torch.cat((torch.arange(0, 512), torch.arange(1_000_000, 1_000_512)))[None]
    x = torch.zeros(1, 1, dtype=torch.float32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(x, position_ids)
    cos, sin = cos_sin(rope, position_ids)
    half = rope.rotary_dim // 2
    torch.testing.assert_close(hf_cos[..., :half], cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(hf_sin[..., :half], sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(hf_cos[..., half:], cos, atol=1e-6, rtol=0)  # rotate-half duplicates


@pytest.mark.skipif(not HAS_EXT, reason="no ringattn._C")
def test_compiled_and_torch_paths_agree():
    rope = RoPEConfig(96, theta=5e5, scaling={"rope_type": "linear", "factor": 2.0})
    positions = torch.randint(0, 2**31 - 1, (3, 257), generator=torch.Generator().manual_seed(3))
    c1, s1 = cos_sin(rope, positions, impl="compiled")
    c2, s2 = cos_sin(rope, positions, impl="torch")
    assert c1.shape == (3, 257, 48) and c1.dtype == torch.float32
    torch.testing.assert_close(c1, c2, atol=1e-6, rtol=0)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)


def _qk(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=gen)


def test_apply_rope_matches_transformers_rotate_half():
    config = _llama_config({"rope_type": "default", "rope_theta": 10000.0})
    rope = RoPEConfig.from_hf(config, precision="hf")
    q, k = _qk((2, 33, 3, 128)), _qk((2, 33, 1, 128), seed=1)
    positions = torch.arange(100, 133).expand(2, 33)
    cos, sin = LlamaRotaryEmbedding(config)(q.float(), positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos.double(), sin.double(), unsqueeze_dim=2)
    # hf cos/sin are fp32 values of the same fp32 angles; ours are fp64 cos of those angles
    torch.testing.assert_close(apply_rope(q, positions, rope), hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(k, positions, rope), hf_k, atol=1e-6, rtol=0)


def test_apply_rope_interleaved_equals_complex_rotation():
    rope = RoPEConfig(64, theta=10000.0, interleaved=True)
    x = _qk((1, 17, 2, 64))
    positions = torch.arange(5, 22)
    angles = reference_angles(rope, positions)[None, :, None, :]  # (1, S, 1, 32)
    as_complex = torch.view_as_complex(x.reshape(1, 17, 2, 32, 2).contiguous())
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(apply_rope(x, positions, rope), expected, atol=1e-12, rtol=0)


def test_apply_rope_partial_rotary_passes_the_rest_through():
    rope = RoPEConfig(80, theta=10000.0, partial_rotary_factor=0.4)
    assert rope.rotary_dim == 32
    x = _qk((2, 9, 2, 80))
    positions = torch.arange(9)
    out = apply_rope(x, positions, rope)
    torch.testing.assert_close(out[..., 32:], x[..., 32:], atol=0, rtol=0)
    sub = apply_rope(x[..., :32].contiguous(), positions, RoPEConfig(32, theta=10000.0 ** (32 / 32)))
    # rotary_dim 32 of dim 80 uses exponents 2i/32: the same as a full 32-dim RoPE with the same theta
    torch.testing.assert_close(out[..., :32], sub, atol=1e-12, rtol=0)


def test_apply_rope_preserves_norm_and_relative_position():
    rope = RoPEConfig(64, theta=45.2e9)
    q, k = _qk((1, 1, 1, 64)), _qk((1, 1, 1, 64), seed=2)
    shift = 4_000_000

    def score(pq, pk):
        return (apply_rope(q, torch.tensor([pq]), rope) * apply_rope(k, torch.tensor([pk]), rope)).sum()

    torch.testing.assert_close(apply_rope(q, torch.tensor([shift]), rope).norm(), q.norm())
    torch.testing.assert_close(score(7 + shift, 3 + shift), score(7, 3), atol=1e-8, rtol=0)


def test_cos_sin_shape_and_attention_factor():
    rope = RoPEConfig(
        64, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    )
    positions = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    cos, sin = cos_sin(rope, positions)
    assert cos.shape == sin.shape == (3, 4, 32) and cos.dtype == torch.float32
    expected = 0.1 * math.log(4.0) + 1.0
    assert rope.attention_factor == pytest.approx(expected)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, expected**2), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 64, "precision": "fast"}, "precision"),
        ({"dim": 63}, "even"),
        ({"dim": 64, "theta": -1.0}, "theta"),
        ({"dim": 64, "scaling": {"rope_type": "linear"}}, "factor"),
        ({"dim": 64, "scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
        ({"dim": 64, "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ],
    ids=["bad-precision", "odd-dim", "negative-theta", "missing-factor", "unknown-type", "bad-partial"],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoPEConfig(**kwargs)


def test_positions_validated():
    rope = RoPEConfig(64)
    with pytest.raises(ValueError, match="positions"):
        cos_sin(rope, torch.tensor([-1, 2]))
    with pytest.raises(TypeError, match="int32 or int64"):
        cos_sin(rope, torch.tensor([1.0, 2.0]))
