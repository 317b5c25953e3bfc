"""RoPE core: configuration, frequencies, exact-phase cos/sin and the fp64 reference rotation.

Two precision modes:

* ``"exact"`` (default): the angle ``pos * f`` is reduced to a fraction of a turn without rounding
  loss. Each frequency is stored as a 64-bit fixed-point turn count ``r = round(f / 2pi * 2^64)``;
  ``pos * r mod 2^64`` is then the exact fractional turn for any int32 position, and only the final
  ``sin``/``cos`` of an angle in ``[-pi, pi)`` run in fp32. Error <= 1e-6 rad at any position.
* ``"hf"``: reproduces transformers' fp32 arithmetic (fp32 ``inv_freq``, fp32 ``pos * inv_freq``),
  for parity with existing checkpoints. At 4M positions and theta = 45.2e9 this is off by ~0.16 rad.

Frequencies follow transformers' definitions for rope types default, linear, dynamic, yarn and llama3.
``cos``/``sin`` include the attention factor (YaRN), as transformers' rotary embeddings do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import torch

from ._extension import compiled

__all__ = ["RoPEConfig", "cos_sin", "apply_rope", "rotate", "reference_angles", "phase_error"]

_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# 2*pi to 50 significant digits: turns = f / 2pi is then exact to far below 2^-64 per position.
TWO_PI = Fraction("6.2831853071795864769252867665590057683943387987502")
_MAX_POSITION = 2**31 - 1
# Numeric rope parameters that must be finite and > 0 (or >= 0: 0 means "use the default" there).
_POSITIVE_KEYS = (
    "factor",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "attention_factor",
)
_NON_NEGATIVE_KEYS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class FrozenScaling(Mapping):
    """``RoPEConfig.scaling``: a read-only copy of the rope parameters dict (reads like the dict,
    compares equal to it; hashable and picklable). The config is frozen and its JSON (what the
    kernels receive) is computed once, so the parameters must not change after construction."""

    __slots__ = ("_params",)

    def __init__(self, params: Mapping[str, Any] = ()):
        object.__setattr__(self, "_params", dict(params))

    def __setattr__(self, name, value):
        raise AttributeError("RoPEConfig.scaling is read-only; build a new RoPEConfig instead")

    def __getitem__(self, key: str) -> Any:
        return self._params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return repr(self._params)

    def __hash__(self) -> int:
        return hash(json.dumps(self._params, sort_keys=True, default=repr))

    def __reduce__(self):
        return type(self), (self._params,)


@dataclass(frozen=True)
class RoPEConfig:
    """Rotary position embedding settings shared by every kernel and reference.

    Args:
        dim: head dimension D of the tensors being rotated.
        theta: RoPE base.
        scaling: transformers' rope parameters dict (``{"rope_type": "yarn", "factor": 4.0, ...}``),
            or None for plain RoPE; kept as a read-only copy (``FrozenScaling``). ``dynamic`` needs
            ``max_position_embeddings`` in this dict (the model config's value; ``from_hf`` fills it
            in); ``yarn`` reads it when ``factor`` is absent. Numeric parameters must be finite and > 0.
        partial_rotary_factor: fraction of ``dim`` that is rotated; the rest passes through.
        interleaved: GPT-J layout (pairs ``(x[2i], x[2i+1])``) instead of NeoX rotate-half.
        precision: ``"exact"`` or ``"hf"`` (see module docstring).
        dynamic_seq_len: ``dynamic`` only: the sequence length its frequencies use, pinned (see
            ``at_seq_len``); None (default): each call uses ``max(positions) + 1`` of its positions.
    """

    dim: int
    theta: float = 10000.0
    scaling: Mapping[str, Any] | None = field(default=None, hash=False)
    partial_rotary_factor: float = 1.0
    interleaved: bool = False
    precision: str = "exact"
    dynamic_seq_len: int | None = None

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not _is_real(self.theta) or not (0 < self.theta < math.inf):
            raise ValueError(f"theta must be a finite number > 0, got {self.theta!r}")
        if not _is_real(self.partial_rotary_factor) or not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"rotary dim int(dim * partial_rotary_factor) must be even and >= 2, got {self.rotary_dim} "
                f"(dim={self.dim}, partial_rotary_factor={self.partial_rotary_factor})"
            )
        if not isinstance(self.interleaved, bool):
            raise TypeError(f"interleaved must be a bool, got {self.interleaved!r}")
        if self.precision not in ("exact", "hf"):
            raise ValueError(f"precision must be 'exact' or 'hf', got {self.precision!r}")
        n = self.dynamic_seq_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= 2**31):
            raise ValueError(f"dynamic_seq_len must be None or an int in [1, 2^31], got {n!r}")
        if self.scaling is not None:
            if not isinstance(self.scaling, Mapping):
                raise TypeError(f"scaling must be a dict or None, got {type(self.scaling).__name__}")
            # A read-only copy: the config is frozen, and the kernels get the JSON made below.
            object.__setattr__(self, "scaling", FrozenScaling(self.scaling))
        # Serialised once here: custom ops take it as a plain string, and json is not traceable.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["scaling"] = None if self.scaling is None else dict(self.scaling)
        object.__setattr__(self, "_json", json.dumps(fields, sort_keys=True))
        if self.scaling is not None:
            rope_type = self.rope_type
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"scaling['rope_type'] must be one of {_ROPE_TYPES}, got {rope_type!r}")
            missing = [k for k in _REQUIRED_KEYS[rope_type] if self.scaling.get(k) is None]
            no_factor = (
                self.scaling.get("factor") is None and self.scaling.get("max_position_embeddings") is None
            )
            if rope_type == "yarn" and no_factor:
                missing.append("factor")
            if missing:
                raise ValueError(f"scaling for rope_type {rope_type!r} is missing {missing}")
            for key in _POSITIVE_KEYS + _NON_NEGATIVE_KEYS:
                value = self.scaling.get(key)
                if value is None:
                    continue
                bound = ">= 0" if key in _NON_NEGATIVE_KEYS else "> 0"
                if (
                    not _is_real(value)
                    or not math.isfinite(value)
                    or not (value >= 0 if bound == ">= 0" else value > 0)
                ):
                    raise ValueError(f"scaling[{key!r}] must be a finite number {bound}, got {value!r}")
            if rope_type == "dynamic" and self.rotary_dim <= 2:
                raise ValueError(
                    f"dynamic scaling needs a rotary dim > 2 (exponent d / (d - 2)), got {self.rotary_dim}"
                )

    def to_json(self) -> str:
        return self._json

    def at_seq_len(self, seq_len: int) -> RoPEConfig:
        """This config with ``dynamic`` frequencies pinned to a sequence of ``seq_len`` tokens (``self``
        for the other rope types, whose frequencies do not depend on the length).

        Dynamic NTK scaling is a property of the whole sequence (transformers: ``max(position_ids) +
        1``), but a block sees only some of its positions: whoever splits a sequence into blocks (the
        ring, ``ring_attention_ref``) pins the sequence's length once, and every block then rotates
        with the same frequencies.
        """
        if self.rope_type != "dynamic":
            return self
        return replace(self, dynamic_seq_len=seq_len)

    @classmethod
    def from_json(cls, text: str) -> RoPEConfig:
        return cls(**json.loads(text))

    @property
    def rope_type(self) -> str:
        if self.scaling is None:
            return "default"
        return self.scaling.get("rope_type", self.scaling.get("type", "default"))

    @property
    def rotary_dim(self) -> int:
        return int(self.dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, config, *, precision: str = "exact", interleaved: bool = False) -> RoPEConfig:
        """Build from a transformers ``PretrainedConfig`` (5.x ``rope_parameters`` or 4.x ``rope_scaling``)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if not params and legacy:
            params = dict(legacy)
        theta = params.pop("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ValueError("config has neither rope_parameters['rope_theta'] nor rope_theta")
        prf = params.pop("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            scaling = None
        else:
            scaling = params
            if rope_type in ("dynamic", "yarn"):
                scaling.setdefault("max_position_embeddings", config.max_position_embeddings)
        return cls(head_dim, float(theta), scaling, float(prf), interleaved, precision)

    def inv_freq(self, dtype: torch.dtype = torch.float64, seq_len: int | None = None) -> torch.Tensor:
        """Inverse frequencies (rotary_dim // 2,), radians per position.

        The operations follow transformers' definitions step by step, so ``dtype=torch.float32``
        gives its fp32 values and ``torch.float64`` the same formula without fp32 rounding.
        ``seq_len`` only matters for ``dynamic`` (transformers uses ``max(position_ids) + 1``);
        default: the pinned ``dynamic_seq_len``.
        """
        dim, base, s = self.rotary_dim, self.theta, self.scaling or {}
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim
        rope_type = self.rope_type
        if rope_type == "dynamic":
            max_pos = s["max_position_embeddings"]
            seq_len = self.dynamic_seq_len if seq_len is None else seq_len
            seq_len = max_pos if seq_len is None else max(seq_len, max_pos)
            factor = s["factor"]
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        pos_freqs = base**exponents
        if rope_type == "yarn":
            return self._yarn(pos_freqs, dtype)
        inv_freq = 1.0 / pos_freqs
        if rope_type == "linear":
            inv_freq = inv_freq / s["factor"]
        elif rope_type == "llama3":
            inv_freq = self._llama3(inv_freq)
        return inv_freq

    def _yarn_factor(self) -> float:
        s = self.scaling
        if s.get("factor") is not None:
            return s["factor"]
        return s["max_position_embeddings"] / s["original_max_position_embeddings"]

    def _yarn(self, pos_freqs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        s, dim, base = self.scaling, self.rotary_dim, self.theta
        factor = self._yarn_factor()
        beta_fast = s.get("beta_fast") or 32
        beta_slow = s.get("beta_slow") or 1
        original = s["original_max_position_embeddings"]

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: avoids a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp
        inv_freq_extrapolation = 1.0 / pos_freqs
        inv_freq_interpolation = 1.0 / (factor * pos_freqs)
        return (
            inv_freq_interpolation * (1 - extrapolation_weight)
            + inv_freq_extrapolation * extrapolation_weight
        )

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)

    @property
    def attention_factor(self) -> float:
        """Scale applied to cos and sin (YaRN's attention factor; 1.0 for the other types)."""
        if self.rope_type != "yarn":
            return 1.0
        s = self.scaling
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        factor = self._yarn_factor()

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if s.get("mscale") and s.get("mscale_all_dim"):
            return float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
        return mscale(factor)

    def turns_fixed(self, seq_len: int | None = None) -> torch.Tensor:
        """Exact-phase constants (rotary_dim // 2,) int64: ``round(f / 2pi * 2^64) mod 2^64``.

        Stored as the two's-complement int64 of the uint64 value (torch has no uint64 arithmetic).
        """
        return _turns_fixed(self, seq_len).clone()


@functools.lru_cache(maxsize=64)
def _turns_fixed(rope: RoPEConfig, seq_len: int | None) -> torch.Tensor:
    # Exact rational arithmetic (fp64 would leave ~300 ulps of 2^-64 turns): cached, it is per config.
    values = []
    for f in rope.inv_freq(torch.float64, seq_len).tolist():
        r = round(Fraction(f) * 2**64 / TWO_PI) % 2**64
        values.append(r - 2**64 if r >= 2**63 else r)
    return torch.tensor(values, dtype=torch.int64)


@functools.lru_cache(maxsize=64)
def kernel_frequencies(rope: RoPEConfig, seq_len: int | None, device: str) -> torch.Tensor:
    """The frequency table fused-RoPE kernels take, on ``device``: int64 ``turns_fixed`` (exact) or fp32
    ``inv_freq`` (hf), (rotary_dim // 2,). Cached per device, so a block call copies nothing from the host.
    """
    if rope.precision == "exact":
        return rope.turns_fixed(seq_len).to(device)
    return rope.inv_freq(torch.float32, seq_len).to(device)


def _check_positions(positions: torch.Tensor) -> None:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) > _MAX_POSITION):
        raise ValueError(
            f"positions must lie in [0, 2^31 - 1], got [{int(positions.min())}, {int(positions.max())}]"
        )


