"""Static issue model of the compiled CUDA attention kernels (``csrc/attn_cuda.cu``), without a GPU.

``python -m ringattn.bench.cuda_aot --mix [--arch sm_89] [--source csrc/attn_cuda.cu | --rev REV] [--json]``

The CUDA counterpart of ``python -m tritonkernels.aot --mix``, sharing its SASS parser, hot-loop
choice, sm_89 issue model and occupancy (``tritonkernels/aot.py``). Per kernel instantiation:

1. nvcc compiles the source as ``tests/test_cuda_kernels.py::ptxas_report`` does (``-std=c++17 -O3
   -arch=ARCH -Xptxas -v``, keeping the cubin): registers, static shared memory, spills and stack frame.
2. The dynamic shared memory of each kernel is the extension's own answer: a small host program linked
   with the compiled object calls ``attn_cuda_smem_bytes()`` (host-only; keys ``forward_d64`` ...),
   matched to a kernel by its name (forward/backward) and its second template argument (the head-dim
   tile). Threads per CTA are the kernel's ``__launch_bounds__`` (``EIATTR_MAX_THREADS``), which the
   launches use. Occupancy (warps per SM) follows from registers and static + dynamic shared memory.
3. ``nvdisasm`` gives the SASS; the hot loop is the loop with the most MMAs (``aot.hot_loop``). Its
   static mix counts every instruction once, as the Triton model does. These kernels also run loops
   *inside* the hot loop (tile loads strided by the block size, the backward's dQ items strided by
   the warp count), so the model weights each loop directly inside the hot loop by its trip count,
   read from its SASS exit test: ``i += stride; if (i < N) repeat`` with N an immediate and stride
   an immediate or ``blockDim.x`` gives ceil(N / stride) (the loop starts at a thread or warp index
   below the stride). A loop whose test has another form counts once and is flagged ``?``. Loops
   nested deeper, and cold paths (e.g. sincosf's large-argument reduction), count once per
   iteration of their parent, as in the static mix.
4. One hot-loop iteration of one warp on sm_89: MMA cycles (weighted MMAs x ``MMA_CYCLES_SM89``)
   against issue cycles (weighted instructions, one per cycle): tensor-bound when MMA cycles >=
   issue cycles. Latency, memory and barrier stalls are ignored: a MODELED lower bound for comparing
   versions of the kernels, not a timing.

``--rope``: the RoPE rotation's cost in SASS instructions per pair and per element, from probe
kernels that run csrc/attn_math.h's rotation (``rope_probe_source``) against a baseline that only
loads and stores, beside the real rotation loops (``rotate_rows_kernel``, ``finish_grad_kernel``),
and its modeled share of causal attention time at Llama-3-8B's shape (``rope_share``,
``ROPE_FORMULA``). MODELED as well: no GPU ran.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tritonkernels import aot

__all__ = [
    "loop_trips",
    "weighted_hot_loop",
    "parse_ptxas",
    "kernel_label",
    "analyze",
    "report",
    "trip_paths",
    "loop_summary",
    "rope_probe_source",
    "compile_rope_probe",
    "rope_costs",
    "real_rope_loops",
    "rope_share",
    "rope_report",
    "main",
]

ROOT = Path(__file__).resolve().parents[2]
COMPILE_FLAGS = ("-std=c++17", "-O3")  # tests/test_cuda_kernels.py::ptxas_report
_DTYPES = {"1": "bf16", "2": "fp16"}  # csrc/attn_math.h: DType
_IMMEDIATE = re.compile(r"^-?(0x[0-9a-fA-F]+|\d+)$")
_BLOCK_DIM_X = ("c[0x0][0x0]", "c[0x0][RZ]")  # blockDim.x in the constant bank


def _immediate(text: str) -> int | None:
    return int(text, 0) if _IMMEDIATE.match(text) else None


def loop_trips(instrs: list[aot.SassInstr], span: tuple[int, int], threads: int | None) -> int | None:
    """Trip count of the loop ``span`` (label index, back-branch index) from its exit test, or None.

    Recognised: the back branch's predicate set by ``ISETP.GE`` (taken on ``!P``) or ``ISETP.LT`` /
    ``ISETP.NE`` (taken on ``P``) of a register against an immediate N, the register advanced in the
    loop by ``IADD3 R, R, stride, RZ`` (sm_90: ``VIADD`` or ``IMAD.IADD R, R, 0x1, stride``) with an
    immediate stride or blockDim.x (= ``threads``), directly or through a register set before the loop;
    also ``R = i + stride`` where the loop later copies R back into i.
    """
    begin, end = span
    guard = instrs[end].guard
    if not guard:
        return None
    negated, pred = guard.startswith("@!"), guard.lstrip("@!")
    for instr in reversed(instrs[begin:end]):
        operands = [o.strip() for o in instr.operands.split(",")]
        if instr.opcode == "ISETP" and operands[0] == pred:
            break
    else:
        return None
    if len(operands) < 4 or (bound := _immediate(operands[3])) is None or bound <= 0:
        return None
    reg, test = operands[2], instr.mnemonic.split(".")[1]
    if not ((test == "GE" and negated) or (test in ("LT", "NE") and not negated)):
        return None
    stride = None
    for step in instrs[begin:end]:
        ops = [o.strip() for o in step.operands.split(",")]
        if step.guard or not ops or ops[0] != reg:
            continue
        if step.opcode == "IADD3" and len(ops) == 4 and ops[3] == "RZ":
            terms = ops[1:3]
        elif step.opcode == "VIADD" and len(ops) == 3:  # sm_90's add
            terms = ops[1:3]
        elif step.mnemonic == "IMAD.IADD" and len(ops) == 4 and ops[2] == "0x1":
            terms = [ops[1], ops[3]]
        else:
            continue
        carried = [t for t in terms if t == reg or _copies(instrs[begin:end], t, reg)]
        if carried:  # reg += stride, or reg = i + stride with i = reg later in the loop
            terms.remove(carried[0])
            stride = _value(instrs[:begin], terms[0], threads)
    if not stride or stride <= 0:
        return None
    return math.ceil(bound / stride)


def _copies(body: list[aot.SassInstr], dst: str, src: str) -> bool:
    """Whether ``body`` copies register ``src`` into ``dst`` (``MOV`` / ``IMAD.MOV.U32 dst, RZ, RZ, src``)."""
    for instr in body:
        ops = [o.strip() for o in instr.operands.split(",")]
        if not instr.guard and ops[0] == dst and ops[-1] == src:
            if instr.opcode == "MOV" or instr.mnemonic == "IMAD.MOV.U32" and ops[1:3] == ["RZ", "RZ"]:
                return True
    return False


def _value(before: list[aot.SassInstr], operand: str, threads: int | None) -> int | None:
    """An operand's value: an immediate, blockDim.x (``threads``), or a register last written before
    the loop with one of them (sm_90 keeps blockDim.x in a register: ``LDC R, c[0x0][RZ]``)."""
    if operand in _BLOCK_DIM_X:
        return threads
    if (value := _immediate(operand)) is not None or not re.fullmatch(r"R\d+", operand):
        return value
    for instr in reversed(before):
        ops = [o.strip() for o in instr.operands.split(",")]
        if ops and ops[0] == operand:
            source = ops[-1] if instr.opcode in ("LDC", "MOV") or instr.mnemonic == "IMAD.MOV.U32" else None
            return None if source is None or source == operand else _value([], source, threads)
    return None


def _weighted_loop(instrs: list[aot.SassInstr], loops: list[tuple[int, int]], span, threads) -> dict:
    begin, end = span
    inside = [s for s in loops if begin <= s[0] and s[1] < end and s != span]
    children = sorted(
        {s for s in inside if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in inside)}
    )
    weight = [1] * (end + 1 - begin)
    inner = []
    for child in children:
        trips = loop_trips(instrs, child, threads)
        for i in range(child[0], child[1] + 1):
            weight[i - begin] = trips or 1
        size = sum(x.opcode != "NOP" for x in instrs[child[0] : child[1] + 1])
        inner.append(dict(instructions=size, trips=trips))
    static: dict[str, int] = {}
    weighted: dict[str, int] = {}
    for instr, w in zip(instrs[begin : end + 1], weight, strict=True):
        if instr.opcode == "NOP":
            continue
        static[instr.opcode] = static.get(instr.opcode, 0) + 1
        weighted[instr.opcode] = weighted.get(instr.opcode, 0) + w

    def mma(counts):
        return sum(n for op, n in counts.items() if op in aot.MMA_OPCODES)

    def local(counts):
        return counts.get("LDL", 0) + counts.get("STL", 0)

    return dict(
        loop_instructions=sum(static.values()),
        loop_mma=mma(static),
        loop_local=local(static),
        inner_loops=inner,
        iter_instructions=sum(weighted.values()),
        iter_mma=mma(weighted),
        iter_local=local(weighted),
        iter_top_opcodes=aot.top_opcodes(weighted, 8),
    )


def weighted_hot_loop(sass: str, threads: int | None) -> dict:
    """The hot loop of one kernel's SASS (``aot.hot_loop``): its static mix (as ``aot.hot_loop_mix``)
    and the counts per iteration with each loop directly inside it weighted by ``loop_trips``.
    ``other_sweeps``: instructions per iteration of the other loops with as many MMAs, outside the
    hot one (e.g. a masked sweep beside a mask-free one: the hot loop is the shortest)."""
    instrs, loops = aot.parse_sass(sass)
    hot = aot.hot_loop(instrs, loops)
    result = _weighted_loop(instrs, loops, hot, threads)

    def disjoint(a, b):
        return a[1] < b[0] or b[1] < a[0]

    peers = [
        s
        for s in loops
        if s != hot
        and disjoint(s, hot)
        and sum(i.opcode in aot.MMA_OPCODES for i in instrs[s[0] : s[1] + 1]) == result["loop_mma"]
    ]
    # a peer nested in another peer is the same sweep's inner loop: keep the outermost
    peers = [s for s in peers if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in peers)]
    result["other_sweeps"] = [_weighted_loop(instrs, loops, s, threads)["iter_instructions"] for s in peers]
    return result


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_\w+'")


def parse_ptxas(text: str) -> dict[str, dict]:
    """``ptxas -v`` output as {mangled kernel: {registers, smem, stack, spill_stores, spill_loads}}."""
    report: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            report[current] = dict(registers=None, smem=0, stack=0, spill_stores=None, spill_loads=None)
        elif current is None:
            continue
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            report[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            report[current]["registers"] = int(m[1])
            if s := re.search(r"(\d+) bytes smem", line):
                report[current]["smem"] = int(s[1])
    return report


def _split_template_args(text: str) -> list[str]:
    args, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += (ch in "<(") - (ch in ">)")
        cur += ch
    return [*args, cur.strip()] if cur.strip() else args


def kernel_label(demangled: str) -> dict:
    """Readable parts of a demangled kernel name. An attention kernel ``attn_<pass>_kernel<DT, D,
    EXTRA, DROPOUT, ...>``, e.g. ``void ringattn::(anonymous namespace)::attn_forward_kernel<1, 128,
    false, false>(...)``, gives pass "forward", dtype "bf16", head-dim tile 128 and variant "plain"
    (EXTRA: "extra", EXTRA + DROPOUT: "extra+dropout"); further template arguments are appended to
    the variant as ``argN=value``. Any other kernel keeps its name and template arguments."""
    m = re.search(r"(\w+)<(.*)>\(", demangled) or re.search(r"(\w+)\(", demangled)
    function = m.group(1) if m else demangled
    args = _split_template_args(m.group(2)) if m and m.lastindex == 2 else []
    info = dict(function=function)
    attn = re.fullmatch(r"attn_(\w+)_kernel", function)
    if attn and len(args) >= 4 and args[1].isdigit() and {args[2], args[3]} <= {"true", "false"}:
        extra, dropout = args[2] == "true", args[3] == "true"
        variant = (
            "extra+dropout" if extra and dropout else "extra" if extra else "dropout" if dropout else "plain"
        )
        info.update(
            pass_=attn.group(1),
            dtype=_DTYPES.get(args[0], f"dtype{args[0]}"),
            head_dim=int(args[1]),
            variant=" ".join([variant, *(f"arg{i}={a}" for i, a in enumerate(args[4:], start=4))]),
        )
        info["label"] = f"{info['pass_']} {info['dtype']} D={info['head_dim']} {info['variant']}"
    else:
        info["label"] = f"{function}<{', '.join(args)}>" if args else function
    return info


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, res.stdout.splitlines(), strict=True))


def _sections(sass: str) -> tuple[dict[str, str], dict[str, int]]:
    """nvdisasm output split into {kernel: text section} and {kernel: EIATTR_MAX_THREADS x}."""
    parts = re.split(r"^//-+ \.(text|nv\.info)\.(\S+)\s+-+$", sass, flags=re.M)  # short names: padded
    text, threads = {}, {}
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        if kind == "text":
            text[name] = body
        elif m := re.search(r"EIATTR_MAX_THREADS.*?\.word\s+(0x[0-9a-f]+)", body, re.S):
            threads[name] = int(m.group(1), 16)
    return text, threads


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:3])} ...): {res.stderr[-3000:]}")
    return res


def compile_source(source: Path, arch: str, workdir: Path, include: Path | None = None) -> dict:
    """Compile ``source`` for ``arch``; returns ptxas text, SASS, and the dynamic shared memory table
    (None with ``dynamic_smem_error`` when the host query cannot be built or run)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    include = include or source.parent
    obj = workdir / "attn_cuda.o"
    cmd = [nvcc, *COMPILE_FLAGS, f"-arch={arch}", "-Xptxas", "-v", f"-I{include}", "-c", str(source)]
    res = _run([*cmd, "-o", str(obj), "-keep", "-keep-dir", str(workdir)], "nvcc")
    cubins = sorted(workdir.glob(f"*.{arch}.cubin"))
    if len(cubins) != 1:
        raise RuntimeError(f"expected one {arch} cubin from nvcc -keep, found {[c.name for c in cubins]}")
    sass = _run([aot.nvidia_tool("nvdisasm"), str(cubins[0])], "nvdisasm").stdout
    out = dict(ptxas=res.stdout + res.stderr, sass=sass, dynamic_smem=None, dynamic_smem_error=None)
    probe = workdir / "smem_probe.cpp"
    probe.write_text(
        '#include <cstdio>\n#include "attn_cuda.h"\n'
        "int main() {\n  for (const auto& [name, bytes] : ringattn::attn_cuda_smem_bytes())\n"
        '    std::printf("%s %zu\\n", name.c_str(), bytes);\n}\n'
    )
    try:
        exe = workdir / "smem_probe"
        _run([nvcc, "-std=c++17", f"-I{include}", str(probe), str(obj), "-o", str(exe)], "smem probe build")
        lines = _run([str(exe)], "smem probe").stdout.split()
        out["dynamic_smem"] = {k: int(v) for k, v in zip(lines[::2], lines[1::2], strict=True)}
    except RuntimeError as err:  # the extension's table is gone or renamed: report without it
        out["dynamic_smem_error"] = str(err)[:300]
    return out


