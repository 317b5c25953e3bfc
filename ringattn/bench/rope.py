"""RoPE suite: phase error vs fp64 (ours exact / hf vs transformers' fp32) and the cost of each path."""

from __future__ import annotations

import math
from functools import partial

import torch

from ringattn import RoPEConfig, cos_sin, extension_status
from ringattn.rope import reference_angles

from .common import Results, plot, time_fn

MARKS = {"8K": 8_192, "128K": 131_072, "1M": 1_048_576, "4M": 4_194_304}
THETAS = {"llama3-5e5": 5e5, "llama3-4M-45.2e9": 45.2e9}
COLUMNS = {
    "measure": "what the row measures (phase: angle error and cost of building cos/sin)",
    "theta": "RoPE base and the model it comes from",
    "positions": "the window of positions ends at this mark (the last positions before it: the worst phases)",
    "impl": "who built cos/sin: transformers' fp32 module, ringattn exact-phase (torch or compiled), ringattn hf",
    "max_phase_err_rad": "largest |angle error| in radians against fp64 angles, over the window and frequencies",
    "seconds": "median seconds to build cos/sin for the window",
    "vs_transformers": "this row's seconds / transformers' seconds at the same mark (< 1: faster)",
}


def _transformers_cos_sin(theta: float, head_dim: int, positions: torch.Tensor):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    module = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    return lambda: module(x, positions[None])


def _phase_err(cos, sin, truth) -> float:
    ours = torch.atan2(sin.double(), cos.double())
    return float((torch.remainder(ours - truth + math.pi, 2 * math.pi) - math.pi).abs().max())


def run(quick: bool, out_dir, *, window: int | None = None, head_dim: int = 128) -> Results:
    results = Results("rope")
    window = window or (1024 if quick else 8192)
    impls = ["torch"] + (["compiled"] if extension_status()["available"] else [])
    for theta_name, theta in THETAS.items():
        for mark, end in MARKS.items():
            _bench_mark(results, theta_name, theta, mark, end, window, head_dim, impls)
    results.save(out_dir, COLUMNS)
    series = {}
    for row in results.rows:
        if row["theta"] == "llama3-4M-45.2e9":
            xs, ys = series.setdefault(row["impl"], ([], []))
            xs.append(MARKS[row["positions"]])
            ys.append(max(row["max_phase_err_rad"], 1e-9))
    plot(
        out_dir / "rope_phase_error.png",
        "RoPE phase error vs fp64 (theta = 45.2e9, d = 128)",
        "position",
        "max |angle error| (rad)",
        series,
        env=results.env,
        logx=True,
        logy=True,
    )
    return results


def _bench_mark(results, theta_name, theta, mark, end, window, head_dim, impls):
    positions = torch.arange(end - window, end)  # the last positions before the mark: worst phases
    truth = reference_angles(RoPEConfig(head_dim, theta=theta), positions)
    common = dict(measure="phase", theta=theta_name, positions=mark)
    hf_module = _transformers_cos_sin(theta, head_dim, positions)
    cos, sin = hf_module()
    half = head_dim // 2
    t_hf = time_fn(hf_module)
    err = _phase_err(cos[0, :, :half], sin[0, :, :half], truth)
    results.add(impl="transformers fp32", max_phase_err_rad=err, seconds=t_hf, vs_transformers=1.0, **common)
    variants = [(f"ringattn exact ({impl})", "exact", impl) for impl in impls] + [
        ("ringattn hf", "hf", "torch")
    ]
    for label, precision, impl in variants:
        rope = RoPEConfig(head_dim, theta=theta, precision=precision)
        t = time_fn(partial(cos_sin, rope, positions, impl=impl))
        err = _phase_err(*cos_sin(rope, positions, impl=impl), truth)
        results.add(impl=label, max_phase_err_rad=err, seconds=t, vs_transformers=t / t_hf, **common)
