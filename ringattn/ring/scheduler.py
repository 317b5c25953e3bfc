"""The ring attention scheduler: K/V shards travel around the ring while each rank computes.

Every rank holds its shard of Q, K and V (a layout of the global sequence: contiguous, zigzag or
stripe). At step s rank r holds the K/V shard of rank (r - s) mod W, so after W steps (W - 1 hops)
every query has met every key. Math goes only through the block contract (``block_forward``,
``block_backward``) and the guarded ``merge_partials``; which backend runs a block is not known here.
What the ranks agree on before K/V move, how a shard splits into pieces and blocks, and the wire
buffer layout are in ``handshake``; this module walks the ring and computes the blocks, skipping
those the plan proves fully masked.

Per step (the same order on every rank; see ``dist_comm`` for the message order):

    forward:  post kv(s+1) | compute blocks of step s, merge in fp32 | wait kv(s+1)
    backward: post kv(s+1) | compute block grads of step s | wait dkv(s) and add | post dkv(s+1)
              | wait kv(s+1);  after the last step, wait dkv(W): each rank's dk/dv is home.

dk/dv accumulators travel one hop behind K/V, W hops in all, in the input dtype by default
(``dkv_dtype=torch.float32`` keeps them unrounded at 2x the bytes for bf16). dq is accumulated
locally in fp32. The sums run in the ring's fixed order, so they are reproducible run to run.

Two levels. A ``TwoLevelComm`` (outer ring of O nodes, inner ring of I ranks per node; position
o * I + i holds shard o * I + i of the N = I * O shards) is walked by the same loop, nested: at outer
step t rank (o, i) holds share i of node (o - t)'s K/V (the super-block), posts the outer exchange of
the next super-block share, and runs the whole inner ring over the current super-block before waiting
for it. In backward the inner ring brings each share's dk/dv (this node's queries) back to the rank
that holds the share, and that sum is what the outer accumulator, one outer hop behind, adds on its
way home. Shards, masks and pieces are those of the flat ring of N ranks.

By default (``TwoLevelComm(..., overlap=False)``) the two levels never have messages in flight at
once: every outer exchange is waited for right after it is posted, before the inner ring (or the next
outer exchange) moves, since NCCL documents concurrent point-to-point traffic on two communicators as
deadlock-prone. ``overlap=True`` keeps the outer exchange in flight across the inner ring's walk, as
described above.
"""

from __future__ import annotations

import atexit
import math
from typing import Any

import torch

from ..block import block_backward, block_forward, check_devices, check_inputs
from ..dropout import new_seed
from ..merge import merge_partials
from ..rope import RoPEConfig
from .comm import HopRecord, nvtx_range
from .dist_comm import ring_comm
from .handshake import _check_local, _kv_of, _Options, _pack_kv, _Plan, _plan, _unpack

__all__ = ["ring_attn_func"]


def _shifted(coords: tuple[int, ...], level: int, position: int) -> tuple[int, ...]:
    return (*coords[:level], position, *coords[level + 1 :])


def _receive_buffers(kv: torch.Tensor, level: int, ring: bool) -> tuple[torch.Tensor, ...]:
    """Buffers K/V hops of a level receive into, alternately. At the outermost level ``kv`` is this
    rank's own packed copy and serves as one of them; an inner level's ``kv`` is an outer buffer that
    is still on the outer wire, so it is never written."""
    if not ring:
        return ()
    return (torch.empty_like(kv), kv) if level == 0 else (torch.empty_like(kv), torch.empty_like(kv))


def _serial(plan: _Plan, level: int) -> bool:
    """Whether this level's exchanges are waited for as soon as they are posted: the outer levels of a
    two-level ring unless it opted into overlap, so no two levels ever have messages in flight at once."""
    return level + 1 < len(plan.levels) and not getattr(plan.comm, "overlap", True)


def _walk_forward(plan: _Plan, level: int, kv: torch.Tensor, owner: tuple[int, ...], compute) -> None:
    """Bring every K/V shard of this level's ring past this rank, starting from ``kv`` (the shard of the
    rank at ``owner``), and ``compute(src, buffer)`` on each at the innermost level."""
    comm = plan.levels[level]
    W = comm.world_size
    steps = plan.steps if len(plan.levels) == 1 else W  # a window may leave far shards unseen
    ring = W > 1 and plan.rows > 0  # an empty sequence has nothing to send
    bufs, cur = _receive_buffers(kv, level, ring), kv
    for step in range(steps):
        pending = recv = None
        if ring and step < steps - 1:
            recv = bufs[step % 2]
            pending = comm.exchange([cur], [recv], hop=step + 1, label="forward kv", timeout=plan.timeout)
            if _serial(plan, level):
                pending.wait()  # done before the inner ring posts anything
        src = _shifted(owner, level, (owner[level] - step) % W)
        if level + 1 < len(plan.levels):
            _walk_forward(plan, level + 1, cur, src, compute)
        else:
            compute(plan.flat(src), cur)
        if pending is not None:
            pending.wait()
            cur = recv


