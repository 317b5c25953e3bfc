"""Ahead-of-time compile of the attention kernels for a GPU arch, on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` produces PTX and the shared
memory size; ``ptxas -v`` on that PTX gives registers and spills. Run in a process where
TRITON_INTERPRET is unset (the interpreter replaces @triton.jit functions), e.g.
``python -m tritonkernels.aot`` which prints one JSON line per shipped config.

``--mix`` adds the instruction mix of each kernel's hot loop from its SASS (``nvdisasm``) and, on
sm_89, a static issue model of one loop iteration: a warp issues at most one instruction per cycle,
and its sub-partition's tensor core takes ``MMA_CYCLES_SM89`` cycles per m16n8k16 MMA, so an
iteration takes at least max(MMA cycles, instructions) — tensor-bound or issue-bound. It ignores
latency and memory stalls: a MODELED lower bound for comparing variants, not a GPU timing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

from .configs import AUX_KERNELS, CONFIGS, KERNELS, SHARED_LIMIT, KernelConfig

__all__ = [
    "compile_kernel",
    "occupancy",
    "hot_loop_mix",
    "parse_sass",
    "hot_loop",
    "issue_model_sm89",
    "nvidia_tool",
    "main",
]

# L40S: 362e12 bf16 FLOP/s (the datasheet's dense bf16 tensor rate, fp32 accumulate) over 142 SMs x 4
# sub-partitions at the 2.52 GHz boost clock = 126.5 MAC per cycle per sub-partition; one m16n8k16
# MMA is 2048 MACs.
MMA_CYCLES_SM89 = 2048 / (362e12 / 2 / (142 * 4 * 2.52e9))

_DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(kernel: str, dtype: str, exact: bool):
    from . import flash_kernels as fk
    from . import rope as rk

    fn = {
        "fwd": fk.flash_fwd_kernel,
        "bwd_dq": fk.flash_bwd_dq_kernel,
        "bwd_dkdv": fk.flash_bwd_dkdv_kernel,
        "delta": fk.flash_bwd_delta_kernel,
        "rope": rk.rope_kernel,
    }[kernel]
    ptr = _DT[dtype]
    tab = "*i32" if exact else "*fp32"
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV", "X", "Y"):
            sig[name] = ptr
        elif name in ("Lse", "Delta"):
            sig[name] = "*fp32"
        elif name in ("QPos", "KPos", "Pos", "QDoc", "KDoc", "TileRange", "QAlign"):
            sig[name] = "*i32"
        elif name == "Alibi":
            sig[name] = "*fp32"
        elif name in ("QTabA", "KTabA", "TabA"):
            sig[name] = tab
        elif name in ("QTabB", "KTabB", "TabB"):  # r_lo (exact) or the hf reduction table
            sig[name] = "*i32"
        elif name in ("scale", "scale_log2", "attn_factor", "softcap_in", "softcap_out", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return fn, sig


def compile_kernel(
    kernel: str,
    arch: int,
    head_dim: int,
    cfg: KernelConfig,
    *,
    dtype: str = "bf16",
    causal: bool = True,
    docs: bool = True,
    rope: bool = True,
    exact: bool = True,
    rot_dim: int | None = None,
    interleaved: bool = False,
    group: int = 4,
    dot_prec: str | None = None,
    transpose: bool = False,
    window: bool = False,
    softcap: bool = False,
    alibi: bool = False,
    k_docs: bool = False,
    dropout: bool = False,
    ptxas: str | None = None,
    mix: bool = False,
) -> dict:
    """Compile one kernel variant; returns shared bytes, registers, spill bytes and the arch.

    ``kernel`` is one of KERNELS or AUX_KERNELS; an aux kernel's rows per program are ``cfg.block_m``
    (the rest of ``cfg`` but num_warps is unused), ``transpose`` picks the RoPE kernel's direction.
    ``window``, ``softcap``, ``alibi`` and ``k_docs`` (key-side documents; needs ``docs``) compile
    the attention kernels' score features in, ``dropout`` attention dropout (the Philox mask).
    """
    if k_docs and not docs:
        raise ValueError("k_docs (key-side documents) needs docs")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .configs import block_d, rope_pads

    rot_dim = head_dim if rot_dim is None else rot_dim
    half_pad, pass_pad = rope_pads(head_dim, rot_dim if rope else None)
    fn, sig = _signature(kernel, dtype, exact)
    constexprs = dict(
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d(head_dim),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        CAUSAL=causal,
        HAS_DOCS=docs,
        ROPE=rope,
        EXACT=exact,
        ROT_DIM=rot_dim,
        INTERLEAVED=interleaved,
        HALF_PAD=half_pad,
        PASS_PAD=pass_pad,
        DOT_PREC=dot_prec or ("ieee" if dtype == "fp32" else "tf32"),
        TRANSPOSE=transpose,
        BLOCK_S=cfg.block_m,
        HAS_WINDOW=window,
        SOFTCAP=softcap,
        HAS_ALIBI=alibi,
        K_DOCS=k_docs,
        DROPOUT=dropout,
    )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    # What the JIT specializes at launch for contiguous-D tensors with 16-aligned strides: unit
    # D strides become constants, pointers and the other strides are known multiples of 16.
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name.startswith("stride_") and name.endswith("d") and not name.endswith("b") and "pos" not in name:
            sig[name] = "constexpr"
            constexprs[name] = 1
        elif sig[name].startswith("*") or (name.startswith("stride_") and "pos" not in name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs, attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    shared = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = _ptxas_usage(ptx, arch, ptxas)
    loop = {}
    if mix and kernel in KERNELS:  # the elementwise kernels have no loop
        loop = hot_loop_mix(_disassemble(compiled.asm["cubin"]))
        if arch == 89:
            model = issue_model_sm89(loop["loop_mma"], loop["loop_instructions"])
            loop.update(modeled_cycles=model["modeled_cycles"], bound=model["bound"])
    return dict(
        kernel=kernel,
        arch=arch,
        head_dim=head_dim,
        dtype=dtype,
        block_m=cfg.block_m,
        block_n=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        shared=shared,
        shared_limit=SHARED_LIMIT[arch],
        registers=regs,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        occupancy_warps=occupancy(regs, shared, cfg.num_warps)[0],
        **loop,
    )


def nvidia_tool(name: str) -> str:
    """Triton's bundled CUDA tool ``name`` (it reads the PTX/cubin versions Triton emits), else PATH."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (neither Triton's bundled one nor on PATH)")
    return found


