"""The driver shared by the compiled backends (``cpu`` and ``cuda``): ``ringattn._C`` block attention.

Each device gets a forward and a backward ``torch.library`` custom op from one definition
(``define_block_ops``), with fake (meta) implementations so they trace under ``torch.compile``:

    torch.ops.ringattn.{device}_block_forward(q, k, v, cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs,
        k_freqs, q_pos, k_pos, ints, floats, out_fp32) -> (out, lse)
    torch.ops.ringattn.{device}_block_backward(dout, q, k, v, lse, delta, cu_seqlens, k_cu_seqlens,
        alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints, floats, grad_fp32) -> (dq, dk, dv)

``ints`` and ``floats`` carry the scalar fields of ``_C.AttnParams`` named in ``INT_FIELDS`` and
``FLOAT_FIELDS``; ``op_inputs`` builds all of them from a block's ``BlockArgs``. ``k_cu_seqlens``
(int64, the keys' own document boundaries, only with ``cu_seqlens``) and ``alibi_slopes`` (fp32 (Hq,)
or (B, Hq) contiguous) may be None. Dropout travels as ``dropout_seed``/``dropout_offset`` (ints) and
``dropout_p`` (a float, 0: off); the backward regenerates the forward's mask from them.
``deterministic`` (an int, 0/1) asks the CUDA backward for its atomic-free dQ pass (the CPU kernels
are deterministic anyway). The kernels read any (B, S, H) strides directly (transformers'
transposed views need no copy); a tensor whose last dimension is not unit-stride is copied with
``.contiguous()`` first.
"""

from __future__ import annotations

import torch

from .._extension import compiled, extension_status
from ..rope import kernel_frequencies

__all__ = [
    "CompiledBackend",
    "check_op_inputs",
    "define_block_ops",
    "fill_params",
    "op_inputs",
    "rowsum_delta",
]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROPE_MODES = {"exact": 1, "hf": 2}
INT_FIELDS = (
    "causal",
    "q_start",
    "q_stride",
    "k_start",
    "k_stride",
    "rope_mode",
    "rotary_dim",
    "interleaved",
    "window_left",
    "window_right",
    "dropout_seed",
    "dropout_offset",
    "deterministic",
)
FLOAT_FIELDS = ("softmax_scale", "attention_factor", "softcap", "dropout_p")
# Window sides beyond any index distance mean "unbounded" already; clamped so the kernels' int64
# index arithmetic (a - left, a + right) cannot overflow.
MAX_WINDOW = 2**62


def op_inputs(args, device: torch.device) -> tuple:
    """(cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints, floats) of the
    ops for a block's ``BlockArgs``."""
    mask, rope = args.mask, args.rope
    cu, k_cu = (
        None if c is None else c.to(device=device, dtype=torch.int64).contiguous()
        for c in (mask.cu_seqlens, mask.k_cu_seqlens)
    )
    alibi = args.alibi_slopes
    if alibi is not None:
        alibi = alibi.to(device=device, dtype=torch.float32).contiguous()
    spans = [mask.q_span.start, mask.q_span.stride, mask.k_span.start, mask.k_span.stride]
    window = [min(int(w), MAX_WINDOW) for w in args.window]
    dropout = [int(args.dropout_seed), int(args.dropout_offset)] if args.dropout_p else [0, 0]
    if rope is None:
        ints = [int(mask.causal), *spans, 0, 0, 0, *window, *dropout, int(args.deterministic)]
        floats = [args.scale, 1.0, float(args.softcap), float(args.dropout_p)]
        return cu, k_cu, alibi, None, None, None, None, ints, floats
    q_freqs = kernel_frequencies(rope, args.q_rope.seq_len, str(device))
    k_freqs = kernel_frequencies(rope, args.k_rope.seq_len, str(device))
    ints = [
        int(mask.causal),
        *spans,
        ROPE_MODES[rope.precision],
        rope.rotary_dim,
        int(rope.interleaved),
        *window,
        *dropout,
        int(args.deterministic),
    ]
    floats = [args.scale, float(rope.attention_factor), float(args.softcap), float(args.dropout_p)]
    return cu, k_cu, alibi, q_freqs, k_freqs, args.q_rope.positions, args.k_rope.positions, ints, floats


