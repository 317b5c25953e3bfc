"""Test session setup: Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported (torch._dynamo imports it too), so it
is set here, at collection, before anything from ringattn or the harness is imported.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; run pytest fresh")
    os.environ["TRITON_INTERPRET"] = "1"

from harness import HAS_GPU, install_interpreter_bf16_fix  # noqa: E402

if not HAS_GPU:
    install_interpreter_bf16_fix()
