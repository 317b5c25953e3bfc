"""Test session setup: the Triton interpreter without a GPU, and NaN poisoning everywhere.

TRITON_INTERPRET must be set before triton is first imported (torch._dynamo imports it too), so it
is set here, at collection, before anything from ringattn or the harness is imported.

NaN poisoning (harness.install_nan_poisoning) is installed here too, for the whole session: every
torch.empty/empty_like/empty_strided/new_empty made by ringattn or tritonkernels returns NaN-filled
memory, so an output element a backend never writes fails every check, not only the tests that
pass their own NaN-filled buffers.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; run pytest fresh")
    os.environ["TRITON_INTERPRET"] = "1"

from harness import HAS_GPU, install_interpreter_bf16_fix, install_nan_poisoning  # noqa: E402

install_nan_poisoning()
if not HAS_GPU:
    install_interpreter_bf16_fix()
