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
