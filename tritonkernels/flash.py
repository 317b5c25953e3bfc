"""Thin launchers for the fused-RoPE flash-attention kernels (no autograd, no torch.distributed).

Nothing here allocates an S x S buffer or a rotated copy of Q/K: the only allocations are the
outputs, lse/delta (B, H, S), int32 positions and doc ids (S,), per-tile key/query ranges and the
RoPE frequency tables (rotary_dim / 2 entries).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import triton

from . import flash_kernels as fk
from .autotune import TUNER, TuneKey, Tuner, size_bucket
from .configs import KernelConfig, aux_rows, block_d, get_configs, rope_pads
from .rope_tables import RopeTables

__all__ = ["flash_attn_fwd", "flash_attn_bwd", "flash_attn_bwd_delta"]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_INDEX = 2**31 - 1


def _span(span, name: str) -> tuple[int, int]:
    start, stride = (span.start, span.stride) if hasattr(span, "start") else tuple(span)
    if start < 0 or stride < 1:
        raise ValueError(f"{name} needs start >= 0 and stride >= 1, got ({start}, {stride})")
    return int(start), int(stride)


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


def _doc_tile_ranges(row_doc, col_cu, col_start, col_stride, col_len, block, extra=None):
    """Per tile of ``block`` rows: [lo, hi) of the other side's rows that share a document with it.

    ``col_cu`` holds the column side's document boundaries (the keys' own for query rows). Each row's
    visible columns (same document, and within ``extra``: optional per-row inclusive (lo, hi) column
    indices, int64) are one contiguous run because column indices grow with the row number; a tile's
    range is the union's hull. Rows outside documents see nothing.
    """
    cu = col_cu.to(device=row_doc.device, dtype=torch.int64)
    doc = row_doc.to(torch.int64)
    inside = doc >= 0
    d = doc.clamp(min=0)
    first, last = cu[d], cu[d + 1] - 1
    if extra is not None:
        first, last = torch.maximum(first, extra[0]), torch.minimum(last, extra[1])
    lo = _ceil_div(first - col_start, col_stride).clamp(0, col_len)
    hi = (torch.div(last - col_start, col_stride, rounding_mode="floor") + 1).clamp(0, col_len)
    empty = ~inside | (hi <= lo)
    lo = torch.where(empty, torch.full_like(lo, col_len), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    n_tiles = -(-row_doc.numel() // block)
    pad = n_tiles * block - row_doc.numel()
    lo = torch.nn.functional.pad(lo, (0, pad), value=col_len).view(n_tiles, block).amin(1)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(n_tiles, block).amax(1)
    return torch.stack((lo, hi), 1).to(torch.int32).contiguous()


def _programs(rows: int, block: int, batch_heads: int) -> int:
    """Programs of a 1-D launch grid: ``block``-row tiles of every (batch, head); at most 2^31 - 1."""
    n = triton.cdiv(rows, block) * batch_heads
    if n > _MAX_INDEX:
        raise ValueError(f"{n} programs (row tiles x batch x heads) exceed the 2^31 - 1 grid limit")
    return n


def _device_guard(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device, which may be another one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _check_qkv(q, k, v):
    """Invariants the kernels rely on (user input is validated with full messages by the caller)."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise ValueError("q, k, v must be (B, S, H, D) tensors")
    if q.dtype not in _KERNEL_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a bf16, fp16 or fp32 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device) or k.shape != v.shape:
        raise ValueError("k and v must have one shape, and q, k, v one device")
    B, _, Hq, D = q.shape
    if (k.shape[0], k.shape[3]) != (B, D) or k.shape[2] == 0 or Hq % k.shape[2] or D > 256:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)}: need equal B and D <= 256, query heads a multiple of KV heads"
        )


