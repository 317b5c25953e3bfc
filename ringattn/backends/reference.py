"""The fp64 reference as a backend: any device, any dtype; slow, exact, the spec for the others."""

from ..reference import attention_backward_ref, attention_ref


class ReferenceBackend:
    name = "reference"

    def can_implement(self, q, k, v, mask, rope):
        return True, ""

    def forward(self, q, k, v, mask, *, softmax_scale, rope, q_positions, k_positions, out_dtype):
        out, lse = attention_ref(
            q,
            k,
            v,
            softmax_scale=softmax_scale,
            rope=rope,
            q_positions=q_positions,
            k_positions=k_positions,
            **_index_kwargs(q, k, mask),
        )
        return out.to(out_dtype), lse.float()

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
        dq, dk, dv = attention_backward_ref(
            dout,
            q,
            k,
            v,
            lse,
            delta=delta,
            softmax_scale=softmax_scale,
            rope=rope,
            q_positions=q_positions,
            k_positions=k_positions,
            **_index_kwargs(q, k, mask),
        )
        return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)


def _index_kwargs(q, k, mask):
    return {
        "causal": mask.causal,
        "q_index": mask.q_span.indices(q.shape[1], q.device),
        "k_index": mask.k_span.indices(k.shape[1], q.device),
        "cu_seqlens": mask.cu_seqlens,
    }
