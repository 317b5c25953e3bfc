"""The fp64 reference as a backend: any device, any dtype; slow, exact, the spec for the others."""

from ..reference import attention_backward_ref, attention_ref


class ReferenceBackend:
    name = "reference"
    features = frozenset(
        {"deterministic", "window_size", "softcap", "alibi_slopes", "cu_seqlens_k", "dropout_p"}
    )

    def can_implement(self, q, k, v, args):
        return True, ""

    def forward(self, q, k, v, args, out_dtype):
        out, lse = attention_ref(q, k, v, **_spec_kwargs(q, k, args))
        return out.to(out_dtype), lse.float()

    def backward(self, dout, q, k, v, out, lse, delta, args, grad_dtype):
        dq, dk, dv = attention_backward_ref(
            dout, q, k, v, lse, out=out, delta=delta, **_spec_kwargs(q, k, args)
        )
        return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)


def _positions(side):
    """(S,) or (B, S) positions as the spec takes them, or None without RoPE."""
    if side is None:
        return None
    return side.positions if side.positions.shape[0] > 1 else side.positions[0]


def _spec_kwargs(q, k, args):
    mask = args.mask
    return {
        "causal": mask.causal,
        "softmax_scale": args.scale,
        "q_index": mask.q_span.indices(q.shape[1], q.device),
        "k_index": mask.k_span.indices(k.shape[1], q.device),
        "cu_seqlens": mask.cu_seqlens,
        "rope": args.rope,
        "q_positions": _positions(args.q_rope),
        "k_positions": _positions(args.k_rope),
        "k_cu_seqlens": mask.k_cu_seqlens,
        "window": args.window,
        "softcap": args.softcap,
        "alibi_slopes": args.alibi_slopes,
        "dropout_p": args.dropout_p,
        "dropout_seed": args.dropout_seed,
        "dropout_offset": args.dropout_offset,
    }
