"""The compiled CPU backend: ``ringattn._C`` block attention (C++17, multithreaded, fp32 accumulation).

Each entry is a ``torch.library`` custom op with a fake (meta) implementation, so it traces under
``torch.compile``. The kernels read any (B, S, H) strides directly (transformers' transposed views need
no copy); a tensor whose last dimension is not unit-stride is copied with ``.contiguous()`` first.
Inputs fp32 or bf16; fp64 blocks go to the reference backend, fp16 is not supported on the CPU.

Benchmarks and tools can call the ops directly:
``torch.ops.ringattn.cpu_block_forward`` and ``torch.ops.ringattn.cpu_block_backward`` (signatures below),
or more simply ``ringattn.block.block_forward(..., backend="cpu")`` / ``block_backward``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .._extension import compiled, extension_status
from ..rope import RoPEConfig, _dynamic_seq_len

__all__ = ["CpuBackend", "cpu_block_forward", "cpu_block_backward"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ROPE_MODES = {"exact": 1, "hf": 2}


@lru_cache(maxsize=64)
def _freqs(rope: RoPEConfig, seq_len: int | None) -> torch.Tensor:
    if rope.precision == "exact":
        return rope.turns_fixed(seq_len)  # uint64 bit patterns stored as int64
    return rope.inv_freq(torch.float32, seq_len)


def rope_args(rope: RoPEConfig | None, q_positions, k_positions, device):
    """(mode, rotary_dim, interleaved, attention_factor, q_freqs, k_freqs, q_pos, k_pos) for the ops."""
    if rope is None:
        return 0, 0, False, 1.0, None, None, None, None
    for name, pos in (("q_positions", q_positions), ("k_positions", k_positions)):
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) > 2**31 - 1):
            raise ValueError(f"{name} must lie in [0, 2^31 - 1], got [{int(pos.min())}, {int(pos.max())}]")
    q_pos = q_positions.to(device=device, dtype=torch.int32).contiguous()
    k_pos = k_positions.to(device=device, dtype=torch.int32).contiguous()
    # dynamic NTK frequencies depend on each call's largest position, as in the reference rotation.
    q_freqs = _freqs(rope, _dynamic_seq_len(rope, q_positions, None)).to(device)
    k_freqs = _freqs(rope, _dynamic_seq_len(rope, k_positions, None)).to(device)
    return (
        _ROPE_MODES[rope.precision],
        rope.rotary_dim,
        rope.interleaved,
        float(rope.attention_factor),
        q_freqs,
        k_freqs,
        q_pos,
        k_pos,
    )


def _view(module, t: torch.Tensor):
    view = module.View()
    view.ptr, view.sb, view.ss, view.sh = t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)
    return view


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def fill_params(
    module,
    q,
    k,
    v,
    *,
    causal,
    q_start,
    q_stride,
    k_start,
    k_stride,
    cu_seqlens,
    softmax_scale,
    rope_mode,
    rotary_dim,
    interleaved,
    attention_factor,
    q_freqs,
    k_freqs,
    q_pos,
    k_pos,
):
    """An ``_C.AttnParams`` for q, k, v (unit stride over D) and the mask/RoPE arguments.

    The caller keeps every tensor whose address goes in alive until the kernel returns.
    """
    p = module.AttnParams()
    p.batch, p.seqlen_q, p.heads_q, p.head_dim = q.shape
    p.seqlen_k, p.heads_kv = k.shape[1], k.shape[2]
    p.dtype = _DTYPE_CODES[q.dtype]
    p.q, p.k, p.v = _view(module, q), _view(module, k), _view(module, v)
    p.softmax_scale = softmax_scale
    p.causal = causal
    p.q_start, p.q_stride, p.k_start, p.k_stride = q_start, q_stride, k_start, k_stride
    if cu_seqlens is not None:
        p.cu_seqlens, p.n_cu = cu_seqlens.data_ptr(), cu_seqlens.numel()
    p.rope_mode = rope_mode
    if rope_mode:
        p.rotary_dim, p.interleaved, p.attention_factor = rotary_dim, interleaved, attention_factor
        p.rope_freqs, p.k_rope_freqs = q_freqs.data_ptr(), k_freqs.data_ptr()
        p.q_positions, p.k_positions = q_pos.data_ptr(), k_pos.data_ptr()
        p.q_positions_sb = q_pos.shape[-1] if q_pos.dim() == 2 else 0
        p.k_positions_sb = k_pos.shape[-1] if k_pos.dim() == 2 else 0
    p.num_threads = torch.get_num_threads()
    return p


def _out_dtype(q: torch.Tensor, fp32: bool) -> torch.dtype:
    return torch.float32 if fp32 else q.dtype


@torch.library.custom_op("ringattn::cpu_block_forward", mutates_args=())
def cpu_block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    q_start: int,
    q_stride: int,
    k_start: int,
    k_stride: int,
    cu_seqlens: torch.Tensor | None,
    softmax_scale: float,
    rope_mode: int,
    rotary_dim: int,
    interleaved: bool,
    attention_factor: float,
    q_freqs: torch.Tensor | None,
    k_freqs: torch.Tensor | None,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    out_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Sq, Hq, D) in q's dtype or fp32, lse (B, Hq, Sq) fp32 natural log."""
    module = compiled()
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Sq, Hq, D = q.shape
    out = torch.empty(B, Sq, Hq, D, dtype=_out_dtype(q, out_fp32))
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32)
    p = fill_params(
        module, q, k, v, causal=causal, q_start=q_start, q_stride=q_stride, k_start=k_start,
        k_stride=k_stride, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale, rope_mode=rope_mode,
        rotary_dim=rotary_dim, interleaved=interleaved, attention_factor=attention_factor,
        q_freqs=q_freqs, k_freqs=k_freqs, q_pos=q_pos, k_pos=k_pos,
    )  # fmt: skip
    p.out, p.out_dtype, p.lse = _view(module, out), _DTYPE_CODES[out.dtype], lse.data_ptr()
    module.attn_forward_cpu(p)
    return out, lse


