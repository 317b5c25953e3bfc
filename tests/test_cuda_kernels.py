"""The compiled CUDA backend ("cuda"): resource report of the kernels (no GPU needed), clear errors
without a GPU, fake implementations. Its comparison with the reference on a GPU is in
test_attention.py (the shared cases, skipped without a GPU)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from harness import HAS_GPU

from ringattn import extension_status
from ringattn._extension import compiled
from ringattn.backends import BACKENDS
from ringattn.block import block_args

ROOT = Path(__file__).resolve().parents[1]
SM89_SMEM_LIMIT = 101_376
STATUS = extension_status()


def ptxas_report(arch: str, out_dir: Path, bf16_only: bool = False) -> dict:
    """ptxas -v report of csrc/attn_cuda.cu compiled for ``arch`` (e.g. "sm_89"), as
    {kernel: {registers, spill_stores, spill_loads, smem}}; ``bf16_only``: the bf16 kernels alone
    (RINGATTN_CUDA_BF16_ONLY, half the compile time; fp16's differ only in the MMA type and conversions)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = out_dir / "attn_cuda.cubin"
    # --split-compile=0: kernels optimised in parallel on every core (the same per-kernel ptxas report; 52 -> 35 s on 2 cores)
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        "--split-compile=0",
        f"-I{ROOT / 'csrc'}",
        *(["-DRINGATTN_CUDA_BF16_ONLY"] if bf16_only else []),
    ]
    # -cubin: device code only, the same ptxas report without the host compile (the extension's
    # build and the CPU emulation compile the host side)
    result = subprocess.run(
        [*cmd, "-cubin", str(ROOT / "csrc" / "attn_cuda.cu"), "-o", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report, current = {}, None
    for line in result.stderr.splitlines():
        if m := re.search(rf"Compiling entry function '(\w+)' for '{arch}'", line):
            current = m.group(1)
            report[current] = {"spill_stores": None, "spill_loads": None, "registers": None, "smem": 0}
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            report[current]["spill_stores"], report[current]["spill_loads"] = map(int, m.groups())
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            report[current]["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                report[current]["smem"] = int(s.group(1))
    return report


@pytest.fixture(scope="module")
def ptxas_sm89(tmp_path_factory):
    """The default tier's report: the bf16 kernels on sm_89 (the slow tier checks every kernel on
    every arch, test_ptxas_all_archs_no_spills)."""
    return ptxas_report("sm_89", tmp_path_factory.mktemp("ptxas"), bf16_only=True)


def _kernels(report, name):
    return {k: v for k, v in report.items() if name in k}


def test_ptxas_sm89_no_spills_and_registers(ptxas_sm89):
    forward, backward, dq_pass = (
        _kernels(ptxas_sm89, "attn_forward_kernel"),
        _kernels(ptxas_sm89, "attn_backward_kernel"),
        _kernels(ptxas_sm89, "attn_backward_dq_kernel"),  # deterministic dQ
    )
    # bf16 (template argument 1), head-dim tiles 64 / 96 / 128 / 256; plain, EXTRA (window, softcap,
    # ALiBi) and EXTRA + DROPOUT (the mangled names end in the two flags: ...ELb1ELb1E for dropout).
    assert len(forward) == len(backward) == len(dq_pass) == 12, sorted(ptxas_sm89)
    assert all("ILi1ELi" in name for name in (*forward, *backward, *dq_pass))
    assert len(_kernels(ptxas_sm89, "Lb1ELb1EEEv")) == 12
    for name, info in ptxas_sm89.items():
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{name} spills: {info}"
        assert info["registers"] is not None and info["registers"] <= 255, f"{name}: {info}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_ptxas_all_archs_no_spills(arch, tmp_path):
    """The build's archs (CMakeLists.txt RINGATTN_CUDA_ARCHS): every kernel, bf16 and fp16, plain,
    EXTRA and DROPOUT, without spills (sm_89's shared-memory limit is the smallest of them, checked
    above)."""
    report = ptxas_report(arch, tmp_path)
    for name in ("attn_forward_kernel", "attn_backward_kernel", "attn_backward_dq_kernel"):
        assert len(_kernels(report, name)) == 24, name
    for name, info in report.items():
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{arch} {name} spills: {info}"
        assert info["registers"] is not None and info["registers"] <= 255, f"{arch} {name}: {info}"


def test_ptxas_sm89_shared_memory_within_99kb(ptxas_sm89):
    # Static shared memory from ptxas plus each kernel's dynamic tiles (reported by the extension,
    # and also checked by static_assert in attn_cuda.cu).
    for name, info in ptxas_sm89.items():
        assert info["smem"] <= SM89_SMEM_LIMIT, f"{name}: {info['smem']} B static shared memory"
    if not STATUS["cuda"]:
        pytest.skip("ringattn._C built without CUDA: dynamic sizes not reported")
    dynamic = dict(compiled().attn_cuda_smem_bytes())
    assert set(dynamic) == {
        f"{d}_d{n}" for d in ("forward", "backward", "backward_dq") for n in (64, 96, 128, 256)
    }
    static = max(info["smem"] for info in ptxas_sm89.values())
    for name, size in dynamic.items():
        assert 0 < size and static + size <= SM89_SMEM_LIMIT, f"{name}: {static} + {size} B"


@pytest.mark.skipif(not STATUS["cuda"] or HAS_GPU, reason="needs a CUDA build on a machine without GPU")
def test_cuda_entries_without_gpu_raise_clear_errors():
    module = compiled()
    for entry in (module.attn_forward_cuda, module.attn_backward_cuda):
        with pytest.raises(RuntimeError, match="no CUDA device"):
            entry(module.AttnParams())
    q = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    ok, reason = BACKENDS["cuda"].can_implement(q, q, q, block_args(q, q, q))
    assert not ok and "cpu" in reason


def test_cuda_backend_rejects_unsupported_inputs_with_reasons():
    q = torch.zeros(1, 4, 2, 64)
    ok, reason = BACKENDS["cuda"].can_implement(q, q, q, block_args(q, q, q))
    assert not ok and reason


def test_cuda_custom_ops_have_fake_implementations():
    # Shapes and dtypes come from the fake implementations on meta tensors: no GPU needed.
    q = torch.empty(1, 12, 4, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 9, 2, 64, dtype=torch.bfloat16, device="meta")
    ints, floats = (
        [1, 0, 1, 0, 1, 0, 0, 0, -1, -1, 0, 0, 1],
        [0.125, 1.0, 0.0, 0.0],
    )  # INT_FIELDS, FLOAT_FIELDS
    args = (None, None, None, None, None, None, None, ints, floats)
    out, lse = torch.ops.ringattn.cuda_block_forward(q, k, k, *args, False)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (1, 4, 12)
    dq, dk, dv = torch.ops.ringattn.cuda_block_backward(q, q, k, k, lse, lse, *args, True)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dk.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not STATUS["cuda"], reason="needs a GPU and ringattn._C with CUDA kernels")
@pytest.mark.parametrize("D", [64, 128, 256])
def test_deterministic_backward_repeats_bit_for_bit_on_gpu(D):
    """deterministic=True on the cuda backend: the dQ pass (no atomics) matches the fp64 reference and
    two runs give the same bits (the atomic path's dq need not)."""
    from attention_checks import Case, assert_matches_reference, make_inputs

    from ringattn import RoPEConfig
    from ringattn.block import block_backward, block_forward

    case = Case(
        300, Hq=4, Hkv=2, D=D, causal=True, cu_seqlens=(0, 100, 300), rope=RoPEConfig(D, theta=45.2e9)
    )
    q, k, v, dout = make_inputs(case, torch.bfloat16, 0, "cuda")
    qp, kp = case.positions("cuda")
    kw = dict(rope=case.rope, q_positions=qp, k_positions=kp, deterministic=True, backend="cuda")
    mask = case.mask("cuda")
    runs = []
    for _ in range(2):
        out, lse = block_forward(q, k, v, mask, **kw)
        runs.append((out, lse, *block_backward(dout, q, k, v, out, lse, mask, **kw)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    ours = dict(zip(("out", "lse", "dq", "dk", "dv"), runs[0], strict=True))
    assert_matches_reference(ours, q, k, v, dout, case.spec_kwargs("cuda"))
