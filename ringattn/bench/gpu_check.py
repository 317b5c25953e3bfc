"""gpu-check: one command for a CUDA machine — correctness of every backend, speed vs peers, verdicts.

1. Each backend that can run on the device: forward and all gradients vs the fp64 reference under the
   numerics rule (ringattn.testing), over dtypes, causal on/off, GQA, RoPE at 4M positions, an odd length.
2. The kernels suite on the GPU (TFLOP/s vs SDPA in the same run).
3. A verdict table: one PASS/FAIL line per check.
4. Determinism: each backend's backward with ``deterministic=True`` twice (bit-equal?) and its time
   against the default backward (cuda: the dQ pass instead of dQ atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ringattn import RoPEConfig, apply_rope
from ringattn.backends import BACKENDS
from ringattn.block import BlockMask, block_args, block_backward, block_forward
from ringattn.reference import attention_backward_ref, attention_ref
from ringattn.testing import GRAD_FACTOR, OUTPUT_FACTOR, peer_error_check

from . import kernels
from .common import Results, timing

COLUMNS = {
    "check": "what is checked (numerics: a backend's forward and gradients against the fp64 reference)",
    "backend": "the ringattn backend under test",
    "dtype": "dtype of q, k, v",
    "causal": "causal mask",
    "rope": "RoPE case: none, or theta 45.2e9 at positions just below 4M",
    "tensor": "the output compared (out, dq, dk, dv)",
    "ours_err": "max |backend - fp64 reference|",
    "bound": "allowed error: factor x max |torch in this dtype - fp64 reference| + eps (ringattn.testing)",
    "verdict": "PASS when ours_err <= bound; n/a with the backend's can_implement reason",
}


def _peer(q, k, v, dout, causal, rope, positions, dtype):
    """Plain torch in the dtype under test: rotate (fp64, then cast), SDPA, autograd for gradients."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rq, rk = leaves[0], leaves[1]
    if rope is not None:
        rq, rk = apply_rope(rq, positions, rope), apply_rope(rk, positions, rope)
    out = F.scaled_dot_product_attention(
        rq.to(dtype).transpose(1, 2),
        rk.to(dtype).transpose(1, 2),
        leaves[2].to(dtype).transpose(1, 2),
        is_causal=causal,
        enable_gqa=True,
    ).transpose(1, 2)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def correctness(
    results: Results, device: str, backends=None, S: int = 257, D: int = 128, dtypes=None
) -> None:
    dev = torch.device(device)
    dtypes = dtypes or ((torch.bfloat16, torch.float16) if dev.type == "cuda" else (torch.float32,))
    gen = torch.Generator(device=dev).manual_seed(0)
    rope_cases = {"none": None, "theta45.2e9@4M": RoPEConfig(D, theta=45.2e9)}
    positions = torch.arange(4_194_304 - S, 4_194_304, device=dev)
    for dtype in dtypes:
        q = torch.randn(2, S, 8, D, device=dev, generator=gen).to(dtype)
        k, v = (torch.randn(2, S, 2, D, device=dev, generator=gen).to(dtype) for _ in range(2))
        dout = torch.randn(2, S, 8, D, device=dev, generator=gen).to(dtype)
        for causal in (False, True):
            for rope_name, rope in rope_cases.items():
                pos = positions if rope is not None else None
                mask = BlockMask(causal=causal)
                kw = dict(causal=causal, rope=rope, q_positions=pos, k_positions=pos)
                ref_out, ref_lse = attention_ref(q, k, v, **kw)
                ref = [ref_out, *attention_backward_ref(dout, q, k, v, ref_lse, out=ref_out, **kw)]
                peer = _peer(q, k, v, dout, causal, rope, pos, dtype)
                for name in backends or BACKENDS:
                    common = dict(
                        check="numerics", backend=name, dtype=str(dtype)[6:], causal=causal, rope=rope_name
                    )
                    ok, reason = BACKENDS[name].can_implement(
                        q, k, v, block_args(q, k, v, mask, rope=rope, q_positions=pos, k_positions=pos)
                    )
                    if not ok:
                        results.add(tensor="-", verdict=f"n/a: {reason}", **common)
                        continue
                    out, lse = block_forward(
                        q, k, v, mask, rope=rope, q_positions=pos, k_positions=pos, backend=name
                    )
                    grads = block_backward(
                        dout,
                        q,
                        k,
                        v,
                        out,
                        lse,
                        mask,
                        rope=rope,
                        q_positions=pos,
                        k_positions=pos,
                        backend=name,
                    )
                    for tensor, ours, r, p in zip(
                        ("out", "dq", "dk", "dv"), (out, *grads), ref, peer, strict=True
                    ):
                        factor = OUTPUT_FACTOR if tensor == "out" else GRAD_FACTOR
                        check = peer_error_check(ours, r, p, factor=factor)
                        results.add(
                            tensor=tensor,
                            ours_err=check.ours_err,
                            bound=check.bound,
                            verdict="PASS" if check.ok else "FAIL",
                            **common,
                        )