@cpu_block_forward.register_fake
def _(q, k, v, causal, q_start, q_stride, k_start, k_stride, cu_seqlens, softmax_scale, rope_mode,
      rotary_dim, interleaved, attention_factor, q_freqs, k_freqs, q_pos, k_pos, out_fp32):  # fmt: skip
    B, Sq, Hq, D = q.shape
    out = q.new_empty(B, Sq, Hq, D, dtype=_out_dtype(q, out_fp32))
    return out, q.new_empty(B, Hq, Sq, dtype=torch.float32)


@torch.library.custom_op("ringattn::cpu_block_backward", mutates_args=())
def cpu_block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    causal: bool,
    q_start: int,
    q_stride: int,
    k_start: int,
    k_stride: int,
    cu_seqlens: torch.Tensor | None,
    softmax_scale: float,
    rope_mode: int,
    rotary_dim: int,
    interleaved: bool,
    attention_factor: float,
    q_freqs: torch.Tensor | None,
    k_freqs: torch.Tensor | None,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    grad_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D) in q's dtype or fp32, from a given lse and delta."""
    module = compiled()
    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    dtype = _out_dtype(q, grad_fp32)
    dq = torch.empty(q.shape, dtype=dtype)
    dk, dv = torch.empty(k.shape, dtype=dtype), torch.empty(v.shape, dtype=dtype)
    p = fill_params(
        module, q, k, v, causal=causal, q_start=q_start, q_stride=q_stride, k_start=k_start,
        k_stride=k_stride, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale, rope_mode=rope_mode,
        rotary_dim=rotary_dim, interleaved=interleaved, attention_factor=attention_factor,
        q_freqs=q_freqs, k_freqs=k_freqs, q_pos=q_pos, k_pos=k_pos,
    )  # fmt: skip
    p.dout, p.lse, p.delta = _view(module, dout), lse.data_ptr(), delta.data_ptr()
    p.dq, p.dk, p.dv = _view(module, dq), _view(module, dk), _view(module, dv)
    p.grad_dtype = _DTYPE_CODES[dtype]
    module.attn_backward_cpu(p)
    return dq, dk, dv


