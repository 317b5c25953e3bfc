"""Activation checkpointing with the ring, and what attention keeps for backward.

* gloo, 2 ranks: ``gradient_checkpointing_enable()`` on a ring-attention tiny Llama. The recomputed
  attention outputs are bitwise those of the first forward, the gradients bitwise those without
  checkpointing, every rank runs the same ring exchanges in the same order (forward hops, then per
  layer from the last: the recomputed forward's hops, then the backward's), and the decoder layers
  keep one hidden state each for backward instead of their activations (at least 8 hidden states'
  worth per layer without checkpointing).
* Saved-tensor hooks: ringattn's attention (one process, and the ring) saves q, k, v, out and lse for
  backward and no other activation: no rotated copy of q or k (RoPE is applied inside the kernel,
  both ways); the ring op also keeps its dropout seed, one integer scalar.
"""

import pytest
import torch
from ring_checks import launch

from ringattn import RoPEConfig
from ringattn.ops import attention
from ringattn.ring import fake_ring, ring_attn_func, run_fake_ring, shard

transformers = pytest.importorskip("transformers")
from tiny_models import VOCAB, tiny_causal_lm  # noqa: E402

WORLD = 2
DOCS = [0, 7, 30, 30, 53]  # three documents, one empty; 53 tokens: uneven shards
VARIANTS = ("plain", "non-reentrant", "reentrant")


class _Saved:
    """Bytes of distinct storages packed for backward, split by whether a decoder layer was running."""

    def __init__(self):
        self.depth, self.inside, self.outside, self.seen = 0, 0, 0, set()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in self.seen:
            self.seen.add(key)
            n = t.numel() * t.element_size()
            if self.depth:
                self.inside += n
            else:
                self.outside += n
        return t


