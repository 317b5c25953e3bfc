"""The bad-input table: every case runs in a child process forked from a warm fork server.

A case is a name, a builder that returns ``(call, watched)`` (the call with its bad argument, and the
tensors that must come back bitwise unchanged) and what must happen:

* ``error``: a TypeError/ValueError/NotImplementedError (or the listed types) whose message names
  the offending argument (any of ``names`` as a whole word, see ``names_it``), raised without
  touching the inputs;
* ``ok``: no error, and ``check(result)`` holds (empty shapes: zeros out, lse -inf, zero gradients).

The child reports through a pipe; a case that crashes (signal), hangs (``TIMEOUT_S``) or exits
without a report fails in the parent. Builders live here so the child needs only the case name.
This module is the fork server's preload: torch and ringattn are imported once, and each case
costs a fork.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

import ringattn
from ringattn import BlockMask, RoPEConfig, Span, block_backward, block_forward, cos_sin
from ringattn.ring import fake_ring, ring_attn_func, run_fake_ring, shard, unshard

TIMEOUT_S = 60.0
NAN, INF = math.nan, math.inf
ERRORS = ("TypeError", "ValueError", "NotImplementedError")


@dataclass
class Case:
    name: str
    build: Callable
    expect: str = "error"  # "error" or "ok"
    names: tuple[str, ...] = ()  # any of these (case-insensitive) must appear in the message
    errors: tuple[str, ...] = ERRORS
    check: Callable | None = None  # for "ok": result -> None or a failure string


# ------------------------------------------------------------------------------------------- inputs


def qkv(B=1, Sq=8, Sk=8, Hq=2, Hkv=1, D=16, dtype=torch.float32, device="cpu", grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype)
    out = [t.to(device) for t in (q, k, v)]
    if grad:
        out = [t.requires_grad_() for t in out]
    return out


def R(**kw):
    return RoPEConfig(16, **kw)


def fa(**kw):
    """flash_attn_func on standard inputs with ``kw`` overriding arguments (q, k, v included)."""

    def build():
        q, k, v = qkv()
        args = dict(q=q, k=k, v=v)
        args.update(kw)
        q_, k_, v_ = args.pop("q"), args.pop("k"), args.pop("v")
        watched = [t for t in (q_, k_, v_, args.get("positions")) if isinstance(t, torch.Tensor)]
        return (lambda: ringattn.flash_attn_func(q_, k_, v_, **args)), watched

    return build


def sdpa(**kw):
    def build():
        q, k, v = (t.transpose(1, 2) for t in qkv(Hq=2, Hkv=2))
        args = dict(query=q, key=k, value=v)
        args.update(kw)
        q_, k_, v_ = args.pop("query"), args.pop("key"), args.pop("value")
        watched = [
            t
            for t in (q_, k_, v_, args.get("positions"), args.get("attn_mask"))
            if isinstance(t, torch.Tensor)
        ]
        return (lambda: ringattn.scaled_dot_product_attention(q_, k_, v_, **args)), watched

    return build


def va(total=10, **kw):
    def build():
        q, k, v = (t[0] for t in qkv(Sq=total, Sk=total))
        cu = torch.tensor([0, 4, total], dtype=torch.int32)
        args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=total, max_seqlen_k=total)
        args.update(kw)
        pos = [
            args.pop(n)
            for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
        ]
        watched = [t for t in (*pos, args.get("positions")) if isinstance(t, torch.Tensor)]
        return (lambda: ringattn.flash_attn_varlen_func(*pos, **args)), watched

    return build


def bf(mask=None, **kw):
    def build():
        q, k, v = qkv()
        args = dict(q=q, k=k, v=v, mask=mask)
        args.update(kw)
        q_, k_, v_, m = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask")
        watched = [
            t
            for t in (q_, k_, v_, args.get("q_positions"), args.get("k_positions"))
            if isinstance(t, torch.Tensor)
        ]
        if isinstance(m, BlockMask) and isinstance(m.cu_seqlens, torch.Tensor):
            watched.append(m.cu_seqlens)
        return (lambda: block_forward(q_, k_, v_, m, **args)), watched

    return build


def bb(**kw):
    """block_backward with good forward results, ``kw`` overriding its arguments."""

    def build():
        q, k, v = qkv()
        out, lse = block_forward(q, k, v)
        dout = torch.randn_like(out)
        args = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
        args.update(kw)
        pos = [args.pop(n) for n in ("dout", "q", "k", "v", "out", "lse")]
        watched = [t for t in pos if isinstance(t, torch.Tensor)]
        return (lambda: block_backward(*pos, **args)), watched

    return build


def ring(W=1, S=8, **kw):
    """ring_attn_func on a fake ring of W (every rank gets ``kw``; a callable value is called with
    the rank), forward and backward; returns rank 0's (out, dq)."""

    def build():
        q, k, v = qkv(Sq=S, Sk=S)
        watched = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor)]
        comms = fake_ring(W, timeout=20.0)

        def rank_fn(comm):
            args = {n: (a(comm.rank) if callable(a) else a) for n, a in kw.items()}
            lq, lk, lv = (args.pop(n, None) for n in ("q", "k", "v"))
            cut = args.get("layout") if args.get("layout") in ringattn.ring.LAYOUTS else "zigzag"
            lq = shard(q, 1, comm, cut) if lq is None else lq
            lk = shard(k, 1, comm, cut) if lk is None else lk
            lv = shard(v, 1, comm, cut) if lv is None else lv
            lq = lq.detach().requires_grad_() if lq.dtype.is_floating_point and not lq.is_meta else lq
            out = ring_attn_func(lq, lk, lv, group=comm, **args)
            o = out[0] if isinstance(out, tuple) else out
            o.sum().backward()
            return out, lq.grad

        return (lambda: run_fake_ring(rank_fn, comms)[0]), watched

    return build


