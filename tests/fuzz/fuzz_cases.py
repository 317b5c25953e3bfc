"""Random cases for the differential fuzz, and the runners that hold the public APIs to the oracle.

Every case is a pure function of its seed (``api_case(seed)``, ``ring_case(seed)``), so a failure
reproduces from the seed alone: ``RINGATTN_FUZZ_SEED=<seed> pytest "tests/fuzz/<file>::<test>[seed_<seed>]"
-m "slow or not slow"`` (every failure prints that line). A runner returns a list of failure
descriptions (empty when every check holds) and never raises for a numerical mismatch.

Checks, all under the tolerance rule (``ringattn.testing.peer_error_check``, eps 1e-6; the peer is
``fuzz_oracle.attention`` in the test dtype, differentiated by autograd): out 2x, lse 2x (eps 1e-5;
-inf exactly where the oracle has -inf), dq/dk/dv 3x the larger of two peers' bounds: the autograd
peer and ``flash_peer``, plain torch computing gradients the way the block contract makes a backend
compute them (dS = P * (dP - delta) from fp32 lse and delta, also for fp64 inputs). The autograd
peer alone is exact by structure on rows with one visible key (p = 1, dS = 0), where no backend can
be (seen: dq 1.7e-6 on Sq = Sk = 1), and fp64 gradients carry the contract's fp32 lse (seen: 1e-6 to
2e-5 against an fp64 peer's 1e-14). Inputs must be bitwise unchanged, outputs finite (NaN-poisoned
allocations make unwritten elements fail).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import torch
from fuzz_oracle import Problem, RopeSpec, positions_in_document, results, rotate, visible

from ringattn.testing import GRAD_FACTOR, OUTPUT_FACTOR, peer_error_check

HEAD_DIMS = (16, 32, 64, 80, 128)
NEAR_2_22 = 4_190_000
MAX_POS = 2**31 - 1


# --------------------------------------------------------------------------------------- seed control


def case_count(default: int) -> int:
    """``RINGATTN_FUZZ_CASES`` scales the slow slice (default: ``default`` cases per category)."""
    value = os.environ.get("RINGATTN_FUZZ_CASES")
    return int(value) if value else default


def seeds(first: int, count: int) -> list[int]:
    """Seeds first .. first + count - 1, or only ``RINGATTN_FUZZ_SEED`` (comma-separated) when set."""
    only = os.environ.get("RINGATTN_FUZZ_SEED")
    if only:
        return [int(s) for s in only.split(",")]
    return list(range(first, first + count))


def seed_id(seed: int) -> str:
    return f"seed_{seed}"


# ------------------------------------------------------------------------------------------ RoPE draw


def draw_rope(rng: random.Random, D: int, allow_dynamic: bool = True) -> RopeSpec:
    kinds = ["default", "default", "linear", "yarn", "llama3"] + (["dynamic"] if allow_dynamic else [])
    kind = rng.choice(kinds)
    theta = rng.choice([10000.0, 500000.0, 1e6, 45.2e9, rng.uniform(100.0, 1e7)])
    prf = 1.0
    if rng.random() < 0.25:
        prf = rng.choice([0.5, 0.25, 0.75])
        if int(D * prf) % 2 or int(D * prf) < (4 if kind == "dynamic" else 2):
            prf = 0.5
    scaling = None
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": rng.choice([2.0, 4.0, 8.0, rng.uniform(1.1, 16.0)])}
    elif kind == "dynamic":
        scaling = {
            "rope_type": "dynamic",
            "factor": rng.choice([2.0, 4.0, rng.uniform(1.1, 8.0)]),
            "max_position_embeddings": rng.choice([8, 16, 64, 4096]),
        }
    elif kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": rng.choice([4.0, 8.0, 32.0, rng.uniform(1.5, 40.0)]),
            "original_max_position_embeddings": rng.choice([8, 64, 4096, 8192]),
        }
        if rng.random() < 0.3:
            scaling["beta_fast"], scaling["beta_slow"] = rng.choice([(16, 2), (64, 1), (32, 0.5)])
        if rng.random() < 0.2:
            scaling["attention_factor"] = rng.uniform(0.5, 1.5)
        elif rng.random() < 0.2:
            scaling["mscale"], scaling["mscale_all_dim"] = 1.0, rng.choice([0.5, 1.0, 2.0])
        if rng.random() < 0.2:
            scaling["truncate"] = False
    elif kind == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": rng.choice([8.0, 4.0, rng.uniform(1.5, 16.0)]),
            "low_freq_factor": 1.0,
            "high_freq_factor": rng.choice([4.0, 2.0]),
            "original_max_position_embeddings": rng.choice([8, 16, 64, 8192]),
        }
    return RopeSpec(
        D,
        theta,
        None if scaling is None else tuple(sorted(scaling.items())),
        prf,
        rng.random() < 0.3,
        "hf" if rng.random() < 0.2 else "exact",
    )


def draw_positions(rng: random.Random, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Explicit RoPE positions: ``offset`` (an offset arange), ``near22`` (around 2^22), ``top``
    (ending at 2^31 - 1), ``random`` (any int32 position)."""
    S = shape[-1]
    rows = shape[0] if len(shape) == 2 else 1
    out = []
    for _ in range(rows):
        if kind == "offset":
            start = rng.randrange(0, 5000)
        elif kind == "near22":
            start = NEAR_2_22 + rng.randrange(0, 2 * 4194304 - NEAR_2_22)
        elif kind == "top":
            start = MAX_POS - S + 1 - rng.randrange(0, 3)
        else:
            out.append([rng.randrange(0, MAX_POS + 1) for _ in range(S)])
            continue
        out.append([start + i for i in range(S)])
    t = torch.tensor(out, dtype=rng.choice([torch.int32, torch.int64]))
    return t.reshape(shape)