def _view(module, t: torch.Tensor):
    view = module.View()
    view.ptr, view.sb, view.ss, view.sh = t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)
    return view


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def fill_params(
    module, q, k, v, cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints, floats
):
    """An ``_C.AttnParams`` for q, k, v (unit stride over D) and the ops' other inputs.

    Positions are int32 (1 or B, S) contiguous. The caller keeps every tensor whose address goes in
    alive until the kernel returns.
    """
    p = module.AttnParams()
    p.batch, p.seqlen_q, p.heads_q, p.head_dim = q.shape
    p.seqlen_k, p.heads_kv = k.shape[1], k.shape[2]
    p.dtype = DTYPE_CODES[q.dtype]
    p.q, p.k, p.v = _view(module, q), _view(module, k), _view(module, v)
    for name, value in zip(INT_FIELDS, ints, strict=True):
        setattr(p, name, type(getattr(p, name))(value))  # bool fields stay bool
    for name, value in zip(FLOAT_FIELDS, floats, strict=True):
        setattr(p, name, value)
    if cu_seqlens is not None:
        p.cu_seqlens, p.n_cu = cu_seqlens.data_ptr(), cu_seqlens.numel()
    if k_cu_seqlens is not None:
        p.k_cu_seqlens = k_cu_seqlens.data_ptr()
    if alibi_slopes is not None:
        p.alibi_slopes = alibi_slopes.data_ptr()
        p.alibi_sb = alibi_slopes.shape[-1] if alibi_slopes.dim() == 2 else 0
    if p.rope_mode:
        p.rope_freqs, p.k_rope_freqs = q_freqs.data_ptr(), k_freqs.data_ptr()
        p.q_positions, p.k_positions = q_pos.data_ptr(), k_pos.data_ptr()
        p.q_positions_sb = q_pos.shape[1] if q_pos.shape[0] > 1 else 0
        p.k_positions_sb = k_pos.shape[1] if k_pos.shape[0] > 1 else 0
    p.num_threads = torch.get_num_threads()
    return p


