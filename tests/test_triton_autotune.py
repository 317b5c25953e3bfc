"""Autotuning among shipped configs: the tuner's choice logic, its wiring into the launchers, and
every shipped tile shape computing correctly (under the interpreter, against the fp64 reference)."""

from __future__ import annotations

import pytest
import torch
from attention_checks import Case, backend_device, check_triton_launchers, make_inputs, reference_results
from harness import launcher_rope

from ringattn import RoPEConfig
from tritonkernels import flash
from tritonkernels.autotune import Tuner, size_bucket
from tritonkernels.configs import CONFIGS, KERNELS, KernelConfig, get_configs

A, B, C = KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 1), KernelConfig(16, 16, 4, 1)
R16 = RoPEConfig(16, theta=1e4)
pytestmark = pytest.mark.gpu  # CUDA tensors on a GPU machine, the interpreter elsewhere
DEVICE = backend_device("triton")


class FakeTimer:
    """Runs each candidate once and reports a scripted time for its config."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, fn):
        fn()
        cfg = self.current
        self.calls.append(cfg)
        return self.times[cfg]


def _tuner(times):
    timer = FakeTimer(times)
    tuner = Tuner(timer)

    def launch(cfg):
        timer.current = cfg

    return tuner, timer, launch


def test_tuner_picks_fastest_once_per_key():
    tuner, timer, launch = _tuner({A: 3.0, B: 1.0, C: 2.0})
    assert tuner.choose("k1", (A, B, C), launch) == B
    assert timer.calls == [A, B, C]
    assert tuner.choose("k1", (A, B, C), launch) == B  # cached: no new timing
    assert timer.calls == [A, B, C]
    assert tuner.timings["k1"] == {A: 3.0, B: 1.0, C: 2.0}
    timer.times = {A: 0.5, B: 1.0, C: 2.0}
    assert tuner.choose("k2", (A, B, C), launch) == A  # another key is tuned on its own
    tuner.clear()
    assert tuner.choose("k1", (A, B, C), launch) == A and len(timer.calls) == 9


def test_tuner_ties_single_candidate_and_disable(monkeypatch):
    tuner, timer, launch = _tuner({A: 1.0, B: 1.0})
    assert tuner.choose("tie", (A, B), launch) == A  # ties keep the default
    assert tuner.choose("one", (B,), launch) == B and len(timer.calls) == 2  # nothing to time
    monkeypatch.setenv("RINGATTN_TRITON_AUTOTUNE", "0")
    assert tuner.choose("off", (A, B), launch) == A and len(timer.calls) == 2
    with pytest.raises(ValueError, match="candidate"):
        tuner.choose("none", (), launch)


def test_size_bucket():
    assert [size_bucket(n) for n in (0, 1, 2, 3, 64, 65, 4096)] == [0, 1, 2, 4, 64, 128, 4096]


def test_launchers_tune_then_launch_the_choice(monkeypatch):
    # Two candidates for every kernel; the fake timer favours the second. Timing runs write the
    # outputs too, so the final results must still match the reference exactly as an untuned run.
    monkeypatch.setattr(flash, "get_configs", lambda *args: (A, C))
    tuner, timer, _ = _tuner({A: 2.0, C: 1.0})
    seen = []
    orig_choose = tuner.choose

    def choose(key, candidates, launch, device=None):
        def launch_recording(cfg):
            timer.current = cfg
            launch(cfg)

        cfg = orig_choose(key, candidates, launch_recording, device)
        seen.append((key[0], cfg))
        return cfg

    tuner.choose = choose
    c = Case(40, causal=True, rope=R16, Hq=4, Hkv=2)
    q, k, v, dout = make_inputs(c, torch.float32, seed=1, device=DEVICE)
    rope = launcher_rope(q, k, R16)
    out, lse = flash.flash_attn_fwd(q, k, v, causal=True, **rope, tuner=tuner)
    dq, dk, dv = flash.flash_attn_bwd(dout, q, k, v, out, lse, causal=True, **rope, tuner=tuner)
    assert seen == [("fwd", C), ("bwd_dq", C), ("bwd_dkdv", C)]
    assert timer.calls == [A, C] * 3
    ref = reference_results(q, k, v, dout, **c.spec_kwargs(DEVICE))
    for ours, name in zip((out, dq, dk, dv), ("out", "dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(ours.double(), ref[name], rtol=0, atol=1e-5)


def _shipped_tiles():
    tiles = set()
    for arch, bd in CONFIGS:
        for kernel in KERNELS:
            for size in (2, 4):
                for cfg in get_configs(kernel, bd, divmod(arch, 10), size):
                    tiles.add((cfg.block_m, cfg.block_n))
    return sorted(tiles)


def _tile_params():
    # the smallest and the largest tile in the default tier, the others in the slow tier
    tiles = _shipped_tiles()
    extremes = {min(tiles, key=lambda t: t[0] * t[1]), max(tiles, key=lambda t: t[0] * t[1])}
    return [pytest.param(t, marks=() if t in extremes else pytest.mark.slow) for t in tiles]


@pytest.mark.parametrize("tile", _tile_params(), ids=lambda t: f"{t[0]}x{t[1]}")
def test_every_shipped_tile_shape_is_correct(tile):
    # Documents (one empty), causal, RoPE, GQA, a length no tile divides: every masking path.
    m, n = tile
    case = Case(70, Hq=4, Hkv=2, causal=True, rope=R16, cu_seqlens=(0, 30, 30, 70))
    check_triton_launchers(case, torch.float32, KernelConfig(m, n, 4, 1), DEVICE)