def analyze(compiled: dict, arch: str, mix: bool = True) -> list[dict]:
    """One row per kernel whose hot loop has MMAs (the attention kernels; elementwise ones are left
    out), the ``mix`` columns only with ``mix``."""
    ptxas = parse_ptxas(compiled["ptxas"])
    text, threads = _sections(compiled["sass"])
    names = _demangle(sorted(ptxas))
    dynamic = compiled["dynamic_smem"] or {}
    rows = []
    for mangled, usage in ptxas.items():
        if mangled not in text or not aot.parse_sass(text[mangled])[1]:
            continue
        loop = weighted_hot_loop(text[mangled], threads.get(mangled))
        if not loop["loop_mma"]:
            continue
        info = kernel_label(names[mangled])
        row = dict(
            kernel=info["label"],
            mangled=mangled,
            arch=arch,
            function=info["function"],
            dtype=info.get("dtype", "-"),
            head_dim=info.get("head_dim", 0),
            variant=info.get("variant", ""),
            threads=threads.get(mangled),
            **usage,
        )
        row["pass"] = info.get("pass_", info["function"])
        row["dynamic_smem"] = dyn = dynamic.get(f"{row['pass']}_d{row['head_dim']}")
        if arch == "sm_89" and row["threads"]:
            warps = row["threads"] // 32
            row["occupancy_warps"] = aot.occupancy(usage["registers"], usage["smem"] + (dyn or 0), warps)[0]
        if mix:
            row.update(loop)
            if arch == "sm_89":
                model = aot.issue_model_sm89(row["iter_mma"], row["iter_instructions"])
                row.update(
                    mma_cycles=round(model["mma_cycles"]),
                    issue_cycles=row["iter_instructions"],
                    bound=model["bound"],
                    tensor_share=round(model["mma_cycles"] / model["modeled_cycles"], 2),
                )
        rows.append(row)
    passes, variants = ["forward", "backward", "backward_dq"], ["plain", "extra", "extra+dropout"]

    def key(r):
        v = (r["variant"].split() or [""])[0]
        p = passes.index(r["pass"]) if r["pass"] in passes else len(passes)
        return (
            p,
            r["pass"],
            r["dtype"],
            r["head_dim"],
            variants.index(v) if v in variants else 9,
            r["variant"],
        )

    return sorted(rows, key=key)