def _dynamic_seq_len(rope: RoPEConfig, positions: torch.Tensor, seq_len: int | None) -> int | None:
    if rope.rope_type != "dynamic" or seq_len is not None:
        return seq_len
    if rope.dynamic_seq_len is not None:
        return rope.dynamic_seq_len  # pinned for the whole sequence (``at_seq_len``)
    if positions.numel():
        return int(positions.max()) + 1  # transformers' choice: max(position_ids) + 1
    return None


def _exact_angles_torch(turns_fixed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Reduced angles in [-pi, pi) as fp32, from int64 arithmetic that never overflows.

    With r = r_hi * 2^32 + r_lo and pos < 2^31, both pos * r_hi and pos * r_lo fit in int64.
    """
    pos = positions.to(torch.int64).unsqueeze(-1)
    r_hi = (turns_fixed >> 32) & 0xFFFFFFFF
    r_lo = turns_fixed & 0xFFFFFFFF
    low = pos * r_lo
    top32 = ((pos * r_hi) + (low >> 32)) & 0xFFFFFFFF  # bits 32..63 of pos * r mod 2^64
    fraction = (top32.to(torch.float64) + (low & 0xFFFFFFFF).to(torch.float64) * 2.0**-32) * 2.0**-32
    centred = fraction - torch.round(fraction)
    return (centred * (2 * math.pi)).to(torch.float32)


def cos_sin(
    rope: RoPEConfig, positions: torch.Tensor, *, seq_len: int | None = None, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, float32, shape ``positions.shape + (rotary_dim // 2,)``.

    Args:
        rope: the RoPE settings; ``rope.precision`` picks exact or transformers-compatible angles.
        positions: int32/int64 tensor of token positions in ``[0, 2^31 - 1]``, any shape.
        seq_len: sequence length for ``dynamic`` scaling (default ``max(positions) + 1``).
        impl: ``"auto"`` (compiled core for exact mode when built, else torch), ``"compiled"`` or ``"torch"``.
    """
    if not isinstance(rope, RoPEConfig):
        raise TypeError(f"rope must be a RoPEConfig, got {type(rope).__name__}")
    _check_positions(positions)
    if impl not in ("auto", "compiled", "torch"):
        raise ValueError(f"impl must be 'auto', 'compiled' or 'torch', got {impl!r}")
    seq_len = _dynamic_seq_len(rope, positions, seq_len)
    scale = rope.attention_factor
    if rope.precision == "hf":
        if impl == "compiled":
            raise ValueError("impl='compiled' supports precision='exact' only")
        # transformers: freqs = position_ids.float() * inv_freq (fp32), then cos/sin in fp32.
        angles = positions.to(torch.float32).unsqueeze(-1) * rope.inv_freq(torch.float32, seq_len).to(
            positions.device
        )
        return angles.cos() * scale, angles.sin() * scale

    turns = rope.turns_fixed(seq_len).to(positions.device)
    module = compiled()
    if impl == "compiled":
        if module is None:
            raise RuntimeError(
                "impl='compiled' requested but ringattn._C is not built; see extension_status()"
            )
        return _cos_sin_compiled(module, turns, positions, scale)
    if impl == "auto" and _compiled_runs_on(module, positions.device):
        return _cos_sin_compiled(module, turns, positions, scale)
    angles = _exact_angles_torch(turns, positions)
    return angles.cos() * scale, angles.sin() * scale


def _compiled_runs_on(module, device: torch.device) -> bool:
    """Whether ``impl="auto"`` may use the compiled cos/sin for tensors on ``device``."""
    if module is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and bool(module.with_cuda))


