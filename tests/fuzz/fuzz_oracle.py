"""An fp64 attention oracle written independently of ringattn, and the peer of the tolerance rule.

Nothing here imports ringattn's references, RoPE code, masks or index helpers: the oracle is written
from the definitions (README, docs/design.md) and from transformers' RoPE formulas, and it is anchored
to outside code by tests (torch SDPA in fp64 on the no-RoPE subset, transformers' own inverse
frequencies, the relative-position property of the rotation).

* Masks come from global token indices with plain Python logic: causal is ``q_index >= k_index``,
  documents are ``cu_seqlens`` boundaries, a token outside every document sees nothing.
* RoPE: inverse frequencies for rope types default, linear, dynamic (NTK), yarn and llama3 as
  transformers defines them, computed in fp64 (Python floats); NeoX (rotate-half) and interleaved
  (GPT-J) layouts; partial rotary (the first ``int(dim * partial_rotary_factor)`` features rotate).
  ``precision="exact"``: the angle ``pos * f`` is reduced modulo 2*pi in integer arithmetic
  (units of 2^-256 rad, 2*pi to 100 digits), so it is exact at any int32 position. ``precision="hf"``: transformers' fp32 angle
  ``fp32(pos) * fp32(inv_freq)``, with the fp32 inverse frequencies taken from transformers itself.
  cos/sin carry YaRN's attention factor.
* Attention: scores over GQA heads expanded by index (query head h reads KV head h // G), masked
  softmax with an explicit empty-row rule (out 0, lse -inf), all in fp64; gradients by autograd.

The peer is the same plain-torch computation run in the dtype under test, with RoPE tables rounded to
fp32 and cast to the dtype (as transformers does): the accuracy that dtype allows.
"""

from __future__ import annotations

import decimal
import functools
import math
from dataclasses import dataclass

import torch

# 2*pi to 100 significant digits.
_TWO_PI = decimal.Decimal(
    "6.283185307179586476925286766559005768394338798750211641949889184615632812572417997256069650684234136"
)
_SHIFT = 256
_TWO_PI_FIXED = int(
    decimal.Context(prec=150).multiply(_TWO_PI, decimal.Decimal(2**_SHIFT)).to_integral_value()
)


# ------------------------------------------------------------------------------------------------ RoPE


@dataclass(frozen=True)
class RopeSpec:
    """RoPE settings as the fuzz draws them (``scaling`` as sorted items so the spec is hashable)."""

    dim: int
    theta: float = 10000.0
    scaling: tuple | None = None
    partial_rotary_factor: float = 1.0
    interleaved: bool = False
    precision: str = "exact"

    @property
    def params(self) -> dict:
        return dict(self.scaling or ())

    @property
    def rope_type(self) -> str:
        return self.params.get("rope_type", "default")

    @property
    def rotary_dim(self) -> int:
        return int(self.dim * self.partial_rotary_factor)

    def config(self):
        """The library's RoPEConfig for these settings (what the code under test receives)."""
        from ringattn import RoPEConfig

        scaling = None if self.scaling is None else dict(self.scaling)
        return RoPEConfig(
            self.dim, self.theta, scaling, self.partial_rotary_factor, self.interleaved, self.precision
        )

    def short(self) -> str:
        bits = [self.rope_type, f"theta={self.theta:g}", self.precision]
        if self.partial_rotary_factor != 1.0:
            bits.append(f"prf={self.partial_rotary_factor}")
        if self.interleaved:
            bits.append("interleaved")
        return "rope(" + ",".join(bits) + ")"