def _walk_backward(plan, level, kv, owner, compute, acc, dkv_dtype) -> torch.Tensor:
    """Like ``_walk_forward``, with ``compute(src, buffer, local)`` adding that shard's dk/dv into
    ``local``; returns the dk/dv of ``kv`` summed over this level's ring, back at this rank."""
    comm = plan.levels[level]
    W = comm.world_size
    ring = W > 1 and plan.rows > 0
    innermost = level + 1 == len(plan.levels)
    kv_bufs, cur = _receive_buffers(kv, level, ring), kv
    dkv_bufs = tuple(
        torch.zeros(plan.kv_shape, dtype=dkv_dtype, device=kv.device) for _ in range(2 if ring else 1)
    )
    local = torch.zeros(plan.kv_shape, dtype=acc, device=kv.device) if innermost else None
    pending_dkv = None
    steps = plan.steps if len(plan.levels) == 1 else W
    for step in range(W):  # dk/dv accumulators need all W hops to get home; K/V and compute stop early
        pending_kv = recv = None
        if ring and step < steps - 1:
            recv = kv_bufs[step % 2]
            pending_kv = comm.exchange([cur], [recv], hop=step + 1, label="backward kv", timeout=plan.timeout)
            if _serial(plan, level):
                pending_kv.wait()
        src = _shifted(owner, level, (owner[level] - step) % W)
        if innermost:
            local.zero_()
            if step < steps:
                compute(plan.flat(src), cur, local)
        else:  # this node's contribution to the super-block share, already home within the node
            local = _walk_backward(plan, level + 1, cur, src, compute, acc, dkv_dtype)
        # The accumulator for shard src arrived from prev (it left there one step ago); add ours.
        travelling = dkv_bufs[step % len(dkv_bufs)]
        if pending_dkv is None:
            travelling.copy_(local)
        else:
            pending_dkv.wait()
            travelling.copy_(travelling.to(acc) + local)
        if ring:
            pending_dkv = comm.exchange([travelling], [dkv_bufs[(step + 1) % 2]], hop=step + 1,
                                        label="backward dkv", timeout=plan.timeout)  # fmt: skip
            if _serial(plan, level):
                pending_dkv.wait()
        if pending_kv is not None:
            pending_kv.wait()
            cur = recv
    if pending_dkv is not None:
        pending_dkv.wait()
    return dkv_bufs[W % len(dkv_bufs)]  # after W hops the travelling buffer is this rank's own