def check_op_inputs(
    q,
    k,
    v,
    cu_seqlens,
    k_cu_seqlens,
    alibi_slopes,
    q_freqs,
    k_freqs,
    q_pos,
    k_pos,
    ints,
    floats,
    dout=None,
    lse=None,
    delta=None,
) -> None:
    """What the block ops need of their arguments, checked without reading tensor data, so the real
    ops (whose kernels take raw addresses) and their fakes (which the dispatcher also runs on real
    tensors when one input is a meta tensor) refuse the same calls with a ValueError/TypeError
    naming the argument. ``dout``, ``lse`` and ``delta`` are the backward's."""
    from ..block import check_devices, check_inputs  # ringattn.block imports the backends

    check_inputs(q, k, v)
    if len(ints) != len(INT_FIELDS) or len(floats) != len(FLOAT_FIELDS):
        raise ValueError(
            f"ints must have {len(INT_FIELDS)} entries {INT_FIELDS} and floats {len(FLOAT_FIELDS)} "
            f"{FLOAT_FIELDS}, got {len(ints)} and {len(floats)}"
        )
    B, Sq, Hq, _ = q.shape
    Sk = k.shape[1]
    for name, cu in (("cu_seqlens", cu_seqlens), ("k_cu_seqlens", k_cu_seqlens)):
        if cu is not None and (cu.dtype != torch.int64 or cu.dim() != 1 or not cu.is_contiguous()):
            raise ValueError(
                f"{name} must be a contiguous 1-D int64 tensor, got {cu.dtype} {tuple(cu.shape)}"
            )
    if k_cu_seqlens is not None and (cu_seqlens is None or k_cu_seqlens.shape != cu_seqlens.shape):
        raise ValueError("k_cu_seqlens needs cu_seqlens with as many entries")
    if alibi_slopes is not None and (
        alibi_slopes.dtype != torch.float32
        or tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq))
        or not alibi_slopes.is_contiguous()
    ):
        raise ValueError(
            f"alibi_slopes must be contiguous fp32 ({Hq},) or ({B}, {Hq}), "
            f"got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}"
        )
    left, right = ints[INT_FIELDS.index("window_left")], ints[INT_FIELDS.index("window_right")]
    if min(left, right) < -1:
        raise ValueError(f"window sides must be >= -1 (-1: unbounded), got ({left}, {right})")
    if not floats[FLOAT_FIELDS.index("softcap")] >= 0:
        raise ValueError(f"softcap must be >= 0 (0: off), got {floats[FLOAT_FIELDS.index('softcap')]}")
    dropout_p = floats[FLOAT_FIELDS.index("dropout_p")]
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a probability in [0, 1) (0: off), got {dropout_p}")
    for name in ("dropout_seed", "dropout_offset"):
        if not 0 <= ints[INT_FIELDS.index(name)] < 2**63:
            raise ValueError(f"{name} must be in [0, 2^63), got {ints[INT_FIELDS.index(name)]}")
    if ints[INT_FIELDS.index("rope_mode")]:
        for name, t, length in (("q_pos", q_pos, Sq), ("k_pos", k_pos, Sk)):
            if t is None or t.dtype != torch.int32 or tuple(t.shape) not in ((1, length), (B, length)):
                raise ValueError(
                    f"{name} must be int32 (1, {length}) or ({B}, {length}) with RoPE, "
                    f"got {None if t is None else (t.dtype, tuple(t.shape))}"
                )
        for name, t in (("q_freqs", q_freqs), ("k_freqs", k_freqs)):
            if t is None or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D frequency table with RoPE")
    for name, t, shape in (("dout", dout, q.shape), ("lse", lse, (B, Hq, Sq)), ("delta", delta, (B, Hq, Sq))):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    check_devices(
        q,
        cu_seqlens=cu_seqlens,
        k_cu_seqlens=k_cu_seqlens,
        alibi_slopes=alibi_slopes,
        q_freqs=q_freqs,
        k_freqs=k_freqs,
        q_pos=q_pos,
        k_pos=k_pos,
        dout=dout,
        lse=lse,
        delta=delta,
    )