def _run(rank, variant):
    import torch.distributed as dist

    from ringattn.integrations import transformers as ra_hf
    from ringattn.ring import ring_comm

    group = dist.group.WORLD
    model = ra_hf.apply(tiny_causal_lm("llama", "sdpa"), group=group, rope_precision="hf")
    if variant != "plain":
        model.gradient_checkpointing_enable({"use_reentrant": variant == "reentrant"})
    model.train()
    ids = torch.randint(0, VOCAB, (1, DOCS[-1]), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor(DOCS, dtype=torch.int32)
    batch = {"input_ids": ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    local = ra_hf.shard_batch(batch, group)
    attn_out = []
    hooks = [
        m.self_attn.register_forward_hook(lambda mod, args, out: attn_out.append(out[0].detach().clone()))
        for m in model.model.layers
    ]
    saved = _Saved()
    for layer in model.model.layers:
        hooks.append(layer.register_forward_pre_hook(lambda *a: setattr(saved, "depth", saved.depth + 1)))
        hooks.append(layer.register_forward_hook(lambda *a: setattr(saved, "depth", saved.depth - 1)))
    comm = ring_comm(group)
    comm.stats.clear()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = model(**local, num_items_in_batch=ra_hf.count_predicted_tokens(batch)).loss
    n_forward = len(attn_out)
    loss.backward()
    for h in hooks:
        h.remove()
    return {
        "forward": attn_out[:n_forward],
        "recomputed": attn_out[n_forward:],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "wire": [(r.label, r.hop, r.bytes_sent) for r in comm.stats.records],
        "saved_inside": saved.inside,
        "saved_outside": saved.outside,
        "hidden_bytes": local["input_ids"].numel() * model.config.hidden_size * 4,
        "loss": loss.detach(),
    }


def _rank(rank, world):
    return {variant: _run(rank, variant) for variant in VARIANTS}


def test_activation_checkpointing_in_a_ring():
    per_rank = launch(_rank, WORLD)
    layers = len(per_rank[0]["plain"]["forward"])
    assert layers == 2
    for rank, res in enumerate(per_rank):
        plain = res["plain"]
        assert plain["recomputed"] == []
        for variant in VARIANTS[1:]:
            ck = res[variant]
            # The forward is the same computation; the recomputation (last layer first) gives it again.
            assert torch.equal(ck["loss"], plain["loss"])
            assert len(ck["recomputed"]) == layers, f"{variant}: recomputed {len(ck['recomputed'])} layers"
            for i in range(layers):
                assert torch.equal(ck["forward"][i], plain["forward"][i]), f"rank {rank} {variant} layer {i}"
                assert torch.equal(ck["recomputed"][layers - 1 - i], plain["forward"][i]), (
                    f"rank {rank} {variant}: recomputed layer {i} differs from its forward"
                )
            for name, g in plain["grads"].items():
                assert torch.equal(ck["grads"][name], g), f"rank {rank} {variant}: grad of {name}"
            # Checkpointed layers keep only their inputs (one hidden state each) where a plain layer
            # keeps its activations: q, k, v, out, lse and the projections' and MLP's inputs.
            assert plain["saved_inside"] >= 8 * layers * plain["hidden_bytes"], plain["saved_inside"]
            assert ck["saved_inside"] <= layers * ck["hidden_bytes"], f"{variant}: {ck['saved_inside']} bytes"
            assert ck["saved_outside"] == plain["saved_outside"]
    # The exchanges: the same sequence on every rank; forward hops per layer, then per layer (last
    # first) the recomputed forward's hops (checkpointing only) and the backward's.
    fwd = [("forward kv", 1, per_rank[0]["plain"]["wire"][0][2])]
    for variant in VARIANTS:
        wires = [res[variant]["wire"] for res in per_rank]
        assert all(w == wires[0] for w in wires), f"{variant}: ranks ran different exchanges"
        labels = [label for label, _, _ in wires[0]]
        bwd = ["backward kv", "backward dkv", "backward dkv"]
        again = ["forward kv"] if variant != "plain" else []
        assert labels == ["forward kv"] * layers + (again + bwd) * layers, f"{variant}: {labels}"
        assert wires[0][:1] == fwd


# ----------------------------------------------------------------------- what is saved for backward


def _saved_during(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved


def _inputs(S, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, S, 4, 16, generator=gen).requires_grad_()
    k, v = (torch.randn(1, S, 2, 16, generator=gen).requires_grad_() for _ in range(2))
    return q, k, v


def _assert_saves_exactly(saved, q, k, v, out, lse):
    """The saved tensors are q, k, v (as given: unrotated), out and lse, in that order; besides them
    at most 0-dim integers (the ring op keeps the dropout seed it drew), no activation."""
    names = ("q", "k", "v", "out", "lse")
    tensors = [t for t in saved if t.dim() > 0 or t.is_floating_point()]
    scalars = [t for t in saved if t.dim() == 0 and not t.is_floating_point()]
    assert len(tensors) == 5, f"saved {len(tensors)} tensors: {[tuple(t.shape) for t in saved]}"
    assert len(scalars) <= 1, f"saved {len(scalars)} integer scalars"
    for name, got, want in zip(names, tensors, (q, k, v, out, lse), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype}"
        assert torch.equal(got, want.detach()), f"saved {name} is not the {name} given or returned"


def test_attention_saves_q_k_v_out_lse_only():
    S = 40
    rope = RoPEConfig(16, theta=45.2e9)
    cu = torch.tensor([0, 9, 40], dtype=torch.int32)
    q, k, v = _inputs(S)
    (out, lse), saved = _saved_during(lambda: attention(q, k, v, causal=True, rope=rope, cu_seqlens=cu))
    _assert_saves_exactly(saved, q, k, v, out, lse)
    rotated = rope_rotated(q, rope, cu)
    assert not torch.allclose(rotated, q), "the rotation must move q for this check to mean anything"
    assert not any(t.shape == q.shape and torch.allclose(t, rotated, atol=1e-5) for t in saved)
    (out + 0).sum().backward()  # the saved tensors suffice for the gradients
    assert q.grad is not None and torch.isfinite(q.grad).all()


def rope_rotated(q, rope, cu):
    from ringattn.indexing import default_positions
    from ringattn.rope import apply_rope

    positions = default_positions(torch.arange(q.shape[1]), cu)
    return apply_rope(q.detach().double(), positions, rope).to(q.dtype)


def test_ring_saves_q_k_v_out_lse_only():
    S, W = 45, 3
    rope = RoPEConfig(16, theta=45.2e9)
    q_full, k_full, v_full = _inputs(S, seed=1)

    def rank(comm):
        q, k, v = (shard(t.detach(), 1, comm).requires_grad_() for t in (q_full, k_full, v_full))
        (out, lse), saved = _saved_during(
            lambda: ring_attn_func(q, k, v, group=comm, rope=rope, return_lse=True)
        )
        _assert_saves_exactly(saved, q, k, v, out, lse)
        out.sum().backward()
        return q.grad

    grads = run_fake_ring(rank, fake_ring(W))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