def _ring_forward(plan: _Plan, q: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rank = plan.comm.rank
    acc = torch.promote_types(q.dtype, torch.float32)
    B, S_local, Hq, D = q.shape
    out = torch.zeros(B, S_local, Hq, D, dtype=acc, device=q.device)
    lse = torch.full((B, Hq, S_local), -math.inf, dtype=torch.float32, device=q.device)
    mine = plan.pieces[rank]

    def compute(src: int, message: torch.Tensor) -> None:
        cur = _kv_of(plan, message)
        with nvtx_range(f"ring forward compute (kv of rank {src})"):
            for qp in mine:
                for kp in plan.pieces[src]:
                    mask = plan.mask(qp, kp)
                    if mask is None:
                        continue
                    o, l = block_forward(
                        q[:, qp.local],
                        cur[0][:, kp.wire],
                        cur[1][:, kp.wire],
                        mask,
                        softmax_scale=plan.scale,
                        rope=plan.rope,
                        q_positions=plan.block_positions(rank, qp),
                        k_positions=plan.block_positions(src, kp),
                        out_dtype=acc,
                        backend=plan.backend,
                        **plan.scores,
                    )
                    o_acc, l_acc = merge_partials(out[:, qp.local], lse[:, :, qp.local], o, l.to(lse.dtype))
                    out[:, qp.local], lse[:, :, qp.local] = o_acc, l_acc

    if plan.cp_mode == "allgather":
        gathered = _gather_kv(plan, kv, "allgather forward kv")
        for src in range(plan.comm.world_size):
            compute(src, gathered[src])
    else:
        _walk_forward(plan, 0, kv, plan.coords(), compute)
    return out, lse


def _ring_backward(plan, dout, q, kv, out, lse, dkv_dtype):
    rank = plan.comm.rank
    acc = torch.promote_types(q.dtype, torch.float32)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, S_local)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    mine = plan.pieces[rank]

    def compute(src: int, message: torch.Tensor, local: torch.Tensor) -> None:
        cur = _kv_of(plan, message)
        with nvtx_range(f"ring backward compute (kv of rank {src})"):
            for qp in mine:
                for kp in plan.pieces[src]:
                    mask = plan.mask(qp, kp)
                    if mask is None:
                        continue
                    dq_b, dk_b, dv_b = block_backward(
                        dout[:, qp.local],
                        q[:, qp.local],
                        cur[0][:, kp.wire],
                        cur[1][:, kp.wire],
                        None,
                        lse[:, :, qp.local],
                        mask,
                        delta=delta[:, :, qp.local],
                        softmax_scale=plan.scale,
                        rope=plan.rope,
                        q_positions=plan.block_positions(rank, qp),
                        k_positions=plan.block_positions(src, kp),
                        grad_dtype=acc,
                        backend=plan.backend,
                        **plan.scores,
                    )
                    dq[:, qp.local] += dq_b
                    local[0][:, kp.wire] += dk_b
                    local[1][:, kp.wire] += dv_b

    if plan.cp_mode == "allgather":
        gathered = _gather_kv(plan, kv, "allgather backward kv")
        local = torch.zeros((plan.comm.world_size, *plan.kv_shape), dtype=acc, device=kv.device)
        for src in range(plan.comm.world_size):
            compute(src, gathered[src], local[src])
        del gathered
        return dq, _reduce_scatter(plan, local, acc, dkv_dtype)
    dkv = _walk_backward(plan, 0, kv, plan.coords(), compute, acc, dkv_dtype)
    return dq, dkv


def _gather_kv(plan: _Plan, kv: torch.Tensor, label: str) -> torch.Tensor:
    """Every rank's packed K/V (W, 2, B, rows, Hkv, D), in ring order (= shard index)."""
    comm = plan.comm
    with nvtx_range(label):
        gathered = comm.all_gather(kv, plan.timeout).to(kv.device)
    nbytes = kv.numel() * kv.element_size() * (comm.world_size - 1)  # a ring all-gather's traffic
    comm.stats.add(HopRecord(label, 1, nbytes, nbytes))
    return gathered


def _reduce_scatter(plan: _Plan, local: torch.Tensor, acc, dkv_dtype) -> torch.Tensor:
    """Sum over ranks of every rank's ``local[r]`` (this rank's contribution to shard r's dk/dv), home
    at rank r: a ring reduce-scatter. At step t this rank holds the partial sum for shard
    (rank - t - 1) mod W, adds its own part and passes it on; after W - 1 hops it holds its own."""
    comm, W, rank = plan.comm, plan.comm.world_size, plan.comm.rank
    travelling = local[(rank - 1) % W].to(dkv_dtype)
    incoming = torch.empty_like(travelling)
    for step in range(1, W):
        comm.exchange(
            [travelling], [incoming], hop=step, label="allgather backward dkv", timeout=plan.timeout
        ).wait()
        travelling = (incoming.to(acc) + local[(rank - step - 1) % W]).to(dkv_dtype)
    return travelling


# ---------------------------------------------------------------------------------- the custom ops
# The ring is two torch.library custom ops, so torch.compile(fullgraph=True) sees one opaque call. Ops
# take only tensors and plain values: the group and the static options are registered once per distinct
# call (``_config_key``, which dynamo runs at trace time and bakes in as a constant) and named by key.

_CONFIGS: list[tuple] = []  # key -> (group, static options); kept alive for the ops that name them
_KEYS: dict = {}
# Drop the groups before interpreter finalization, as dist_comm does for its cache: a gloo group
# destroyed then aborts the process ("terminate called without an active exception").
atexit.register(_KEYS.clear)
atexit.register(_CONFIGS.clear)


@torch._dynamo.assume_constant_result
def _config_key(group, rope, static: tuple) -> int:
    """The key of (group, options); ``rope`` apart from ``static``: dynamo passes objects through, but
    cannot rebuild a frozen dataclass built into a traced tuple."""
    static = (rope, *static)
    try:
        lookup = (group, static)
        hash(lookup)
    except TypeError:  # an unhashable group (a list of groups): identity is what matters
        lookup = (id(group), static)
    if lookup not in _KEYS:
        _KEYS[lookup] = len(_CONFIGS)
        _CONFIGS.append((group, static))
    return _KEYS[lookup]