def plain(fn, *watched_factory):
    """A call with no tensors to watch (RoPEConfig, cos_sin, shard on fresh tensors)."""

    def build():
        tensors = [f() for f in watched_factory]
        return (lambda: fn(*tensors)), tensors

    return build


# ------------------------------------------------------------------------------------- empty checks


def _empty_ok(res) -> str | None:
    """out all zeros (no NaN), lse (if returned) -inf, gradients (when taken) finite zeros."""
    outs = res if isinstance(res, (tuple, list)) else (res,)
    for i, t in enumerate(outs):
        if not isinstance(t, torch.Tensor):
            continue
        if t.numel() == 0:
            continue
        if torch.isnan(t).any():
            return f"output {i} has NaN"
        if i == 1 and t.dtype == torch.float32 and t.dim() in (2, 3) and not torch.isneginf(t).all():
            return f"lse is not -inf everywhere: {t.flatten()[:4].tolist()}"
        if i != 1 and not torch.equal(t, torch.zeros_like(t)):
            return f"output {i} is not all zeros"
    return None


def empty_fa(backend="auto", dtype=torch.float32, rope=None, **shape):
    def build():
        q, k, v = qkv(dtype=dtype, grad=True, **shape)

        def call():
            out, lse = ringattn.flash_attn_func(
                q, k, v, causal=True, rope=rope, return_lse=True, backend=backend
            )
            out.sum().backward()
            grads = [torch.zeros(0) if t.grad is None else t.grad for t in (q, k, v)]
            return (out.detach(), lse, *grads)

        return call, [q.detach(), k.detach(), v.detach()]

    return build


def empty_va(backend="auto", rope=None, cu=(0, 0)):
    def build():
        q, k, v = (t[0].detach().requires_grad_() for t in qkv(Sq=cu[-1], Sk=cu[-1]))
        cu_t = torch.tensor(cu, dtype=torch.int32)

        def call():
            out, lse = ringattn.flash_attn_varlen_func(
                q, k, v, cu_t, cu_t, 0, 0, causal=True, rope=rope, return_lse=True, backend=backend
            )
            return out, lse

        return call, [q.detach(), k.detach(), v.detach(), cu_t]

    return build


def empty_block(backend="auto", backward=False, **shape):
    def build():
        q, k, v = qkv(**shape)

        def call():
            out, lse = block_forward(q, k, v, BlockMask(True), backend=backend)
            if not backward:
                return out, lse
            dq, dk, dv = block_backward(
                torch.ones_like(out), q, k, v, out, lse, BlockMask(True), backend=backend
            )
            return dq, torch.full((1, 1, 1), -INF), dk, dv

        return call, [q, k, v]

    return build


def _ring_empty_check(res):
    out, dq = res
    return _empty_ok((out[0], out[1])) if isinstance(out, tuple) else _empty_ok((out,))


def _finite_check(res):
    out, dq = res
    out = out[0] if isinstance(out, tuple) else out
    if not torch.isfinite(out).all() or (dq is not None and not torch.isfinite(dq).all()):
        return "non-finite output or gradient"
    return None


def _finite_out(res):
    out = res[0] if isinstance(res, tuple) else res
    return None if torch.isfinite(out).all() else "non-finite output"


def unshard_w2():
    """unshard on a fake ring of 2 whose ranks pass 3 and 1 tokens: no zigzag split of 4 tokens over
    2 ranks gives those lengths (it gives 2 + 2)."""

    def build():
        x = torch.randn(1, 6, 2, 4)

        def call():
            comms = fake_ring(2, timeout=20.0)
            return run_fake_ring(lambda c: unshard(x[:, : 3 if c.rank == 0 else 1], 1, c, "zigzag"), comms)[0]

        return call, [x]

    return build


def _rows_nan_check(res):
    out = res[0] if isinstance(res, tuple) else res
    if not torch.isnan(out[0, 3, 1]).all():
        return f"the NaN query row (0, 3, 1) gave {out[0, 3, 1, :4].tolist()}, not NaN"
    others = torch.ones_like(out, dtype=torch.bool)
    others[0, 3, 1] = False
    if torch.isnan(out[others]).any():
        return "NaN leaked into other rows"
    return None


