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

__all__ = ["loop_trips", "weighted_hot_loop", "parse_ptxas", "kernel_label", "analyze", "report", "main"]

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
    parts = re.split(r"^//-+ \.(text|nv\.info)\.(\S+) -+$", sass, flags=re.M)
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
    passes, variants = ["forward", "backward"], ["plain", "extra", "extra+dropout"]

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
    args = parser.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        parser.error(f"--arch must look like sm_89, got {args.arch!r}")
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
    if args.json:
        for row in rows:
            print(json.dumps(dict(row, source=described, modeled=True)))
    else:
        print(report(rows, header), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
