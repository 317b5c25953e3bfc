"""The CUDA kernels' static issue model (ringattn/bench/cuda_aot.py): parsing and the model's rules on
SASS and ptxas text written here by hand (default tier), then the real source compiled for sm_89
(slow: nvcc takes about a minute). Every number the tool reports is MODELED, not measured."""

from __future__ import annotations

import math
import re
import shutil

import pytest

from ringattn.bench import cuda_aot
from tritonkernels.aot import MMA_CYCLES_SM89, issue_model_sm89

# A hot loop (.L_x_0) holding: a copy loop strided by blockDim.x up to 1024 (5 instructions), two MMAs
# and a NOP, a loop strided by 4 up to 32 with one MMA (4 instructions), and a halving search whose
# exit test the model does not read (3 instructions).
SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   IMAD.MOV.U32 R2, RZ, RZ, R0 ;
.L_x_1:
        /*0030*/                   LDG.E.U16 R4, [R6.64] ;
        /*0040*/                   STS.U16 [R8], R4 ;
        /*0050*/                   IADD3 R2, R2, c[0x0][0x0], RZ ;
        /*0060*/                   ISETP.GE.AND P0, PT, R2, 0x400, PT ;
        /*0070*/              @!P0 BRA `(.L_x_1) ;
        /*0080*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*0090*/                   HMMA.16816.F32.BF16 R24, R16, R22, R24 ;
        /*00a0*/                   NOP ;
.L_x_2:
        /*00b0*/                   HMMA.16816.F32.BF16 R28, R16, R20, R28 ;
        /*00c0*/                   IADD3 R3, R3, 0x4, RZ ;
        /*00d0*/                   ISETP.GE.U32.AND P1, PT, R3, 0x20, PT ;
        /*00e0*/              @!P1 BRA `(.L_x_2) ;
.L_x_3:
        /*00f0*/                   SHF.R.U32.HI R9, RZ, 0x1, R9 ;
        /*0100*/                   ISETP.GT.U32.AND P2, PT, R9, 0x1, PT ;
        /*0110*/               @P2 BRA `(.L_x_3) ;
        /*0120*/                   ISETP.GE.AND P3, PT, R10, R11, PT ;
        /*0130*/              @!P3 BRA `(.L_x_0) ;
        /*0140*/                   EXIT ;