def _cos_sin_compiled(module, turns: torch.Tensor, positions: torch.Tensor, scale: float):
    pos = positions.to(torch.int32).contiguous()
    n_freqs = turns.numel()
    cos = torch.empty(pos.shape + (n_freqs,), dtype=torch.float32, device=pos.device)
    sin = torch.empty_like(cos)
    args = (pos.data_ptr(), pos.numel(), turns.data_ptr(), n_freqs, scale, cos.data_ptr(), sin.data_ptr())
    if pos.is_cuda:
        if not module.with_cuda:
            raise RuntimeError("positions are on CUDA but ringattn._C was built without CUDA kernels")
        module.rope_cos_sin_cuda(*args, torch.cuda.current_stream(pos.device).cuda_stream)
    elif pos.device.type == "cpu":
        module.rope_cos_sin_cpu(*args)
    else:
        raise ValueError(f"impl='compiled' supports CPU and CUDA tensors, got device {pos.device}")
    return cos, sin


def reference_angles(rope: RoPEConfig, positions: torch.Tensor, *, seq_len: int | None = None):
    """fp64 angles ``positions.shape + (rotary_dim // 2,)`` with the semantics of ``rope.precision``.

    Exact mode: ``pos * f`` with fp64 frequencies (error ~1e-9 rad at 2^24). hf mode: transformers'
    fp32-rounded angle, promoted to fp64.
    """
    _check_positions(positions)
    seq_len = _dynamic_seq_len(rope, positions, seq_len)
    if rope.precision == "hf":
        angles = positions.to(torch.float32).unsqueeze(-1) * rope.inv_freq(torch.float32, seq_len).to(
            positions.device
        )
        return angles.double()
    inv_freq = rope.inv_freq(torch.float64, seq_len).to(positions.device)
    return positions.to(torch.float64).unsqueeze(-1) * inv_freq