def draw_docs(rng: random.Random, total: int, *, cover: bool = True) -> list[int]:
    """Document boundaries over 0..total: some empty documents; with ``cover=False`` the boundaries
    may start after 0 and end before ``total`` (tokens outside every document)."""
    n = rng.randint(1, 5)
    cuts = sorted(rng.randint(0, total) for _ in range(n - 1))
    if rng.random() < 0.3 and cuts:
        cuts.append(rng.choice(cuts))  # an empty document
        cuts.sort()
    first = 0 if cover or rng.random() < 0.5 else rng.randint(0, total)
    last = total if cover or rng.random() < 0.5 else rng.randint(first, total)
    inner = [min(max(c, first), last) for c in cuts]
    return [first, *inner, last]


# --------------------------------------------------------------------------------------------- cases


@dataclass
class ApiCase:
    seed: int
    api: str  # flash, varlen, sdpa, block
    backend: str
    dtype: torch.dtype
    B: int
    Sq: int
    Sk: int
    Hq: int
    Hkv: int
    D: int
    causal: bool
    scale: float | None
    rope: RopeSpec | None = None
    pos_kind: str = "default"  # default, offset, near22, top, random
    batched_pos: bool = False
    cu: list[int] | None = None
    q_span: tuple[int, int] = (0, 1)
    k_span: tuple[int, int] = (0, 1)
    strided: bool = False
    pinned_seq_len: int | None = None  # block API with dynamic RoPE: RoPEConfig.dynamic_seq_len

    def describe(self) -> str:
        bits = [
            f"seed={self.seed}",
            self.api,
            f"backend={self.backend}",
            str(self.dtype).removeprefix("torch."),
            f"B={self.B} Sq={self.Sq} Sk={self.Sk} Hq={self.Hq} Hkv={self.Hkv} D={self.D}",
            "causal" if self.causal else "full",
        ]
        if self.scale is not None:
            bits.append(f"scale={self.scale:.4g}")
        if self.rope is not None:
            bits.append(self.rope.short() + f" scaling={self.rope.params}")
            bits.append(f"positions={self.pos_kind}{' (B,S)' if self.batched_pos else ''}")
        if self.cu is not None:
            bits.append(f"cu_seqlens={self.cu}")
        if self.api == "block":
            bits.append(f"q_span={self.q_span} k_span={self.k_span}")
        if self.strided:
            bits.append("strided views")
        if self.pinned_seq_len is not None:
            bits.append(f"dynamic_seq_len={self.pinned_seq_len}")
        return " ".join(bits)


