"""Kernel suite: each backend of ours vs torch SDPA in the same run, and fused vs unfused RoPE.

Our kernels are timed through the block contract (block_forward / block_backward); SDPA through
its autograd path, with its backward time taken as (fwd+bwd) - fwd of two measured runs. The
"unfused" peer is what a transformers model does: rotate q and k with its RoPE module, then SDPA.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from ringattn import RoPEConfig, block_backward, block_forward
from ringattn.backends import BACKENDS
from ringattn.block import BlockMask, block_args

from .common import FLOP_FORMULA, Results, attention_flops, plot, progress
from .common import timing as _timing

COLUMNS = {
    "impl": "what ran: a ringattn backend through the block contract, or a peer (torch SDPA, flash-attn)",
    "dtype": "dtype of q, k, v",
    "S": "sequence length of q and k (one sequence, B = 1)",
    "D": "head dim",
    "causal": "causal mask",
    "rope": "RoPE applied: fused into our kernel, or transformers' RoPE module before SDPA for peers",
    "mode": "fwd, bwd, or fwd+bwd (bwd alone for peers: their fwd+bwd minus fwd)",
    "seconds": "median seconds per call",
    "spread": "half the interquartile range of the timing samples, relative to the median",
    "tflops": f"TFLOP/s from the FLOP formula ({FLOP_FORMULA}) over the median",
    "vs_sdpa": "SDPA's seconds / this row's seconds, same mode and RoPE (> 1: faster than SDPA)",
    "isa": "CPU rows: the kernel variant ringattn cpu ran (forced with --cpu-isa), torch's CPU capability for peers",
}
CELLS = {"spread": lambda row: "" if row.get("spread") is None else f"±{100 * row['spread']:.0f}%"}
OPTIONAL_BASELINES = {"flash-attn": "flash_attn"}


def check_baselines(requested: list[str]) -> None:
    """A baseline the user asked for that cannot be imported is an error, never a silent skip."""
    for name in requested:
        if name == "sdpa":
            continue
        if name not in OPTIONAL_BASELINES:
            raise SystemExit(f"unknown baseline {name!r}; known: sdpa, {', '.join(OPTIONAL_BASELINES)}")
        try:
            importlib.import_module(OPTIONAL_BASELINES[name])
        except ImportError as exc:
            raise SystemExit(f"baseline {name!r} was requested but cannot be imported: {exc}") from exc
        if name == "flash-attn" and not torch.cuda.is_available():
            raise SystemExit("baseline 'flash-attn' was requested but needs a CUDA device")


def _hf_rope(rope: RoPEConfig, positions: torch.Tensor):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=rope.dim * 2,
        num_attention_heads=2,
        head_dim=rope.dim,
        rope_parameters={"rope_type": "default", "rope_theta": rope.theta},
    )
    module = LlamaRotaryEmbedding(config).to(positions.device)

    def rotate(q_BHSD, k_BHSD):
        cos, sin = module(q_BHSD, positions[None])
        return apply_rotary_pos_emb(q_BHSD, k_BHSD, cos, sin, unsqueeze_dim=1)

    return rotate


def _our_backends(device: torch.device, requested: list[str] | None, q, k, v, rope) -> list[str]:
    mask = BlockMask(causal=True)
    names = requested or [n for n in BACKENDS if n != "reference"]  # the fp64 spec is not a contender
    usable = []
    for name in names:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
        ok, reason = BACKENDS[name].can_implement(q, k, v, block_args(q, k, v, mask, rope=rope))
        if ok:
            usable.append(name)
        elif requested:
            raise SystemExit(f"backend {name!r} was requested but cannot run here: {reason}")
    return usable


def cpu_variants(requested: str) -> tuple[str, ...]:
    """The CPU kernel variants ``--cpu-isa`` names (comma-separated; "all": every one this CPU runs;
    "": the default, the most capable). Exits naming the compiled and runnable ones on a bad name."""
    from ringattn._extension import compiled

    if not requested:
        return ("",)
    module = compiled()
    if module is None:
        raise SystemExit("--cpu-isa needs the compiled extension ringattn._C, which is not built")
    runs = [name for name, _, missing in module.cpu_variants() if not missing]
    names = runs if requested == "all" else [n for n in requested.split(",") if n]
    bad = [n for n in names if n not in runs]
    if bad:
        compiled_names = ", ".join(name for name, _, _ in module.cpu_variants())
        raise SystemExit(
            f"--cpu-isa {','.join(bad)}: not a variant this CPU runs; compiled: {compiled_names}; runs here: "
            + ", ".join(runs)
        )
    return tuple(names)


@contextmanager
def _forced_cpu_variant(name: str):
    """RINGATTN_CPU_ISA=name (read by the cpu backend at every call) inside the block; "" leaves it."""
    from ringattn.backends.cpu import ISA_ENV

    before = os.environ.get(ISA_ENV)
    if name:
        os.environ[ISA_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = before


def _variant_used(name: str) -> str:
    """The CPU kernel variant a call makes under ``_forced_cpu_variant(name)``."""
    from ringattn._extension import compiled
    from ringattn.backends.cpu import forced_variant

    module = compiled()
    with _forced_cpu_variant(name):
        return forced_variant(module) or module.cpu_variant()


def run(
    quick: bool,
    out_dir,
    *,
    device: str = "cpu",
    dtypes=(torch.float32, torch.bfloat16),
    seq_lens=None,
    head_dims=(128,),
    heads=(32, 8),
    backends: list[str] | None = None,
    suite: str = "kernels",
    cpu_isas: tuple[str, ...] = ("",),
) -> Results:
    """``cpu_isas``: the CPU kernel variants the cpu backend runs in, each its own rows ("": the default)."""
    results = Results(suite)
    dev = torch.device(device)
    Hq, Hkv = heads
    if seq_lens is None:
        seq_lens = (256, 512) if quick else (1024, 2048, 4096)
    if quick:
        Hq, Hkv = min(Hq, 8), min(Hkv, 2)
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = [(dt, S, D) for dt in dtypes for S in seq_lens for D in head_dims]
    for dtype, S, D in progress(cases, suite):
        _bench_case(results, dev, gen, dtype, S, D, Hq, Hkv, backends, quick, cpu_isas)
    results.save(out_dir, COLUMNS, CELLS)
    series = {}
    plot_dtype = str(dtypes[0]).removeprefix("torch.")
    for row in results.rows:
        if row["mode"] == "fwd+bwd" and row["D"] == head_dims[-1] and row["dtype"] == plot_dtype:
            xs, ys = series.setdefault(row["impl"], ([], []))
            xs.append(row["S"])
            ys.append(row["tflops"])
    plot(
        out_dir / f"{suite}_tflops.png",
        f"{suite}: fwd+bwd TFLOP/s, causal, {plot_dtype}, D={head_dims[-1]}",
        "sequence length",
        "TFLOP/s (causal FLOPs)",
        series,
        env=results.env,
        logx=True,
    )
    return results


def _bench_case(results, dev, gen, dtype, S, D, Hq, Hkv, backends, quick=False, cpu_isas=("",)):
    # quick: 2 rounds of 3 calls (enough to see the spread); else rounds of 5 until the median settles
    timing = partial(_timing, repeats=3, max_rounds=2) if quick else _timing
    q = torch.randn(1, S, Hq, D, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(1, S, Hkv, D, device=dev, dtype=dtype, generator=gen)
    dout = torch.randn_like(q)
    rope = RoPEConfig(D, theta=5e5)
    mask = BlockMask(causal=True)
    common = dict(dtype=str(dtype).removeprefix("torch."), S=S, D=D, causal=True, flop_formula=FLOP_FORMULA)

    torch_isa = torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else ""

    def record(impl, mode, seconds, sdpa_seconds, rope_on, spread=None, isa=torch_isa):
        flops = attention_flops(1, Hq, S, S, D, causal=True, mode=mode)
        results.add(
            impl=impl,
            mode=mode,
            rope=rope_on,
            seconds=seconds,
            spread=spread,
            tflops=flops / seconds / 1e12,
            vs_sdpa=sdpa_seconds / seconds,
            isa=isa,
            **common,
        )

    # Peer: SDPA in (B, H, S, D), GQA heads not expanded; with RoPE, transformers' module first.
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dout_t = dout.transpose(1, 2)
    rotate = _hf_rope(rope, torch.arange(S, device=dev))

    def sdpa_fwd(with_rope):
        qq, kk = rotate(qt, kt) if with_rope else (qt, kt)
        return F.scaled_dot_product_attention(qq, kk, vt, is_causal=True, enable_gqa=True)

    def sdpa_fwd_bwd(with_rope):
        sdpa_fwd(with_rope).backward(dout_t)

    sdpa = {}
    for with_rope in (False, True):
        fwd, all_ = timing(partial(sdpa_fwd, with_rope)), timing(partial(sdpa_fwd_bwd, with_rope))
        t_fwd, t_all = fwd.median, all_.median
        sdpa[with_rope] = {"fwd": t_fwd, "bwd": max(t_all - t_fwd, 1e-12), "fwd+bwd": t_all}
        spreads = {"fwd": fwd.spread, "bwd": None, "fwd+bwd": all_.spread}
        for mode, t in sdpa[with_rope].items():
            record("torch sdpa" + (" + hf rope" if with_rope else ""), mode, t, t, with_rope, spreads[mode])

    if dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func as fa2

        qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))

        def fa2_fwd_bwd():
            fa2(qf, kf, vf, causal=True).backward(dout)

        fwd, all_ = timing(partial(fa2, q, k, v, causal=True)), timing(fa2_fwd_bwd)
        t_fwd, t_all = fwd.median, all_.median
        for mode, t, spread in (
            ("fwd", t_fwd, fwd.spread),
            ("bwd", max(t_all - t_fwd, 1e-12), None),
            ("fwd+bwd", t_all, all_.spread),
        ):
            record("flash-attn 2", mode, t, sdpa[False][mode], False, spread)

    for name in _our_backends(dev, backends, q, k, v, rope):
        for variant in cpu_isas if name == "cpu" else ("",):
            with _forced_cpu_variant(variant):
                isa = _variant_used(variant) if name == "cpu" else ""
                for r in (None, rope):
                    out, lse = block_forward(q, k, v, mask, rope=r, backend=name)
                    fwd = timing(partial(block_forward, q, k, v, mask, rope=r, backend=name))
                    bwd = timing(partial(block_backward, dout, q, k, v, out, lse, mask, rope=r, backend=name))
                    label = (
                        f"ringattn {name}"
                        + (f" [{variant}]" if variant else "")
                        + (" fused rope" if r else "")
                    )
                    for mode, t, spread in (
                        ("fwd", fwd.median, fwd.spread),
                        ("bwd", bwd.median, bwd.spread),
                        ("fwd+bwd", fwd.median + bwd.median, None),
                    ):
                        record(label, mode, t, sdpa[r is not None][mode], r is not None, spread, isa)