# One line per column of the markdown table (as the benchmark tables explain theirs).
COLUMNS = {
    "kernel": "pass, dtype, head-dim tile, variant (plain; extra = window/softcap/ALiBi; +dropout)",
    "regs": "registers per thread (ptxas)",
    "smem": "shared memory per CTA, static + dynamic bytes (ptxas + attn_cuda_smem_bytes())",
    "stack/spill": "stack frame bytes / spill store + load bytes (ptxas)",
    "warps/SM": "resident warps per SM on sm_89 from registers, shared memory and threads per CTA",
    "loop": "hot loop's static instructions / MMAs (each instruction once, as the Triton --mix)",
    "inner loops": "loops directly inside the hot loop, instructions x trips per iteration (? = unknown, once)",
    "instr/iter": "instructions one warp issues per hot-loop iteration, inner loops weighted by trips",
    "other sweeps": "instr/iter of other loops with as many MMAs (e.g. masked tiles beside the mask-free hot loop)",
    "MMA/iter": "m16n8k16 MMAs per warp per iteration",
    "MMA cyc": "MMA/iter x MMA_CYCLES_SM89 (tensor-core cycles of the warp's sub-partition)",
    "bound": "tensor when MMA cycles >= issue cycles (= instr/iter), else issue",
    "TC share": "MMA cycles / max(MMA cycles, issue cycles): modeled tensor-core busy fraction",
    "local": "local-memory loads + stores per iteration (weighted)",
    "top opcodes": "most issued opcodes per iteration (weighted)",
}


