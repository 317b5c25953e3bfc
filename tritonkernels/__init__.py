"""Triton kernels for ringattn and their thin launchers (no autograd, no torch.distributed).

Kernels use plain pointer arithmetic (no block pointers) and keep every shipped tile config within
the per-block shared-memory budget of sm_80, sm_89 (101,376 B) and sm_90.
"""