def inv_freq64(spec: RopeSpec, seq_len: int | None = None) -> list[float]:
    """Inverse frequencies (radians per position) in fp64, transformers' formulas step by step."""
    r, base, p = spec.rotary_dim, float(spec.theta), spec.params
    kind = spec.rope_type
    if kind == "dynamic":
        mpe = p["max_position_embeddings"]
        n = mpe if seq_len is None else max(seq_len, mpe)
        base = base * ((p["factor"] * n / mpe) - (p["factor"] - 1)) ** (r / (r - 2))
    pos_freqs = [base ** ((2 * i) / r) for i in range(r // 2)]
    inv = [1.0 / f for f in pos_freqs]
    if kind == "linear":
        return [f / p["factor"] for f in inv]
    if kind == "llama3":
        factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / high_ff:
                out.append(f)
            elif wavelen > old / low_ff:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - low_ff) / (high_ff - low_ff)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out
    if kind == "yarn":
        factor = yarn_factor(spec)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1
        orig = p["original_max_position_embeddings"]

        def correction_dim(rotations):
            return (r * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        if low == high:
            high += 0.001
        out = []
        for i in range(r // 2):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            extrapolation = 1 - ramp
            out.append(inv[i] / factor * (1 - extrapolation) + inv[i] * extrapolation)
        return out
    return inv


def yarn_factor(spec: RopeSpec) -> float:
    p = spec.params
    if p.get("factor") is not None:
        return p["factor"]
    return p["max_position_embeddings"] / p["original_max_position_embeddings"]


def attention_factor(spec: RopeSpec) -> float:
    """YaRN's cos/sin scale (1 for the other types), as transformers computes it."""
    if spec.rope_type != "yarn":
        return 1.0
    p = spec.params
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor = yarn_factor(spec)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if p.get("mscale") and p.get("mscale_all_dim"):
        return float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
    return mscale(factor)


@functools.lru_cache(maxsize=256)
def hf_inv_freq32(spec: RopeSpec, seq_len: int | None = None) -> torch.Tensor:
    """transformers' own fp32 inverse frequencies (its ROPE_INIT_FUNCTIONS), for precision="hf"."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": float(spec.theta), "partial_rotary_factor": spec.partial_rotary_factor}
    params.update(spec.params)
    kind = spec.rope_type
    if kind == "default":  # the linear rule with factor 1 is the default one, with partial rotary
        kind, params = "linear", {**params, "rope_type": "linear", "factor": 1.0}
    extra = {}
    if "max_position_embeddings" in params:
        extra["max_position_embeddings"] = params["max_position_embeddings"]
    elif kind == "yarn" and params.get("factor"):  # the length YaRN implies (keeps transformers quiet)
        extra["max_position_embeddings"] = int(params["original_max_position_embeddings"] * params["factor"])
    config = LlamaConfig(
        hidden_size=spec.dim * 2,
        num_attention_heads=2,
        head_dim=spec.dim,
        rope_parameters=params,
        **extra,
    )
    kwargs = {"seq_len": seq_len} if kind == "dynamic" else {}
    inv, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu", **kwargs)
    return inv.to(torch.float32)


def _exact_angle(pos: int, f: float) -> float:
    """pos * f reduced to [-pi, pi], exactly: f is taken as its exact fp64 value M * 2^E, the product
    and the reduction run on integers in units of 2^-256 rad, then one correctly rounded division."""
    m, e = math.frexp(f)
    mant, exp = int(m * 2**53), e - 53 + _SHIFT
    x = pos * mant << exp if exp >= 0 else (pos * mant) >> -exp
    r = x % _TWO_PI_FIXED
    if 2 * r > _TWO_PI_FIXED:
        r -= _TWO_PI_FIXED
    return r / 2**_SHIFT


def rope_seq_len(spec: RopeSpec | None, positions) -> int | None:
    """Dynamic NTK's sequence length: transformers' max(position_ids) + 1 over all given positions."""
    if spec is None or spec.rope_type != "dynamic":
        return None
    flat = [int(p) for p in torch.as_tensor(positions).flatten().tolist()]
    return max(flat) + 1 if flat else None


def rope_tables(spec: RopeSpec, positions: torch.Tensor, seq_len: int | None):
    """(cos64, sin64, cos32, sin32), each positions.shape + (rotary_dim // 2,).

    The fp64 pair is the oracle's (attention factor included); the fp32 pair is what a careful plain
    torch user would hold: correctly rounded fp32 tables (exact mode), or transformers' own fp32
    cos/sin of its fp32 angle (hf mode).
    """
    af = attention_factor(spec)
    pos_list = [int(p) for p in positions.flatten().tolist()]
    n = spec.rotary_dim // 2
    if spec.precision == "hf":
        inv32 = hf_inv_freq32(spec, seq_len)
        angle32 = torch.tensor(pos_list, dtype=torch.float32)[:, None] * inv32[None, :]
        a64 = angle32.double()
        cos64 = torch.tensor([[math.cos(a) for a in row] for row in a64.tolist()], dtype=torch.float64)
        sin64 = torch.tensor([[math.sin(a) for a in row] for row in a64.tolist()], dtype=torch.float64)
        cos32, sin32 = angle32.cos() * af, angle32.sin() * af
        cos64, sin64 = cos64 * af, sin64 * af
    else:
        inv = inv_freq64(spec, seq_len)
        cache: dict[int, list[float]] = {}
        rows = []
        for p in pos_list:
            if p not in cache:
                cache[p] = [_exact_angle(p, f) for f in inv]
            rows.append(cache[p])
        angles = torch.tensor(rows, dtype=torch.float64).reshape(len(pos_list), n)
        cos64, sin64 = angles.cos() * af, angles.sin() * af
        cos32, sin32 = cos64.float(), sin64.float()
    shape = tuple(positions.shape) + (n,)
    return tuple(t.reshape(shape) for t in (cos64, sin64, cos32, sin32))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """RoPE of x (B, S, H, D) with tables (S, r/2) or (B, S, r/2) in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    r = spec.rotary_dim
    rot, rest = x[..., :r], x[..., r:]
    if spec.interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = rot[..., : r // 2], rot[..., r // 2 :]
        rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


# ----------------------------------------------------------------------------------------------- masks


def document_of(index: int, cu: list[int] | None):
    """Document number of a global index, None outside every document, 0 without documents."""
    if cu is None:
        return 0
    for d in range(len(cu) - 1):
        if cu[d] <= index < cu[d + 1]:
            return d
    return None


def visible(q_index: list[int], k_index: list[int], causal: bool, cu: list[int] | None) -> torch.Tensor:
    """(Sq, Sk) bool from global indices, by plain Python."""
    q_doc = [document_of(i, cu) for i in q_index]
    k_doc = [document_of(j, cu) for j in k_index]
    rows = [
        [(not causal or i >= j) and qd is not None and qd == kd for j, kd in zip(k_index, k_doc, strict=True)]
        for i, qd in zip(q_index, q_doc, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(q_index), len(k_index))


def positions_in_document(index: list[int], cu: list[int] | None) -> list[int]:
    """Default RoPE positions: index within its document (0 outside every document), or the index."""
    if cu is None:
        return list(index)
    out = []
    for i in index:
        d = document_of(i, cu)
        out.append(0 if d is None else i - cu[d])
    return out


# ------------------------------------------------------------------------------------------- attention


@dataclass
class Problem:
    """One attention problem in the library's (B, S, H, D) convention, fully resolved.

    q_index/k_index: global indices; q_pos/k_pos: RoPE positions (S,) or (B, S) int64 tensors.
    """

    causal: bool
    scale: float
    q_index: list[int]
    k_index: list[int]
    cu: list[int] | None = None
    rope: RopeSpec | None = None
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    seq_len: int | None = None  # dynamic NTK length; None: max over q_pos and k_pos, + 1

    def tables(self):
        """Per side (cos64, sin64, cos32, sin32), or None without RoPE."""
        if self.rope is None:
            return None, None
        n = self.seq_len
        if n is None and self.rope.rope_type == "dynamic":
            both = torch.cat([self.q_pos.flatten(), self.k_pos.flatten()])
            n = rope_seq_len(self.rope, both)
        return rope_tables(self.rope, self.q_pos, n), rope_tables(self.rope, self.k_pos, n)


def attention(q, k, v, prob: Problem, tables, *, dtype: torch.dtype):
    """out (B, Sq, Hq, D) and lse (B, Hq, Sq) computed in ``dtype`` (differentiable).

    ``tables``: (q_tables, k_tables) from ``Problem.tables``; fp64 uses the fp64 tables, any other
    dtype the fp32 ones cast to it.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if prob.rope is not None:
        qt, kt = tables
        pick = slice(0, 2) if dtype == torch.float64 else slice(2, 4)
        qc, qs = (t.to(dtype) for t in qt[pick])
        kc, ks = (t.to(dtype) for t in kt[pick])
        q, k = rotate(q, qc, qs, prob.rope), rotate(k, kc, ks, prob.rope)
    group = Hq // Hkv
    heads = torch.tensor([h // group for h in range(Hq)], dtype=torch.long)
    k, v = k.index_select(2, heads), v.index_select(2, heads)
    if Sk == 0:
        out = torch.zeros(B, Sq, Hq, D, dtype=dtype) + 0 * q  # keeps q in the graph
        return out, torch.full((B, Hq, Sq), -math.inf, dtype=dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * prob.scale
    vis = visible(prob.q_index, prob.k_index, prob.causal, prob.cu)
    scores = scores.masked_fill(~vis, -math.inf)
    if dtype == torch.float64:
        row_max = scores.amax(-1, keepdim=True).detach()
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        e = torch.exp(scores - row_max)
        denom = e.sum(-1, keepdim=True)
        empty = denom == 0
        safe = torch.where(empty, torch.ones_like(denom), denom)
        probs = e / safe
        lse = torch.where(empty, torch.full_like(denom, -math.inf), row_max + torch.log(safe))
        lse = lse.squeeze(-1)
    else:  # the peer: torch's own softmax and logsumexp in the dtype
        has_key = vis.any(-1, keepdim=True)
        lse = scores.logsumexp(-1)
        probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * vis
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def results(q, k, v, dout, prob: Problem, *, dtype: torch.dtype, tables=None, grads=True) -> dict:
    """out, lse and (with ``grads``) dq, dk, dv of ``attention`` in ``dtype``, by name."""
    tables = prob.tables() if tables is None else tables
    leaves = [t.detach().to(dtype).requires_grad_(grads) for t in (q, k, v)]
    with torch.enable_grad():
        out, lse = attention(*leaves, prob, tables, dtype=dtype)
        res = {"out": out.detach(), "lse": lse.detach()}
        if grads:
            dq, dk, dv = torch.autograd.grad(out, leaves, dout.to(dtype), allow_unused=True)
            for name, g, leaf in (("dq", dq, leaves[0]), ("dk", dk, leaves[1]), ("dv", dv, leaves[2])):
                res[name] = torch.zeros_like(leaf) if g is None else g
    return res
