"""The block-attention contract: the one interface between the ring scheduler and the kernels.

A *block* is attention of a run of queries against a run of keys. Each run's rows carry global token
indices given cheaply as a ``Span`` (row i has index ``start + stride * i``): a contiguous shard, one
zigzag chunk and a stripe are all spans, so every layout is one code path. Masks are functions of
those indices (``BlockMask``); RoPE uses per-token *positions*, which are not indices.

``block_forward``/``block_backward`` validate their arguments once and build one frozen ``BlockArgs``;
every backend implements the same calls on it and says whether it can run a block:

    can_implement(q, k, v, args) -> (ok, reason)
    forward(q, k, v, args, out_dtype) -> (out, lse)
    backward(dout, q, k, v, out, lse, delta, args, grad_dtype) -> (dq, dk, dv)

Shapes: q, out, dout, dq (B, Sq, Hq, D); k, v, dk, dv (B, Sk, Hkv, D), Hq % Hkv == 0 (K/V never
expanded; dk/dv are reduced over each query group); lse and delta (B, Hq, Sq) fp32, natural log.
``delta`` = rowsum(dout * out) may be None, and the backend computes it from ``out``. Rows that see
no key have lse = -inf and out = 0. The scheduler calls ``block_forward`` and ``block_backward`` and
never knows which backend ran.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .backends import BACKENDS
from .indexing import default_positions, default_query_positions
from .rope import RoPEConfig

__all__ = [
    "Span",
    "BlockMask",
    "BlockArgs",
    "Backend",
    "block_args",
    "block_forward",
    "block_backward",
    "check_block",
    "check_devices",
    "check_dropout_args",
    "check_grad_inputs",
    "check_inputs",
    "check_score_features",
    "check_softmax_scale",
    "select_backend",
]
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_POSITION = 2**31 - 1  # positions and global indices are int32 in every kernel


@dataclass(frozen=True)
class Span:
    """Global token indices of a run of rows: row i has index ``start + stride * i``."""

    start: int = 0
    stride: int = 1

    def __post_init__(self):
        if self.start < 0 or self.stride < 1:
            raise ValueError(
                f"Span needs start >= 0 and stride >= 1, got start={self.start}, stride={self.stride}"
            )

    def indices(self, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        return self.start + self.stride * torch.arange(length, device=device)

    def last(self, length: int) -> int:
        return self.start + self.stride * (length - 1)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which (query, key) pairs of a block may attend.

    causal: key index <= the query's aligned index (its global index, shifted per document when
    ``k_cu_seqlens`` is given). cu_seqlens: int tensor (n_docs + 1,) of document boundaries over
    global indices; pairs must share a document, and tokens outside every document see nothing.
    k_cu_seqlens: the keys' own boundaries (cross-length varlen: document d's queries are
    cu_seqlens[d]:cu_seqlens[d+1], its keys k_cu_seqlens[d]:k_cu_seqlens[d+1]; the last query of a
    document aligns with its last key). None: the keys use ``cu_seqlens``.
    """

    causal: bool = False
    q_span: Span = field(default_factory=Span)
    k_span: Span = field(default_factory=Span)
    cu_seqlens: torch.Tensor | None = None
    k_cu_seqlens: torch.Tensor | None = None

    def is_empty(self, q_len: int, k_len: int) -> bool:
        """True when no pair can attend, so the block may be skipped (a cheap, conservative test)."""
        if q_len == 0 or k_len == 0:
            return True
        # With key-side documents a query's aligned index may lie past its own: no causal shortcut.
        return self.causal and self.k_cu_seqlens is None and self.q_span.last(q_len) < self.k_span.start


@dataclass(frozen=True, eq=False)
class RotaryPositions:
    """One side's RoPE positions, resolved: int32 (1 or B, S) contiguous on the block's device, in
    [0, 2^31 - 1], and the sequence length its frequencies use (dynamic NTK only, else None)."""

    positions: torch.Tensor
    seq_len: int | None

    @property
    def batch_stride(self) -> int:
        """Elements between batch rows: 0 when one row serves every batch entry."""
        return self.positions.shape[1] if self.positions.shape[0] > 1 else 0