_STATIC = ("rope", "causal", "layout", "softmax_scale", "deterministic", "backend", "dkv_dtype", "timeout",
           "window_size", "softcap", "dropout_p", "cp_mode", "wire_dtype")  # fmt: skip


def _op_plan(q, k, v, positions, cu_seqlens, alibi_slopes, key: int, seed: int):
    group, static = _CONFIGS[key]
    options = _Options(
        **dict(zip(_STATIC, static, strict=True)), positions=positions, cu_seqlens=cu_seqlens,
        alibi_slopes=alibi_slopes, dropout_seed=seed, return_lse=True,
    )  # fmt: skip
    options = _check_local(q, k, v, options)
    return _plan(q, k, ring_comm(group), options), options


@torch.library.custom_op("ringattn::ring_attention_fwd", mutates_args=())
def _ring_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out, lse and the dropout seed used (``seed`` < 0: drawn now from torch's generator)."""
    if seed < 0:
        seed = new_seed() if _CONFIGS[key][1][_STATIC.index("dropout_p")] else 0
    plan, _ = _op_plan(q, k, v, positions, cu_seqlens, alibi_slopes, key, seed)
    stats = plan.levels[-1].stats  # a two-level ring counts on its inner ring
    stats.cp_modes[plan.cp_mode] = stats.cp_modes.get(plan.cp_mode, 0) + 1
    out, lse = _ring_forward(plan, q, _pack_kv(plan, k, v))
    return out.to(q.dtype), lse, torch.tensor(seed, dtype=torch.int64)


@_ring_attention_fwd.register_fake
def _(q, k, v, positions, cu_seqlens, alibi_slopes, key, seed):
    # The dispatcher also runs a fake on real tensors when one input is a meta tensor: refuse what the
    # real op would (mixed devices above all) instead of returning uninitialised memory.
    check_inputs(q, k, v)
    check_devices(q, positions=positions, alibi_slopes=alibi_slopes)
    B, S, H, _ = q.shape
    return (
        torch.empty_like(q),
        q.new_empty((B, H, S), dtype=torch.float32),
        torch.empty((), dtype=torch.int64),
    )


@torch.library.custom_op("ringattn::ring_attention_bwd", mutates_args=())
def _ring_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The same plan as the forward's: the ranks' agreement is cached, so no handshake again.
    plan, options = _op_plan(q, k, v, positions, cu_seqlens, alibi_slopes, key, int(seed))
    dq, dkv = _ring_backward(plan, dout.contiguous(), q, _pack_kv(plan, k, v), out, lse, options.dkv_dtype)
    mine, S_local = plan.pieces[plan.comm.rank], q.shape[1]
    return dq.to(q.dtype), _unpack(dkv[0], mine, S_local, k.dtype), _unpack(dkv[1], mine, S_local, v.dtype)


@_ring_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, seed, positions, cu_seqlens, alibi_slopes, key):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, positions, cu_seqlens, alibi_slopes, key, _ = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.extras = (positions, cu_seqlens, alibi_slopes, key)
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, dout, _dlse, _dseed):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _ring_attention_bwd(dout, q, k, v, out, lse, seed, *ctx.extras)
    return dq, dk, dv, None, None, None, None, None