def nan_q(backend):
    def build():
        q, k, v = qkv()
        q[0, 3, 1, 5] = NAN
        return (lambda: ringattn.flash_attn_func(q, k, v, backend=backend)), [q, k, v]

    return build


# --------------------------------------------------------------------------------------------- table

MAX = 2**31
META = "meta"


def _cases() -> list[Case]:
    C = []

    def err(name, build, *names, errors=ERRORS):
        C.append(Case(name, build, "error", names, errors))

    def ok(name, build, check=_empty_ok):
        C.append(Case(name, build, "ok", check=check))

    q, k, v = qkv()

    # fmt: off
    # --- wrong types
    err("fa-q-list", fa(q=q.tolist()), "q")
    err("fa-k-none", fa(k=None), "k")
    err("fa-v-int", fa(v=3), "v")
    err("fa-causal-str", fa(causal="yes"), "causal")
    err("fa-causal-none", fa(causal=None), "causal")
    err("fa-causal-int", fa(causal=1), "causal")
    err("fa-scale-str", fa(softmax_scale="0.1"), "softmax_scale")
    err("fa-scale-bool", fa(softmax_scale=True), "softmax_scale")
    err("fa-scale-tensor", fa(softmax_scale=torch.tensor([0.1, 0.2])), "softmax_scale")
    err("fa-rope-dict", fa(rope={"dim": 16}), "rope")
    err("fa-rope-int", fa(rope=16), "rope")
    err("fa-positions-list", fa(rope=R(), positions=list(range(8))), "positions")
    err("fa-backend-int", fa(backend=3), "backend")
    err("fa-backend-none", fa(backend=None), "backend")
    err("fa-return-lse-str", fa(return_lse="yes"), "return_lse")
    err("fa-deterministic-str", fa(deterministic="no"), "deterministic")
    err("fa-dropout", fa(dropout_p=0.1), "dropout_p", errors=("NotImplementedError",))
    err("sdpa-attn-mask", sdpa(attn_mask=torch.ones(8, 8, dtype=torch.bool)), "attn_mask", errors=("NotImplementedError",))
    err("sdpa-dropout", sdpa(dropout_p=1.5), "dropout_p")
    err("sdpa-query-list", sdpa(query=[[1.0]]), "query")
    err("sdpa-is-causal-str", sdpa(is_causal="x"), "is_causal")
    err("sdpa-enable-gqa-none", sdpa(enable_gqa=None), "enable_gqa")
    err("sdpa-scale-str", sdpa(scale="a"), "scale")
    err("va-cu-list", va(cu_seqlens_q=[0, 4, 10], cu_seqlens_k=[0, 4, 10]), "cu_seqlens_q")
    err("va-causal-str", va(causal="y"), "causal")
    err("bf-mask-str", bf(mask="causal"), "mask")
    err("bf-causal-str", bf(mask=BlockMask("yes")), "causal")
    err("bf-positions-float", bf(rope=R(), q_positions=torch.arange(8.0)), "q_positions")
    err("bf-out-dtype-int", bf(out_dtype=torch.int32), "out_dtype")
    err("bb-dout-none", bb(dout=None), "dout")
    err("bb-lse-list", bb(lse=[0.0]), "lse")
    err("bb-grad-dtype-fp16", bb(grad_dtype=torch.float16), "grad_dtype")
    err("ring-causal-str", ring(causal="yes"), "causal")
    err("ring-causal-none", ring(causal=None), "causal")
    err("ring-return-lse-int", ring(return_lse=1), "return_lse")
    err("ring-backend-int", ring(backend=1), "backend")
    err("ring-timeout-str", ring(timeout="5"), "timeout")
    err("ring-group-str", plain(lambda q: ring_attn_func(q, q, q, group="world"), lambda: qkv()[0]), "'world'", "str")
    err("shard-x-list", plain(lambda: shard([1, 2, 3], 0, fake_ring(1)[0])), "x")
    err("shard-dim-bool", plain(lambda x: shard(x, True, fake_ring(1)[0]), lambda: qkv()[0]), "dim")
    err("shard-dim-5", plain(lambda x: shard(x, 5, fake_ring(1)[0]), lambda: qkv()[0]), "dim")
    err("unshard-wrong-lengths", unshard_w2(), "shard lengths", "lengths")
    err("cos-sin-impl", plain(lambda p: cos_sin(R(), p, impl="gpu"), lambda: torch.arange(4)), "impl")
    err("shard-dim-float", plain(lambda x: shard(x, 1.0, fake_ring(1)[0]), lambda: qkv()[0]), "dim")
    err("cos-sin-positions-list", plain(lambda: cos_sin(R(), [0, 1, 2])), "positions")
    err("cos-sin-rope-dict", plain(lambda p: cos_sin({"dim": 16}, p), lambda: torch.arange(4)), "rope")

    # --- shapes
    err("fa-q-3d", fa(q=q[0]), "q")
    err("fa-k-5d", fa(k=k[None]), "k")
    err("fa-kv-mismatch", fa(v=v[:, :4]), "k", "v")
    err("fa-batch-mismatch", fa(k=torch.cat([k, k]), v=torch.cat([v, v])), "B", "batch")
    err("fa-headdim-mismatch", fa(k=k[..., :8], v=v[..., :8]), "D", "head dim")
    err("fa-heads-not-multiple", fa(q=torch.randn(1, 8, 3, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16)), "heads")
    err("fa-hkv-0", fa(k=k[:, :, :0], v=v[:, :, :0]), "Hkv", "heads")
    err("fa-d-0", fa(q=q[..., :0], k=k[..., :0], v=v[..., :0]), "head dim", "D")
    err("fa-positions-short", fa(rope=R(), positions=torch.arange(5)), "positions")
    err("fa-positions-3d", fa(rope=R(), positions=torch.arange(8)[None, None]), "positions")
    err("fa-positions-batch-3", fa(rope=R(), positions=torch.arange(8).repeat(3, 1)), "positions")
    err("fa-positions-sq-gt-sk", fa(q=torch.randn(1, 9, 2, 16), rope=R(), positions=torch.arange(8)), "positions")
    err("fa-rope-dim", fa(rope=RoPEConfig(32)), "rope.dim", "rope")
    err("sdpa-query-3d", sdpa(query=torch.randn(2, 8, 16)), "query")
    err("sdpa-gqa-without-flag", sdpa(key=torch.randn(1, 1, 8, 16), value=torch.randn(1, 1, 8, 16)), "enable_gqa")
    err("sdpa-positions-sq-ne-sk", sdpa(query=torch.randn(1, 2, 4, 16), rope=R(), positions=torch.arange(8)), "positions")
    err("sdpa-hkv-0", sdpa(key=torch.randn(1, 0, 8, 16), value=torch.randn(1, 0, 8, 16), enable_gqa=True), "Hkv", "heads")
    err("va-q-4d", va(q=torch.randn(1, 10, 2, 16)), "q")
    err("va-total-mismatch", va(q=torch.randn(9, 2, 16)), "q", "cu_seqlens_q", "tokens")
    err("va-positions-short", va(rope=R(), positions=torch.arange(9)), "positions")
    err("va-d-0", va(q=torch.randn(10, 2, 0), k=torch.randn(10, 1, 0), v=torch.randn(10, 1, 0)), "head dim", "D")
    err("bf-q-positions-shape", bf(rope=R(), q_positions=torch.arange(7)), "q_positions")
    err("bf-k-positions-shape", bf(rope=R(), k_positions=torch.arange(8)[None, None]), "k_positions")
    err("bf-hkv-0", bf(k=k[:, :, :0], v=v[:, :, :0]), "Hkv", "heads")
    err("bb-dout-shape", bb(dout=torch.randn(1, 8, 2, 8)), "dout")
    err("bb-lse-shape", bb(lse=torch.zeros(1, 2, 7)), "lse")
    err("bb-delta-shape", bb(delta=torch.zeros(1, 2, 9)), "delta")
    err("bf-span-negative", plain(lambda: BlockMask(False, Span(-1))), "start", "span")
    err("bf-span-past-2-31", bf(mask=BlockMask(True, Span(2**31 - 4), Span())), "2^31", "span")
    err("bb-out-shape", bb(out=torch.zeros(1, 8, 2, 8)), "out")
    err("ring-s-local-mismatch", ring(k=lambda r: torch.randn(1, 3, 1, 16), v=lambda r: torch.randn(1, 3, 1, 16)), "S_local", "k")
    err("ring-positions-shape", ring(rope=R(), positions=torch.arange(5)), "positions")
    err("ring-hkv-0", ring(k=lambda r: torch.randn(1, 8, 0, 16), v=lambda r: torch.randn(1, 8, 0, 16)), "Hkv", "heads")
    err("ring-d-0", ring(q=lambda r: torch.randn(1, 8, 2, 0), k=lambda r: torch.randn(1, 8, 1, 0), v=lambda r: torch.randn(1, 8, 1, 0)), "head dim", "D")

    # --- dtypes
    err("fa-int-q", fa(q=q.to(torch.int32), k=k.to(torch.int32), v=v.to(torch.int32)), "q")
    err("fa-mixed-dtypes", fa(k=k.bfloat16()), "dtype")
    err("fa-complex", fa(q=q.to(torch.complex64), k=k.to(torch.complex64), v=v.to(torch.complex64)), "q", "dtype")
    err("fa-fp64-on-cpu-backend", fa(q=q.double(), k=k.double(), v=v.double(), backend="cpu"), "dtype", "float64")
    err("fa-fp64-on-triton", fa(q=q.double(), k=k.double(), v=v.double(), backend="triton"), "dtype", "float64")
    err("fa-positions-float", fa(rope=R(), positions=torch.arange(8.0)), "positions")
    err("fa-positions-int16", fa(rope=R(), positions=torch.arange(8, dtype=torch.int16)), "positions")
    err("fa-positions-bool", fa(rope=R(), positions=torch.ones(8, dtype=torch.bool)), "positions")
    err("va-cu-float", va(cu_seqlens_q=torch.tensor([0.0, 3.9, 10.0]), cu_seqlens_k=torch.tensor([0.0, 3.9, 10.0])), "cu_seqlens_q")
    err("ring-dkv-dtype-int", ring(dkv_dtype=torch.int32), "dkv_dtype")
    err("ring-dkv-dtype-fp16", ring(dkv_dtype=torch.float16), "dkv_dtype")
    err("ring-positions-float", ring(rope=R(), positions=torch.arange(8.0)), "positions")
    err("bf-cu-float", bf(mask=BlockMask(False, Span(), Span(), torch.tensor([0.0, 8.0]))), "cu_seqlens")

    # --- devices: a meta tensor among CPU tensors
    err("fa-k-meta", fa(k=k.to(META)), "k", "device")
    err("fa-v-meta", fa(v=v.to(META)), "v", "device")
    err("fa-q-meta", fa(q=q.to(META)), "q", "device")
    err("fa-positions-meta", fa(rope=R(), positions=torch.arange(8, device=META)), "positions")
    err("va-cu-meta", va(cu_seqlens_q=torch.tensor([0, 10], device=META), cu_seqlens_k=torch.tensor([0, 10], device=META)), "cu_seqlens")
    err("va-positions-meta", va(rope=R(), positions=torch.arange(10, device=META)), "positions")
    err("sdpa-key-meta", sdpa(key=torch.randn(1, 2, 8, 16, device=META)), "key", "device")
    err("bf-cu-meta", bf(mask=BlockMask(False, Span(), Span(), torch.tensor([0, 8], device=META))), "cu_seqlens")
    err("bf-q-positions-meta", bf(rope=R(), q_positions=torch.arange(8, device=META)), "q_positions")
    err("bb-lse-meta", bb(lse=torch.zeros(1, 2, 8, device=META)), "lse")
    err("bb-dout-meta", bb(dout=torch.zeros(1, 8, 2, 16, device=META)), "dout")
    err("ring-k-meta", ring(k=lambda r: torch.randn(1, 8, 1, 16, device=META)), "k", "device")
    err("ring-cu-meta", ring(cu_seqlens=torch.tensor([0, 8], device=META)), "cu_seqlens")

    # --- softmax_scale: NaN, inf, -inf, 0, negative, everywhere
    for label, s in (("nan", NAN), ("inf", INF), ("minus-inf", -INF), ("zero", 0.0), ("negative", -0.5)):
        err(f"fa-scale-{label}", fa(softmax_scale=s), "softmax_scale")
        err(f"va-scale-{label}", va(softmax_scale=s), "softmax_scale")
        err(f"sdpa-scale-{label}", sdpa(scale=s), "scale")
        err(f"bf-scale-{label}", bf(softmax_scale=s), "softmax_scale")
        err(f"ring-scale-{label}", ring(softmax_scale=s), "softmax_scale")

    # --- empty shapes: no error; zeros out, lse -inf, zero gradients
    ok("empty-fa-sq0", empty_fa(Sq=0))
    ok("empty-fa-sk0", empty_fa(Sk=0))
    ok("empty-fa-both0", empty_fa(Sq=0, Sk=0))
    ok("empty-fa-b0", empty_fa(B=0))
    ok("empty-fa-sk0-rope", empty_fa(Sk=0, rope=R()))
    ok("empty-fa-both0-rope", empty_fa(Sq=0, Sk=0, rope=R()))
    ok("empty-fa-sk0-fp64-auto", empty_fa(Sk=0, dtype=torch.float64))
    ok("empty-fa-sk0-fp16-auto", empty_fa(Sk=0, dtype=torch.float16))
    ok("empty-fa-sk0-reference", empty_fa(Sk=0, backend="reference"))
    ok("empty-fa-sk0-cpu-bf16", empty_fa(Sk=0, backend="cpu", dtype=torch.bfloat16))
    ok("empty-fa-sk0-triton", empty_fa(Sk=0, backend="triton"))
    ok("empty-fa-sq0-triton", empty_fa(Sq=0, backend="triton"))
    ok("empty-fa-both0-rope-triton", empty_fa(Sq=0, Sk=0, rope=R(), backend="triton"))
    ok("empty-va-total0", empty_va())
    ok("empty-va-total0-rope", empty_va(rope=R()))
    ok("empty-va-total0-reference", empty_va(backend="reference"))
    ok("empty-va-total0-rope-triton", empty_va(rope=R(), backend="triton"))
    ok("empty-va-empty-docs", empty_va(cu=(0, 0, 0, 0)))
    ok("empty-sdpa-sk0", plain(lambda q: ringattn.scaled_dot_product_attention(q, q[:, :, :0], q[:, :, :0]), lambda: torch.randn(1, 2, 4, 16)))
    ok("empty-sdpa-sq0", plain(lambda q: ringattn.scaled_dot_product_attention(q[:, :, :0], q, q), lambda: torch.randn(1, 2, 4, 16)))
    ok("empty-bf-sk0", empty_block(Sk=0))
    ok("empty-bf-sk0-reference", empty_block(Sk=0, backend="reference"))
    ok("empty-bb-sk0", empty_block(Sk=0, backward=True))
    ok("empty-bb-sq0", empty_block(Sq=0, backward=True))
    ok("empty-bb-sk0-triton", empty_block(Sk=0, backward=True, backend="triton"))
    ok("empty-ring-s0-w2", ring(W=2, S=0, return_lse=True), check=_ring_empty_check)
    ok("empty-ring-s0-w1-rope", ring(W=1, S=0, return_lse=True, rope=R()), check=_ring_empty_check)
    ok("ring-s1-w3-ranks-without-tokens", ring(W=3, S=1, return_lse=True, causal=True), check=_finite_check)
    ok("ring-s2-w4-stripe-rope", ring(W=4, S=2, layout="stripe", rope=R()), check=_finite_check)
    ok("empty-cos-sin", plain(lambda p: cos_sin(R(), p), lambda: torch.zeros(0, dtype=torch.int64)))

    # --- bad cu_seqlens
    err("va-cu-decreasing", va(cu_seqlens_q=torch.tensor([0, 6, 4, 10]), cu_seqlens_k=torch.tensor([0, 6, 4, 10])), "cu_seqlens_q")
    err("va-cu-not-ending-at-total", va(cu_seqlens_q=torch.tensor([0, 4, 8]), cu_seqlens_k=torch.tensor([0, 4, 8])), "cu_seqlens_q")
    err("va-cu-past-total", va(cu_seqlens_q=torch.tensor([0, 4, 12]), cu_seqlens_k=torch.tensor([0, 4, 12])), "cu_seqlens_q")
    err("va-cu-not-from-0", va(cu_seqlens_q=torch.tensor([2, 4, 10]), cu_seqlens_k=torch.tensor([2, 4, 10])), "cu_seqlens_q")
    err("va-cu-2d", va(cu_seqlens_q=torch.tensor([[0, 10]]), cu_seqlens_k=torch.tensor([[0, 10]])), "cu_seqlens_q")
    err("va-cu-one-entry", va(cu_seqlens_q=torch.tensor([0]), cu_seqlens_k=torch.tensor([0])), "cu_seqlens_q")
    err("va-cu-empty", va(cu_seqlens_q=torch.tensor([], dtype=torch.int32), cu_seqlens_k=torch.tensor([], dtype=torch.int32)), "cu_seqlens_q")
    err("va-cu-negative", va(cu_seqlens_q=torch.tensor([0, -2, 10]), cu_seqlens_k=torch.tensor([0, -2, 10])), "cu_seqlens_q")
    err("va-cu-k-differs", va(cu_seqlens_k=torch.tensor([0, 5, 10], dtype=torch.int32)), "cu_seqlens_k", errors=("NotImplementedError", "ValueError"))
    err("bf-cu-decreasing", bf(mask=BlockMask(False, Span(), Span(), torch.tensor([0, 6, 2, 8]))), "cu_seqlens")
    err("bf-cu-negative", bf(mask=BlockMask(False, Span(), Span(), torch.tensor([-3, 8]))), "cu_seqlens")
    err("bf-cu-2d", bf(mask=BlockMask(False, Span(), Span(), torch.tensor([[0, 8]]))), "cu_seqlens")
    err("ring-cu-decreasing", ring(cu_seqlens=torch.tensor([0, 6, 2, 8])), "cu_seqlens")
    err("ring-cu-not-ending-at-s", ring(W=2, cu_seqlens=torch.tensor([0, 4, 6])), "cu_seqlens")
    err("ring-cu-float", ring(cu_seqlens=torch.tensor([0.0, 8.0])), "cu_seqlens")
    err("ring-cu-not-from-0", ring(cu_seqlens=torch.tensor([1, 8])), "cu_seqlens")

    # --- bad positions
    err("fa-positions-negative", fa(rope=R(), positions=torch.arange(8) - 3), "positions")
    err("fa-positions-2-31", fa(rope=R(), positions=torch.arange(8) + MAX - 4), "positions")
    err("fa-positions-huge", fa(rope=R(), positions=torch.arange(8) + 2**40), "positions")
    err("va-positions-negative", va(rope=R(), positions=torch.arange(10) - 1), "positions")
    err("va-positions-2-31", va(rope=R(), positions=torch.full((10,), MAX)), "positions")
    err("sdpa-positions-negative", sdpa(rope=R(), positions=torch.arange(8) - 8), "positions")
    err("bf-q-positions-2-31", bf(rope=R(), q_positions=torch.full((8,), MAX)), "q_positions")
    err("bf-k-positions-negative", bf(rope=R(), k_positions=-torch.ones(8, dtype=torch.int64)), "k_positions")
    err("ring-positions-negative", ring(rope=R(), positions=lambda r: -torch.ones(8, dtype=torch.int64)), "positions")
    err("ring-positions-2-31", ring(rope=R(), positions=lambda r: torch.full((8,), MAX)), "positions")
    err("ring-w2-positions-2-31-one-rank", ring(W=2, rope=R(), positions=lambda r: torch.full((4,), MAX if r else 0)), "positions")
    err("cos-sin-negative", plain(lambda p: cos_sin(R(), p), lambda: torch.tensor([-1])), "positions")
    err("cos-sin-2-31", plain(lambda p: cos_sin(R(), p), lambda: torch.tensor([MAX])), "positions")
    err("cos-sin-float", plain(lambda p: cos_sin(R(), p), lambda: torch.tensor([1.0])), "positions")

    ok("fa-positions-at-2-31-minus-1", fa(rope=R(), positions=torch.arange(8, dtype=torch.int32) + (MAX - 8)), check=_finite_out)
    ok("bf-positions-at-2-31-minus-1", bf(rope=R(), q_positions=torch.full((8,), MAX - 1), k_positions=torch.full((8,), MAX - 1)), check=_finite_out)

    # --- bad RoPE configs
    for label, theta in (("zero", 0.0), ("negative", -1e4), ("inf", INF), ("nan", NAN), ("str", "1e4"), ("none", None)):
        err(f"rope-theta-{label}", plain(lambda t=theta: RoPEConfig(16, theta=t)), "theta")
    for label, dim in (("zero", 0), ("negative", -16), ("float", 16.0), ("odd-rotary", 15), ("bool", True)):
        err(f"rope-dim-{label}", plain(lambda d=dim: RoPEConfig(d)), "dim")
    for label, prf in (("zero", 0.0), ("above-1", 1.5), ("nan", NAN), ("negative", -0.5)):
        err(f"rope-prf-{label}", plain(lambda p=prf: RoPEConfig(16, partial_rotary_factor=p)), "partial_rotary_factor")
    err("rope-precision", plain(lambda: RoPEConfig(16, precision="fp16")), "precision")
    err("rope-interleaved-str", plain(lambda: RoPEConfig(16, interleaved="yes")), "interleaved")
    err("rope-scaling-str", plain(lambda: RoPEConfig(16, scaling="linear")), "scaling")
    err("rope-type-unknown", plain(lambda: RoPEConfig(16, scaling={"rope_type": "foo"})), "rope_type")
    for label, f in (("zero", 0.0), ("negative", -2.0), ("nan", NAN), ("inf", INF), ("str", "2")):
        err(f"rope-linear-factor-{label}", plain(lambda f=f: RoPEConfig(16, scaling={"rope_type": "linear", "factor": f})), "factor")
    err("rope-linear-no-factor", plain(lambda: RoPEConfig(16, scaling={"rope_type": "linear"})), "factor")
    err("rope-dynamic-factor-nan", plain(lambda: RoPEConfig(16, scaling={"rope_type": "dynamic", "factor": NAN, "max_position_embeddings": 8})), "factor")
    err("rope-dynamic-mpe-zero", plain(lambda: RoPEConfig(16, scaling={"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 0})), "max_position_embeddings")
    err("rope-dynamic-no-mpe", plain(lambda: RoPEConfig(16, scaling={"rope_type": "dynamic", "factor": 2.0})), "max_position_embeddings")
    err("rope-yarn-no-original", plain(lambda: RoPEConfig(16, scaling={"rope_type": "yarn", "factor": 4.0})), "original_max_position_embeddings")
    err("rope-yarn-beta-fast-negative", plain(lambda: RoPEConfig(16, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": -1})), "beta_fast")
    err("rope-yarn-attention-factor-nan", plain(lambda: RoPEConfig(16, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "attention_factor": NAN})), "attention_factor")
    err("rope-llama3-low-zero", plain(lambda: RoPEConfig(16, scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})), "low_freq_factor")
    err("rope-llama3-factor-negative", plain(lambda: RoPEConfig(16, scaling={"rope_type": "llama3", "factor": -8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})), "factor")
    err("rope-dynamic-seq-len-zero", plain(lambda: RoPEConfig(16, dynamic_seq_len=0)), "dynamic_seq_len")

    # --- bad layouts and backends
    err("fa-layout-bogus", fa(layout="bogus"), "layout")
    err("ring-layout-bogus", ring(layout="diagonal"), "layout")
    err("shard-layout-bogus", plain(lambda x: shard(x, 1, fake_ring(1)[0], "diagonal"), lambda: qkv()[0]), "layout")
    err("unshard-layout-bogus", plain(lambda x: unshard(x, 1, fake_ring(1)[0], "diagonal"), lambda: qkv()[0]), "layout")
    err("fa-backend-unknown", fa(backend="nope"), "backend")
    err("fa-backend-cuda-on-cpu", fa(backend="cuda"), "cuda")
    err("sdpa-backend-unknown", sdpa(backend="flash"), "backend")
    err("va-backend-empty", va(backend=""), "backend")
    err("bf-backend-unknown", bf(backend="nope"), "backend")
    err("ring-backend-unknown", ring(backend="nope"), "backend")

    # --- NaN in a query row: that row is NaN (out), the others are finite
    for backend in ("cpu", "reference", "triton"):
        ok(f"nan-q-row-{backend}", nan_q(backend), check=_rows_nan_check)
    # fmt: on
    return C


_TABLE = _cases()
CASES = {c.name: c for c in _TABLE}
assert len(CASES) == len(_TABLE), "duplicate case names"


# --------------------------------------------------------------------------------------- the child


def _bits(t: torch.Tensor):
    """A copy to compare with after the call (a meta tensor has only its shape and dtype)."""
    return ("meta", tuple(t.shape), t.dtype) if t.is_meta else t.detach().clone()


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return torch.equal(a, b)


def run_case(name: str, conn) -> None:
    """Child: build and run one case, send a report dict through ``conn``."""
    report = {"status": "?", "unchanged": True}
    try:
        case = CASES[name]
        call, watched = case.build()
        before = [_bits(t) for t in watched]
        try:
            result = call()
            report["status"] = "returned"
            if case.check is not None:
                report["check"] = case.check(result)
        except BaseException as exc:  # noqa: BLE001 - the report says what it was
            report.update(
                status="raised",
                exc_type=type(exc).__name__,
                exc_mro=[c.__name__ for c in type(exc).__mro__],
                message=str(exc)[:2000],
                where=traceback.format_exc()[-1500:],
            )
        after = [_bits(t) for t in watched]
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if not _same(a, b)]
        report["unchanged"] = not changed
        report["changed"] = changed
    except BaseException:  # noqa: BLE001 - a broken builder is a failure of the suite, reported
        report.update(status="harness-error", where=traceback.format_exc()[-2000:])
    conn.send(report)
    conn.close()
    os._exit(0)


_CTX = None
_HERE = os.path.dirname(os.path.abspath(__file__))


def context():
    """The fork-server context; the server preloads this module (torch, ringattn, the lazily imported
    dynamo/Triton modules, NaN poisoning), so a case costs a fork. Python 3.11's fork server does
    not apply the parent's sys.path to its preloads, so PYTHONPATH carries this directory and tests/
    while the server starts (and is restored right after)."""
    global _CTX
    if _CTX is None:
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["fuzz_bad_table"])
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([_HERE, os.path.dirname(_HERE)] + ([old] if old else []))
        try:
            forkserver.ensure_running()
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = old
        _CTX = ctx
    return _CTX


def run_in_child(name: str, timeout: float = TIMEOUT_S) -> dict:
    """Run case ``name`` in a forked child; the report, or a crash/hang/no-report status."""
    import time

    ctx = context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_case, args=(name, child), daemon=True)
    start = time.monotonic()
    proc.start()
    child.close()
    report = None
    if parent.poll(timeout):
        try:
            report = parent.recv()
        except EOFError:
            report = None
    proc.join(max(0.0, timeout - (time.monotonic() - start)) if report is None else 10.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"status": "hang", "seconds": time.monotonic() - start}
    if report is None:
        return {"status": "crash", "exitcode": proc.exitcode}
    report["seconds"] = time.monotonic() - start
    return report


def _install_child_harness() -> None:
    """A forked child never runs conftest: NaN poisoning and the interpreter's bf16 fix, as in the tests."""
    try:
        from harness import HAS_GPU, install_interpreter_bf16_fix, install_nan_poisoning
    except ImportError:  # imported outside the test tree
        return
    install_nan_poisoning()
    if not HAS_GPU:
        install_interpreter_bf16_fix()


def _warm_imports() -> None:
    """Modules the first attention call imports lazily (about 1.5 s), imported once in the server."""
    import torch._dynamo  # noqa: F401

    import ringattn.backends.triton  # noqa: F401

    try:
        import tritonkernels.flash  # noqa: F401
    except ImportError:
        pass


_warm_imports()
_install_child_harness()  # idempotent: a no-op in the pytest process, which conftest set up


def names_it(message: str, name: str) -> bool:
    """``name`` appears in ``message`` as a word or an underscore-joined part of one ("str" is not
    named by "distributed", nor "q" by "requires"; "positions" is, by "q_positions"); case-insensitive
    except for names of one to three characters (q, k, v, B, D, Hq, Hkv), matched as written."""
    flags = 0 if len(name) <= 3 else re.IGNORECASE
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", message, flags) is not None


def verdict(case: Case, report: dict) -> list[str]:
    """What is wrong with a child's report for ``case`` (empty: the case holds)."""
    status = report.get("status")
    if status in ("hang", "crash", "harness-error"):
        return [f"{status}: {report}"]
    problems = []
    if not report.get("unchanged", False):
        problems.append(f"inputs modified (watched tensors {report.get('changed')})")
    if case.expect == "error":
        if status != "raised":
            problems.append("returned without an error")
        else:
            exc, msg = report["exc_type"], report["message"]
            if not set(case.errors) & set(report["exc_mro"]):
                problems.append(f"raised {exc}, expected one of {case.errors}: {msg}")
            elif case.names and not any(names_it(msg, n) for n in case.names):
                problems.append(f"{exc} does not name {' or '.join(case.names)}: {msg!r}")
    else:
        if status != "returned":
            problems.append(f"raised {report.get('exc_type')}: {report.get('message')}")
        elif report.get("check"):
            problems.append(report["check"])
    return problems
