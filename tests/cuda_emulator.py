"""The CUDA emulation of csrc/attn_cuda.cu as a test helper: build, ctypes mirror, running a case.

``build_library`` compiles the file the GPU build compiles as host C++ under csrc/emu/ (every thread
a fiber, ``mma.sync`` by the PTX ISA's fragment tables, every shared/global access checked through
GCC's ThreadSanitizer hooks) into a cache keyed by the sources' hash; ``Emulator`` loads it
(``ra_emu_attn_forward``/``_backward`` call the real host entry points); ``run_case`` and
``check_case`` run one ``attention_checks.Case`` forward and backward and hold it to the fp64
reference with the project's tolerance rule. Shared by tests/test_cuda_emulation.py (the kernels and
the emulator itself) and tests/test_compiled_features.py (window, softcap, ALiBi, key documents).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from attention_checks import Case, assert_matches_reference, make_inputs

from ringattn.backends.compiled import DTYPE_CODES, FLOAT_FIELDS, INT_FIELDS, op_inputs, rowsum_delta
from ringattn.block import block_args

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
KERNEL_SOURCE = CSRC / "attn_cuda.cu"
HEADERS = [CSRC / n for n in ("attn_cuda.h", "attn_math.h", "attn_params.h", "rope_phase.h")]
EMU_SOURCES = [
    EMU / n
    for n in ("cuda_emu.h", "cuda_emu_runtime.h", "cuda_emu_runtime.cpp", "emu_driver.cpp", "emu_selftest.cu")
]
CACHE = Path(os.environ.get("RINGATTN_EMU_CACHE", Path(tempfile.gettempdir()) / "ringattn-cuda-emu"))

BF16, FP16 = torch.bfloat16, torch.float16
CXX = ["g++", "-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
# The kernel translation unit: CUDA spellings from the force-included emulation header, and GCC's
# ThreadSanitizer instrumentation, whose hooks (__tsan_read4(addr), ...) the emulator implements to
# see every memory access (no TSan runtime is linked). CUDA code type-puns (ld32, pack2): no strict
# aliasing, as under nvcc.
KERNEL_FLAGS = [
    "-x",
    "c++",
    "-DRINGATTN_CUDA_EMULATION",
    "-include",
    str(EMU / "cuda_emu.h"),
    "-fsanitize=thread",
    "--param=tsan-instrument-func-entry-exit=0",
    "-fno-strict-aliasing",
]


# ------------------------------------------------------------------------------------------- build


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:20]


def _compile(source: Path, flags: list[str], obj: Path, include: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CXX, *flags, f"-I{include}", "-c", str(source), "-o", str(obj)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def build_library(kernel_text: str | None = None) -> Path:
    """The emulation library (cached by the hash of every source, the flags and the compiler).

    ``kernel_text``: a patched attn_cuda.cu (mutation tests), compiled from a copy next to the real
    headers' include path; None: the file itself.
    """
    if shutil.which("g++") is None:
        pytest.fail("g++ is needed to build the CUDA emulation")
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    kernel = KERNEL_SOURCE.read_bytes() if kernel_text is None else kernel_text.encode()
    common = [p.read_bytes() for p in HEADERS + EMU_SOURCES] + [
        " ".join(CXX + KERNEL_FLAGS).encode(),
        version.encode(),
    ]
    key = _digest(kernel, *common)
    lib = CACHE / f"libringattn_emu_{key}.so"
    if lib.exists():
        return lib
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
    try:
        source = KERNEL_SOURCE
        if kernel_text is not None:
            source = work / "attn_cuda.cu"
            source.write_text(kernel_text)
        # The runtime and driver objects do not depend on the kernel source: shared by mutations.
        shared_key = _digest(*common)
        objects, jobs = [], []
        for src, flags in (
            (EMU / "cuda_emu_runtime.cpp", []),
            (EMU / "emu_driver.cpp", []),
            (EMU / "emu_selftest.cu", KERNEL_FLAGS),
        ):
            obj = CACHE / f"{src.stem}_{shared_key}.o"
            objects.append(obj)
            if not obj.exists():
                tmp = work / obj.name
                jobs.append((_compile(src, flags, tmp, CSRC), tmp, obj))
        kernel_obj = work / "attn_cuda.o"
        jobs.append((_compile(source, KERNEL_FLAGS, kernel_obj, CSRC), kernel_obj, None))
        failures = []
        for proc, tmp, final in jobs:
            output = proc.communicate()[0]
            if proc.returncode != 0:
                failures.append(output[-4000:])
            elif final is not None:
                os.replace(tmp, final)
        if failures:
            pytest.fail("building the CUDA emulation failed:\n" + "\n".join(failures))
        tmp_lib = work / lib.name
        link = subprocess.run(
            ["g++", "-shared", "-Wl,-z,defs", "-o", str(tmp_lib), str(kernel_obj), *map(str, objects)],
            capture_output=True,
            text=True,
        )
        if link.returncode != 0:
            pytest.fail("linking the CUDA emulation failed:\n" + link.stderr[-4000:])
        os.replace(tmp_lib, lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


# ------------------------------------------------------------------------------------------ ctypes


class View(ctypes.Structure):
    _fields_ = [
        ("ptr", ctypes.c_uint64),
        ("sb", ctypes.c_int64),
        ("ss", ctypes.c_int64),
        ("sh", ctypes.c_int64),
    ]


_I64, _INT, _U64, _F32, _BOOL = ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_float, ctypes.c_bool


class AttnParams(ctypes.Structure):
    """Mirror of csrc/attn_params.h (checked against the compiler's offsets by ``Emulator``)."""

    _fields_ = [
        *[(n, _I64) for n in ("batch", "seqlen_q", "seqlen_k", "heads_q", "heads_kv", "head_dim")],
        ("dtype", _INT),
        ("q", View),
        ("k", View),
        ("v", View),
        ("out", View),
        ("out_dtype", _INT),
        ("lse", _U64),
        ("dout", View),
        ("dq", View),
        ("dk", View),
        ("dv", View),
        ("delta", _U64),
        ("grad_dtype", _INT),
        ("softmax_scale", _F32),
        ("causal", _BOOL),
        *[(n, _I64) for n in ("q_start", "q_stride", "k_start", "k_stride")],
        ("cu_seqlens", _U64),
        ("n_cu", _I64),
        ("k_cu_seqlens", _U64),
        ("window_left", _I64),
        ("window_right", _I64),
        ("softcap", _F32),
        ("alibi_slopes", _U64),
        ("alibi_sb", _I64),
        ("dropout_p", ctypes.c_double),
        ("dropout_seed", _I64),
        ("dropout_offset", _I64),
        ("rope_mode", _INT),
        ("rotary_dim", _INT),
        ("interleaved", _BOOL),
        ("attention_factor", _F32),
        *[(n, _U64) for n in ("rope_freqs", "k_rope_freqs", "q_positions", "k_positions")],
        ("q_positions_sb", _I64),
        ("k_positions_sb", _I64),
        ("deterministic", _BOOL),
        ("dq_accum", _U64),
        ("dk_accum", _U64),
        ("rope_work", _U64),
        ("num_threads", _INT),
        ("stream", _U64),
    ]


class Emulator:
    """The built library: the attention entry points, the checkers' report and the test hooks."""

    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        for name, res, args in (
            ("ra_emu_attn_forward", _INT, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
            ("ra_emu_attn_backward", _INT, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
            ("ra_emu_params_layout", ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]),
            ("ra_emu_smem_bytes", ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]),
            ("ra_emu_register", None, [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p]),
            ("ra_emu_reset", None, []),
            ("ra_emu_report", ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]),
            ("ra_emu_mma_test", _INT, [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
            ("ra_emu_round", None, [_INT, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]),
            ("ra_emu_widen", None, [_INT, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]),
            ("ra_emu_selftest", _INT, [ctypes.c_char_p, ctypes.c_void_p, _INT, ctypes.c_uint, ctypes.c_uint]),
            ("ra_emu_set_dry_run", None, [_INT]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.check_layout()

    def _text(self, fn) -> str:
        size = fn(None, 0)
        buf = ctypes.create_string_buffer(size)
        fn(buf, size)
        return buf.value.decode()

    def check_layout(self) -> None:
        entries = dict(item.split("=") for item in self._text(self.lib.ra_emu_params_layout).split(";"))
        ours = {name: getattr(View, name).offset for name, _ in View._fields_}
        ours |= {name: getattr(AttnParams, name).offset for name, _ in AttnParams._fields_}
        ours |= {"sizeof": ctypes.sizeof(AttnParams), "View.sizeof": ctypes.sizeof(View)}
        assert {k: int(v) for k, v in entries.items()} == ours, "AttnParams mirror differs from attn_params.h"

    def report(self) -> dict:
        return json.loads(self._text(self.lib.ra_emu_report))

    def smem_bytes(self) -> dict:
        return {
            k: int(v)
            for k, v in (e.split("=") for e in self._text(self.lib.ra_emu_smem_bytes).split(";") if e)
        }

    def call(self, entry: str, params: AttnParams, buffers: dict) -> tuple[int, str]:
        """Run ``entry`` on fresh checker state with ``buffers`` (name: tensor) registered."""
        self.lib.ra_emu_reset()
        for name, t in buffers.items():
            if t is not None and t.numel():
                self.lib.ra_emu_register(t.data_ptr(), _extent(t), name.encode())
        msg = ctypes.create_string_buffer(4096)
        rc = getattr(self.lib, entry)(ctypes.byref(params), msg, len(msg))
        return rc, msg.value.decode()


def _extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to one past its last (any strides >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


# ------------------------------------------------------------------------------ running a case


def _view(t: torch.Tensor) -> View:
    assert t.stride(-1) == 1 or t.shape[-1] == 1
    return View(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


@dataclass
class Run:
    """One case through the emulated kernels: outputs, and each entry's return code and report."""

    out: torch.Tensor
    lse: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    reports: dict
    messages: dict


def _nan(*shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def run_case(
    emu: Emulator, case: Case, dtype, *, inputs=None, fp32_out=False, fp32_grads=False, deterministic=False
) -> Run:
    """Forward and backward of ``case`` through ``ra_emu_attn_*``, parameters filled as the cuda
    backend fills them (``op_inputs``: frequency tables, positions, spans, documents, window, softcap,
    ALiBi, dropout, deterministic; delta from our out), into NaN-filled outputs and dk workspace (dq's
    is zero-filled for the atomics, as the backend does; NaN-filled when ``deterministic``: its dQ pass
    writes every row)."""
    q, k, v, dout = make_inputs(case, dtype) if inputs is None else inputs
    qp, kp = case.positions()
    args = block_args(
        q, k, v, case.mask(), rope=case.rope, q_positions=qp, k_positions=kp, deterministic=deterministic,
        **case.feature_kwargs(),
    )  # fmt: skip
    cu, k_cu, alibi, q_freqs, k_freqs, q_pos, k_pos, ints, floats = op_inputs(args, torch.device("cpu"))
    p = AttnParams()
    p.batch, p.seqlen_q, p.heads_q, p.head_dim = q.shape
    p.seqlen_k, p.heads_kv = k.shape[1], k.shape[2]
    p.dtype = DTYPE_CODES[dtype]
    p.q, p.k, p.v = _view(q), _view(k), _view(v)
    for name, value in zip(INT_FIELDS, ints, strict=True):
        setattr(p, name, value)
    for name, value in zip(FLOAT_FIELDS, floats, strict=True):
        setattr(p, name, value)
    if cu is not None:
        p.cu_seqlens, p.n_cu = cu.data_ptr(), cu.numel()
    if k_cu is not None:
        p.k_cu_seqlens = k_cu.data_ptr()
    if alibi is not None:
        p.alibi_slopes, p.alibi_sb = alibi.data_ptr(), (alibi.shape[-1] if alibi.dim() == 2 else 0)
    if p.rope_mode:
        p.rope_freqs, p.k_rope_freqs = q_freqs.data_ptr(), k_freqs.data_ptr()
        p.q_positions, p.k_positions = q_pos.data_ptr(), k_pos.data_ptr()
        p.q_positions_sb = q_pos.shape[1] if q_pos.shape[0] > 1 else 0
        p.k_positions_sb = k_pos.shape[1] if k_pos.shape[0] > 1 else 0
    B, Sq, Hq, D = q.shape
    out_dtype = torch.float32 if fp32_out else dtype
    out, lse = _nan(B, Sq, Hq, D, dtype=out_dtype), _nan(B, Hq, Sq, dtype=torch.float32)
    p.out, p.out_dtype, p.lse = _view(out), DTYPE_CODES[out_dtype], lse.data_ptr()
    inputs = {"q": q, "k": k, "v": v, "cu_seqlens": cu, "k_cu_seqlens": k_cu, "alibi_slopes": alibi}
    inputs |= {"q_freqs": q_freqs, "k_freqs": k_freqs}
    inputs |= {"q_positions": q_pos, "k_positions": k_pos}
    reports, messages = {}, {}
    # RoPE's workspaces, as the backend allocates them: K's rows rotated (forward), Q's (backward; then
    # K's for the deterministic dQ pass).
    q_rows = q.numel() + (k.numel() if deterministic else 0)
    k_work, q_work = (_nan(n, dtype=dtype) if p.rope_mode else None for n in (k.numel(), q_rows))
    p.rope_work = k_work.data_ptr() if p.rope_mode else 0
    rc, messages["forward"] = emu.call(
        "ra_emu_attn_forward", p, inputs | {"out": out, "lse": lse, "rope_work": k_work}
    )
    reports["forward"] = emu.report()
    assert rc == 0, f"forward: {messages['forward']}\n{_describe(reports['forward'])}"
    delta = rowsum_delta(dout, out)
    grad_dtype = torch.float32 if fp32_grads else dtype
    dq, dk, dv = (_nan(*t.shape, dtype=grad_dtype) for t in (q, k, k))
    dq_accum = (
        _nan(*q.shape, dtype=torch.float32) if deterministic else torch.zeros(q.shape, dtype=torch.float32)
    )
    dk_accum = _nan(*k.shape, dtype=torch.float32)
    p.dout, p.delta = _view(dout), delta.data_ptr()
    p.dq, p.dk, p.dv, p.grad_dtype = _view(dq), _view(dk), _view(dv), DTYPE_CODES[grad_dtype]
    p.dq_accum, p.dk_accum = dq_accum.data_ptr(), dk_accum.data_ptr()
    grads = {"dout": dout, "lse": lse, "delta": delta, "dq": dq, "dk": dk, "dv": dv}
    grads |= {"dq_accum": dq_accum, "dk_accum": dk_accum, "rope_work": q_work}
    p.rope_work = q_work.data_ptr() if p.rope_mode else 0
    rc, messages["backward"] = emu.call("ra_emu_attn_backward", p, inputs | grads)
    reports["backward"] = emu.report()
    assert rc == 0, f"backward: {messages['backward']}\n{_describe(reports['backward'])}"
    return Run(out, lse, dq, dk, dv, reports, messages)


def _describe(report: dict) -> str:
    return json.dumps({"counts": report["counts"], "messages": report["messages"]}, indent=1)


def assert_clean(run: Run) -> None:
    """No checker fired in any launch: no race, out-of-bounds access, uninitialised read, divergence."""
    for entry, report in run.reports.items():
        assert not report["counts"], f"{entry}: the checkers reported\n{_describe(report)}"
        assert all(launch["error"] == 0 for launch in report["launches"]), report["launches"]


def mutant(*edits: tuple[str, str]) -> Emulator:
    """The emulation of attn_cuda.cu with each ``(original, planted)`` edit applied in turn (mutation
    tests); each original must occur exactly once where it is applied, else the mutation went stale."""
    text = KERNEL_SOURCE.read_text()
    for original, planted in edits:
        assert text.count(original) == 1, (
            f"the mutated text is not in attn_cuda.cu exactly once: {original!r}"
        )
        text = text.replace(original, planted)
    return Emulator(build_library(text))


def assert_check_case_fails(emu: Emulator, case: Case, dtype, expected: str, **kwargs) -> None:
    """``check_case`` fails, and its message names ``expected`` (a checker or a tensor's error)."""
    with pytest.raises(AssertionError) as caught:
        check_case(emu, case, dtype, **kwargs)
    assert expected in str(caught.value), str(caught.value)[:3000]


def check_case(emu: Emulator, case: Case, dtype, *, deterministic=False) -> Run:
    """Forward, backward and dQ/dK finish vs the fp64 reference (the tolerance rule), report clean."""
    inputs = make_inputs(case, dtype)
    before = [t.clone() for t in inputs]
    run = run_case(emu, case, dtype, inputs=inputs, deterministic=deterministic)
    assert_clean(run)
    q, k, v, dout = inputs
    ours = {"out": run.out, "lse": run.lse, "dq": run.dq, "dk": run.dk, "dv": run.dv}
    assert_matches_reference(ours, q, k, v, dout, case.spec_kwargs())
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t, b), "inputs were modified"
    return run
