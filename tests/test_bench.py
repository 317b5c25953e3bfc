"""Bench smoke test: suites run at tiny sizes, rows carry the schema, ratios come from measurements,
tables explain their columns, noisy ring numbers are marked, plots name the machine."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringattn._extension import compiled
from ringattn.bench import common, kernels, rope

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = {"device", "torch", "triton", "cuda", "git_sha", "timestamp", "suite", "ringattn"}


def _rows(out_dir: Path, suite: str) -> list[dict]:
    rows = json.loads((out_dir / f"{suite}.json").read_text())
    assert rows, f"{suite} produced no rows"
    text = (out_dir / f"{suite}.md").read_text()
    assert text.count("\n|") >= len(rows)
    # every table column is explained, one line each, before the table starts
    header = next(line for line in text.splitlines() if line.startswith("| "))
    columns = [c.strip() for c in header.strip("|").split("|")]
    before_table = text[: text.index(header)]
    for column in columns:
        assert f"- `{column}`: " in before_table, column
    for row in rows:
        assert ENV_KEYS <= row.keys()
    return rows


def test_kernels_suite_rows_and_ratios(tmp_path):
    # With the extension, the cpu backend runs in its least and most capable variant (--cpu-isa).
    variants = kernels.cpu_variants("all") if compiled() is not None else ("",)
    chosen = tuple(dict.fromkeys((variants[0], variants[-1])))
    kernels.run(
        True,
        tmp_path,
        dtypes=(torch.float32,),
        seq_lens=(32,),
        head_dims=(16,),
        heads=(2, 1),
        suite="kernels",
        cpu_isas=chosen,
    )
    rows = _rows(tmp_path, "kernels")
    if compiled() is not None:
        assert variants[0] == "generic"
        for variant in chosen:
            mine = [r for r in rows if r["impl"].startswith(f"ringattn cpu [{variant}]")]
            assert len(mine) == 6 and all(r["isa"] == variant for r in mine)
        with pytest.raises(
            SystemExit, match="--cpu-isa sse9: not a variant this CPU runs; compiled: generic"
        ):
            kernels.cpu_variants("sse9")
    assert (tmp_path / "kernels_tflops.png").stat().st_size > 0
    sdpa = {(r["rope"], r["mode"]): r["seconds"] for r in rows if r["impl"].startswith("torch sdpa")}
    assert len(sdpa) == 6
    for row in rows:
        assert row["seconds"] > 0 and row["flop_formula"]
        flops = 4 * 1 * 2 * 32 * 32 * 16 * 0.5 * {"fwd": 1, "bwd": 2.5, "fwd+bwd": 3.5}[row["mode"]]
        assert math.isclose(row["tflops"], flops / row["seconds"] / 1e12, rel_tol=1e-9)
        assert math.isclose(row["vs_sdpa"], sdpa[(row["rope"], row["mode"])] / row["seconds"], rel_tol=1e-9)


def test_rope_suite_rows_and_ratios(tmp_path):
    rope.run(True, tmp_path, window=64, head_dim=32)
    rows = _rows(tmp_path, "rope")
    baseline = {(r["theta"], r["positions"]): r["seconds"] for r in rows if r["impl"] == "transformers fp32"}
    for row in rows:
        assert math.isclose(
            row["vs_transformers"], row["seconds"] / baseline[(row["theta"], row["positions"])]
        )
        if row["impl"].startswith("ringattn exact"):
            assert row["max_phase_err_rad"] <= 1e-6
    worst_hf = max(r["max_phase_err_rad"] for r in rows if r["impl"] == "transformers fp32")
    assert worst_hf > 0.1  # the 4M mark at theta 45.2e9 and 5e5: the error exact mode removes


def test_missing_requested_baseline_is_a_loud_error():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",  # the repository's alias of python -m ringattn.bench
            "kernels",
            "--baselines",
            "sdpa,no-such-peer",
            "--out",
            "/nonexistent",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "no-such-peer" in result.stderr


def test_gpu_check_reports_every_autotune_timing(tmp_path):
    from ringattn.bench import gpu_check
    from tritonkernels.autotune import TuneKey, Tuner
    from tritonkernels.configs import KernelConfig

    fast, slow = KernelConfig(64, 32, 4, 2), KernelConfig(128, 32, 8, 2)
    tuner = Tuner(timer=lambda fn: fn())  # each "launch" returns its own time
    key = TuneKey(
        "fwd", torch.device("cpu"), torch.bfloat16, 128, 4, True, False, "exact/128", 4096, 4096, 32
    )
    assert tuner.choose(key, (slow, fast), {slow: 2.0, fast: 1.5}.__getitem__) == fast
    rows = gpu_check.autotune_results(tuner).rows
    assert [(r["tile"], r["ms"], r["chosen"]) for r in rows] == [("128x32", 2.0, False), ("64x32", 1.5, True)]
    assert rows[0]["dtype"] == "bfloat16" and rows[0]["rope"] == "exact/128" and rows[0]["sq"] == 4096
    gpu_check.autotune_results(tuner).save(tmp_path, gpu_check.AUTOTUNE_COLUMNS)
    assert "64x32" in (tmp_path / "gpu-autotune.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_flash_attn_baseline_without_gpu_is_an_error():
    with pytest.raises(SystemExit, match="flash-attn"):
        kernels.check_baselines(["flash-attn"])


def test_gpu_check_numerics_logic_passes_good_and_fails_bad_backends(monkeypatch):
    from ringattn.backends import BACKENDS
    from ringattn.bench import gpu_check
    from ringattn.bench.common import Results

    class OffByOnePercent:
        name = "broken"
        features = frozenset()

        def can_implement(self, *args):
            return True, ""

        def forward(self, *args, **kwargs):
            out, lse = BACKENDS["reference"].forward(*args, **kwargs)
            return out * 1.01, lse

        def backward(self, *args, **kwargs):
            return BACKENDS["reference"].backward(*args, **kwargs)

    monkeypatch.setitem(BACKENDS, "broken", OffByOnePercent())
    results = Results("gpu-check")
    gpu_check.correctness(results, "cpu", backends=["reference", "broken"], S=17, D=16)
    verdicts = {(r["backend"], r["tensor"]): r["verdict"] for r in results.rows}
    assert all(v == "PASS" for (b, _), v in verdicts.items() if b == "reference")
    assert verdicts[("broken", "out")] == "FAIL" and verdicts[("broken", "dv")] == "PASS"


def test_gpu_check_determinism_rows(tmp_path):
    from ringattn.bench import gpu_check

    results = gpu_check.determinism("cpu", S=40, D=16, dtype=torch.float32, backends=["cpu", "cuda"])
    rows = {r["backend"]: r for r in results.rows}
    assert rows["cpu"]["bit_equal"] is True and rows["cpu"]["t_default"] > 0 and rows["cpu"]["ratio"] > 0
    assert rows["cuda"]["bit_equal"].startswith("n/a: ")  # CPU tensors: the reason, no timing
    results.save(tmp_path, gpu_check.DETERMINISM_COLUMNS)
    assert "t_deterministic" in (tmp_path / "gpu-determinism.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_check_without_gpu_says_so(tmp_path):
    from ringattn.bench import gpu_check

    with pytest.raises(SystemExit, match="CUDA device"):
        gpu_check.run(True, tmp_path)


def test_ring_suite_rows_ratios_and_bytes(tmp_path):
    from ringattn.bench import ring

    ring.run(True, tmp_path, world_sizes=(2,), seq_lens=(64,), timeout_s=180, max_rounds=2)
    rows = _rows(tmp_path, "ring")
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    table = (tmp_path / "ring.md").read_text()
    for row in rows:
        assert min(row["t_single"], row["t_compute"], row["t_wire"], row["t_total"]) > 0
        assert math.isclose(row["overlap"], 1 - (row["t_total"] - row["t_compute"]) / row["t_wire"])
        assert math.isclose(row["efficiency"], row["t_single"] / 2 / row["t_total"])
        assert row["n"] >= 6  # two rounds of three interleaved iterations at least
        assert row["overlap_lo"] <= row["overlap"] <= row["overlap_hi"]
        assert row["efficiency_lo"] <= row["efficiency"] <= row["efficiency_hi"]
        if row.get("overlap_below_zero"):  # the whole interval below 0 (timing-dependent on a busy machine)
            shown = "below 0: exposed > wire ["
        elif row["overlap_within_noise"]:
            shown = "within noise ["
        else:
            shown = f"{row['overlap']:.2f} ["
        assert shown in table
    fwd = next(r for r in rows if r["mode"] == "fwd")
    # K and V of one 32-token shard travel per hop: 2 * B * S_local * Hkv * D * 4 bytes (fp32)
    assert fwd["bytes_per_hop"] == 2 * 1 * 32 * fwd["Hkv"] * fwd["D"] * 4


def _timing(median: float, half_iqr: float):
    """Five samples whose median and quartiles are known: median ± half_iqr at the quartiles."""
    return common.Timing(
        (median - 2 * half_iqr, median - half_iqr, median, median + half_iqr, median + 2 * half_iqr)
    )


def test_timing_quartiles_and_spread():
    t = _timing(2.0, 0.1)
    assert (t.median, t.q1, t.q3) == (2.0, 1.9, 2.1)
    assert math.isclose(t.spread, 0.1 / 2.0)


def test_ring_overlap_inside_timing_noise_is_marked():
    from ringattn.bench import ring

    single = _timing(4.0, 0.01)
    # Quiet: total 1.05 s, compute 1.00 s, wire 0.20 s, each within ±1 %: overlap 1 - 0.05 / 0.2 = 0.75.
    quiet = ring.derived(single, _timing(1.0, 0.005), _timing(0.2, 0.001), _timing(1.05, 0.005), 2)
    assert math.isclose(quiet["overlap"], 0.75) and not quiet["overlap_within_noise"]
    assert (
        quiet["overlap_lo"] < 0.75 < quiet["overlap_hi"] and quiet["overlap_hi"] - quiet["overlap_lo"] < 0.2
    )
    assert math.isclose(quiet["efficiency"], 4.0 / 2 / 1.05) and not quiet["efficiency_within_noise"]
    # Noisy: the compute and total times jitter by ±10 % while the wire is 1 % of them, so
    # the point value (1 - 0.05 / 0.01 = -4) says nothing.
    noisy = ring.derived(single, _timing(1.0, 0.1), _timing(0.01, 0.0005), _timing(1.05, 0.1), 2)
    assert math.isclose(noisy["overlap"], -4.0) and noisy["overlap_within_noise"]
    row = {"n": 6, "stable": True, **noisy}
    assert ring.CELLS["overlap"](row).startswith("within noise [")
    assert "-4" not in ring.CELLS["overlap"](row).split("[")[0]
    assert ring.CELLS["overlap"]({**quiet}).startswith("0.75 [")


def test_repeats_stop_when_the_median_settles_and_say_when_it_does_not():
    steady, drifting = [], []
    rounds = {"steady": 0, "drifting": 0}

    def steady_round():
        rounds["steady"] += 1
        steady.extend([1.0, 1.01, 0.99])

    def drifting_round():
        rounds["drifting"] += 1
        drifting.extend([float(rounds["drifting"])] * 3)  # every round twice, thrice ... as slow

    assert common.repeat_until_stable(steady_round, lambda: [steady], max_rounds=6, rel_tol=0.02)
    assert rounds["steady"] == 2
    assert not common.repeat_until_stable(drifting_round, lambda: [drifting], max_rounds=4, rel_tol=0.02)
    assert rounds["drifting"] == 4


def test_ring_interleaving_keeps_the_slowest_rank_and_stops_together():
    from ringattn.bench import ring

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    other_rank = torch.full((2, 3), 5.0, dtype=torch.float64)  # a slower rank: 5 s every iteration

    def gather(local):
        return torch.stack([local, other_rank])

    samples, stable = ring.interleaved_until_stable(
        fns, lambda: None, gather, per_round=3, max_rounds=5, rel_tol=0.02
    )
    assert stable and samples == {"a": [5.0] * 6, "b": [5.0] * 6}  # two rounds: the median held
    assert calls[:2] == ["a", "b"] and calls[2:8] == ["a", "b"] * 3  # warm-up, then interleaved


def test_markdown_requires_a_meaning_per_column():
    results = common.Results("t", env={"device": "x"})
    results.add(a=1.0)
    with pytest.raises(ValueError, match="meaning"):
        results.markdown({"a": ""})
    with pytest.raises(TypeError):
        results.markdown(["a"])
    text = results.markdown({"a": "what a is"})
    assert text.index("- `a`: what a is") < text.index("| a |")


def test_plots_are_labelled_with_machine_and_versions(tmp_path):
    import matplotlib

    env = common.environment()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        common.plot(tmp_path / "p.svg", "title", "x", "y", {"s": ([1, 2], [3, 4])}, env=env)
    svg = (tmp_path / "p.svg").read_text()
    for word in (f"torch {torch.__version__}", f"ringattn {env['ringattn']}", env["device"].split(" (")[0]):
        assert word in svg, word


def test_installed_bench_cli_runs_outside_the_repository(tmp_path):
    """python -m ringattn.bench from a folder that is not the repository (the package, not bench/)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "ringattn.bench", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_text.returncode == 0, help_text.stderr
    assert (
        "ring overlap and efficiency" in help_text.stdout
        and "usage: python -m ringattn.bench" in help_text.stdout
    )


