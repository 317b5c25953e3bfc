"""What a first GPU run depends on, checked without a GPU: backend choice, determinism, and no host
reads on the CUDA backend's per-call path (meta tensors refuse host reads)."""

from __future__ import annotations

import types

import pytest
import torch

import ringattn
from ringattn import RoPEConfig, rope
from ringattn._extension import compiled
from ringattn.backends import BACKENDS
from ringattn.backends.compiled import INT_FIELDS, op_inputs
from ringattn.block import BlockMask, Span, block_args, select_backend


def test_auto_prefers_triton_on_cuda_until_cuda_kernels_are_measured():
    from ringattn.block import _AUTO_ORDER

    assert _AUTO_ORDER["cuda"][0] == "triton"
    assert "reference" not in _AUTO_ORDER["cuda"]  # never a silent fp64 run on a GPU


def test_deterministic_reaches_the_cuda_kernels_as_their_dq_pass():
    # The cuda backend runs deterministic blocks (attn_backward_dq_kernel instead of dQ atomics): the
    # flag travels in the ops' ints to AttnParams.deterministic, off unless asked for.
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    for deterministic in (False, True):
        args = block_args(q, q, q, deterministic=deterministic)
        assert args.unsupported(BACKENDS["cuda"].features) == ""
        assert op_inputs(args, q.device)[-2][INT_FIELDS.index("deterministic")] == deterministic
    assert select_backend("auto", q, q, q, block_args(q, q, q, deterministic=True)).name == "cpu"


def test_deterministic_flash_attn_repeats_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 33, 4, 32, generator=gen, requires_grad=True) for _ in range(3))
    runs = []
    for _ in range(2):
        out = ringattn.flash_attn_func(q, k, v, causal=True, deterministic=True, rope=RoPEConfig(32))
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        runs.append((out.detach(), *grads))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_cos_sin_auto_uses_compiled_only_where_it_runs():
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    without_cuda = types.SimpleNamespace(with_cuda=False)
    with_cuda = types.SimpleNamespace(with_cuda=True)
    assert not rope._compiled_runs_on(None, cpu)
    assert rope._compiled_runs_on(without_cuda, cpu)
    assert not rope._compiled_runs_on(without_cuda, cuda)  # falls back to torch instead of raising
    assert rope._compiled_runs_on(with_cuda, cuda)
    assert not rope._compiled_runs_on(with_cuda, meta)


@pytest.mark.skipif(compiled() is None, reason="needs ringattn._C")
def test_cuda_backend_call_path_reads_nothing_on_the_host():
    # Positions checked on the device, frequency tables cached per device, outputs from the fake op:
    # the whole per-call path runs on meta tensors, which raise on any host read.
    meta = torch.device("meta")
    q = torch.empty(2, 40, 4, 64, dtype=torch.bfloat16, device=meta)
    k = torch.empty(2, 40, 2, 64, dtype=torch.bfloat16, device=meta)
    mask = BlockMask(True, Span(40), Span(0), torch.tensor([0, 50, 80], device=meta))
    positions = torch.arange(40, device=meta)
    args = block_args(q, k, k, mask, rope=RoPEConfig(64, theta=45.2e9), q_positions=positions)
    inputs = op_inputs(args, meta)
    assert all(t.device == meta for t in inputs[:5] if t is not None)
    out, lse = torch.ops.ringattn.cuda_block_forward(q, k, k, *inputs, True)
    assert out.shape == q.shape and out.dtype == torch.float32 and lse.shape == (2, 4, 40)
    dq, dk, dv = torch.ops.ringattn.cuda_block_backward(q, q, k, k, lse, lse, *inputs, False)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


_PRETEND_GPU = """
import json, os, sys, torch
torch.cuda.is_available = lambda: True  # what a GPU host reports, before conftest reads it
import pytest

class Probe:
    def pytest_collection_finish(self, session):
        devices = {item.module.__name__: getattr(item.module, "DEVICE", None) for item in session.items}
        gpu = {item.nodeid for item in session.items if item.get_closest_marker("gpu")}
        probe = {"interpret": os.environ.get("TRITON_INTERPRET"), "devices": devices, "gpu": len(gpu)}
        print("PROBE " + json.dumps(probe))

sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Probe()]))
"""


def test_on_a_gpu_host_triton_tests_use_cuda_tensors_without_the_interpreter(tmp_path):
    # A collection run that pretends a GPU is present: conftest must leave the interpreter off and
    # the Triton test modules must put their tensors on CUDA (CPU tensors fail a compiled launch).
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    files = [
        "test_triton_flash.py",
        "test_triton_rope.py",
        "test_triton_autotune.py",
        "test_triton_backend.py",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _PRETEND_GPU, *(str(tests / f) for f in files)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tests.parent,
        timeout=300,
    )
    probe = next((line for line in run.stdout.splitlines() if line.startswith("PROBE")), None)
    assert probe is not None, run.stdout[-2000:] + run.stderr[-2000:]
    found = json.loads(probe.removeprefix("PROBE "))
    assert found["interpret"] is None, "conftest turned the Triton interpreter on although a GPU is present"
    assert found["devices"] and set(found["devices"].values()) == {"cuda"}, found["devices"]
    assert found["gpu"] > 0, "the Triton tests carry the gpu marker that make gpu-check selects"