def _check_out(t, name, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(
            f"{name} must be {tuple(shape)} {dtype} on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
        )


def _check_seq_major(t, name):
    # A dim of size 1 has no meaningful stride (torch keeps any value there, e.g. after a transpose).
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have unit stride along S (B, H, S), got strides {t.stride()}")


def _document_ids(index: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """int32 document of each global index (-1 outside every document)."""
    doc = torch.searchsorted(cu, index.contiguous(), right=True) - 1
    return torch.where((index < cu[0]) | (index >= cu[-1]), -1, doc).to(torch.int32).contiguous()


def _window(window) -> tuple[int, int]:
    """(left, right) ints, -1 for an unbounded side, clamped to 2^31 - 1 so the kernels take int32
    (they bound in int64: a side that long already reaches every key of a non-negative aligned index)."""
    left, right = (int(w) for w in window)
    if min(left, right) < -1:
        raise ValueError(f"window sides must be >= 0, or -1 for unbounded, got {tuple(window)}")
    return min(left, _MAX_INDEX), min(right, _MAX_INDEX)


def _dropout(p, seed, offset) -> tuple[int, int, int, int, float]:
    """The kernels' dropout scalars (seed_lo, seed_hi, drop_offset, drop_threshold, drop_scale).

    ``p`` in [0, 1) (0: off), ``seed`` and ``offset`` ints in [0, 2^63). The Philox key is (seed mod
    2^32, seed >> 32) and the counter's last word offset mod 2^32 (``ringattn.dropout``), each passed
    as the int32 with that bit pattern; an element is kept when its 24-bit draw u24 satisfies
    u24 * 2^-24 >= p, i.e. u24 >= ceil(p * 2^24) (p * 2^24 is exact in a double).
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"dropout_p must be a probability in [0, 1), got {p!r}")
    for name, value in (("dropout_seed", seed), ("dropout_offset", offset)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
            raise ValueError(f"{name} must be an int in [0, 2^63), got {value!r}")

    def word(x: int) -> int:
        x &= 0xFFFFFFFF
        return x - 2**32 if x >= 2**31 else x

    p, seed = float(p), int(seed)
    return word(seed), word(seed >> 32), word(int(offset)), math.ceil(p * 2**24), 1.0 / (1.0 - p)


def _with_rows(tables: RopeTables, device) -> RopeTables:
    """``tables`` on ``device``; positions of a side without rows become a dummy the kernels never read."""
    pos = tables.positions
    pos = pos.to(device) if pos.shape[-1] else torch.zeros(1, 1, dtype=torch.int32, device=device)
    return RopeTables(
        pos,
        tables.tab_a.to(device),
        tables.tab_b.to(device),
        tables.exact,
        tables.rot_dim,
        tables.interleaved,
        tables.attn_factor,
    )


class _LaunchArgs:
    """What the forward and both backward kernels share: sizes, spans, documents, RoPE, tile choice."""

    def __init__(
        self, q, k, softmax_scale, causal, q_span, k_span, cu_seqlens, q_rope, k_rope,
        window=(-1, -1), softcap=0.0, alibi_slopes=None, k_cu_seqlens=None,
        dropout_p=0.0, dropout_seed=0, dropout_offset=0,
    ):  # fmt: skip
        B, Sq, Hq, D = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        self.B, self.Sq, self.Sk, self.Hq, self.Hkv, self.D = B, Sq, Sk, Hq, Hkv, D
        self.scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
        self.causal = bool(causal)
        self.q_start, self.q_stride = _span(q_span, "q_span")
        self.k_start, self.k_stride = _span(k_span, "k_span")
        if self.q_start + self.q_stride * max(Sq, 1) > _MAX_INDEX or (
            self.k_start + self.k_stride * max(Sk, 1) > _MAX_INDEX
        ):
            raise ValueError("global token indices must stay below 2^31")
        dev = q.device
        self.cu = cu_seqlens
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
                raise ValueError("cu_seqlens must be a 1-D int tensor of document boundaries (n_docs + 1,)")
            if cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"cu_seqlens must be int32/int64, got {cu_seqlens.dtype}")
            self.cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            self.q_index = torch.arange(Sq, device=dev) * self.q_stride + self.q_start
            self.k_index = torch.arange(Sk, device=dev) * self.k_stride + self.k_start
            self.q_doc = _document_ids(self.q_index, self.cu)
        else:
            self.q_doc = self.k_doc = torch.zeros(1, dtype=torch.int32, device=dev)
        self.k_docs = k_cu_seqlens is not None  # keys take their own document boundaries
        self.k_cu = self.cu
        self.q_align = self.q_doc  # a dummy the kernels never read unless k_docs
        if self.k_docs:
            if cu_seqlens is None:
                raise ValueError("k_cu_seqlens needs cu_seqlens (the queries' document boundaries)")
            if not isinstance(k_cu_seqlens, torch.Tensor) or k_cu_seqlens.shape != cu_seqlens.shape:
                raise ValueError(
                    f"k_cu_seqlens must be an int tensor of cu_seqlens' shape {tuple(cu_seqlens.shape)}"
                )
            if k_cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"k_cu_seqlens must be int32/int64, got {k_cu_seqlens.dtype}")
            self.k_cu = k_cu_seqlens.to(device=dev, dtype=torch.int64)
            # Aligned query index: q + k_cu[d + 1] - cu[d + 1] (the last query of a document aligns
            # with its last key). Clamped into int32: exact while document ends are below 2^31.
            d = self.q_doc.to(torch.int64)
            shift = torch.where(d >= 0, self.k_cu[d.clamp(min=0) + 1] - self.cu[d.clamp(min=0) + 1], 0)
            align = (self.q_index + shift).clamp(-_MAX_INDEX, _MAX_INDEX)
            self.q_align = align.to(torch.int32).contiguous() if Sq else self.q_doc
        if cu_seqlens is not None:
            self.k_doc = _document_ids(self.k_index, self.k_cu)
        self.window = _window(window)
        self.softcap = float(softcap)
        if not (math.isfinite(self.softcap) and self.softcap >= 0):
            raise ValueError(f"softcap must be finite and >= 0 (0: off), got {softcap!r}")
        self.dropout = _dropout(dropout_p, dropout_seed, dropout_offset)
        self.has_dropout = float(dropout_p) > 0
        self.alibi = alibi_slopes is not None
        if self.alibi:
            if not isinstance(alibi_slopes, torch.Tensor) or tuple(alibi_slopes.shape) not in (
                (Hq,),
                (B, Hq),
            ):
                raise ValueError(f"alibi_slopes must be a ({Hq},) or ({B}, {Hq}) tensor")
            self.slopes = alibi_slopes.to(device=dev, dtype=torch.float32).expand(B, Hq).contiguous()
        else:
            self.slopes = torch.zeros(1, dtype=torch.float32, device=dev)  # never read
        if (q_rope is None) != (k_rope is None):
            raise ValueError("q_rope and k_rope must be given together")
        self.rope = q_rope is not None
        if self.rope:
            for name, tables, length in (("q_rope", q_rope, Sq), ("k_rope", k_rope, Sk)):
                if not isinstance(tables, RopeTables):
                    raise TypeError(f"{name} must be a RopeTables, got {type(tables).__name__}")
                if tables.positions.shape[-1] != length or tables.positions.shape[0] not in (1, B):
                    raise ValueError(
                        f"{name}.positions must be (1, {length}) or ({B}, {length}), got {tuple(tables.positions.shape)}"
                    )
            if (q_rope.exact, q_rope.rot_dim, q_rope.interleaved) != (
                k_rope.exact,
                k_rope.rot_dim,
                k_rope.interleaved,
            ):
                raise ValueError("q_rope and k_rope must share mode, rot_dim and interleaving")
            if q_rope.rot_dim > D:
                raise ValueError(f"rot_dim {q_rope.rot_dim} must not exceed the head dim {D}")
            # a side without rows gets a dummy the kernels never read
            self.qr, self.kr = (_with_rows(r, dev) for r in (q_rope, k_rope))
        else:
            dummy_i = torch.zeros(1, 1, dtype=torch.int32, device=dev)
            dummy_t = torch.zeros(1, dtype=torch.int32, device=dev)
            self.qr = self.kr = RopeTables(dummy_i, dummy_t, dummy_t, True, 2, False, 1.0)
        self.dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
        self.device = dev
        self.capability = _capability(dev)

    def tile_ranges(self, block: int, rows_are_queries: bool):
        if self.cu is None:
            return self.q_doc  # unused dummy
        if rows_are_queries:
            return _doc_tile_ranges(self.q_doc, self.k_cu, self.k_start, self.k_stride, self.Sk, block)
        return _doc_tile_ranges(
            self.k_doc, self.cu, self.q_start, self.q_stride, self.Sq, block, self._query_bounds_per_key()
        )

    def _query_bounds_per_key(self):
        """With key-side documents: per key row, the inclusive query indices whose causal/window
        bounds hold it (aligned indices jump between documents, so the dk/dv kernel cannot bound
        its query loop itself). None otherwise (the kernel bounds it)."""
        if not self.k_docs or not (self.causal or self.window != (-1, -1)):
            return None
        d = self.k_doc.to(torch.int64).clamp(min=0)
        # key k sees a query q of its document d when its aligned index a = q + shift lies in
        # [k - right, k + left] (and a >= k if causal)
        base = self.k_index - (self.k_cu[d + 1] - self.cu[d + 1])
        left, right = self.window
        far = 2**62
        lo = base - right if right >= 0 else torch.full_like(base, -far)
        if self.causal:
            lo = torch.maximum(lo, base)
        hi = base + left if left >= 0 else torch.full_like(base, far)
        return lo, hi

    def rope_pointer_args(self):
        return (
            self.qr.positions,
            self.kr.positions,
            self.qr.tab_a,
            self.qr.tab_b,
            self.kr.tab_a,
            self.kr.tab_b,
        )

    def constexprs(self, cfg: KernelConfig):
        r = self.rope
        half_pad, pass_pad = rope_pads(self.D, self.qr.rot_dim if r else None)
        return dict(
            GROUP=self.Hq // self.Hkv,
            HEAD_DIM=self.D,
            BLOCK_D=block_d(self.D),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            CAUSAL=self.causal,
            HAS_DOCS=self.cu is not None,
            ROPE=r,
            EXACT=self.qr.exact if r else True,
            ROT_DIM=self.qr.rot_dim if r else 2,
            INTERLEAVED=self.qr.interleaved if r else False,
            HALF_PAD=half_pad,
            PASS_PAD=pass_pad,
            DOT_PREC=self.dot_prec,
            HAS_WINDOW=self.window != (-1, -1),
            SOFTCAP=self.softcap > 0,
            HAS_ALIBI=self.alibi,
            K_DOCS=self.k_docs,
            DROPOUT=self.has_dropout,
        )

    def feature_args(self):
        """(QAlign, Alibi) pointers of every attention kernel."""
        return self.q_align, self.slopes

    def feature_scalars(self):
        """(win_left, win_right, softcap_in, softcap_out, seed_lo, seed_hi, drop_offset,
        drop_threshold, drop_scale): softcap acts on the natural-scale score, cap * tanh(scale * q.k
        / cap), in log2 units after it; the dropout scalars as ``_dropout`` makes them."""
        cap = self.softcap
        softcap_in, softcap_out = (self.scale / cap, cap * fk.LOG2E) if cap > 0 else (0.0, 0.0)
        return (*self.window, softcap_in, softcap_out, *self.dropout)

    def features(self) -> str:
        """The score features in use, for the autotuning key."""
        used = (
            ("window", self.window != (-1, -1)),
            ("softcap", self.softcap > 0),
            ("alibi", self.alibi),
            ("kdocs", self.k_docs),
            ("dropout", self.has_dropout),
        )
        return ",".join(name for name, on in used if on)

    def launch_options(self, cfg: KernelConfig):
        return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def config(self, kernel: str, given: KernelConfig | None, tuner: Tuner | None, dtype, launch):
        """``given``, else the shipped config for ``kernel``, autotuned among candidates on a GPU."""
        if given is not None:
            return given
        candidates = get_configs(kernel, self.D, self.capability, dtype.itemsize, self.has_dropout)
        rope = f"{'exact' if self.qr.exact else 'hf'}/{self.qr.rot_dim}" if self.rope else "none"
        key = TuneKey(
            kernel, self.device, dtype, self.D, self.Hq // self.Hkv, self.causal, self.cu is not None, rope,
            size_bucket(self.Sq), size_bucket(self.Sk), size_bucket(self.B * self.Hq), self.features(),
        )  # fmt: skip
        return (tuner or TUNER).choose(key, candidates, launch, self.device)


def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    q_span=(0, 1),
    k_span=(0, 1),
    cu_seqlens: torch.Tensor | None = None,
    q_rope: RopeTables | None = None,
    k_rope: RopeTables | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_cu_seqlens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    tuner: Tuner | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward with RoPE fused into the tile loads; returns out (B, Sq, Hq, D), lse (B, Hq, Sq).

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D), any strides. ``q_span``/``k_span``: (start, stride) of
    the rows' global token indices (any object with ``start`` and ``stride``). ``cu_seqlens``: int
    (n_docs + 1,) document boundaries over global indices. ``q_rope``/``k_rope`` (both or neither):
    ``rope_tables.RopeTables`` of each side, positions already range-checked by the caller.
    ``window`` (left, right): keys within [a - left, a + right] of the query's aligned index a, -1 for
    an unbounded side; ``softcap`` > 0: scores -> softcap * tanh(scores / softcap); ``alibi_slopes``
    ((Hq,) or (B, Hq)): - slope * |a - k| added after the softcap; ``k_cu_seqlens`` (needs
    ``cu_seqlens``, same length): the keys' own document boundaries, a = q index + k_cu[d + 1] -
    cu[d + 1] for a query of document d (bottom-right alignment per document; else a = q index).
    ``dropout_p`` > 0: attention dropout with ``ringattn.dropout``'s counter-based mask of
    (``dropout_seed``, ``dropout_offset``), ints in [0, 2^63), over global token indices, so any
    tile shape, span or the backward draws the same mask; lse is the one before dropout.
    ``out``/``lse`` may be given to write into. ``config`` overrides the shipped tile configs; without it a GPU launch autotunes
    among them with ``tuner`` (default: the process-wide ``autotune.TUNER``).
    """
    _check_qkv(q, k, v)
    c = _LaunchArgs(
        q, k, softmax_scale, causal, q_span, k_span, cu_seqlens, q_rope, k_rope,
        window, softcap, alibi_slopes, k_cu_seqlens, dropout_p, dropout_seed, dropout_offset,
    )  # fmt: skip
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if out_dtype not in (q.dtype, torch.float32):
        raise TypeError(f"out_dtype must be q's dtype or float32, got {out_dtype}")
    if out is None:
        out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    _check_out(out, "out", q.shape, out_dtype, q.device)
    if lse is None:
        lse = torch.empty(c.B, c.Hq, c.Sq, dtype=torch.float32, device=q.device)
    _check_out(lse, "lse", (c.B, c.Hq, c.Sq), torch.float32, q.device)
    if not lse.is_contiguous():
        raise ValueError("lse must be contiguous")
    if c.Sq == 0 or c.B == 0 or c.Hq == 0:
        return out, lse

    def launch(cfg: KernelConfig):
        fk.flash_fwd_kernel[(_programs(c.Sq, cfg.block_m, c.B * c.Hq),)](
            q, k, v, out, lse,
            *c.rope_pointer_args(),
            c.q_doc, c.k_doc, c.tile_ranges(cfg.block_m, True), *c.feature_args(),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            c.qr.stride_b, c.kr.stride_b,
            c.Sq, c.Sk, c.Hq, c.q_start, c.q_stride, c.k_start, c.k_stride,
            c.scale * fk.LOG2E, c.qr.attn_factor, *c.feature_scalars(),
            **c.constexprs(cfg), **c.launch_options(cfg),
        )  # fmt: skip

    with _device_guard(q.device):
        launch(c.config("fwd", config, tuner, q.dtype, launch))
    return out, lse


def flash_attn_bwd_delta(
    out: torch.Tensor, dout: torch.Tensor, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """delta = rowsum(dout * out) in fp32, (B, H, S)."""
    if out.shape != dout.shape or out.dim() != 4:
        raise ValueError(
            f"out and dout must be the same (B, S, H, D) shape, got {tuple(out.shape)}, {tuple(dout.shape)}"
        )
    B, S, H, D = out.shape
    if delta is None:
        delta = torch.empty(B, H, S, dtype=torch.float32, device=out.device)
    _check_out(delta, "delta", (B, H, S), torch.float32, out.device)
    if not delta.is_contiguous():
        raise ValueError("delta must be contiguous")
    if delta.numel() == 0:
        return delta
    block_m = aux_rows("delta", D)
    with _device_guard(out.device):
        fk.flash_bwd_delta_kernel[(_programs(S, block_m, B * H),)](
            out, dout, delta, *out.stride(), *dout.stride(), S, H,
            HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=block_m,
        )  # fmt: skip
    return delta


def flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    delta: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    q_span=(0, 1),
    k_span=(0, 1),
    cu_seqlens: torch.Tensor | None = None,
    q_rope: RopeTables | None = None,
    k_rope: RopeTables | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_cu_seqlens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    grad_dtype: torch.dtype | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    config_dq: KernelConfig | None = None,
    config_dkdv: KernelConfig | None = None,
    tuner: Tuner | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq (B, Sq, Hq, D), dk, dv (B, Sk, Hkv, D) with the RoPE backward fused.

    ``lse`` and ``delta`` (B, Hq, Sq) fp32 may be global ones (a ring's); ``delta`` is computed from
    ``out`` when not given. Two passes, dq and dk/dv, so no atomics: results are deterministic.
    ``config_dq``/``config_dkdv``/``tuner`` as ``config``/``tuner`` of ``flash_attn_fwd``, and the score
    features (``window``, ``softcap``, ``alibi_slopes``, ``k_cu_seqlens``) and dropout (``dropout_p``,
    ``dropout_seed``, ``dropout_offset``: the forward's, the mask regenerated, never stored) as there;
    with dropout ``delta`` is rowsum(dout * out) of the dropped output, as computed from ``out``.
    """
    _check_qkv(q, k, v)
    if not isinstance(dout, torch.Tensor) or dout.shape != q.shape or dout.dtype != q.dtype:
        raise ValueError(f"dout must be a {q.dtype} tensor of q's shape {tuple(q.shape)}")
    c = _LaunchArgs(
        q, k, softmax_scale, causal, q_span, k_span, cu_seqlens, q_rope, k_rope,
        window, softcap, alibi_slopes, k_cu_seqlens, dropout_p, dropout_seed, dropout_offset,
    )  # fmt: skip
    _check_out(lse, "lse", (c.B, c.Hq, c.Sq), torch.float32, q.device)
    _check_seq_major(lse, "lse")
    if delta is None:
        if out is None:
            raise ValueError("flash_attn_bwd needs out or delta")
        delta = flash_attn_bwd_delta(out, dout)
    _check_out(delta, "delta", (c.B, c.Hq, c.Sq), torch.float32, q.device)
    _check_seq_major(delta, "delta")
    grad_dtype = q.dtype if grad_dtype is None else grad_dtype
    if grad_dtype not in (q.dtype, torch.float32):
        raise TypeError(f"grad_dtype must be the input dtype or float32, got {grad_dtype}")
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=grad_dtype, device=q.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=grad_dtype, device=q.device) if dv is None else dv
    _check_out(dq, "dq", q.shape, grad_dtype, q.device)
    _check_out(dk, "dk", k.shape, grad_dtype, q.device)
    _check_out(dv, "dv", v.shape, grad_dtype, q.device)
    if c.B == 0 or c.Hq == 0:
        return dq, dk, dv
    common_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    tail = (c.qr.stride_b, c.kr.stride_b, c.Sq, c.Sk)
    spans = (c.q_start, c.q_stride, c.k_start, c.k_stride, c.scale, c.qr.attn_factor, *c.feature_scalars())
    if c.Sq:

        def launch_dq(cfg: KernelConfig):
            fk.flash_bwd_dq_kernel[(_programs(c.Sq, cfg.block_m, c.B * c.Hq),)](
                q, k, v, dout, lse, delta, dq,
                *c.rope_pointer_args(),
                c.q_doc, c.k_doc, c.tile_ranges(cfg.block_m, True), *c.feature_args(),
                *common_strides, *dq.stride(),
                lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1),
                *tail, c.Hq, *spans,
                **c.constexprs(cfg), **c.launch_options(cfg),
            )  # fmt: skip

        with _device_guard(q.device):
            launch_dq(c.config("bwd_dq", config_dq, tuner, q.dtype, launch_dq))
    if c.Sk:

        def launch_dkdv(cfg: KernelConfig):
            fk.flash_bwd_dkdv_kernel[(_programs(c.Sk, cfg.block_n, c.B * c.Hkv),)](
                q, k, v, dout, lse, delta, dk, dv,
                *c.rope_pointer_args(),
                c.q_doc, c.k_doc, c.tile_ranges(cfg.block_n, False), *c.feature_args(),
                *common_strides, *dk.stride(), *dv.stride(),
                lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1),
                *tail, c.Hkv, *spans,
                **c.constexprs(cfg), **c.launch_options(cfg),
            )  # fmt: skip

        with _device_guard(q.device):
            launch_dkdv(c.config("bwd_dkdv", config_dkdv, tuner, q.dtype, launch_dkdv))
    return dq, dk, dv
