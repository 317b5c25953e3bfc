"""Triton kernels for ringattn and their thin launchers (no autograd, no torch.distributed).

Modules (imported on use, so ``import tritonkernels`` does not import triton):

- ``flash``: ``flash_attn_fwd`` / ``flash_attn_bwd`` / ``flash_attn_bwd_delta``: flash attention with
  RoPE fused into the Q/K tile loads (exact-phase or hf angles), GQA without expanding K/V, causal
  by global token index (start/stride spans), packed documents, fully masked tiles skipped, and a
  deterministic two-pass backward (dq; dk/dv summed over each query group) without atomics.
- ``rope``: ``rope_apply``, the standalone RoPE kernel (forward and transposed backward).
- ``configs``: tile config candidates per arch (sm_80/89/90) and head dim, the first the default;
  ``autotune``: times the candidates once per problem class on a GPU (``RINGATTN_TRITON_AUTOTUNE=0``
  turns it off); ``aot``: AOT compile + ptxas report (``python -m tritonkernels.aot`` with
  TRITON_INTERPRET unset).

Kernels use plain pointer arithmetic (no block pointers) and keep every shipped tile config within
the per-block shared-memory budget of sm_80, sm_89 (101,376 B) and sm_90, with no register spills in
an attention kernel's hot loop, at most 64 B outside it, and none in the loop-free delta and RoPE
kernels (``tests/test_triton_aot.py``).
"""