def apply_rope(
    x_BSHD: torch.Tensor, positions_BS: torch.Tensor, rope: RoPEConfig, *, transpose: bool = False
) -> torch.Tensor:
    """fp64 reference rotation of ``x`` (B, S, H, D) at ``positions`` (B, S) or (S,); returns fp64.

    NeoX layout rotates pairs ``(x[i], x[i + r/2])``, interleaved layout pairs ``(x[2i], x[2i+1])``,
    over the first ``r = rope.rotary_dim`` features; the rest pass through unchanged.
    ``transpose=True`` applies the transposed map (rotation by -angle, same attention factor): the
    RoPE backward, which takes gradients w.r.t. rotated q/k back to q/k.
    """
    if x_BSHD.dim() != 4 or x_BSHD.shape[-1] != rope.dim:
        raise ValueError(f"x must be (B, S, H, {rope.dim}), got {tuple(x_BSHD.shape)}")
    if positions_BS.shape not in (x_BSHD.shape[1:2], x_BSHD.shape[:2]):
        raise ValueError(
            f"positions must be (S,) or (B, S) = {tuple(x_BSHD.shape[:2])}, got {tuple(positions_BS.shape)}"
        )
    angles = reference_angles(rope, positions_BS)
    cos, sin = angles.cos() * rope.attention_factor, angles.sin() * rope.attention_factor
    return rotate(x_BSHD.to(torch.float64), cos, sin, rope, transpose=transpose)


def rotate(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RoPEConfig, *, transpose=False):
    """The rotation itself, in the dtype of its inputs: ``x`` (B, S, H, D) by per-pair ``cos``/``sin``
    ((S, r/2) or (B, S, r/2), attention factor included) in ``rope``'s layout; the features past
    ``rope.rotary_dim`` pass through. ``transpose``: rotation by -angle (the RoPE backward)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., S, 1, r/2) broadcasts over heads
    if transpose:
        sin = -sin
    r = rope.rotary_dim
    rot, rest = x_BSHD[..., :r], x_BSHD[..., r:]
    if rope.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def phase_error(rope: RoPEConfig, positions: torch.Tensor, *, impl: str = "auto") -> float:
    """Largest angle error in radians of ``cos_sin(rope, positions)`` against the exact fp64 angle."""
    cos, sin = cos_sin(rope, positions, impl=impl)
    ours = torch.atan2(sin.double(), cos.double())
    truth = reference_angles(replace(rope, precision="exact"), positions)
    diff = torch.remainder(ours - truth + math.pi, 2 * math.pi) - math.pi
    return float(diff.abs().max()) if diff.numel() else 0.0
