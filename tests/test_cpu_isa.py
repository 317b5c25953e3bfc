"""The CPU kernels' ISA variants: every variant this CPU runs (forced with RINGATTN_CPU_ISA) against the
fp64 reference, what each was compiled for, the errors for a variant that cannot run, and fp16's
conversions (exact widening, round-to-nearest-even narrowing) through each variant's kernels."""

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from attention_checks import Case, check_block

import ringattn
from ringattn import RoPEConfig
from ringattn._extension import compiled
from ringattn.backends.cpu import ISA_ENV
from ringattn.block import BlockMask, block_forward

pytestmark = pytest.mark.skipif(compiled() is None, reason="ringattn._C not built")

STATUS = ringattn.extension_status()
VARIANTS = STATUS["cpu_variants"] or {}
X86_VARIANTS = ("generic", "avx2", "avx512", "avx512bf16")  # the portable build's, least to most capable
PORTABLE_X86 = STATUS["cpu_march"] is None and platform.machine() in ("x86_64", "AMD64")


def runnable(name: str) -> str:
    """Why variant ``name`` cannot run here ("" when it can)."""
    if name not in VARIANTS:
        return f"{name} is not compiled in this build ({', '.join(VARIANTS)})"
    missing = VARIANTS[name]["missing"]
    return f"this CPU lacks {' '.join(missing)}" if missing else ""


VARIANT_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(bool(runnable(name)), reason=runnable(name) or "runs"))
    for name in (X86_VARIANTS if PORTABLE_X86 else tuple(VARIANTS))
]


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_each_variant_matches_the_reference(variant, dtype, monkeypatch):
    # GQA, causal, documents, RoPE far out, a partial last tile: forward and backward under the rule.
    monkeypatch.setenv(ISA_ENV, variant)
    case = Case(90, Hq=4, Hkv=2, D=72, causal=True, rope=RoPEConfig(72, theta=45.2e9), cu_seqlens=(0, 50, 90))
    check_block(case, dtype, "cpu")


@pytest.mark.skipif(not PORTABLE_X86, reason="the portable x86-64 build's variants")
def test_variants_are_compiled_for_their_isa_levels():
    # The psABI's levels: x86-64-v3 = AVX2 + FMA + F16C, v4 adds AVX-512 F/BW/DQ/VL, bf16 on top.
    assert list(VARIANTS) == list(X86_VARIANTS)
    isa = {name: set(v["isa"]) for name, v in VARIANTS.items()}
    assert not isa["generic"] & {"avx", "avx2", "avx512f"}
    assert {"avx2", "fma", "f16c"} <= isa["avx2"] and "avx512f" not in isa["avx2"]
    assert {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= isa["avx512"] and "avx512_bf16" not in isa[
        "avx512"
    ]
    assert isa["avx512"] | {"avx512_bf16"} == isa["avx512bf16"]


def test_status_names_the_most_capable_variant_this_cpu_runs():
    runs = [name for name, v in VARIANTS.items() if not v["missing"]]
    assert runs, "no compiled variant runs on this CPU"
    assert STATUS["cpu_variant"] == runs[-1] == compiled().cpu_variant()
    assert STATUS["cpu_isa"] == VARIANTS[runs[-1]]["isa"]


def _tiny_call():
    q = torch.randn(1, 8, 2, 16)
    return block_forward(q, q, q, BlockMask(True), backend="cpu")


def test_unknown_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=rf"{ISA_ENV}='sse9' is not a CPU kernel variant.*compiled: generic"):
        _tiny_call()
    monkeypatch.setenv(ISA_ENV, "")  # empty: the default
    _tiny_call()


def test_the_binding_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'sse9'; compiled: generic"):
        compiled().attn_forward_cpu(compiled().AttnParams(), "sse9")


def test_a_variant_this_cpu_cannot_run_is_a_clear_error(monkeypatch):
    # The error path itself, whatever this CPU is: pretend the most capable variant lacks a feature.
    import ringattn.backends.cpu as cpu

    module = compiled()
    last = list(VARIANTS)[-1]

    class Lacking:
        def __getattr__(self, name):
            return getattr(module, name)

        def cpu_variants(self):
            return [(n, isa, ["made_up"] if n == last else miss) for n, isa, miss in module.cpu_variants()]

    monkeypatch.setenv(ISA_ENV, last)
    with pytest.raises(ValueError, match=rf"{ISA_ENV}='{last}': this CPU lacks made_up"):
        cpu.forced_variant(Lacking())