def define_block_ops(device_type: str, run_forward, run_backward):
    """Define ``ringattn::{device_type}_block_forward`` and ``_backward`` (signatures in the module doc).

    ``run_forward(module, params, q)`` and ``run_backward(module, params, q, k)`` launch the kernels
    on filled params (and may attach device workspaces).
    """

    @torch.library.custom_op(f"ringattn::{device_type}_block_forward", mutates_args=())
    def forward_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        k_cu_seqlens: torch.Tensor | None,
        alibi_slopes: torch.Tensor | None,
        q_freqs: torch.Tensor | None,
        k_freqs: torch.Tensor | None,
        q_pos: torch.Tensor | None,
        k_pos: torch.Tensor | None,
        ints: list[int],
        floats: list[float],
        out_fp32: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = (cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints, floats)
        check_op_inputs(q, k, v, *inputs)
        module = compiled()
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out, lse = _forward_outputs(q, out_fp32)
        p = fill_params(module, q, k, v, *inputs)
        p.out, p.out_dtype, p.lse = _view(module, out), DTYPE_CODES[out.dtype], lse.data_ptr()
        run_forward(module, p, q)
        return out, lse

    @forward_op.register_fake
    def _(
        q,
        k,
        v,
        cu_seqlens,
        k_cu_seqlens,
        alibi_slopes,
        q_freqs,
        k_freqs,
        q_pos,
        k_pos,
        ints,
        floats,
        out_fp32,
    ):
        check_op_inputs(
            q, k, v, cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints, floats
        )
        return _forward_outputs(q, out_fp32)

    @torch.library.custom_op(f"ringattn::{device_type}_block_backward", mutates_args=())
    def backward_op(
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lse: torch.Tensor,
        delta: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        k_cu_seqlens: torch.Tensor | None,
        alibi_slopes: torch.Tensor | None,
        q_freqs: torch.Tensor | None,
        k_freqs: torch.Tensor | None,
        q_pos: torch.Tensor | None,
        k_pos: torch.Tensor | None,
        ints: list[int],
        floats: list[float],
        grad_fp32: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = (cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints, floats)
        check_op_inputs(q, k, v, *inputs, dout, lse, delta)
        module = compiled()
        q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
        lse, delta = lse.float().contiguous(), delta.float().contiguous()
        dq, dk, dv = _gradients(q, k, grad_fp32)
        p = fill_params(module, q, k, v, *inputs)
        p.dout, p.lse, p.delta = _view(module, dout), lse.data_ptr(), delta.data_ptr()
        p.dq, p.dk, p.dv = _view(module, dq), _view(module, dk), _view(module, dv)
        p.grad_dtype = DTYPE_CODES[dq.dtype]
        run_backward(module, p, q, k)
        return dq, dk, dv

    @backward_op.register_fake
    def _(
        dout, q, k, v, lse, delta, cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints,
        floats, grad_fp32,
    ):  # fmt: skip
        inputs = (cu_seqlens, k_cu_seqlens, alibi_slopes, q_freqs, k_freqs, q_pos, k_pos, ints, floats)
        check_op_inputs(q, k, v, *inputs, dout, lse, delta)
        return _gradients(q, k, grad_fp32)

    return forward_op, backward_op


def _forward_outputs(q: torch.Tensor, out_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised out (B, Sq, Hq, D) in q's dtype or fp32 and lse (B, Hq, Sq) fp32."""
    B, Sq, Hq, D = q.shape
    out = torch.empty(B, Sq, Hq, D, dtype=torch.float32 if out_fp32 else q.dtype, device=q.device)
    return out, torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)


def _gradients(q: torch.Tensor, k: torch.Tensor, grad_fp32: bool):
    """Uninitialised dq (q's shape), dk and dv (k's shape) in q's dtype or fp32."""
    dtype = torch.float32 if grad_fp32 else q.dtype
    return (
        torch.empty(q.shape, dtype=dtype, device=q.device),
        torch.empty(k.shape, dtype=dtype, device=q.device),
        torch.empty(k.shape, dtype=dtype, device=q.device),
    )


def rowsum_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dout * out) (B, H, S) in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(dout.dtype, torch.float32)
    return (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()


class CompiledBackend:
    """Drives a device's pair of compiled block ops; subclasses name the device, dtypes and ops."""

    name: str
    device_type: str
    dtypes: tuple[torch.dtype, ...]
    # BlockArgs features both compiled backends implement (argument names, BlockArgs.unsupported).
    features = frozenset({"window_size", "softcap", "alibi_slopes", "cu_seqlens_k", "dropout_p"})
    forward_op = None  # the torch.library ops from define_block_ops, set by each subclass
    backward_op = None

    def can_implement(self, q, k, v, args) -> tuple[bool, str]:
        if compiled() is None:
            return False, f"ringattn._C is not built ({extension_status()['reason']})"
        if q.device.type != self.device_type:
            return False, f"tensors are on {q.device.type}, this backend runs on {self.device_type}"
        if q.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return False, f"dtype {q.dtype} is not supported (supports {names}; fp64 runs on the reference)"
        if q.shape[1] >= 2**31 or k.shape[1] >= 2**31:
            return False, "sequence lengths must be below 2^31"
        return True, ""

    def forward(self, q, k, v, args, out_dtype):
        inputs = op_inputs(args, q.device)
        out, lse = type(self).forward_op(q, k, v, *inputs, out_dtype != q.dtype)
        return out.to(out_dtype), lse

    def backward(self, dout, q, k, v, out, lse, delta, args, grad_dtype):
        delta = rowsum_delta(dout, out) if delta is None else delta
        inputs = op_inputs(args, q.device)
        dq, dk, dv = type(self).backward_op(
            dout.to(q.dtype), q, k, v, lse, delta, *inputs, grad_dtype != q.dtype
        )
        return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)