_ring_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def ring_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    causal: bool = True,
    layout: str = "zigzag",
    rope: RoPEConfig | None = None,
    positions: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    dkv_dtype: torch.dtype | None = None,
    timeout: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    cp_mode: str = "ring",
    wire_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over the ranks of ``group`` on this rank's shard of the sequence.

    Args:
        q: (B, S_local, Hq, D); k, v: (B, S_local, Hkv, D), Hq % Hkv == 0 (only KV heads travel).
            The shard is ``ringattn.shard(x, 1, group, layout, cu_seqlens)`` of the global sequence; any global
            length works (shards then differ by a token; a rank may hold none).
        group: the ring. A flat ring: a ProcessGroup, a 1-D DeviceMesh, a ``RingComm`` (e.g. the
            in-process fake, or ``ring_comm(pg, order=...)`` for a topology-chosen order), or None for
            the default group. A two-level ring of N = I * O ranks: a pair ``(inner, outer)`` of such
            groups (inner: the I ranks of this node; outer: the O ranks at this inner position on
            every node), a 2-D DeviceMesh of shape (O, I), or a ``TwoLevelComm``; the rank at inner
            position i of node o holds shard o * I + i of the N shards (``ringattn.shard`` with the
            same ``group`` gives it). Either way a rank's shard index is its position in the ring.
        causal: mask by global token index (query index >= key index).
        layout: "zigzag", "stripe", "contiguous" or "doc_zigzag" (each document of ``cu_seqlens`` cut
            zigzag-wise: balanced causal work for packed documents): how the shards were cut.
        rope: rotate Q and K inside the blocks (fused); positions default to the global index, or the
            index within the document when ``cu_seqlens`` is given.
        positions: this rank's shard of the RoPE positions, (S_local,) or (B, S_local), int
            (``ringattn.shard(positions, -1, group, layout)``); unused without ``rope``.
        cu_seqlens: document boundaries over the *global* sequence (same tensor on every rank);
            starts at 0, non-decreasing, ends at the global length.
        softmax_scale: default 1 / sqrt(D).
        deterministic: the ring's own sums always run in a fixed order; results are then as
            reproducible as the block backend (the flag is accepted for API compatibility).
        return_lse: also return lse (B, Hq, S_local), fp32, natural log (-inf for rows seeing no key).
        backend: block backend name, or "auto".
        dkv_dtype: dtype of the dk/dv accumulators on the wire in backward (default: k's dtype;
            torch.float32 avoids one rounding per hop at twice the bf16 bytes).
        timeout: seconds (or timedelta) for each wait on the wire; default the group's timeout. On
            CUDA (NCCL) waits only order streams and the group's own timeout applies, unless
            ``RINGATTN_RING_DEBUG=1``, where each hop blocks the host for at most ``timeout``.
        window_size, softcap, alibi_slopes ((Hq,) or (B, Hq)): as in ``flash_attn_func``, over global
            token indices; blocks wholly outside the window are skipped, and on a flat ring the walk
            stops after the last step whose K/V some rank's window reaches (contiguous layout: the
            window in shards plus one), so K/V beyond it are neither sent nor computed. The backward's
            dK/dV accumulators still make all W hops home.
        dropout_p, dropout_seed: dropout with ``ringattn.dropout``'s mask keyed by global indices, so
            the ring drops what one call on the whole sequence would; the seed must be the same on every
            rank (default: drawn from torch's generator, which then must be seeded alike).
        cp_mode: "ring" (K/V pass around the ring while computing); "allgather" (the Llama 3 recipe:
            all-gather K/V once, attend locally, reduce-scatter dK/dV around the ring; flat rings only);
            "auto" picks one per call from ``ringattn.topology.cp_mode_for`` (MODELED; PCIe links
            assumed). ``comm.stats.cp_modes`` counts the modes run.
        wire_dtype: None (K/V travel in k's dtype) or ``torch.float8_e4m3fn``: K/V travel as e4m3 with
            an fp32 scale per (K or V, batch, piece, head), half bf16's bytes; every rank attends to the
            dequantized K/V (its own included) and dK/dV are their gradients, in dkv_dtype (see
            ``ringattn.ring.wire``).

    The ranks agree on shapes and options on the first call with them (one small all_gather and a
    host sync); the communicator keeps that agreement, so later identical calls do neither
    (``RINGATTN_RING_DEBUG=1`` agrees on every call). A two-level ring never has both levels'
    messages in flight at once unless its ``TwoLevelComm`` was built with ``overlap=True``.

    Returns:
        out (B, S_local, Hq, D) in q's dtype, and lse when ``return_lse``.
    """
    static = (causal, layout, softmax_scale, deterministic, backend, dkv_dtype, timeout,
              tuple(window_size), softcap, dropout_p, cp_mode, wire_dtype)  # fmt: skip
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
        raise ValueError(f"dropout_seed must be an int in [0, 2^63) or None, got {dropout_seed!r}")
    seed = -1 if dropout_seed is None else dropout_seed
    if not torch.compiler.is_compiling():  # eager: every local check before the op, with the user's names
        local = dict(zip(_STATIC, (rope, *static), strict=True))
        _check_local(q, k, v, _Options(**local, positions=positions, cu_seqlens=cu_seqlens,
                                       alibi_slopes=alibi_slopes, dropout_seed=max(seed, 0), return_lse=return_lse))  # fmt: skip
    if isinstance(alibi_slopes, torch.Tensor):
        alibi_slopes = alibi_slopes.detach()
    key = _config_key(group, rope, static)
    out, lse, _ = _ring_attention_fwd(q, k, v, positions, cu_seqlens, alibi_slopes, key, seed)
    return (out, lse) if return_lse else out