def _fp16_values() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_fp16_conversions_are_exact_and_round_to_nearest_even(variant, monkeypatch):
    # One key per query: out = 1 * v, so every fp16 value (subnormals, infinities, NaN) must come back
    # unchanged, and widened exactly in fp32. Two keys of equal score: out = (a + b) / 2, exact in fp32,
    # for adjacent a and b: a tie, which the store must round to even, as torch does.
    monkeypatch.setenv(ISA_ENV, variant)
    values = _fp16_values().reshape(1024, 1, 1, 64)
    zeros = torch.zeros(1024, 1, 1, 64, dtype=torch.float16)
    mask = BlockMask(False)
    for out_dtype in (torch.float16, torch.float32):
        out, _ = block_forward(zeros, zeros, values, mask, out_dtype=out_dtype, backend="cpu")
        torch.testing.assert_close(out, values.to(out_dtype), rtol=0, atol=0, equal_nan=True)
    finite = _fp16_values()
    finite = finite[finite.isfinite()].view(torch.int16)
    a = finite[: 62 * (finite.numel() // 62)].reshape(-1, 1, 1, 62)  # D = 62: F16C's 8 lanes and a tail
    b = (a + 1).view(torch.float16)  # the next value away from 0 (sign and magnitude bits)
    keep = b.isfinite().all(-1).flatten()
    a, b = a.view(torch.float16)[keep], b[keep]
    v = torch.cat([a, b], dim=1)
    q, k = torch.zeros(a.shape, dtype=torch.float16), torch.zeros(v.shape, dtype=torch.float16)
    out, _ = block_forward(q, k, v, mask, backend="cpu")
    expected = ((a.float() + b.float()) / 2).half()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(
    not PORTABLE_X86 or shutil.which("objdump") is None, reason="the portable x86-64 build, and objdump"
)
def test_code_shared_between_variants_uses_no_avx():
    # The linker keeps one copy of a function several objects emit (a template instantiation, an inline
    # function): if an AVX-512 variant's copy were kept, the generic kernels would call it on any CPU.
    # Such functions are the exported ones (the rest is hidden); outside the variants' namespaces none
    # may contain an AVX instruction (any v-prefixed mnemonic, ymm/zmm or mask registers).
    so = compiled().__file__
    symbols = subprocess.run(["objdump", "-T", "-C", so], capture_output=True, text=True, check=True).stdout
    functions = []
    for line in symbols.splitlines():
        m = re.match(r"^([0-9a-f]+)\s.*\sDF\s+\.text\s+([0-9a-f]+)\s+\S+\s+(.*)$", line)
        if m and "ringattn_cpu_" not in m.group(3):
            functions.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip()))
    assert any(name == "PyInit__C" for _, _, name in functions), "objdump -T output not understood"
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-j", ".text", so], capture_output=True, text=True, check=True
    ).stdout
    instructions = {}
    for line in code.splitlines():
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)(.*)$", line)
        if m:
            instructions[int(m.group(1), 16)] = (m.group(2), m.group(3))
    offenders = {}
    for start, size, name in functions:
        avx = {
            op
            for address, (op, operands) in instructions.items()
            if start <= address < start + size
            and (op.startswith("v") or re.search(r"%[yz]mm|%k[0-7]\b", operands))
        }
        if avx:
            offenders[name] = sorted(avx)
    assert offenders == {}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or not PORTABLE_X86, reason="Linux on x86-64")
def test_feature_detection_agrees_with_the_kernel():
    # CPUID and XCR0 as the dispatcher reads them against Linux's flags (which also drop what the OS
    # does not enable).
    flags = next(
        set(line.split(":", 1)[1].split())
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
    )
    features = dict(compiled().cpu_features())
    assert {"avx2", "f16c", "avx512f", "avx512_bf16", "abm", "movbe"} <= set(features)
    assert features == {name: name in flags for name in features}