@dataclass(frozen=True, eq=False)
class BlockArgs:
    """Everything about one block call besides its tensors, validated once by the contract.

    A feature that changes what a block computes is a field here; a backend lists the features it
    implements in its ``features`` set, and ``select_backend`` passes over a backend that lacks one in
    use (see ``unsupported``) before asking its ``can_implement``.
    """

    mask: BlockMask
    scale: float
    rope: RoPEConfig | None = None
    q_rope: RotaryPositions | None = None  # set exactly when rope is
    k_rope: RotaryPositions | None = None
    window: tuple[int, int] = (-1, -1)  # sliding window (left, right) in tokens; -1: unbounded
    softcap: float = 0.0  # scores -> softcap * tanh(scores / softcap); 0: off
    alibi_slopes: torch.Tensor | None = None  # fp32 (B, Hq) contiguous on the block's device
    dropout_p: float = 0.0  # with dropout_seed/offset: ringattn.dropout's counter-based mask
    dropout_seed: int = 0
    dropout_offset: int = 0
    deterministic: bool = False  # bitwise-repeatable results for the same inputs and settings

    def unsupported(self, supported: frozenset[str] = frozenset()) -> str:
        """The first feature in use that is not in ``supported``, as the user's argument name; "" if none."""
        in_use = {
            "cu_seqlens_k": self.mask.k_cu_seqlens is not None,
            "window_size": self.window != (-1, -1),
            "softcap": self.softcap != 0.0,
            "alibi_slopes": self.alibi_slopes is not None,
            "dropout_p": self.dropout_p != 0.0,
            "deterministic": self.deterministic,
        }
        return next((name for name, used in in_use.items() if used and name not in supported), "")


class Backend(Protocol):
    name: str
    features: frozenset[str]  # BlockArgs features it implements (argument names, see BlockArgs.unsupported)

    def can_implement(self, q, k, v, args: BlockArgs) -> tuple[bool, str]: ...

    def forward(self, q, k, v, args: BlockArgs, out_dtype: torch.dtype): ...

    def backward(self, dout, q, k, v, out, lse, delta, args: BlockArgs, grad_dtype: torch.dtype): ...


# Tried in order by backend="auto". The fp64 reference is a CPU fallback only: on a GPU, silently
# running it would be a surprise, so a GPU block no fast backend supports is an error. On a GPU the
# Triton kernels come first: they carry the most evidence (interpreter vs fp64 and AOT checks) until
# a GPU run has measured the CUDA kernels.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda")}


def _why_not(backend: Backend, q, k, v, args: BlockArgs) -> str:
    """Empty when ``backend`` can run the block, else the reason."""
    feature = args.unsupported(backend.features)
    if feature:
        return f"{feature} is not supported by this backend"
    ok, reason = backend.can_implement(q, k, v, args)
    return "" if ok else reason


def select_backend(name: str, q, k, v, args: BlockArgs) -> Backend:
    """The backend to run a block: ``name`` itself (checked), or the first capable one for "auto".

    A feature of ``args`` that no candidate implements raises NotImplementedError naming the argument.
    """
    backends = BACKENDS
    if name != "auto":
        if name not in backends:
            raise ValueError(f"backend must be 'auto' or one of {sorted(backends)}, got {name!r}")
        candidates = (name,)
    else:
        candidates = tuple(c for c in _AUTO_ORDER.get(q.device.type, ()) if c in backends)
    reasons = []
    for candidate in candidates:
        reason = _why_not(backends[candidate], q, k, v, args)
        if not reason:
            return backends[candidate]
        reasons.append(f"{candidate}: {reason}")
    feature = args.unsupported()
    if feature and all(args.unsupported(backends[c].features) for c in candidates):
        raise NotImplementedError(f"{feature} is not supported by backend {name!r} on {q.device.type}")
    if name != "auto":
        raise ValueError(f"backend {name!r} cannot run this block: {reasons[0].split(': ', 1)[1]}")
    raise ValueError(
        f"no backend can run this block on {q.device.type}: " + "; ".join(reasons or ["none known"])
    )