_DTYPES = {
    "reference": (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cpu": (torch.float32, torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.float32, torch.bfloat16, torch.float16),
    "auto": (torch.float32, torch.bfloat16, torch.float64, torch.float16),
}


def api_case(seed: int, backend: str | None = None) -> ApiCase:
    rng = random.Random(f"api-{seed}")
    if backend is None:
        backend = rng.choice(["cpu", "cpu", "cpu", "reference", "reference", "auto", "triton"])
    api = rng.choice(["flash", "flash", "varlen", "sdpa", "block", "block"])
    small = backend == "triton"
    dtype = rng.choice(_DTYPES[backend])
    D = rng.choice(HEAD_DIMS if not small else (16, 32, 64, 80))
    Hkv = rng.randint(1, 2 if small else 3)
    Hq = Hkv * rng.randint(1, 2 if small else 3)
    B = 1 if small else rng.randint(1, 3)
    max_s = 20 if small else 48
    # 15%: an edge length (0, 1 or 2 queries, or a random one); the extra draw keeps every seed's case.
    edge = rng.random() < 0.15
    Sq = rng.choice([0, 1, 2, rng.randint(1, max_s), rng.randint(1, max_s)]) if edge else -1
    drawn = rng.randint(1, max_s) if Sq <= 0 else 0
    Sq = drawn if Sq < 0 else (Sq if Sq > 0 else 0)
    Sk = Sq if rng.random() < 0.5 else rng.randint(0 if rng.random() < 0.1 else 1, max_s)
    if api == "varlen":
        B, Sk = 1, Sq
    case = ApiCase(
        seed, api, backend, dtype, B, Sq, Sk, Hq, Hkv, D,
        causal=rng.random() < 0.5,
        scale=None if rng.random() < 0.7 else rng.uniform(0.05, 1.5),
    )  # fmt: skip
    if rng.random() < 0.7:
        # SDPA rotates both sides from one positions tensor only when Sq == Sk.
        case.rope = draw_rope(rng, D, allow_dynamic=api != "block" or rng.random() < 0.5)
        kinds = ["default", "default", "offset", "near22", "top", "random"]
        if api == "sdpa" and Sq != Sk:
            kinds = ["default"]
        if api == "flash" and Sq > Sk:
            kinds = ["default"]
        case.pos_kind = rng.choice(kinds)
        case.batched_pos = case.pos_kind != "default" and api != "varlen" and rng.random() < 0.3
        if api == "block" and case.rope.rope_type == "dynamic":
            case.pinned_seq_len = rng.choice([1, 8, 100, 5000, 2**31])
    if api == "varlen" and rng.random() < 0.85:
        case.cu = draw_docs(rng, Sq, cover=True)
    elif api == "varlen":
        case.cu = [0, Sq]
    if api == "block":
        case.q_span = (rng.choice([0, 0, rng.randint(0, 40)]), rng.choice([1, 1, 2, 3]))
        case.k_span = (rng.choice([0, 0, rng.randint(0, 40)]), rng.choice([1, 1, 2, 3]))
        if rng.random() < 0.5:
            top = max(case.q_span[0] + case.q_span[1] * Sq, case.k_span[0] + case.k_span[1] * Sk)
            case.cu = draw_docs(rng, top, cover=False)
    case.strided = api in ("flash", "block") and rng.random() < 0.25
    return case


def _randn(gen, shape, dtype, strided):
    """Standard normal drawn in fp64 and cast; ``strided`` gives a (B, H, S, D).transpose(1, 2) view."""
    if strided and len(shape) == 4:
        B, S, H, D = shape
        return torch.randn(B, H, S, D, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------- the checks


def _split_lse(name, ours, ref, peer, failures):
    """-inf exactly where the oracle has -inf; the rule on the finite rest."""
    ours, ref, peer = ours.double(), ref.double(), peer.double()
    ref_inf = torch.isneginf(ref)
    if torch.isnan(ours).any():
        failures.append(f"{name}: NaN in ours")
        return
    if not torch.equal(torch.isneginf(ours), ref_inf):
        bad = int((torch.isneginf(ours) != ref_inf).sum())
        failures.append(f"{name}: -inf pattern differs from the oracle in {bad} rows")
        return
    keep = ~ref_inf
    peer_f = torch.where(torch.isfinite(peer), peer, ref)
    check = peer_error_check(ours[keep], ref[keep], peer_f[keep], factor=OUTPUT_FACTOR, eps=1e-5)
    if not check.ok:
        failures.append(check.describe(name))


def compare(ours: dict, ref: dict, peer: dict, peer2: dict | None = None) -> list[str]:
    """The rule for every output present in ``ours``; gradients against the looser of the autograd
    peer and ``peer2`` (the flash-style peer)."""
    failures = []
    for name in ("out", "dq", "dk", "dv"):
        if name not in ours:
            continue
        factor = OUTPUT_FACTOR if name == "out" else GRAD_FACTOR
        if ours[name].shape != ref[name].shape:
            failures.append(f"{name}: shape {tuple(ours[name].shape)}, expected {tuple(ref[name].shape)}")
            continue
        if ours[name].dtype != ref["dtype"]:
            failures.append(f"{name}: dtype {ours[name].dtype}, expected {ref['dtype']}")
        checks = [peer_error_check(ours[name], ref[name], peer[name], factor=factor, eps=1e-6)]
        if peer2 is not None and name in peer2:
            eps = 1e-6 + factor * peer2["unc"][name]
            checks.append(peer_error_check(ours[name], ref[name], peer2[name], factor=factor, eps=eps))
        check = max(checks, key=lambda c: c.bound)
        if not check.ok:
            failures.append(
                check.describe(name) + (" (looser of the autograd and flash peers)" if peer2 else "")
            )
    if "lse" in ours:
        if ours["lse"].shape != ref["lse"].shape:
            failures.append(f"lse: shape {tuple(ours['lse'].shape)}, expected {tuple(ref['lse'].shape)}")
        else:
            _split_lse("lse", ours["lse"], ref["lse"], peer["lse"], failures)
    return failures


def flash_peer(q, k, v, dout, prob: Problem, tables, dtype: torch.dtype) -> dict:
    """Gradients the way the block contract makes every backend compute them, in plain torch.

    The autograd peer differentiates softmax, which is exact by structure on a row with one visible
    key (p = 1, dS = 0). A backend instead gets the forward's lse and delta = rowsum(dout * out) in
    fp32 (docs/design.md, section 2; fp32 for fp64 inputs too) and forms P = exp(S - lse) and dS =
    P * (dP - delta) with dP = dout . v^T. This peer does the same: accumulators in fp32 (fp64 for
    fp64 inputs), lse and delta rounded to fp32, P and dS rounded to the dtype before the GEMMs that
    read them, as flash kernels do. The gradient rule takes the larger of the two peers' bounds.

    ``unc`` (added to this peer's eps, times the rule's factor) is what one torch evaluation order
    cannot show: P is known to 1 ulp of |S| + |lse| in fp32 (a backend recomputes S, lse is fp32)
    and dP - delta to 2 ulp of |dP| + |delta| (two fp32 sums of the same products in a kernel's own
    orders: on a row with one key, torch's orders often agree bit for bit and give dS = 0 exactly).
    """
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    if Sq == 0 or k.shape[1] == 0:
        zeros = {n: torch.zeros_like(t, dtype=dtype) for n, t in (("dq", q), ("dk", k), ("dv", v))}
        return {**zeros, "unc": {"dq": 0.0, "dk": 0.0, "dv": 0.0}}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q32, k32, v32, do32 = (t.to(dtype).to(acc) for t in (q, k, v, dout))
    if prob.rope is not None:
        pick = slice(0, 2) if acc == torch.float64 else slice(2, 4)
        (qc, qs), (kc, ks) = (tuple(t.to(acc) for t in side[pick]) for side in tables)
        q32, k32 = rotate(q32, qc, qs, prob.rope), rotate(k32, kc, ks, prob.rope)
    heads = torch.tensor([h // (Hq // Hkv) for h in range(Hq)], dtype=torch.long)
    ke, ve = k32.index_select(2, heads), v32.index_select(2, heads)
    vis = visible(prob.q_index, prob.k_index, prob.causal, prob.cu)
    s = torch.einsum("bqhd,bkhd->bhqk", q32, ke) * prob.scale
    lse = s.masked_fill(~vis, -math.inf).logsumexp(-1).float().to(acc)  # the contract's fp32 lse
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    p = torch.where(vis, torch.exp(s - lse[..., None]), torch.zeros_like(s))
    p_lo = p.to(dtype).to(acc)
    out = torch.einsum("bhqk,bkhd->bqhd", p_lo, ve).to(dtype).to(acc)
    delta = (do32 * out).sum(-1).transpose(1, 2).float().to(acc)  # the contract's fp32 delta
    dp = torch.einsum("bqhd,bkhd->bhqk", do32, ve)
    ds = (p * (dp - delta[..., None])).to(dtype).to(acc)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke) * prob.scale
    dke = torch.einsum("bhqk,bqhd->bkhd", ds, q32) * prob.scale
    dve = torch.einsum("bhqk,bqhd->bkhd", p_lo, do32)
    dk = torch.zeros_like(k32).index_add_(2, heads, dke)
    dv = torch.zeros_like(v32).index_add_(2, heads, dve)
    if prob.rope is not None:  # RoPE's transpose: rotate back by -angle
        dq, dk = rotate(dq, qc, -qs, prob.rope), rotate(dk, kc, -ks, prob.rope)
    u = 2.0**-24  # lse and delta are fp32 whatever the dtype
    lse_fin = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    unc_p = p * u * (s.abs() + lse_fin.abs()[..., None])
    unc_ds = unc_p * (dp - delta[..., None]).abs() + p * 2 * u * (dp.abs() + delta.abs()[..., None])
    # Independent roundings add in quadrature (one term, on a row with one key, is the case that matters).
    unc_dq = torch.einsum("bhqk,bkhd->bqhd", unc_ds**2, ke**2).sqrt() * prob.scale
    unc_dk = torch.einsum("bhqk,bqhd->bkhd", unc_ds**2, q32**2).sqrt() * prob.scale
    unc_dv = torch.einsum("bhqk,bqhd->bkhd", unc_p**2, do32**2).sqrt()
    return {
        "dq": dq.to(dtype), "dk": dk.to(dtype), "dv": dv.to(dtype),
        "unc": {"dq": float(unc_dq.max()), "dk": float(unc_dk.max()), "dv": float(unc_dv.max())},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- API runner


def _snapshot(tensors: dict) -> dict:
    return {n: t.clone() for n, t in tensors.items() if t is not None}


def _check_unchanged(before: dict, tensors: dict, failures: list) -> None:
    """Every input bitwise as it was (NaN-safe: compared as bytes)."""
    for name, old in before.items():
        new = tensors[name]
        same = old.shape == new.shape and torch.equal(
            old.contiguous().view(torch.uint8), new.contiguous().view(torch.uint8)
        )
        if not same:
            failures.append(f"input {name} was modified")


def run_api_case(case: ApiCase) -> list[str]:
    """Run one ApiCase through its public API (forward and gradients) and compare with the oracle."""
    import ringattn
    from ringattn import BlockMask, Span, block_backward, block_forward

    gen = torch.Generator().manual_seed(case.seed)
    rng = random.Random(f"api-inputs-{case.seed}")
    B, Sq, Sk, Hq, Hkv, D = case.B, case.Sq, case.Sk, case.Hq, case.Hkv, case.D
    q = _randn(gen, (B, Sq, Hq, D), case.dtype, case.strided)
    k = _randn(gen, (B, Sk, Hkv, D), case.dtype, case.strided)
    v = _randn(gen, (B, Sk, Hkv, D), case.dtype, case.strided)
    dout = _randn(gen, (B, Sq, Hq, D), case.dtype, False)
    scale = 1.0 / math.sqrt(D) if case.scale is None else case.scale
    rope_cfg = None
    if case.rope is not None:
        rope_cfg = case.rope.config()
        if case.pinned_seq_len is not None:
            from dataclasses import replace

            rope_cfg = replace(rope_cfg, dynamic_seq_len=case.pinned_seq_len)

    pos_arg = None  # what the API receives
    cu_t = None if case.cu is None else torch.tensor(case.cu, dtype=rng.choice([torch.int32, torch.int64]))
    if case.api == "flash":
        q_index = [max(Sk - Sq, 0) + i for i in range(Sq)]
        k_index = [max(Sq - Sk, 0) + j for j in range(Sk)]
    elif case.api == "sdpa":
        q_index, k_index = list(range(Sq)), list(range(Sk))
    elif case.api == "varlen":
        q_index = k_index = list(range(Sq))
    else:
        q_index = [case.q_span[0] + case.q_span[1] * i for i in range(Sq)]
        k_index = [case.k_span[0] + case.k_span[1] * j for j in range(Sk)]
    q_pos = k_pos = None
    if case.rope is not None:
        if case.pos_kind == "default":
            q_pos = torch.tensor(positions_in_document(q_index, case.cu), dtype=torch.int64)
            k_pos = torch.tensor(positions_in_document(k_index, case.cu), dtype=torch.int64)
            if case.api == "sdpa":  # top-left: each side counts from 0
                q_pos, k_pos = torch.arange(Sq), torch.arange(Sk)
        elif case.api == "block":
            q_shape = (B, Sq) if case.batched_pos else (Sq,)
            k_shape = (B, Sk) if case.batched_pos else (Sk,)
            q_pos = draw_positions(rng, case.pos_kind, q_shape)
            k_pos = draw_positions(rng, case.pos_kind, k_shape)
        else:
            S = Sk
            pos_arg = draw_positions(rng, case.pos_kind, (B, S) if case.batched_pos else (S,))
            k_pos = pos_arg.long()
            q_pos = k_pos[..., S - Sq :]
    prob = Problem(
        case.causal, scale, q_index, k_index, case.cu, case.rope,
        None if q_pos is None else q_pos.long(), None if k_pos is None else k_pos.long(),
        seq_len=case.pinned_seq_len,
    )  # fmt: skip
    inputs = dict(q=q, k=k, v=v, dout=dout, positions=pos_arg, cu_seqlens=cu_t)
    if case.api == "block":
        inputs.update(q_positions=q_pos, k_positions=k_pos)
    originals = _snapshot(inputs)

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    failures: list[str] = []
    kw = dict(softmax_scale=case.scale, rope=rope_cfg, backend=case.backend)
    if case.api == "flash":
        out, lse = ringattn.flash_attn_func(
            qg, kg, vg, causal=case.causal, positions=pos_arg, return_lse=True, **kw
        )
        out.backward(dout)
        ours = {"out": out, "lse": lse, "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}
    elif case.api == "varlen":
        out, lse = ringattn.flash_attn_varlen_func(
            qg[0], kg[0], vg[0], cu_t, cu_t, Sq, Sq, causal=case.causal, positions=pos_arg,
            return_lse=True, **kw,
        )  # fmt: skip
        out.backward(dout[0])
        ours = {"out": out[None], "lse": lse[None], "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}
    elif case.api == "sdpa":
        out = ringattn.scaled_dot_product_attention(
            qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), is_causal=case.causal,
            scale=case.scale, enable_gqa=Hq != Hkv, rope=rope_cfg, positions=pos_arg, backend=case.backend,
        ).transpose(1, 2)  # fmt: skip
        out.backward(dout)
        ours = {"out": out, "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}
    else:
        mask = BlockMask(case.causal, Span(*case.q_span), Span(*case.k_span), cu_t)
        bkw = dict(rope=rope_cfg, q_positions=q_pos, k_positions=k_pos, backend=case.backend)
        out, lse = block_forward(q, k, v, mask, softmax_scale=case.scale, **bkw)
        dq, dk, dv = block_backward(dout, q, k, v, out, lse, mask, softmax_scale=case.scale, **bkw)
        ours = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    ours = {n: t.detach() if t is not None else t for n, t in ours.items()}
    for n in ("dq", "dk", "dv"):
        if ours.get(n) is None:
            ours[n] = torch.zeros_like((q, k, v)[("dq", "dk", "dv").index(n)])
    _check_unchanged(originals, inputs, failures)

    tables = prob.tables()
    ref = results(q, k, v, dout, prob, dtype=torch.float64, tables=tables)
    ref["dtype"] = case.dtype
    peer = results(q, k, v, dout, prob, dtype=case.dtype, tables=tables)
    failures += compare(ours, ref, peer, flash_peer(q, k, v, dout, prob, tables, case.dtype))
    return failures


# ------------------------------------------------------------------------------------- ring (fake)


@dataclass
class RingCase:
    seed: int
    W: int
    two_level: tuple[int, int] | None  # (inner, outer) or None for a flat ring
    layout: str
    backend: str
    dtype: torch.dtype
    B: int
    S: int
    Hq: int
    Hkv: int
    D: int
    causal: bool
    scale: float | None
    rope: RopeSpec | None = None
    pos_kind: str = "default"
    batched_pos: bool = False
    cu: list[int] | None = None
    dkv_dtype: torch.dtype | None = None

    def describe(self) -> str:
        ring = f"W={self.W}" + (
            f" two-level inner={self.two_level[0]} outer={self.two_level[1]}" if self.two_level else ""
        )
        bits = [
            f"seed={self.seed}", "ring", ring, self.layout, f"backend={self.backend}",
            str(self.dtype).removeprefix("torch."),
            f"B={self.B} S={self.S} Hq={self.Hq} Hkv={self.Hkv} D={self.D}",
            "causal" if self.causal else "full",
        ]  # fmt: skip
        if self.scale is not None:
            bits.append(f"scale={self.scale:.4g}")
        if self.rope is not None:
            bits.append(self.rope.short() + f" scaling={self.rope.params}")
            bits.append(f"positions={self.pos_kind}{' (B,S)' if self.batched_pos else ''}")
        if self.cu is not None:
            bits.append(f"cu_seqlens={self.cu}")
        if self.dkv_dtype is not None:
            bits.append(f"dkv_dtype={self.dkv_dtype}")
        return " ".join(bits)


def ring_case(seed: int, max_w: int = 8, max_s: int = 40) -> RingCase:
    rng = random.Random(f"ring-{seed}")
    two_level = None
    if rng.random() < 0.15:
        two_level = (rng.randint(1, 3), rng.randint(2, 3))
        W = two_level[0] * two_level[1]
    else:
        W = rng.randint(1, max_w)
    backend = rng.choice(["auto", "auto", "auto", "reference"])
    dtype = rng.choice(
        [torch.float32, torch.float32, torch.bfloat16] + ([torch.float64] if backend != "cpu" else [])
    )
    D = rng.choice((16, 32, 64, 80) if W > 4 else HEAD_DIMS)
    Hkv = rng.randint(1, 2)
    S = rng.choice([0, rng.randint(0, W), rng.randint(1, max_s), rng.randint(1, max_s)])
    case = RingCase(
        seed, W, two_level, rng.choice(["zigzag", "stripe", "contiguous"]), backend, dtype,
        rng.randint(1, 2), S, Hkv * rng.randint(1, 2), Hkv, D,
        causal=rng.random() < 0.7, scale=None if rng.random() < 0.8 else rng.uniform(0.05, 1.5),
    )  # fmt: skip
    if rng.random() < 0.6:
        case.rope = draw_rope(rng, D)
        case.pos_kind = rng.choice(["default", "default", "offset", "near22", "top", "random"])
        case.batched_pos = case.pos_kind != "default" and rng.random() < 0.3
    if rng.random() < 0.4:
        case.cu = draw_docs(rng, S, cover=True)
    if rng.random() < 0.3:
        case.dkv_dtype = torch.float32
    return case


def layout_indices(S: int, W: int, layout: str) -> list[list[int]]:
    """Global indices per rank, from the layouts' definitions (README): contiguous runs, zigzag chunks
    r and 2W - 1 - r of 2W, stripes r, r + W, ...; chunk sizes differ by at most one token, the
    first ones longer."""
    if layout == "stripe":
        return [list(range(r, S, W)) for r in range(W)]
    n = 2 * W if layout == "zigzag" else W
    base, extra = divmod(S, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    chunks = [list(range(bounds[i], bounds[i + 1])) for i in range(n)]
    if layout == "contiguous":
        return chunks
    return [chunks[r] + chunks[n - 1 - r] for r in range(W)]


def run_ring_case(case: RingCase) -> list[str]:
    from ringattn.ring import fake_ring, fake_two_level, ring_attn_func, run_fake_ring, shard

    gen = torch.Generator().manual_seed(case.seed)
    rng = random.Random(f"ring-inputs-{case.seed}")
    B, S, Hq, Hkv, D = case.B, case.S, case.Hq, case.Hkv, case.D
    q = _randn(gen, (B, S, Hq, D), case.dtype, False)
    k = _randn(gen, (B, S, Hkv, D), case.dtype, False)
    v = _randn(gen, (B, S, Hkv, D), case.dtype, False)
    dout = _randn(gen, (B, S, Hq, D), case.dtype, False)
    index = list(range(S))
    positions = None
    if case.rope is not None:
        if case.pos_kind == "default":
            pos_full = torch.tensor(positions_in_document(index, case.cu), dtype=torch.int64)
        else:
            positions = draw_positions(rng, case.pos_kind, (B, S) if case.batched_pos else (S,))
            pos_full = positions.long()
    cu_t = None if case.cu is None else torch.tensor(case.cu, dtype=rng.choice([torch.int32, torch.int64]))
    scale = 1.0 / math.sqrt(D) if case.scale is None else case.scale
    prob = Problem(
        case.causal, scale, index, index, case.cu, case.rope,
        None if case.rope is None else pos_full, None if case.rope is None else pos_full,
    )  # fmt: skip
    rope_cfg = None if case.rope is None else case.rope.config()
    if case.two_level:
        comms = fake_two_level(*case.two_level, timeout=120.0)
    else:
        comms = fake_ring(case.W, timeout=120.0)
    shards = layout_indices(S, case.W, case.layout)
    failures: list[str] = []

    def rank_fn(comm):
        rank = comms.index(comm)
        idx = torch.tensor(shards[rank], dtype=torch.long)
        local = [shard(t, 1, comm, case.layout) for t in (q, k, v, dout)]
        for name, t, full in zip(("q", "k", "v", "dout"), local, (q, k, v, dout), strict=True):
            if not torch.equal(t, full.index_select(1, idx)):
                failures.append(f"rank {rank}: shard({name}) differs from the {case.layout} definition")
        ql, kl, vl = (t.detach().requires_grad_() for t in local[:3])
        kw = {}
        if positions is not None:
            kw["positions"] = shard(positions, positions.dim() - 1, comm, case.layout)
        out, lse = ring_attn_func(
            ql, kl, vl, group=comm, causal=case.causal, layout=case.layout, rope=rope_cfg,
            cu_seqlens=cu_t, softmax_scale=case.scale, return_lse=True, backend=case.backend,
            dkv_dtype=case.dkv_dtype, **kw,
        )  # fmt: skip
        out.backward(local[3])
        return {"out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}

    inputs = dict(q=q, k=k, v=v, dout=dout, positions=positions, cu_seqlens=cu_t)
    originals = _snapshot(inputs)
    per_rank = run_fake_ring(rank_fn, comms)
    _check_unchanged(originals, inputs, failures)
    ours = {}
    for name in ("out", "lse", "dq", "dk", "dv"):
        dim = 2 if name == "lse" else 1
        like = per_rank[0][name]
        if like is None:
            like = torch.zeros(B, 0, Hq if name == "dq" else Hkv, D, dtype=case.dtype)
        shape = list(like.shape)
        shape[dim] = S
        full = torch.full(shape, math.nan, dtype=like.dtype)
        for rank, res in enumerate(per_rank):
            t = res[name]
            if t is None:  # no gradient reached an empty shard
                t = torch.zeros(B, 0, Hq if name == "dq" else Hkv, D, dtype=case.dtype)
            if t.shape[dim] != len(shards[rank]):
                failures.append(
                    f"{name} of rank {rank} has length {t.shape[dim]}, expected {len(shards[rank])}"
                )
                continue
            full.index_copy_(dim, torch.tensor(shards[rank], dtype=torch.long), t)
        ours[name] = full
    tables = prob.tables()
    ref = results(q, k, v, dout, prob, dtype=torch.float64, tables=tables)
    ref["dtype"] = case.dtype
    peer = results(q, k, v, dout, prob, dtype=case.dtype, tables=tables)
    failures += compare(ours, ref, peer, flash_peer(q, k, v, dout, prob, tables, case.dtype))
    return failures
