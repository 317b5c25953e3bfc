"""AOT-compile the shipped Triton attention configs for sm_80/89/90 without a GPU.

Asserts each fits the arch's per-block shared memory and has no register spills in its hot loop
(ptxas -v plus the SASS of the loop; see COLD_SPILL_LIMIT), for the attention kernels and the
elementwise delta and RoPE kernels.
Compiling runs in a subprocess: the test session runs Triton under its interpreter, which
replaces @triton.jit functions. sm_89 at head dim 128 (the tuning target) is in the default tier;
every arch, head dim, fp32 and the RoPE variants are under ``slow``. The score features (window,
softcap, ALiBi, key-side documents) and dropout compile once per kernel by default, and on every
arch at head dims 64 and 128 under ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tritonkernels.aot import HEAD_DIMS
from tritonkernels.configs import AUX_KERNELS, KERNELS, SHARED_LIMIT

pytestmark = pytest.mark.skipif(
    shutil.which("ptxas") is None
    and not os.path.exists(
        os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    ),
    reason="ptxas not found",
)


def _compile(args: list[str], timeout: int = 1500) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run(
        [sys.executable, "-m", "tritonkernels.aot", "--mix", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


# ptxas (12.9, as bundled with Triton) sometimes parks a few loop-invariant registers in local memory
# around the main loop although far fewer than 255 registers are in use (64 to 168 seen): one store
# and one load per value per program, outside the hot loop. Those are allowed up to this size;
# local-memory traffic inside the hot loop (read from the SASS) is not allowed at all.
COLD_SPILL_LIMIT = 64


def _check(results: list[dict], expected: int):
    """Shared memory within the arch's limit, no spill traffic in the hot loop and at most
    COLD_SPILL_LIMIT bytes of spills outside it (none for the loop-free elementwise kernels)."""
    assert len(results) == expected
    problems = []
    for r in results:
        label = f"{r['kernel']} sm_{r['arch']} d{r['head_dim']} {r['dtype']} {r['block_m']}x{r['block_n']}"
        label += f"x{r['num_warps']} {r.get('variant', '')}"
        if r["shared"] > SHARED_LIMIT[r["arch"]]:
            problems.append(f"{label}: {r['shared']} B shared")
        if r["shared"] == 0 and r["kernel"] not in AUX_KERNELS:
            problems.append(f"{label}: no shared memory (a broken compile?)")
        cold_limit = 0 if r["kernel"] in AUX_KERNELS else COLD_SPILL_LIMIT
        spills = max(r["spill_stores"], r["spill_loads"])
        if r["registers"] > 255 or spills > cold_limit or r.get("loop_local", 0):
            problems.append(
                f"{label}: {r['registers']} registers, spills {spills} B, "
                f"{r.get('loop_local', 0)} local loads/stores in the hot loop"
            )
    assert not problems, "\n".join(problems)


def _shipped(archs, head_dims, dtypes, variants=("causal-docs-exact",)) -> int:
    from tritonkernels.aot import shipped_specs

    return len(shipped_specs(archs, head_dims, dtypes=dtypes, variants=variants))


def test_sm89_head_dim_128_configs_compile_within_budget():
    # every autotuning candidate of the tuning target (bf16) in the heaviest plain variant; every
    # variant at every head dim: test_every_shipped_sm89_config_compiles_in_every_variant (slow)
    variant = "causal-docs-exact"
    results = _compile(["--arch", "89", "--head-dim", "128", "--variant", variant])
    _check(results, _shipped([89], [128], ["bf16"], (variant,)))


@pytest.mark.slow  # a subset of the every-arch sweep below, kept as the quick way to run one variant
def test_feature_variant_compiles_on_sm89_head_dim_128():
    # The heaviest score-feature variant (window, softcap, ALiBi, key-side documents, exact RoPE,
    # causal) of each attention kernel, every bf16 candidate, on the tuning target.
    from tritonkernels.aot import shipped_specs

    variant = "causal-kdocs-window-softcap-alibi-exact"
    results = _compile(["--arch", "89", "--head-dim", "128", "--kernel", *KERNELS, "--variant", variant])
    _check(results, len(shipped_specs([89], [128], KERNELS, ("bf16",), (variant,))))


@pytest.mark.slow
def test_feature_variants_compile_within_budget_on_every_arch():
    # Every shipped candidate (bf16 and fp32) at head dims 64 and 128 on sm_80/89/90, in every
    # score-feature variant.
    from tritonkernels.aot import FEATURE_VARIANTS, shipped_specs

    dtypes = ["bf16", "fp32"]
    args = ["--arch", "80", "89", "90", "--head-dim", "64", "128", "--kernel", *KERNELS, "--dtype", *dtypes]
    results = _compile([*args, "--variant", *FEATURE_VARIANTS])
    _check(results, len(shipped_specs([80, 89, 90], [64, 128], KERNELS, dtypes, tuple(FEATURE_VARIANTS))))


@pytest.mark.slow  # a subset of the every-arch sweep below, kept as the quick way to run one variant
def test_dropout_variant_compiles_on_sm89_head_dim_128():
    # Attention dropout on top of every score feature (the heaviest variant), each attention
    # kernel's first bf16 dropout candidate on the tuning target: one quick compile per kernel.
    from tritonkernels.configs import get_configs

    specs = []
    for kernel in KERNELS:
        c = get_configs(kernel, 128, (8, 9), 2, dropout=True)[0]
        spec = dict(
            kernel=kernel, arch=89, head_dim=128, cfg=[c.block_m, c.block_n, c.num_warps, c.num_stages]
        )
        specs.append(dict(spec, window=True, softcap=True, alibi=True, k_docs=True, dropout=True))
    _check(_compile(["--specs", json.dumps(specs)]), len(specs))


@pytest.mark.slow
def test_dropout_variants_compile_within_budget_on_every_arch():
    # Every shipped candidate (bf16 and fp32) at head dims 64 and 128 on sm_80/89/90, in every
    # dropout variant.
    from tritonkernels.aot import DROPOUT_VARIANTS, shipped_specs

    dtypes = ["bf16", "fp32"]
    args = ["--arch", "80", "89", "90", "--head-dim", "64", "128", "--kernel", *KERNELS, "--dtype", *dtypes]
    results = _compile([*args, "--variant", *DROPOUT_VARIANTS], timeout=4000)
    _check(results, len(shipped_specs([80, 89, 90], [64, 128], KERNELS, dtypes, tuple(DROPOUT_VARIANTS))))


@pytest.mark.slow
def test_every_shipped_16bit_config_compiles_within_budget_without_spills():
    _check(_compile(["--dtype", "bf16", "fp16"]), _shipped(None, HEAD_DIMS, ["bf16", "fp16"]))


@pytest.mark.slow
def test_every_shipped_sm89_config_compiles_in_every_variant():
    from tritonkernels.aot import VARIANTS

    dtypes = ["bf16", "fp32"]
    results = _compile(["--arch", "89", "--dtype", *dtypes, "--variant", *VARIANTS])
    _check(results, _shipped([89], HEAD_DIMS, dtypes, tuple(VARIANTS)))


@pytest.mark.slow
def test_every_shipped_fp32_config_compiles_within_budget_without_spills():
    _check(_compile(["--dtype", "fp32"]), _shipped(None, HEAD_DIMS, ["fp32"]))


@pytest.mark.slow
def test_rope_variants_compile_on_sm89():
    from tritonkernels.configs import CONFIGS

    specs = []
    for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        c = CONFIGS[(89, 128)][kernel][0]
        cfg = [c.block_m, c.block_n, c.num_warps, c.num_stages]
        for variant in (
            dict(exact=False),
            dict(interleaved=True),
            dict(rot_dim=64),
            dict(rope=False, docs=False, causal=False),
            dict(dtype="fp16", group=1),
        ):
            specs.append(dict(kernel=kernel, arch=89, head_dim=128, cfg=cfg, **variant))
    _check(_compile(["--specs", json.dumps(specs)]), len(specs))


def test_hot_loop_mix_picks_the_loop_with_most_mma():
    from tritonkernels.aot import hot_loop_mix

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   FFMA R5, R6, R7, R5 ;
        /*0050*/                   NOP ;
        /*0060*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0070*/              @!P1 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
    """
    mix = hot_loop_mix(sass)
    assert mix["loop_mma"] == 2 and mix["loop_instructions"] == 4  # HMMA, FFMA, HMMA, BRA; NOP left out
    assert mix["loop_top_opcodes"] == {"HMMA": 2, "FFMA": 1, "BRA": 1}
    with pytest.raises(ValueError, match="no loop"):
        hot_loop_mix("        /*0000*/                   EXIT ;")


@pytest.mark.slow
def test_sass_model_of_the_forward_on_sm89():
    # The static issue model (MODELED): without RoPE the forward's loop is tensor-bound; the fused
    # RoPE adds instructions, never MMAs.
    specs = [
        dict(kernel="fwd", arch=89, head_dim=128, cfg=[64, 32, 4, 2], docs=False, rope=rope)
        for rope in (False, True)
    ]
    plain, fused = _compile(["--specs", json.dumps(specs)])
    assert plain["loop_mma"] == fused["loop_mma"] == 64  # (64 x 32 x 128) x 2 / (16 x 8 x 16) / 4 warps
    assert plain["bound"] == "tensor" and fused["loop_instructions"] > plain["loop_instructions"]
