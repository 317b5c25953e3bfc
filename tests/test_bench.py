"""Bench smoke test: suites run at tiny sizes, rows carry the schema, ratios come from measurements."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run from the repository root, not installed

from bench import kernels, rope  # noqa: E402

ENV_KEYS = {"device", "torch", "triton", "cuda", "git_sha", "timestamp", "suite"}


def _rows(out_dir: Path, suite: str) -> list[dict]:
    rows = json.loads((out_dir / f"{suite}.json").read_text())
    assert rows, f"{suite} produced no rows"
    assert (out_dir / f"{suite}.md").read_text().count("\n|") >= len(rows)
    for row in rows:
        assert ENV_KEYS <= row.keys()
    return rows


def test_kernels_suite_rows_and_ratios(tmp_path):
    kernels.run(
        True,
        tmp_path,
        dtypes=(torch.float32,),
        seq_lens=(32,),
        head_dims=(16,),
        heads=(2, 1),
        suite="kernels",
    )
    rows = _rows(tmp_path, "kernels")
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
            "bench",
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
    from bench import gpu_check
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
    from bench import gpu_check
    from bench.common import Results
    from ringattn.backends import BACKENDS

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_check_without_gpu_says_so(tmp_path):
    from bench import gpu_check

    with pytest.raises(SystemExit, match="CUDA device"):
        gpu_check.run(True, tmp_path)


def test_ring_suite_rows_ratios_and_bytes(tmp_path):
    from bench import ring

    ring.run(True, tmp_path, world_sizes=(2,), seq_lens=(64,), timeout_s=180)
    rows = _rows(tmp_path, "ring")
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        assert min(row["t_single"], row["t_compute"], row["t_wire"], row["t_total"]) > 0
        assert math.isclose(row["overlap"], 1 - (row["t_total"] - row["t_compute"]) / row["t_wire"])
        assert math.isclose(row["efficiency"], row["t_single"] / 2 / row["t_total"])
    fwd = next(r for r in rows if r["mode"] == "fwd")
    # K and V of one 32-token shard travel per hop: 2 * B * S_local * Hkv * D * 4 bytes (fp32)
    assert fwd["bytes_per_hop"] == 2 * 1 * 32 * fwd["Hkv"] * fwd["D"] * 4