"""
OUTSIDE = 6  # BAR, IMAD.MOV, two HMMAs, the outer ISETP and BRA (the NOP is not issued work)


def test_inner_loops_are_weighted_by_the_trips_their_exit_tests_give():
    mix = cuda_aot.weighted_hot_loop(SASS, threads=128)
    assert mix["loop_instructions"] == OUTSIDE + 5 + 4 + 3 and mix["loop_mma"] == 3  # each once
    assert mix["inner_loops"] == [
        dict(instructions=5, trips=1024 // 128),
        dict(instructions=4, trips=32 // 4),
        dict(instructions=3, trips=None),  # a test of another form: counted once
    ]
    assert mix["iter_instructions"] == OUTSIDE + 5 * 8 + 4 * 8 + 3
    assert mix["iter_mma"] == 2 + 1 * 8
    assert mix["iter_top_opcodes"]["HMMA"] == 10 and mix["iter_top_opcodes"]["LDG"] == 8
    # Unknown threads per CTA: the blockDim-strided loop cannot be weighted and counts once.
    assert cuda_aot.weighted_hot_loop(SASS, threads=None)["iter_instructions"] == OUTSIDE + 5 + 4 * 8 + 3
    # A bound that is not a multiple of the stride rounds up (the busiest thread's trips).
    assert cuda_aot.weighted_hot_loop(SASS, threads=96)["inner_loops"][0]["trips"] == math.ceil(1024 / 96)


def test_the_classification_follows_from_the_counts():
    # 10 MMAs per iteration: with 128 threads 81 instructions, with 32 threads the copy loop runs
    # 32 times (201 instructions); the bound flips where the counts cross, nowhere else.
    mma_cycles = 10 * MMA_CYCLES_SM89
    for threads, instructions in ((128, OUTSIDE + 40 + 32 + 3), (32, OUTSIDE + 5 * 32 + 32 + 3)):
        mix = cuda_aot.weighted_hot_loop(SASS, threads=threads)
        assert mix["iter_instructions"] == instructions
        model = issue_model_sm89(mix["iter_mma"], mix["iter_instructions"])
        assert model["bound"] == ("tensor" if mma_cycles >= instructions else "issue")
        assert model["modeled_cycles"] == round(max(mma_cycles, instructions))
    assert issue_model_sm89(10, 81)["bound"] == "tensor" and issue_model_sm89(10, 201)["bound"] == "issue"


def test_loop_trips_reads_only_the_forms_it_knows():
    def loop(test: str, branch: str, step: str = "IADD3 R2, R2, 0x8, RZ") -> str:
        return f""".L_x_0:
        /*0000*/                   {step} ;
        /*0010*/                   {test} ;
        /*0020*/              {branch} BRA `(.L_x_0) ;
"""

    def trips(text):
        from tritonkernels.aot import parse_sass

        instrs, loops = parse_sass(text)
        return cuda_aot.loop_trips(instrs, loops[-1], threads=64)

    assert trips(loop("ISETP.GE.AND P0, PT, R2, 0x40, PT", "@!P0")) == 8
    assert trips(loop("ISETP.LT.AND P0, PT, R2, 64, PT", "@P0")) == 8
    assert trips(loop("ISETP.GE.AND P0, PT, R2, 0x40, PT", "@P0")) is None  # exits while below: not this form
    assert trips(loop("ISETP.GE.AND P0, PT, R2, R5, PT", "@!P0")) is None  # bound in a register
    assert trips(loop("ISETP.GE.AND P0, PT, R2, 0x40, PT", "@!P0", "IADD3 R2, R2, R7, RZ")) is None
    assert trips(loop("ISETP.GE.AND P0, PT, R2, 0x40, PT", "@!P0", "IADD3 R2, R2, c[0x0][0x0], RZ")) == 1
    assert trips(loop("ISETP.GE.AND P0, PT, R2, 0x40, PT", "@!P0", "VIADD R2, R2, 0x10")) == 4  # sm_90's add
    assert trips(loop("ISETP.GE.AND P0, PT, R2, 0x40, PT", "@!P0", "@P1 IADD3 R2, R2, 0x8, RZ")) is None
    # The step written to a new register that the loop copies back into its counter.
    assert (
        trips(
            loop(
                "ISETP.GE.AND P0, PT, R3, 0x180, PT",
                "@!P0",
                "IADD3 R3, R2, 0x80, RZ ;\n        /*0008*/                   IMAD.MOV.U32 R2, RZ, RZ, R3",
            )
        )
        == 3
    )
    # sm_90 keeps blockDim.x in a register loaded before the loop.
    assert (
        trips(
            "        /*0000*/                   LDC R24, c[0x0][RZ] ;\n"
            + loop("ISETP.GE.AND P0, PT, R2, 0x100, PT", "@!P0", "IMAD.IADD R2, R24, 0x1, R2")
        )
        == 256 // 64
    )


def test_parse_ptxas_reads_each_kernel():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooILi64EEvv' for 'sm_89'
ptxas info    : Function properties for _Z3fooILi64EEvv
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 32 bytes cumulative stack size, 1056 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_89'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 512 bytes smem, 360 bytes cmem[0]
"""
    assert cuda_aot.parse_ptxas(text) == {
        "_Z3fooILi64EEvv": dict(registers=168, smem=0, stack=32, spill_stores=0, spill_loads=0),
        "_Z3barv": dict(registers=40, smem=512, stack=0, spill_stores=8, spill_loads=12),
    }


def test_kernel_labels_read_the_template_arguments():
    prefix = "void ringattn::(anonymous namespace)::"
    args = "(ringattn::AttnParams, ringattn::(anonymous namespace)::RowSide, ringattn::Dropout)"
    label = cuda_aot.kernel_label(f"{prefix}attn_backward_kernel<2, 128, true, true>{args}")
    assert label == dict(
        function="attn_backward_kernel",
        pass_="backward",
        dtype="fp16",
        head_dim=128,
        variant="extra+dropout",
        label="backward fp16 D=128 extra+dropout",
    )
    assert cuda_aot.kernel_label(f"{prefix}attn_forward_kernel<1, 64, false, false>{args}")["label"] == (
        "forward bf16 D=64 plain"
    )
    # Template arguments past the four known ones stay visible.
    assert cuda_aot.kernel_label(f"{prefix}attn_forward_kernel<1, 80, true, false, 3>{args}")["variant"] == (
        "extra arg4=3"
    )
    # Another attention pass (e.g. a separate dQ kernel) is named after its function.
    assert cuda_aot.kernel_label(f"{prefix}attn_backward_dq_kernel<1, 128, false, false>{args}")["label"] == (
        "backward_dq bf16 D=128 plain"
    )
    other = cuda_aot.kernel_label(f"{prefix}finish_grad_kernel<1>(float const*)")
    assert "pass_" not in other and other["label"] == "finish_grad_kernel<1>"


def test_bad_arch_is_rejected_by_name(capsys):
    with pytest.raises(SystemExit):
        cuda_aot.main(["--arch", "89"])
    assert "--arch" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_real_kernels_on_sm89(tmp_path):
    compiled = cuda_aot.compile_source(cuda_aot.ROOT / "csrc" / "attn_cuda.cu", "sm_89", tmp_path)
    assert compiled["dynamic_smem_error"] is None, compiled["dynamic_smem_error"]
    rows = cuda_aot.analyze(compiled, "sm_89")
    for pass_ in ("forward", "backward"):
        dims = {r["head_dim"] for r in rows if r["pass"] == pass_}
        assert {64, 96, 128, 256} <= dims, (pass_, dims)
    for r in rows:
        # The label's head dim is the mangled name's second template argument.
        assert re.search(rf"ILi\d+ELi{r['head_dim']}E", r["mangled"]), r["kernel"]
        assert r["dynamic_smem"] is not None and r["threads"], r["kernel"]
        assert r["occupancy_warps"] >= r["threads"] // 32, r["kernel"]  # at least one CTA fits
        assert 0 < r["loop_mma"] <= r["iter_mma"] and r["loop_instructions"] <= r["iter_instructions"]
        assert r["bound"] == (
            "tensor" if r["iter_mma"] * MMA_CYCLES_SM89 >= r["iter_instructions"] else "issue"
        )
    text = cuda_aot.report(rows, "MODELED test header")
    assert (
        text.startswith("MODELED")
        and len([x for x in text.splitlines() if x.startswith("| ")]) == len(rows) + 1
    )
    # The real RoPE loops (--rope's cross-check): no stack frame, the polynomial sincos inside, and
    # more static instructions than the hf probe's loop (both modes' turns and the index math).
    loops = {r["kernel"]: r for r in cuda_aot.real_rope_loops(compiled)}
    assert set(loops) == {"rotate_rows_kernel<1>", "finish_grad_kernel<1>"}
    probe = cuda_aot.compile_rope_probe("sm_89", tmp_path)
    hf = next(
        r for r in cuda_aot.rope_costs(probe["sass"], probe["ptxas"]) if r["kernel"] == "rope_probe_hf_bf16"
    )
    for r in loops.values():
        assert r["stack"] == 0 and r["spill_stores"] == r["spill_loads"] == 0, r["kernel"]
        assert r["opcodes"].get("FFMA", 0) >= 7 and "LDL" not in r["opcodes"], r["kernel"]
        assert r["instructions"] > hf["instructions"], r["kernel"]


def test_other_sweeps_with_as_many_mmas_are_listed():
    # A masked sweep (an extra select) and a mask-free one, two MMAs each: the hot loop is the
    # shorter, the other is listed with its own count.
    sass = """
.L_x_0:
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   FSEL R5, R5, -INF , P1 ;
        /*0020*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0060*/              @!P2 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""
    mix = cuda_aot.weighted_hot_loop(sass, threads=128)
    assert mix["iter_instructions"] == 3 and mix["other_sweeps"] == [4]


def test_pass_order_puts_the_dq_pass_after_the_backward(tmp_path):
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt not found")
    body = """
.L_x_0:
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
        /*0020*/                   EXIT ;
"""
    names = {
        p: f"_Z{len(p) + 12}attn_{p}_kernelILi1ELi128ELb0ELb0EEvv"
        for p in ("backward_dq", "forward", "backward")
    }
    sass = "".join(
        f"//--------------------- .text.{m} --------------------------\n{body}" for m in names.values()
    )
    ptxas = "".join(
        f"ptxas info    : Compiling entry function '{m}' for 'sm_80'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers, 360 bytes cmem[0]\n"
        for m in names.values()
    )
    rows = cuda_aot.analyze(dict(ptxas=ptxas, sass=sass, dynamic_smem=None), "sm_80", mix=False)
    assert [r["pass"] for r in rows] == ["forward", "backward", "backward_dq"]


# One loop trip (.L_x_1 .. the back branch) with a diamond: a guarded branch over 2 instructions
# (taken: 5 issued, fall through: 7), a NOP (not issued), a guarded branch out of the loop and a CALL.
PATHS_SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E R2, [R4.64] ;
        /*0020*/                   ISETP.GE.AND P1, PT, R2, RZ, PT ;
        /*0030*/               @P1 BRA `(.L_x_2) ;
        /*0040*/                   FMUL R2, R2, R2 ;
        /*0050*/                   CALL.REL.NOINC `(.L_x_9) ;
.L_x_2:
        /*0060*/                   NOP ;
        /*0070*/               @P2 BRA `(.L_x_9) ;
        /*0080*/                   IADD3 R0, R0, 0x80, RZ ;
        /*0090*/              @!P0 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