def _disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([nvidia_tool("nvdisasm"), path], capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"nvdisasm failed: {res.stderr[-2000:]}")
    return res.stdout


_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_INSTR = re.compile(r"/\*[0-9a-f]+\*/\s+(?:(@!?U?P[0-9T]+)\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_SASS_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
MMA_OPCODES = ("HMMA", "HGMMA")


class SassInstr(NamedTuple):
    """One SASS instruction: opcode without modifiers, the full mnemonic, operands text, guard (``@!P0``)."""

    opcode: str
    mnemonic: str
    operands: str
    guard: str


def parse_sass(sass: str) -> tuple[list[SassInstr], list[tuple[int, int]]]:
    """Instructions of ``nvdisasm`` output and its loops: a loop is a backward branch and its target
    label, as (index of the label's first instruction, index of the branch)."""
    labels: dict[str, int] = {}
    instrs: list[SassInstr] = []
    loops: list[tuple[int, int]] = []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        instr = _SASS_INSTR.search(line)
        if not instr:
            continue
        guard, mnemonic, operands = instr.group(1) or "", instr.group(2), instr.group(3).strip()
        opcode = mnemonic.split(".")[0]
        target = _SASS_TARGET.search(operands)
        if opcode == "BRA" and target and target.group(1) in labels:
            loops.append((labels[target.group(1)], len(instrs)))
        instrs.append(SassInstr(opcode, mnemonic, operands, guard))
    return instrs, loops


def hot_loop(instrs: list[SassInstr], loops: list[tuple[int, int]]) -> tuple[int, int]:
    """The loop with the most MMA instructions (then FFMAs, for fp32 kernels), the shortest
    (innermost) among equals."""
    if not loops:
        raise ValueError("no loop (backward branch) in the SASS")

    def count(span, opcodes):
        return sum(i.opcode in opcodes for i in instrs[span[0] : span[1] + 1])

    return max(
        loops, key=lambda span: (count(span, MMA_OPCODES), count(span, ("FFMA",)), -(span[1] - span[0]))
    )


def top_opcodes(counts: dict[str, float], n: int = 10) -> dict[str, float]:
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:n])


