"""Runnable examples that double as end-to-end checks.

* ``python -m ringattn.examples.train``: a long-context training run of a small Llama over W ranks with
  ring attention (CPU/gloo or GPU/NCCL), the same steps in one process as the reference, JSON and PNG.
* ``python -m ringattn.examples.memory``: peak memory of one attention layer's forward + backward at
  growing sequence length, ringattn vs torch SDPA vs transformers' eager attention.

``ringattn.examples.peak`` holds the peak-memory probe both use (CPU RSS high-water mark, or CUDA's
max-allocated).
"""