DETERMINISM_COLUMNS = {
    "backend": "the ringattn backend under test",
    "dtype": "dtype of q, k, v",
    "S": "sequence length (B=1, 32 query heads, 8 KV heads, causal, exact RoPE)",
    "head_dim": "head dim",
    "t_default": "median s of one backward (deterministic=False: cuda adds dQ with fp32 atomics)",
    "t_deterministic": "median s of one backward with deterministic=True (cuda: its separate dQ pass)",
    "ratio": "t_deterministic / t_default",
    "bit_equal": "two deterministic=True backwards gave the same dq, dk, dv bits",
}


def determinism(device: str, S: int = 4096, D: int = 128, dtype=torch.bfloat16, backends=None) -> Results:
    """One row per backend that can run here: what ``deterministic=True`` costs in the backward and
    whether it repeats bit for bit. A backend that cannot run gets its reason in ``bit_equal``."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    q, dout = (torch.randn(1, S, 32, D, device=dev, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, S, 8, D, device=dev, generator=gen).to(dtype) for _ in range(2))
    mask, rope = BlockMask(causal=True), RoPEConfig(D, theta=45.2e9)
    results = Results("gpu-determinism")
    for name in backends or BACKENDS:
        row = dict(backend=name, dtype=str(dtype)[6:], S=S, head_dim=D)
        ok, reason = BACKENDS[name].can_implement(
            q, k, v, block_args(q, k, v, mask, rope=rope, deterministic=True)
        )
        if not ok:
            results.add(**row, bit_equal=f"n/a: {reason}")
            continue
        out, lse = block_forward(q, k, v, mask, rope=rope, backend=name)

        def backward(deterministic, name=name, out=out, lse=lse):
            return block_backward(
                dout, q, k, v, out, lse, mask, rope=rope, deterministic=deterministic, backend=name
            )

        first, second = backward(True), backward(True)
        t_default, t_det = timing(lambda: backward(False)).median, timing(lambda: backward(True)).median
        results.add(
            **row, t_default=t_default, t_deterministic=t_det, ratio=t_det / t_default,
            bit_equal=all(torch.equal(a, b) for a, b in zip(first, second, strict=True)),
        )  # fmt: skip
    return results


AUTOTUNE_COLUMNS = {
    "kernel": "Triton kernel tuned (fwd, dq, dkdv)",
    "dtype": "dtype of q, k, v",
    "head_dim": "head dim",
    "group": "query heads per KV head (GQA group)",
    "causal": "causal mask",
    "docs": "packed documents (cu_seqlens)",
    "rope": "RoPE variant fused in the kernel",
    "sq": "query length of the tuned problem",
    "sk": "key length of the tuned problem",
    "rows": "batch x query heads of the tuned problem",
    "features": "score features compiled in (window, softcap, alibi, kdocs), empty for none",
    "tile": "candidate tile (BLOCK_M x BLOCK_N)",
    "warps": "candidate num_warps",
    "stages": "candidate num_stages",
    "ms": "the autotuner's measured milliseconds for this candidate",
    "chosen": "the fastest candidate, the one the autotuner kept",
}


def autotune_results(tuner=None) -> Results:
    """One row per (tuned problem class, candidate config) the Triton autotuner timed in this run."""
    from tritonkernels.autotune import TUNER

    results = Results("gpu-autotune")
    for key, times in (tuner or TUNER).timings.items():
        fastest = min(times.values())
        for cfg, ms in times.items():
            row = key._asdict()
            row.pop("device")
            row["dtype"] = str(row["dtype"]).removeprefix("torch.")
            results.add(
                **row, tile=f"{cfg.block_m}x{cfg.block_n}", warps=cfg.num_warps, stages=cfg.num_stages,
                ms=ms, chosen=ms == fastest,
            )  # fmt: skip
    return results


def run(quick: bool, out_dir) -> Results:
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu-check needs a CUDA device, and torch sees none (torch.cuda.is_available() is False)"
        )
    results = Results("gpu-check")
    correctness(results, "cuda", S=257 if quick else 1023)
    results.save(out_dir, COLUMNS)
    speed = kernels.run(
        quick,
        out_dir,
        device="cuda",
        dtypes=(torch.bfloat16,),
        seq_lens=(2048,) if quick else (4096, 16384, 32768),
        head_dims=(64, 128),
        suite="gpu-kernels",
    )
    autotune_results().save(out_dir, AUTOTUNE_COLUMNS)
    determinism("cuda", S=2048 if quick else 8192).save(out_dir, DETERMINISM_COLUMNS)
    failed = [r for r in results.rows if r["verdict"] == "FAIL"]
    print(
        f"\ngpu-check: {len(results.rows) - len(failed)} checks passed or n/a, {len(failed)} failed; "
        f"{len(speed.rows)} speed rows in {out_dir}/gpu-kernels.md; tuner timings in {out_dir}/gpu-autotune.md; "
        f"deterministic backwards in {out_dir}/gpu-determinism.md"
    )
    return results