@cpu_block_backward.register_fake
def _(dout, q, k, v, lse, delta, causal, q_start, q_stride, k_start, k_stride, cu_seqlens, softmax_scale,
      rope_mode, rotary_dim, interleaved, attention_factor, q_freqs, k_freqs, q_pos, k_pos, grad_fp32):  # fmt: skip
    dtype = _out_dtype(q, grad_fp32)
    return (
        q.new_empty(q.shape, dtype=dtype),
        k.new_empty(k.shape, dtype=dtype),
        v.new_empty(v.shape, dtype=dtype),
    )


def mask_args(mask, device) -> dict:
    """Keyword arguments of the ops for a BlockMask (cu_seqlens as int64 on ``device``)."""
    cu = mask.cu_seqlens
    if cu is not None:
        cu = cu.to(device=device, dtype=torch.int64).contiguous()
    return {
        "causal": mask.causal,
        "q_start": mask.q_span.start,
        "q_stride": mask.q_span.stride,
        "k_start": mask.k_span.start,
        "k_stride": mask.k_span.stride,
        "cu_seqlens": cu,
    }


def check_compiled(q, k, v, mask, device_type: str, dtypes) -> tuple[bool, str]:
    """Shared can_implement checks of the compiled backends."""
    if compiled() is None:
        return False, f"ringattn._C is not built ({extension_status()['reason']})"
    if q.device.type != device_type:
        return False, f"tensors are on {q.device.type}, this backend runs on {device_type}"
    if q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return False, f"dtype {q.dtype} is not supported (supports {names}; fp64 runs on the reference)"
    if q.shape[1] >= 2**31 or k.shape[1] >= 2**31:
        return False, "sequence lengths must be below 2^31"
    if mask.cu_seqlens is not None and mask.cu_seqlens.numel() < 1:
        return False, "cu_seqlens must have at least one entry"
    return True, ""


class CompiledBackend:
    """Drives a pair of compiled block ops (forward, backward); subclasses name the device and dtypes."""

    name: str
    device_type: str
    dtypes: tuple[torch.dtype, ...]
    forward_op = None  # the torch.library ops, set by each subclass
    backward_op = None

    def can_implement(self, q, k, v, mask, rope):
        return check_compiled(q, k, v, mask, self.device_type, self.dtypes)

    def forward(self, q, k, v, mask, *, softmax_scale, rope, q_positions, k_positions, out_dtype):
        out, lse = type(self).forward_op(
            q,
            k,
            v,
            **mask_args(mask, q.device),
            softmax_scale=float(softmax_scale),
            **rope_kwargs(rope, q_positions, k_positions, q.device),
            out_fp32=out_dtype != q.dtype,
        )
        return out.to(out_dtype), lse

    def backward(
        self,
        dout,
        q,
        k,
        v,
        out,
        lse,
        delta,
        mask,
        *,
        softmax_scale,
        rope,
        q_positions,
        k_positions,
        grad_dtype,
    ):
        dq, dk, dv = type(self).backward_op(
            dout.to(q.dtype),
            q,
            k,
            v,
            lse,
            delta,
            **mask_args(mask, q.device),
            softmax_scale=float(softmax_scale),
            **rope_kwargs(rope, q_positions, k_positions, q.device),
            grad_fp32=grad_dtype != q.dtype,
        )
        return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)


class CpuBackend(CompiledBackend):
    """Block attention on CPU tensors with the compiled kernels (fp32 and bf16)."""

    name = "cpu"
    device_type = "cpu"
    dtypes = (torch.float32, torch.bfloat16)
    forward_op = cpu_block_forward
    backward_op = cpu_block_backward


def rope_kwargs(rope, q_positions, k_positions, device) -> dict:
    """Keyword arguments of the ops for the RoPE settings and positions."""
    names = (
        "rope_mode",
        "rotary_dim",
        "interleaved",
        "attention_factor",
        "q_freqs",
        "k_freqs",
        "q_pos",
        "k_pos",
    )
    return dict(zip(names, rope_args(rope, q_positions, k_positions, device), strict=True))