def hot_loop_mix(sass: str) -> dict:
    """Static instruction mix of the loop with the most MMA instructions in ``nvdisasm`` output.

    A loop is a backward branch and its target label; the one with the most MMAs (then FFMAs, for
    fp32 kernels) wins, the shortest (innermost) among equals. Returns its instruction count (NOPs excluded), MMA count and the ten most
    frequent opcodes (without modifiers); ``loop_local`` counts its local-memory (spill) loads and stores.
    """
    instrs, loops = parse_sass(sass)
    begin, end = hot_loop(instrs, loops)
    body = [i.opcode for i in instrs[begin : end + 1] if i.opcode != "NOP"]
    counts: dict[str, int] = {}
    for op in body:
        counts[op] = counts.get(op, 0) + 1
    return dict(
        loop_instructions=len(body),
        loop_mma=sum(op in MMA_OPCODES for op in body),
        loop_local=counts.get("LDL", 0) + counts.get("STL", 0),
        loop_top_opcodes=top_opcodes(counts),
    )


def issue_model_sm89(mma: float, instructions: float) -> dict:
    """One loop iteration of one warp on sm_89 (see the module doc): MMA cycles on its
    sub-partition's tensor core against one issued instruction per cycle. MODELED, a lower bound."""
    mma_cycles = mma * MMA_CYCLES_SM89
    return dict(
        mma_cycles=mma_cycles,
        modeled_cycles=round(max(mma_cycles, instructions)),
        bound="tensor" if mma_cycles >= instructions else "issue",
    )


def _ptxas_usage(ptx: str, arch: int, ptxas: str | None):
    if ptxas is None:
        # Triton's own choice for the arch first (sm_90a PTX 9.x is newer than some system
        # toolkits accept), then its bundled ptxas, then PATH.
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            ptxas = get_ptxas(arch).path
        except Exception:  # noqa: BLE001 - any failure to locate it means: look further
            ptxas = None
        if not ptxas or not os.path.exists(ptxas):
            ptxas = nvidia_tool("ptxas")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    gpu = target.group(1).rstrip(",") if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            # --regAllocOptLevel=2: as Triton's own ptxas call (its workaround for a ptxas 13 bug)
            [ptxas, f"-arch={gpu}", "-v", "--regAllocOptLevel=2", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=False,
        )
    if res.returncode:
        raise RuntimeError(f"ptxas failed for {gpu}: {res.stderr[-2000:]}")
    text = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spills.group(1)), int(spills.group(2))


def occupancy(registers: int, shared: int, num_warps: int, arch: int = 89) -> tuple[int, int]:
    """(resident warps per SM, resident blocks per SM) on sm_89: 64K regs, 100 KB smem, 48 warps."""
    threads = 32 * num_warps
    # registers are allocated per warp in units of 256
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    smem_sm, reserved = 102_400, 1024  # sm_89: 100 KB per SM, 1 KB reserved per block
    by_smem = smem_sm // (shared + reserved) if shared else 24
    by_warps = 48 // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, 24, 1536 // threads))
    return blocks * num_warps, blocks


HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # every BLOCK_D bucket, and the non-powers of two

# Kernel variants a shipped attention config must compile for without spills. compile_kernel's
# defaults (causal, documents, exact RoPE) are the heaviest, but ptxas allocates registers by
# heuristics, so a lighter variant can still spill where the heaviest does not.
VARIANTS = {
    "causal-docs-exact": {},
    "causal-docs-hf": dict(exact=False),
    "causal-exact": dict(docs=False),
    "causal-hf": dict(docs=False, exact=False),
    "causal-no-rope": dict(docs=False, rope=False),
}
# The score features (sliding window, softcap, ALiBi, key-side documents), each a constexpr variant
# of the attention kernels: the heaviest combinations, with and without RoPE and documents. Kept
# apart from VARIANTS so the default-tier sweep over VARIANTS does not grow with them.
FEATURE_VARIANTS = {
    "causal-kdocs-window-softcap-alibi-exact": dict(window=True, softcap=True, alibi=True, k_docs=True),
    "causal-docs-window-softcap-alibi-hf": dict(window=True, softcap=True, alibi=True, exact=False),
    "window-softcap-alibi-no-rope": dict(
        causal=False, docs=False, rope=False, window=True, softcap=True, alibi=True
    ),
}
# Attention dropout (a Philox4x32-10 draw per score, in the forward and both backward kernels): on
# the plain causal path with documents and exact RoPE, on top of every score feature, and alone.
DROPOUT_VARIANTS = {
    "causal-docs-dropout-exact": dict(dropout=True),
    "causal-kdocs-window-softcap-alibi-dropout-exact": dict(
        window=True, softcap=True, alibi=True, k_docs=True, dropout=True
    ),
    "dropout-no-rope": dict(causal=False, docs=False, rope=False, dropout=True),
}
ALL_VARIANTS = {**VARIANTS, **FEATURE_VARIANTS, **DROPOUT_VARIANTS}


