"""Test session setup: Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os
import sys

from harness import HAS_GPU

if not HAS_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; run pytest fresh")
    os.environ["TRITON_INTERPRET"] = "1"
    from harness import install_interpreter_bf16_fix

    install_interpreter_bf16_fix()