.L_x_9:
        /*00b0*/                   EXIT ;
"""


def test_trip_paths_follow_the_branches_inside_a_trip():
    loop = cuda_aot.loop_summary(PATHS_SASS)
    assert loop["instructions"] == 8  # every arm once, the NOP left out
    assert loop["opcodes"] == dict(LDG=1, ISETP=1, BRA=3, FMUL=1, CALL=1, IADD3=1)
    assert (loop["shortest"], loop["longest"], loop["paths"]) == (6, 8, [6, 8])
    assert loop["leaves"] == 1 and loop["calls"] == 1 and loop["inner_loops"] == 0
    # An unguarded EXIT inside the trip ends that path: only the branch around it goes on.
    exiting = PATHS_SASS.replace("FMUL R2, R2, R2", "EXIT")
    assert cuda_aot.loop_summary(exiting)["paths"] == [6]


def _probe_sass(bodies: dict[str, list[str]]) -> tuple[str, str]:
    """nvdisasm and ptxas text of probe kernels, each one loop over the given instructions (short
    kernel names: nvdisasm pads their section headers)."""
    sass = ptxas = ""
    for n, (name, body) in enumerate(bodies.items()):
        lines = [f".L_x_{n}:", *body, f"@!P0 BRA `(.L_x_{n})", "EXIT"]
        sass += f"//--------------------- .text.{name}  --------------------------\n"
        sass += "".join(x + "\n" if x.startswith(".L") else f"        /*0000*/  {x} ;\n" for x in lines)
        ptxas += f"ptxas info    : Compiling entry function '{name}' for 'sm_89'\n"
        ptxas += "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        ptxas += "ptxas info    : Used 20 registers, used 0 barriers, 392 bytes cmem[0]\n"
    return sass, ptxas


def test_rope_costs_subtract_the_baseline_of_the_same_io():
    base = [
        "LDG.E.U16 R2, [R4.64]",
        "LDG.E.U16 R3, [R4.64+0x80]",
        "STG.E.U16 [R6.64], R2",
        "IADD3 R0, R0, 0x80, RZ",
    ]
    exact = [*base[:2], "LDG.E R8, [R10.64]", "I2FP.F32.S32 R9, R8", "FFMA R2, R9, R2, R3", *base[2:]]
    # hf: an if (1 instruction) / else (2 and a branch over the if arm): its trips take 10 or 12
    # instructions, its static count is 13 (every arm once)
    hf = [
        *exact[:3],
        "@P1 BRA `(.L_x_90)",
        "SHF.R.U32.HI R8, RZ, 0x1, R8",
        "LOP3.LUT R8, R8, 0x7, RZ, 0xc0, !PT",
        "BRA `(.L_x_91)",
        ".L_x_90:",
        "IMAD.MOV.U32 R8, RZ, RZ, RZ",
        ".L_x_91:",
        *exact[3:],
    ]
    bodies = {}
    for io, extra in (("bf16", []), ("fp32", ["FMUL R2, R2, -1"])):
        bodies[f"rope_probe_none_{io}"] = base
        bodies[f"rope_probe_exact_{io}"] = exact + extra
        bodies[f"rope_probe_hf_{io}"] = hf + extra
    sass, ptxas = _probe_sass(bodies)
    rows = {(r["mode"], r["io"]): r for r in cuda_aot.rope_costs(sass, ptxas)}
    assert len(rows) == 6 and rows[("none", "bf16")]["paths"] == [len(base) + 1]  # + the back branch
    exact_bf16, hf_bf16, exact_fp32 = rows[("exact", "bf16")], rows[("hf", "bf16")], rows[("exact", "fp32")]
    assert (exact_bf16["pair"], exact_bf16["element"], exact_bf16["pair_static"]) == (3, 1.5, 3)
    assert exact_bf16["difference"] == dict(FFMA=1, I2FP=1, LDG=1)
    assert hf_bf16["paths"] == [10, 12] and hf_bf16["instructions"] == 13
    assert (hf_bf16["pair"], hf_bf16["pair_static"]) == (12 - 5, 13 - 5)  # the longest path; every arm once
    assert exact_fp32["pair"] == 4 and exact_fp32["difference"]["FMUL"] == 1
    assert all(r["stack"] == 0 and r["spill_stores"] == 0 for r in rows.values())
    # A probe the compiler split into more than one trip per pair is refused, not counted.
    nested = dict(
        bodies, rope_probe_exact_fp32=[".L_x_92:", "IADD3 R1, R1, 0x1, RZ", "@P3 BRA `(.L_x_92)", *base]
    )
    with pytest.raises(RuntimeError, match="rope_probe_exact_fp32"):
        cuda_aot.rope_costs(*_probe_sass(nested))


def test_rope_share_counts_the_causal_tiles_and_the_rotated_rows():
    # S = 100: forward query tiles of 64 rows see keys up to 64 and 100 (2 + 4 key tiles of 32);
    # backward key tiles of 64 keys see queries from 0 and 64 (4 + 2 query steps of 32, per head).
    c, c_t, c_pass, fwd, bwd = 10, 12, 50, 1000.0, 2000.0
    r = cuda_aot.rope_share(100, fwd, bwd, c, c_t, c_pass)
    warps, q_rows, k_rows, pairs = 4, 100 * 32, 100 * 8, 64
    assert r["attn_fwd_cycles"] == 32 * warps * (2 + 4) * fwd
    assert r["attn_bwd_cycles"] == 8 * warps * 4 * (4 + 2) * bwd
    rot_fwd = (q_rows + k_rows) * pairs * c / 32
    rot_bwd = (q_rows * c + k_rows * c + (q_rows + k_rows) * c_t) * pairs / 32
    assert r["rot_fwd_cycles"] == rot_fwd and r["rot_bwd_cycles"] == rot_bwd
    assert r["share_fwd"] == pytest.approx(rot_fwd / (r["attn_fwd_cycles"] + rot_fwd))
    total = r["attn_fwd_cycles"] + r["attn_bwd_cycles"] + rot_fwd + rot_bwd
    assert r["share_fwd_bwd"] == pytest.approx((rot_fwd + rot_bwd) / total)
    assert r["pass_fwd_bytes"] == 2 * k_rows * 128 * 2 and r["pass_bwd_bytes"] == 2 * q_rows * 128 * 2
    # Attention grows as S^2 and the rotation as S: the share falls with the length.
    long = cuda_aot.rope_share(8192, fwd, bwd, c, c_t, c_pass)
    assert long["share_fwd"] < r["share_fwd"] and long["whole_share_fwd_bwd"] < r["whole_share_fwd_bwd"]


def test_bad_seqlen_is_rejected_by_name(capsys):
    with pytest.raises(SystemExit):
        cuda_aot.main(["--rope", "--seqlen", "0"])
    assert "--seqlen" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_rope_probe_compiles_the_real_rotation(tmp_path):
    probe = cuda_aot.compile_rope_probe("sm_89", tmp_path)
    rows = {(r["mode"], r["io"]): r for r in cuda_aot.rope_costs(probe["sass"], probe["ptxas"])}
    for io in cuda_aot.ROPE_IO:
        base, exact, hf = (rows[(m, io)] for m in ("none", "exact", "hf"))
        assert base["longest"] < exact["longest"] and base["longest"] < hf["longest"]
        for r in (base, exact, hf):
            assert r["stack"] == 0 and r["spill_stores"] == r["spill_loads"] == 0, r["kernel"]
        for r in (exact, hf):
            diff = r["difference"]
            # Position and frequency loaded for every pair (nothing hoisted out of the loop), the
            # turns converted to a float, the two sincos polynomials and the rotation as FMAs; no
            # library sincosf (MUFU, local memory).
            assert diff.get("LDG") == 2, (r["kernel"], diff)
            assert diff.get("I2FP", 0) + diff.get("I2F", 0) >= 1, (r["kernel"], diff)
            assert diff.get("FFMA", 0) >= 7, (r["kernel"], diff)
            assert "MUFU" not in r["opcodes"] and "LDL" not in r["opcodes"], r["kernel"]
        # Exact turns are one 32 x 64-bit product: no branches; hf reduces by the angle's exponent.
        assert len(exact["paths"]) == 1 and len(hf["paths"]) > 1
        assert exact["pair"] < hf["pair"]