def check_softmax_scale(scale, name: str = "softmax_scale") -> float | None:
    """The one check of a softmax scale (every API and the ring call it): a positive finite real
    number, or None for the default 1 / sqrt(D). Returns it as a float (or None); raises a
    TypeError/ValueError naming ``name`` (the caller's argument name) and the value."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a positive finite float or None, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be a positive finite float or None, got {scale!r}")
    return float(scale)


def check_devices(q: torch.Tensor, **tensors) -> None:
    """Every tensor given by keyword (None: absent) must be on q's device; raise a ValueError naming it.

    A meta tensor among real ones would otherwise send a custom op to its fake (shape-only)
    implementation, which returns uninitialised memory.
    """
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}: all tensors of a call must share a device"
            )


def check_inputs(q, k, v, rope=None) -> None:
    """Validate q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) and rope; raise TypeError/ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, S, H, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be bf16, fp16, fp32 or fp64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B and D")
    if q.shape[3] == 0:
        raise ValueError(f"the head dim D of q, k and v must be > 0, got q shape {tuple(q.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"k and v need at least one head (Hkv > 0), got k shape {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a positive multiple of KV heads {k.shape[2]}")
    if rope is not None and not isinstance(rope, RoPEConfig):
        raise TypeError(f"rope must be a RoPEConfig or None, got {type(rope).__name__}")
    if rope is not None and rope.dim != q.shape[3]:
        raise ValueError(f"rope.dim {rope.dim} must equal the head dim {q.shape[3]}")


def _rotary_positions(positions, span: Span, length: int, batch: int, mask: BlockMask, rope, device, name):
    """Validate one side's positions (default: index within the document) and resolve them.

    The range check runs on the host for CPU tensors and as a device-side assert elsewhere, so a ring
    hop on a GPU never waits for the host; dynamic NTK needs the maximum on the host by definition,
    unless the config pins the sequence's length (``RoPEConfig.at_seq_len``, as the ring does).
    """
    if positions is None and name == "q_positions":
        index = span.indices(length, device)
        positions = default_query_positions(index, mask.cu_seqlens, mask.k_cu_seqlens)
    elif positions is None:
        k_cu = mask.cu_seqlens if mask.k_cu_seqlens is None else mask.k_cu_seqlens
        positions = default_positions(span.indices(length, device), k_cu)
    dynamic = rope.rope_type == "dynamic"
    seq_len = rope.dynamic_seq_len if dynamic else None
    if positions.numel() and (positions.device.type == "cpu" or (dynamic and seq_len is None)):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi > MAX_POSITION:
            raise ValueError(f"{name} must lie in [0, 2^31 - 1], got [{lo}, {hi}]")
        if dynamic and seq_len is None:
            seq_len = hi + 1  # transformers: max(position_ids) + 1
    elif positions.numel() and positions.device.type != "meta":
        in_range = ((positions >= 0) & (positions <= MAX_POSITION)).all()
        torch._assert_async(in_range, f"{name} must lie in [0, 2^31 - 1]")
    rows = positions.shape[0] if positions.dim() == 2 else 1
    resolved = positions.to(device=device, dtype=torch.int32).reshape(rows, length).contiguous()
    return RotaryPositions(resolved, seq_len)


def check_block(
    q,
    k,
    v,
    mask=None,
    *,
    softmax_scale=None,
    rope=None,
    q_positions=None,
    k_positions=None,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_seed=0,
    dropout_offset=0,
) -> tuple[BlockMask, float]:
    """The checks of ``block_args`` that read no tensor data, so they also run on meta and fake
    tensors (the custom ops' fake implementations call them): types, dtypes, shapes, devices, the
    scale and the score features. Returns the mask (default: no mask) and the scale (default:
    1 / sqrt(D))."""
    check_inputs(q, k, v, rope)
    mask = BlockMask() if mask is None else mask
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a BlockMask, got {type(mask).__name__}")
    if not isinstance(mask.causal, bool):
        raise TypeError(f"causal must be a bool, got {mask.causal!r}")
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    for name, span, length in (("q", mask.q_span, Sq), ("k", mask.k_span, Sk)):
        if span.start + span.stride * max(length, 1) > MAX_POSITION:
            raise ValueError(f"global token indices of {name} must stay below 2^31 (mask.{name}_span)")
    for name, cu in (("cu_seqlens", mask.cu_seqlens), ("cu_seqlens_k", mask.k_cu_seqlens)):
        if cu is None:
            continue
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32/int64 tensor, got {_describe(cu)}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(
                f"{name} must be 1-D document boundaries (n_docs + 1,), got shape {tuple(cu.shape)}"
            )
    if mask.k_cu_seqlens is not None and (
        mask.cu_seqlens is None or mask.k_cu_seqlens.numel() != mask.cu_seqlens.numel()
    ):
        raise ValueError("cu_seqlens_k needs cu_seqlens (the queries' boundaries) with as many entries")
    for name, positions, length in (("q_positions", q_positions, Sq), ("k_positions", k_positions, Sk)):
        if positions is None:
            continue
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32/int64 tensor, got {_describe(positions)}")
        if rope is not None and positions.shape not in ((length,), (B, length)):
            raise ValueError(f"{name} must be ({length},) or ({B}, {length}), got {tuple(positions.shape)}")
    check_score_features(q, window_size, softcap, alibi_slopes)
    check_dropout_args(dropout_p, dropout_seed, dropout_offset)
    check_devices(
        q,
        cu_seqlens=mask.cu_seqlens,
        cu_seqlens_k=mask.k_cu_seqlens,
        q_positions=q_positions,
        k_positions=k_positions,
        alibi_slopes=alibi_slopes,
    )
    scale = check_softmax_scale(softmax_scale)
    return mask, 1.0 / math.sqrt(q.shape[3]) if scale is None else scale


def check_dropout_args(dropout_p=0.0, dropout_seed=0, dropout_offset=0) -> None:
    """Dropout's probability in [0, 1) and its generator's seed and offset, ints in [0, 2^63)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a probability in [0, 1), got {dropout_p!r}")
    for name, value in (("dropout_seed", dropout_seed), ("dropout_offset", dropout_offset)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
            raise ValueError(f"{name} must be an int in [0, 2^63), got {value!r}")


def check_score_features(q, window_size=(-1, -1), softcap=0.0, alibi_slopes=None) -> None:
    """flash-attn's score options, checked by the names users pass them as: ``window_size`` (left,
    right) ints >= -1, ``softcap`` a finite real >= 0, ``alibi_slopes`` a floating tensor (Hq,) or
    (B, Hq)."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size sides must be >= 0, or -1 for unbounded, got {tuple(window_size)}")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float, got {softcap!r}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0: off), got {softcap!r}")
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.dtype.is_floating_point:
        raise TypeError(
            f"alibi_slopes must be a floating-point tensor or None, got {_describe(alibi_slopes)}"
        )
    B, _, Hq, _ = q.shape
    if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must be ({Hq},) or ({B}, {Hq}), got {tuple(alibi_slopes.shape)}")