def report(rows: list[dict], header: str) -> str:
    """Markdown: the header, one line per column, then the table; every number MODELED."""
    lines = [header, ""] + [f"- {name}: {meaning}" for name, meaning in COLUMNS.items()] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        inner = " + ".join(
            f"{i['instructions']}x{i['trips'] if i['trips'] else '?'}" for i in r.get("inner_loops", [])
        )
        dyn = "?" if r["dynamic_smem"] is None else r["dynamic_smem"]
        cells = [
            r["kernel"],
            r["registers"],
            f"{r['smem']}+{dyn}",
            f"{r['stack']}/{r['spill_stores'] + r['spill_loads']}",
            r.get("occupancy_warps", "-"),
            f"{r['loop_instructions']}/{r['loop_mma']}" if "loop_mma" in r else "-",
            inner or "-",
            r.get("iter_instructions", "-"),
            " ".join(str(n) for n in r.get("other_sweeps", [])) or "-",
            r.get("iter_mma", "-"),
            r.get("mma_cycles", "-"),
            r.get("bound", "-"),
            r.get("tensor_share", "-"),
            r.get("iter_local", "-"),
            " ".join(f"{k} {v}" for k, v in r.get("iter_top_opcodes", {}).items()) or "-",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---- RoPE rotation cost (--rope) -------------------------------------------------------------

# The probe translation unit: attn_math.h's rotation as rope_pair_apply calls it (rope_turns ->
# sincos_turns -> rope_rotate), in a grid-stride loop over the feature pairs of 128-wide rows (one
# pair per trip: unroll 1). Mode "none" loads and stores the same pair without rotating it: the
# baseline. Positions and frequencies are read from global memory for every pair and the scale is a
# kernel parameter, as in the real kernels, so only the loop-invariant scale x coefficient products
# leave the loop (they do in the real kernels too). io "bf16": a bf16 pair rotated to bf16 (load_rows,
# rotate_rows_kernel); io "fp32": an fp32 pair, transposed (sign -1), to bf16 (finish_grad_kernel).
ROPE_MODES = {"none": "kRopeNone", "exact": "kRopeExact", "hf": "kRopeHf"}
ROPE_IO = {"bf16": "false", "fp32": "true"}
ROPE_PAIRS = 64  # rotary pairs per row: head dim 128, rotary_dim = head dim (Llama-3-8B)

_ROPE_PROBE = """\
// Generated by python -m ringattn.bench.cuda_aot --rope: RoPE rotation cost probes (not shipped).
#include "attn_math.h"
using namespace ringattn;

template <int MODE, bool F32>
__device__ __forceinline__ void probe(const void* __restrict__ x, uint16_t* __restrict__ y,
                                      const int32_t* __restrict__ positions, const void* __restrict__ freqs,
                                      float scale, int rows) {
  constexpr int kPairs = %(pairs)d;
#pragma unroll 1
  for (int item = blockIdx.x * blockDim.x + threadIdx.x; item < rows * kPairs; item += gridDim.x * blockDim.x) {
    const int row = item / kPairs, i = item %% kPairs;
    int ea, eb;
    rope_pair(i, 2 * kPairs, false, &ea, &eb);
    const int at = row * 2 * kPairs;
    float xa, xb;
    if constexpr (F32) {
      xa = static_cast<const float*>(x)[at + ea];
      xb = static_cast<const float*>(x)[at + eb];
    } else {
      xa = bf16_to_float(static_cast<const uint16_t*>(x)[at + ea]);
      xb = bf16_to_float(static_cast<const uint16_t*>(x)[at + eb]);
    }
    if constexpr (MODE != kRopeNone) {
      const uint32_t pos = static_cast<uint32_t>(positions[row]);
      float sn, cs;
      sincos_turns(rope_turns(MODE, pos, freqs, i), scale, &sn, &cs);
      rope_rotate(xa, xb, cs, F32 ? -sn : sn, &xa, &xb);
    }
    y[at + ea] = float_to_bf16(xa);
    y[at + eb] = float_to_bf16(xb);
  }
}
"""
_ROPE_KERNEL = """
extern "C" __global__ void rope_probe_%(mode)s_%(io)s(const void* x, uint16_t* y, const int32_t* positions,
                                                     const void* freqs, float scale, int rows) {
  probe<%(enum)s, %(f32)s>(x, y, positions, freqs, scale, rows);
}
"""


def rope_probe_source() -> str:
    """The probe translation unit: one kernel ``rope_probe_<mode>_<io>`` per mode and io."""
    kernels = [
        _ROPE_KERNEL % dict(mode=mode, io=io, enum=enum, f32=f32)
        for io, f32 in ROPE_IO.items()
        for mode, enum in ROPE_MODES.items()
    ]
    return _ROPE_PROBE % dict(pairs=ROPE_PAIRS) + "".join(kernels)


def _labels(sass: str) -> dict[str, int]:
    """Label -> index of the instruction after it, counted as ``aot.parse_sass`` counts them."""
    labels, count = {}, 0
    for line in sass.splitlines():
        if label := aot._SASS_LABEL.match(line.strip()):
            labels[label.group(1)] = count
        elif aot._SASS_INSTR.search(line):
            count += 1
    return labels


def trip_paths(instrs: list[aot.SassInstr], span: tuple[int, int], labels: dict[str, int]) -> dict:
    """Instructions (NOPs excluded) on the shortest and the longest path through one trip of the loop
    ``span``, from its label to its back branch, over the forward branches inside it (a guarded branch
    may fall through; an unguarded ``EXIT`` ends a path), and ``paths``: every distinct length. The
    static count runs every arm of every branch once; one trip runs one path, so it issues at most
    ``longest``. ``leaves``: branches to code outside the span, ``calls``: ``CALL`` instructions (their
    targets are not counted); backward branches inside the span (nested loops) count as not taken,
    i.e. inner loops once."""
    begin, end = span
    lengths: list[set[int]] = [set() for _ in range(end + 1 - begin)]  # path lengths from each instruction
    leaves = calls = 0
    for j in range(end, begin - 1, -1):
        instr, k = instrs[j], j - begin
        weight = int(instr.opcode != "NOP")
        calls += instr.opcode == "CALL"
        if j == end:
            lengths[k] = {weight}
            continue
        successors = []
        if instr.opcode == "BRA":
            target = re.search(r"`\((\.L_x_\d+)\)", instr.operands)
            index = labels.get(target.group(1)) if target else None
            if index is not None and j < index <= end:
                successors.append(index - begin)
            elif index is None or index < begin or index > end:
                leaves += 1
            if instr.guard:
                successors.append(k + 1)
        elif not (instr.opcode == "EXIT" and not instr.guard):
            successors.append(k + 1)
        lengths[k] = {weight + n for s in successors for n in lengths[s]}
    if not lengths[0]:
        raise ValueError(f"no path through the loop {span}")
    return dict(
        shortest=min(lengths[0]),
        longest=max(lengths[0]),
        paths=sorted(lengths[0]),
        leaves=leaves,
        calls=calls,
    )


def loop_summary(sass: str, span: tuple[int, int] | None = None) -> dict:
    """One kernel's loop (``span``, default: its outermost, i.e. longest, loop): static instructions
    (NOPs excluded), opcode counts, and ``trip_paths``."""
    instrs, loops = aot.parse_sass(sass)
    if span is None:
        if not loops:
            raise ValueError("no loop (backward branch) in the SASS")
        span = max(loops, key=lambda s: s[1] - s[0])
    opcodes: dict[str, int] = {}
    for instr in instrs[span[0] : span[1] + 1]:
        if instr.opcode != "NOP":
            opcodes[instr.opcode] = opcodes.get(instr.opcode, 0) + 1
    inner = sum(1 for s in loops if s != span and span[0] <= s[0] and s[1] <= span[1])
    return dict(
        instructions=sum(opcodes.values()),
        opcodes=opcodes,
        inner_loops=inner,
        **trip_paths(instrs, span, _labels(sass)),
    )


def _opcode_difference(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """a - b per opcode, nonzero ones, largest magnitude first."""
    diff = {op: a.get(op, 0) - b.get(op, 0) for op in {*a, *b}}
    return dict(sorted(((op, n) for op, n in diff.items() if n), key=lambda kv: (-abs(kv[1]), kv[0])))


def rope_costs(sass: str, ptxas: str) -> list[dict]:
    """Per probe kernel of ``rope_probe_source`` (SASS and ``ptxas -v`` text of its compile): the loop
    (one trip = one pair), its stack frame and spills, and for exact and hf the difference from the
    baseline of the same io: the rotation's instructions per pair (longest paths; the static counts
    beside them), per element (/ 2) and its opcode mix."""
    usage = parse_ptxas(ptxas)
    text, _ = _sections(sass)
    rows = {}
    for io in ROPE_IO:
        for mode in ROPE_MODES:
            name = f"rope_probe_{mode}_{io}"
            if name not in text or name not in usage:
                raise RuntimeError(f"probe kernel {name} missing from the compiled SASS / ptxas report")
            loop = loop_summary(text[name])
            if loop["inner_loops"] or loop["leaves"] or loop["calls"]:  # one pair per trip, nothing hidden
                raise RuntimeError(f"{name}: unexpected loop structure {loop}")
            rows[name] = dict(kernel=name, mode=mode, io=io, **usage[name], **loop)
            if mode != "none":
                base = rows[f"rope_probe_none_{io}"]
                pair = loop["longest"] - base["longest"]
                rows[name].update(
                    pair=pair,
                    element=pair / 2,
                    pair_static=loop["instructions"] - base["instructions"],
                    difference=_opcode_difference(loop["opcodes"], base["opcodes"]),
                )
    return list(rows.values())


def compile_rope_probe(arch: str, workdir: Path, include: Path | None = None) -> dict:
    """Compile ``rope_probe_source()`` for ``arch`` (nvcc as ``compile_source``, straight to a cubin);
    returns its ptxas text and SASS."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    source, cubin = workdir / "rope_probe.cu", workdir / "rope_probe.cubin"
    source.write_text(rope_probe_source())
    include = include or ROOT / "csrc"
    cmd = [nvcc, *COMPILE_FLAGS, f"-arch={arch}", "-Xptxas", "-v", f"-I{include}", "-cubin", str(source)]
    res = _run([*cmd, "-o", str(cubin)], "nvcc (RoPE probe)")
    sass = _run([aot.nvidia_tool("nvdisasm"), str(cubin)], "nvdisasm").stdout
    return dict(ptxas=res.stdout + res.stderr, sass=sass)


def real_rope_loops(compiled: dict) -> list[dict]:
    """The real kernels' RoPE loops in a ``compile_source`` result: ``rotate_rows_kernel<1>`` and
    ``finish_grad_kernel<1>`` (bf16), each a grid-stride loop over feature pairs holding both modes'
    rope_turns behind the runtime mode test (and the pass-through pairs' path)."""
    text, _ = _sections(compiled["sass"])
    usage = parse_ptxas(compiled["ptxas"])
    rows = []
    for mangled, demangled in _demangle(sorted(text)).items():
        function = kernel_label(demangled)["label"]
        if function in ("rotate_rows_kernel<1>", "finish_grad_kernel<1>"):
            rows.append(dict(kernel=function, **usage.get(mangled, {}), **loop_summary(text[mangled])))
    return sorted(rows, key=lambda r: r["kernel"], reverse=True)


# The reference shape of the share model: Llama-3-8B attention on one GPU, batch 1, causal, bf16.
ROPE_SHAPE = dict(batch=1, heads_q=32, heads_kv=8, head_dim=128)
# csrc/attn_cuda.cu at head dim 128: FwdTiles<128> (64 query rows per CTA, 32-key tiles, 4 warps)
# and BwdTiles<128> (64 keys per CTA, 32-query steps over the group's query heads, 4 warps, 1 split).
ROPE_TILES = dict(fwd_rows=64, fwd_keys=32, bwd_keys=64, bwd_rows=32, warps=4)
# sm_89 (L40S: 142 SMs of 4 sub-partitions at 2.52 GHz boost, as aot.MMA_CYCLES_SM89 assumes; 864 GB/s GDDR6).
SM89_SUBPARTITIONS, SM89_CLOCK, SM89_DRAM_BYTES_S = 142 * 4, 2.52e9, 864e9

ROPE_FORMULA = """\
T_fwd = B Hq W sum_{qt < S/64} ceil((qt + 1) 64 / 32) x max(MMA cyc, instr/iter) of the forward's hot loop
T_bwd = B Hkv W G sum_{kt < S/64} ceil((S - 64 kt) / 32) x max(MMA cyc, instr/iter) of the backward's
  (causal tiles only; W = 4 warps per CTA, G = Hq / Hkv; cycles of one SM sub-partition)
R_fwd = B S P (Hq c + Hkv c) / 32          Q rotated at load + K by rotate_rows
R_bwd = B S P (Hq c + Hkv c + (Hq + Hkv) c_T) / 32   Q by rotate_rows + K at load + dQ, dK transposed
  (P = 64 pairs per row; c, c_T = the probe's rotation instructions per pair, bf16 / fp32 io;
   one warp instruction rotates 32 pairs and issues in one cycle of its sub-partition)
share fwd = R_fwd / (T_fwd + R_fwd); share fwd+bwd = (R_fwd + R_bwd) / (T_fwd + T_bwd + R_fwd + R_bwd)
rotate passes whole: time of each pass = max(rows P c_pass / 32 / (142 x 4 x 2.52 GHz), 2 rows D 2 B / 864 GB/s)
  (c_pass = rotate_rows_kernel's longest path per pair; it replaces that pass's rows in R)"""


def _causal_steps(seqlen: int, tile: int, step: int, from_end: bool) -> int:
    """Sum over the CTAs' tiles (``tile`` rows each) of the causal steps (``step`` rows each) a CTA
    visits: the forward's key tiles up to its last query, the backward's query steps from its first key."""
    tiles = -(-seqlen // tile)
    if from_end:
        return sum(-(-(seqlen - t * tile) // step) for t in range(tiles))
    return sum(-(-min((t + 1) * tile, seqlen) // step) for t in range(tiles))


def rope_share(
    seqlen: int, fwd_cycles: float, bwd_cycles: float, c: float, c_t: float, c_pass: float
) -> dict:
    """The modeled share of the RoPE rotation in causal attention time at ``ROPE_SHAPE`` and
    ``seqlen`` (ROPE_FORMULA): ``fwd_cycles`` / ``bwd_cycles`` per warp per hot-loop iteration, ``c`` /
    ``c_t`` the rotation's instructions per pair (bf16 / fp32 io), ``c_pass`` a rotate pass's per pair.
    Cycles are sub-partition cycles; times are seconds at the full chip. MODELED."""
    b, hq, hkv, d = (ROPE_SHAPE[k] for k in ("batch", "heads_q", "heads_kv", "head_dim"))
    t, pairs, per_s = ROPE_TILES, d // 2, SM89_SUBPARTITIONS * SM89_CLOCK
    attn_fwd = b * hq * t["warps"] * _causal_steps(seqlen, t["fwd_rows"], t["fwd_keys"], False) * fwd_cycles
    attn_bwd = b * hkv * t["warps"] * (hq // hkv) * _causal_steps(seqlen, t["bwd_keys"], t["bwd_rows"], True)
    attn_bwd *= bwd_cycles
    q_rows, k_rows = b * seqlen * hq, b * seqlen * hkv
    fwd_load, fwd_pass = q_rows * pairs * c / 32, k_rows * pairs * c / 32
    bwd_in = (k_rows * c + (q_rows + k_rows) * c_t) * pairs / 32
    bwd_pass = q_rows * pairs * c / 32
    rot_fwd, rot_bwd = fwd_load + fwd_pass, bwd_in + bwd_pass

    def pass_time(rows):  # a whole rotate pass: issue or its DRAM traffic (read + write, bf16), the longer
        return max(rows * pairs * c_pass / 32 / per_s, 2 * rows * d * 2 / SM89_DRAM_BYTES_S)

    # Each tensor read or written once in bf16: forward Q, K, V, O; backward Q, K, V, dO, dQ, dK, dV
    # (the fp32 dQ / dK workspaces and dQ's atomics not counted: a lower bound of the kernels' bytes).
    fwd_bytes, bwd_bytes = 2 * b * seqlen * d * (2 * hq + 2 * hkv), 2 * b * seqlen * d * (3 * hq + 4 * hkv)
    whole_fwd = fwd_load / per_s + pass_time(k_rows)
    whole_bwd = bwd_in / per_s + pass_time(q_rows)
    t_fwd, t_bwd = attn_fwd / per_s, attn_bwd / per_s
    return dict(
        seqlen=seqlen,
        attn_fwd_cycles=attn_fwd,
        attn_bwd_cycles=attn_bwd,
        attn_fwd_ms=t_fwd * 1e3,
        attn_bwd_ms=t_bwd * 1e3,
        rot_fwd_cycles=rot_fwd,
        rot_bwd_cycles=rot_bwd,
        share_fwd=rot_fwd / (attn_fwd + rot_fwd),
        share_fwd_bwd=(rot_fwd + rot_bwd) / (attn_fwd + attn_bwd + rot_fwd + rot_bwd),
        pass_fwd_bytes=2 * k_rows * d * 2,
        pass_bwd_bytes=2 * q_rows * d * 2,
        fwd_kernel_bytes=fwd_bytes,
        bwd_kernel_bytes=bwd_bytes,
        pass_fwd_us=pass_time(k_rows) * 1e6,
        pass_bwd_us=pass_time(q_rows) * 1e6,
        whole_share_fwd=whole_fwd / (t_fwd + whole_fwd),
        whole_share_fwd_bwd=(whole_fwd + whole_bwd) / (t_fwd + t_bwd + whole_fwd + whole_bwd),
    )


def rope_report(probes: list[dict], real: list[dict], shares: list[dict], header: str) -> str:
    """Markdown: the probes' loops and rotation cost per mode, the real loops beside them, then the
    share model with its formula; every number MODELED."""
    lines = [
        header,
        "",
        "Probe loops (one trip = one feature pair; instructions per trip, NOPs excluded):",
        "",
    ]
    lines.append(
        "| probe | regs | stack/spill | static | paths per trip | rotation per pair | per element | "
        "static difference | difference mix |"
    )
    lines.append("|" + "---|" * 9)
    for r in probes:
        paths = (
            str(r["longest"])
            if len(r["paths"]) == 1
            else f"{r['shortest']}..{r['longest']} ({len(r['paths'])})"
        )
        mix = " ".join(f"{op} {n:+d}" for op, n in r.get("difference", {}).items()) or "-"
        cells = [
            r["kernel"],
            r["registers"],
            f"{r['stack']}/{r['spill_stores'] + r['spill_loads']}",
            r["instructions"],
            paths,
            r.get("pair", "-"),
            r.get("element", "-"),
            r.get("pair_static", "-"),
            mix,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "- paths per trip: instructions on one trip's path, shortest..longest (distinct lengths) where it branches",
        "- rotation per pair: longest path minus the baseline's (same io); per element: / 2",
        "- static difference: static instructions (every branch arm once) minus the baseline's",
    ]
    if real:
        lines += [
            "",
            "Real loops (csrc/attn_cuda.cu; both modes' rope_turns and the pass-through pairs inside):",
            "",
        ]
        lines.append("| kernel | regs | stack/spill | static | paths per trip | calls | FFMA | I2F+I2FP |")
        lines.append("|" + "---|" * 8)
        for r in real:
            ops = r["opcodes"]
            cells = [
                r["kernel"],
                r.get("registers", "?"),
                f"{r.get('stack', '?')}/{r.get('spill_stores', 0) + r.get('spill_loads', 0)}",
                r["instructions"],
                f"{r['shortest']}..{r['longest']}",
                r["calls"],
                ops.get("FFMA", 0),
                ops.get("I2F", 0) + ops.get("I2FP", 0),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if shares:
        b, hq, hkv, d = (ROPE_SHAPE[k] for k in ("batch", "heads_q", "heads_kv", "head_dim"))
        lines += [
            "",
            f"Share of the rotation, causal bf16 B={b} Hq={hq} Hkv={hkv} D={d} on one sm_89 (MODELED):",
            "",
            "```",
            ROPE_FORMULA,
            "```",
            "",
            "| mode | S | c / c_T / c_pass | attn fwd / bwd ms | rotation share fwd | fwd+bwd | rotate pass "
            "bytes fwd / bwd (kernel bytes) | pass fwd / bwd us | share with whole passes fwd | fwd+bwd |",
        ]
        lines.append("|" + "---|" * 10)
        for r in shares:
            cells = [
                r["mode"],
                r["seqlen"],
                f"{r['c']} / {r['c_t']} / {r['c_pass']}",
                f"{r['attn_fwd_ms']:.3f} / {r['attn_bwd_ms']:.3f}",
                f"{100 * r['share_fwd']:.2f}%",
                f"{100 * r['share_fwd_bwd']:.2f}%",
                f"{r['pass_fwd_bytes'] / 1e6:.1f} / {r['pass_bwd_bytes'] / 1e6:.1f} MB "
                f"({r['fwd_kernel_bytes'] / 1e6:.0f} / {r['bwd_kernel_bytes'] / 1e6:.0f} MB)",
                f"{r['pass_fwd_us']:.1f} / {r['pass_bwd_us']:.1f}",
                f"{100 * r['whole_share_fwd']:.2f}%",
                f"{100 * r['whole_share_fwd_bwd']:.2f}%",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _describe_source(source: Path, rev: str | None) -> str:
    def git(*args):
        res = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
        return res.stdout.strip() if res.returncode == 0 else None

    if rev:
        return f"csrc at commit {git('rev-parse', '--short=12', rev) or rev}"
    head = git("rev-parse", "--short=12", "HEAD")
    try:
        rel = source.resolve().relative_to(ROOT)
    except ValueError:
        return f"{source} (outside the repository)"
    dirty = git("status", "--porcelain", "--", str(rel.parent))
    return f"{rel} at commit {head}" + (" + uncommitted changes in its directory" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ringattn.bench.cuda_aot", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--arch", default="sm_89", help="nvcc arch (the issue model and occupancy: sm_89 only)"
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT / "csrc" / "attn_cuda.cu",
        help="default: the checkout's csrc/attn_cuda.cu",
    )
    parser.add_argument("--rev", default=None, help="git revision: analyze csrc/ as committed there")
    parser.add_argument("--mix", action="store_true", help="add the hot loop's SASS mix and the sm_89 model")
    parser.add_argument("--dtype", nargs="*", default=["bf16"], help="dtypes to list (bf16, fp16)")
    parser.add_argument("--head-dim", type=int, nargs="*", default=None, help="head-dim tiles to list")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the markdown table")
    parser.add_argument(
        "--rope",
        action="store_true",
        help="RoPE rotation cost per pair / element (probe kernels on csrc/attn_math.h), the real rotation "
        "loops, and the rotation's modeled share of attention time (sm_89)",
    )
    parser.add_argument(
        "--seqlen",
        type=int,
        nargs="*",
        default=[8192, 32768],
        help="--rope: sequence lengths of the share model",
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        parser.error(f"--arch must look like sm_89, got {args.arch!r}")
    if any(s <= 0 for s in args.seqlen):
        parser.error(f"--seqlen must be positive, got {args.seqlen}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.source
        if args.rev:
            archive = subprocess.run(
                ["git", "archive", args.rev, "csrc"], capture_output=True, cwd=ROOT, check=False
            )
            if archive.returncode:
                parser.error(f"--rev {args.rev!r}: {archive.stderr.decode()[-300:]}")
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
            source = tmp / "csrc" / "attn_cuda.cu"
        elif not source.is_file():
            parser.error(f"--source {source}: no such file")
        build = tmp / "build"
        build.mkdir()
        compiled = compile_source(source, args.arch, build)
        if args.rope:
            (tmp / "rope").mkdir()
            probe = compile_rope_probe(args.arch, tmp / "rope", include=source.parent)
    rows = [
        r
        for r in analyze(compiled, args.arch, mix=args.mix)
        if r["dtype"] in (*args.dtype, "-") and (args.head_dim is None or r["head_dim"] in args.head_dim)
    ]
    described = _describe_source(args.source, args.rev)
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=False).stdout
    release = re.search(r"release ([\d.]+)", nvcc)
    header = (
        f"MODELED (static SASS issue model, not measured; no GPU ran): {described}, {args.arch}, "
        f"nvcc {release.group(1) if release else '?'} {' '.join(COMPILE_FLAGS)}"
    )
    if compiled["dynamic_smem_error"]:
        header += f"; dynamic shared memory unknown ({compiled['dynamic_smem_error'][:120]})"
    if args.rope:
        return _rope_main(args, compiled, probe, header, described)
    if args.json:
        for row in rows:
            print(json.dumps(dict(row, source=described, modeled=True)))
    else:
        print(report(rows, header), end="")
    return 0


def _rope_main(args, compiled: dict, probe: dict, header: str, described: str) -> int:
    probes = rope_costs(probe["sass"], probe["ptxas"])
    real = real_rope_loops(compiled)
    shares = []
    if args.arch == "sm_89":  # the issue model's constants are sm_89's
        cycles = {}
        for r in analyze(compiled, args.arch, mix=True):
            if r["dtype"] == "bf16" and r["head_dim"] == 128 and r["variant"] == "plain":
                cycles[r["pass"]] = max(r["mma_cycles"], r["iter_instructions"])
        passes = [r["longest"] for r in real if r["kernel"].startswith("rotate_rows")]
        if {"forward", "backward"} <= set(cycles) and passes:
            cost = {(r["mode"], r["io"]): r["pair"] for r in probes if "pair" in r}
            for mode in ("exact", "hf"):
                c, c_t = cost[(mode, "bf16")], cost[(mode, "fp32")]
                for seqlen in args.seqlen:
                    share = rope_share(seqlen, cycles["forward"], cycles["backward"], c, c_t, passes[0])
                    shares.append(dict(mode=mode, c=c, c_t=c_t, c_pass=passes[0], **share))
            header += (
                f"; hot loops per warp iteration: forward {cycles['forward']}, backward {cycles['backward']} "
                "cycles (max(MMA cyc, instr/iter), bf16 D=128 plain, --mix)"
            )
        else:
            header += "; share model skipped: the D=128 bf16 plain hot loops or rotate_rows_kernel not found"
    else:
        header += "; share model: sm_89 only"
    if args.json:
        for section, rows in (("probe", probes), ("real", real), ("share", shares)):
            for row in rows:
                print(json.dumps(dict(row, section=section, source=described, modeled=True)))
    else:
        print(rope_report(probes, real, shares, header), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