def shipped_specs(
    archs=None,
    head_dims=HEAD_DIMS,
    kernels=KERNELS + AUX_KERNELS,
    dtypes=("bf16",),
    variants=("causal-docs-exact",),
):
    """compile_kernel arguments for every shipped config: each autotuning candidate, fp32's own, and
    the elementwise kernels'; attention kernels once per name in ``variants`` (keys of ALL_VARIANTS),
    a dropout variant with dropout's candidates (``configs.get_configs(dropout=True)``)."""
    from .configs import get_configs

    specs = []
    for arch in archs or sorted({a for a, _ in CONFIGS}):
        capability = divmod(arch, 10)
        for hd in head_dims:
            for kernel in kernels:
                for dtype in dtypes:
                    if kernel in AUX_KERNELS:
                        specs.extend(aux_specs(kernel, arch, hd, dtype))
                        continue
                    size = 4 if dtype == "fp32" else 2
                    for name in variants:
                        dropout = ALL_VARIANTS[name].get("dropout", False)
                        for cfg in get_configs(kernel, hd, capability, size, dropout):
                            spec = dict(kernel=kernel, arch=arch, head_dim=hd, dtype=dtype, cfg=cfg)
                            specs.append(dict(spec, variant=name, **ALL_VARIANTS[name]))
    return specs


def aux_specs(kernel: str, arch: int, head_dim: int, dtype: str) -> list[dict]:
    """compile_kernel arguments for an elementwise kernel (RoPE: both directions)."""
    from .configs import aux_rows

    spec = dict(kernel=kernel, arch=arch, head_dim=head_dim, dtype=dtype)
    spec["cfg"] = KernelConfig(aux_rows(kernel, head_dim), 16, 4, 1)
    if kernel == "rope":
        return [dict(spec, transpose=t) for t in (False, True)]
    return [spec]


def main(argv=None) -> int:
    """Print one JSON line per compiled config (``--specs`` takes a JSON list of compile_kernel kwargs,
    with ``cfg`` as [block_m, block_n, num_warps, num_stages])."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to AOT-compile", file=sys.stderr)
        return 2
    import argparse
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, nargs="*", default=None)
    parser.add_argument("--head-dim", type=int, nargs="*", default=list(HEAD_DIMS))
    parser.add_argument("--kernel", nargs="*", default=list(KERNELS + AUX_KERNELS))
    parser.add_argument("--dtype", nargs="*", default=["bf16"])
    parser.add_argument("--specs", default=None, help="JSON list of compile_kernel keyword arguments")
    parser.add_argument("--variant", nargs="*", default=["causal-docs-exact"], choices=list(ALL_VARIANTS))
    parser.add_argument("--mix", action="store_true", help="add the hot loop's SASS mix and sm_89 model")
    args = parser.parse_args(argv)
    if args.specs:
        specs = json.loads(args.specs)
        for spec in specs:
            spec["cfg"] = KernelConfig(*spec["cfg"])
    else:
        specs = shipped_specs(args.arch, args.head_dim, args.kernel, args.dtype, args.variant)
    for spec in specs:
        spec = dict(spec)
        kernel, arch, hd, cfg = spec.pop("kernel"), spec.pop("arch"), spec.pop("head_dim"), spec.pop("cfg")
        variant = spec.pop("variant", None)
        result = compile_kernel(kernel, arch, hd, cfg, mix=args.mix, **spec)
        result.update({k: v for k, v in spec.items() if k not in result})
        if variant:
            result["variant"] = variant
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