def _describe(x) -> str:
    """A value for an error message: a tensor's dtype, else the type name."""
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_boundaries(cu: torch.Tensor | None) -> None:
    """Document boundaries must be >= 0 and non-decreasing: checked on the host for CPU tensors, by
    a device-side assert elsewhere (no host sync per block)."""
    if cu is None or cu.numel() == 0 or cu.device.type == "meta":
        return
    ok = (cu[0] >= 0) & (cu[1:] >= cu[:-1]).all()
    if cu.device.type != "cpu":
        torch._assert_async(ok, "cu_seqlens must be >= 0 and non-decreasing")
    elif not bool(ok):
        raise ValueError(f"cu_seqlens must be >= 0 and non-decreasing, got {cu.tolist()}")


def block_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask | None = None,
    *,
    softmax_scale: float | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    deterministic: bool = False,
) -> BlockArgs:
    """Validate a block's inputs and build its ``BlockArgs`` (what ``block_forward`` does first)."""
    mask, scale = check_block(
        q,
        k,
        v,
        mask,
        softmax_scale=softmax_scale,
        rope=rope,
        q_positions=q_positions,
        k_positions=k_positions,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        dropout_offset=dropout_offset,
    )
    _check_boundaries(mask.cu_seqlens)
    _check_boundaries(mask.k_cu_seqlens)
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    features = dict(
        window=tuple(int(w) for w in window_size),
        softcap=float(softcap),
        alibi_slopes=None
        if alibi_slopes is None
        else alibi_slopes.to(torch.float32).expand(B, q.shape[2]).contiguous(),
        dropout_p=float(dropout_p),
        dropout_seed=int(dropout_seed),
        dropout_offset=int(dropout_offset),
        deterministic=bool(deterministic),
    )
    if rope is None:
        return BlockArgs(mask, scale, **features)
    q_rope = _rotary_positions(q_positions, mask.q_span, Sq, B, mask, rope, q.device, "q_positions")
    k_rope = _rotary_positions(k_positions, mask.k_span, Sk, B, mask, rope, q.device, "k_positions")
    if rope.rope_type == "dynamic" and rope.dynamic_seq_len is None:
        # Dynamic NTK is a property of the whole sequence: one length (max position + 1 over q and
        # k) for both sides, pinned so every backend, the spec included, uses the same frequencies.
        seq_len = max(q_rope.seq_len or 0, k_rope.seq_len or 0)
        if seq_len:
            rope = rope.at_seq_len(seq_len)
            q_rope, k_rope = (
                RotaryPositions(q_rope.positions, seq_len),
                RotaryPositions(k_rope.positions, seq_len),
            )
    return BlockArgs(mask, scale, rope, q_rope, k_rope, **features)


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask | None = None,
    *,
    softmax_scale: float | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    out_dtype: torch.dtype | None = None,
    deterministic: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention with fused RoPE; returns out (B, Sq, Hq, D) and lse (B, Hq, Sq) fp32.

    ``out_dtype`` defaults to q's dtype; ``torch.float32`` keeps ring partials unrounded. Positions
    ((Sq,)/(B, Sq) and (Sk,)/(B, Sk) ints) default to the global index (index within the document
    when ``mask.cu_seqlens`` is given). ``window_size``, ``softcap`` and ``alibi_slopes`` ((Hq,) or
    (B, Hq)) change the scores as flash-attn's arguments of those names do, and ``dropout_p`` drops
    probabilities by the mask ``ringattn.dropout`` draws from (``dropout_seed``, ``dropout_offset``)
    (``ringattn.reference`` is their definition). ``deterministic`` makes results repeat bit for bit (``cuda``'s
    backward then sums dQ in its own pass instead of with atomics). Inputs are never modified.
    """
    args = block_args(
        q,
        k,
        v,
        mask,
        softmax_scale=softmax_scale,
        rope=rope,
        q_positions=q_positions,
        k_positions=k_positions,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        dropout_offset=dropout_offset,
        deterministic=deterministic,
    )
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if out_dtype not in (q.dtype, torch.float32, torch.float64):
        raise TypeError(f"out_dtype must be q's dtype, float32 or float64, got {out_dtype}")
    return select_backend(backend, q, k, v, args).forward(q, k, v, args, out_dtype)


def check_grad_inputs(q, dout, out, lse, delta) -> None:
    """The backward's own tensors (beyond ``check_block``'s): dout and out (may be None when delta is
    given) of q's shape, lse and delta (may be None) (B, Hq, Sq), all tensors on q's device."""
    B, Sq, Hq, _ = q.shape
    for name, t, shape in (
        ("dout", dout, q.shape),
        ("out", out, q.shape),
        ("lse", lse, (B, Hq, Sq)),
        ("delta", delta, (B, Hq, Sq)),
    ):
        if t is None and name in ("dout", "lse"):
            raise TypeError(f"{name} must be a torch.Tensor, got None")
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if out is None and delta is None:
        raise ValueError("block_backward needs out or delta")
    check_devices(q, dout=dout, out=out, lse=lse, delta=delta)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    mask: BlockMask | None = None,
    *,
    delta: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    rope: RoPEConfig | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    grad_dtype: torch.dtype | None = None,
    deterministic: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block, normalised by ``lse`` (B, Hq, Sq), which may be the global one.

    ``delta`` = rowsum(dout * out) (B, Hq, Sq) fp32 is computed by the backend from ``out`` when not
    given (the ring passes the global one). Returns dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D) in
    ``grad_dtype`` (default: the input dtype; ``torch.float32`` for accumulation across blocks).
    """
    args = block_args(
        q,
        k,
        v,
        mask,
        softmax_scale=softmax_scale,
        rope=rope,
        q_positions=q_positions,
        k_positions=k_positions,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        dropout_offset=dropout_offset,
        deterministic=deterministic,
    )
    check_grad_inputs(q, dout, out, lse, delta)
    grad_dtype = q.dtype if grad_dtype is None else grad_dtype
    if grad_dtype not in (q.dtype, torch.float32, torch.float64):
        raise TypeError(f"grad_dtype must be the input dtype, float32 or float64, got {grad_dtype}")
    impl = select_backend(backend, q, k, v, args)
    return impl.backward(dout, q, k, v, out, lse, delta, args, grad_dtype)