def test_ring_overlap_surely_below_zero_is_said_plainly():
    from ringattn.bench import ring

    # total 2.0 s against compute 1.0 s + wire 0.1 s, all within ±5 %: overlap is surely negative.
    row = ring.derived(_timing(3.0, 0.01), _timing(1.0, 0.05), _timing(0.1, 0.005), _timing(2.0, 0.05), 2)
    assert row["overlap_hi"] < 0 and row["overlap_below_zero"] and not row["overlap_within_noise"]
    assert ring.CELLS["overlap"]({"n": 6, "stable": True, **row}).startswith("below 0")


def test_cp_suite_counts_bytes_per_mode_and_layout_balance(tmp_path):
    from ringattn.bench import features

    rows = {row["mode"]: row for row in features.run_cp(True, tmp_path).rows}
    # One shard of K/V is 2 x 256 tokens x 2 heads x 64 x bf16 = 131072 bytes; W - 1 = 3 forward hops.
    assert rows["ring"]["fwd_bytes"] == 3 * 131072
    assert rows["allgather"]["fwd_bytes"] == 3 * 131072  # gathered once: the same bytes, one collective
    assert rows["ring, fp8 wire"]["fwd_bytes"] < 0.51 * rows["ring"]["fwd_bytes"]  # e4m3 + scales
    assert rows["ring, fp8 wire"]["vs_ring"] < 1 and rows["allgather, fp8 wire"]["vs_ring"] < 1
    balance = json.loads((tmp_path / "layout_balance.json").read_text())
    doc = {row["W"]: row["busiest_over_mean"] for row in balance if row["layout"] == "doc_zigzag"}
    zig = {row["W"]: row["busiest_over_mean"] for row in balance if row["layout"] == "zigzag"}
    assert all(doc[W] <= 1.05 < zig[W] for W in (4, 8, 32))
    assert "busiest_over_mean" in (tmp_path / "layout_balance.md").read_text()


@pytest.mark.slow
def test_window_suite_cost_grows_slower_than_causal(tmp_path):
    from ringattn.bench import features

    rows = features.run_window(True, tmp_path, device="cpu").rows
    assert [row["S"] for row in rows] == [512, 1024, 2048]
    # 4x the tokens: plain causal costs ~16x at large S; the window's skipped tiles keep it near 4x.
    assert rows[-1]["t_window"] / rows[0]["t_window"] < rows[-1]["t_causal"] / rows[0]["t_causal"]
