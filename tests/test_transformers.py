"""transformers integration: tiny random models of four families, ringattn (fused RoPE) vs SDPA."""

import copy
import warnings

import pytest
import torch
from harness import GRAD_FACTOR, assert_within_peer_error

transformers = pytest.importorskip("transformers")
from tiny_models import FAMILIES, tiny_causal_lm  # noqa: E402

from ringattn.integrations import transformers as ra_hf  # noqa: E402


def _step(model, input_ids, **kwargs):
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_matches_sdpa(family):
    input_ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _step(tiny_causal_lm(family, dtype=torch.float64), input_ids)
    peer_logits, peer_grads = _step(tiny_causal_lm(family), input_ids)
    ours_model = ra_hf.apply(tiny_causal_lm(family), rope_precision="hf")
    assert ours_model.config._attn_implementation == "ringattn"
    ours_logits, ours_grads = _step(ours_model, input_ids)
    assert_within_peer_error(ours_logits, ref_logits, peer_logits, name="logits")
    for name in ref_grads:
        assert_within_peer_error(
            ours_grads[name], ref_grads[name], peer_grads[name], factor=GRAD_FACTOR, eps=1e-7, name=name
        )


def test_fused_rope_is_really_inside_the_kernel_and_remove_restores():
    model = tiny_causal_lm("llama")
    input_ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        ra_hf.apply(model, rope_precision="hf")
        cos, sin = model.model.rotary_emb(model.model.embed_tokens(input_ids), torch.arange(20)[None])
        assert (cos == 1).all() and (sin == 0).all()  # the model's own rotation is now the identity
        fused = model(input_ids=input_ids).logits
        ra_hf.remove(model)
        after = model(input_ids=input_ids).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(fused, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("packing", ["position_ids", "cu_seq_lens"])
def test_packed_documents_equal_separate_runs(packing):
    lengths = [5, 17, 42]
    model = ra_hf.apply(tiny_causal_lm("qwen3"))
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 97, (1, n), generator=gen) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    kwargs = {"position_ids": position_ids}
    if packing == "cu_seq_lens":
        cu = torch.tensor([0, 5, 22, 64], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=42, max_length_k=42)
    with torch.no_grad():
        together = model(input_ids=packed, **kwargs).logits
        start = 0
        for doc in docs:
            alone = model(input_ids=doc).logits
            torch.testing.assert_close(together[:, start : start + doc.shape[1]], alone, atol=1e-5, rtol=1e-5)
            start += doc.shape[1]


def test_other_families_keep_their_rope_with_a_warning():
    config = transformers.GPTNeoXConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ra_hf.apply(model)
    assert any("keeps its own RoPE" in str(w.message) for w in caught)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ra_hf.remove(model)
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _summed_loss(logits, ids, real):
    """Next-token cross entropy summed over real (token, next token) pairs (a sum, so batches and
    single rows compare)."""
    targets = ids[:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(side):
    """A padding attention mask is unpadded into a varlen call: each row's real tokens get the logits
    of that row run alone without padding, and the summed loss the same gradients (fp64, fused RoPE)."""
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, :4] = mask[2, :1] = False
    if side == "right":
        mask = mask.flip(1)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # what generate() passes
    model = ra_hf.apply(tiny_causal_lm("llama", dtype=torch.float64))
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids).logits
    _summed_loss(logits, ids, mask).backward()
    batch_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for row in range(3):
        real = ids[row : row + 1, mask[row]]
        alone = model(input_ids=real).logits
        torch.testing.assert_close(logits[row, mask[row]], alone[0].detach(), atol=1e-10, rtol=1e-10)
        _summed_loss(alone, real, torch.ones_like(real, dtype=torch.bool)).backward()
    for name, grad in batch_grads.items():
        torch.testing.assert_close(
            grad, dict(model.named_parameters())[name].grad, atol=1e-10, rtol=1e-8, msg=name
        )


def test_padding_that_is_not_one_run_is_refused_by_name():
    model = ra_hf.apply(tiny_causal_lm("llama"))
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(5))
    with pytest.raises(NotImplementedError, match="contiguous run"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_fused_rope_gives_the_sdpa_tokens(family):
    """Greedy decoding with a KV cache (Sq = 1 against the cache) and fused exact RoPE, on a batch with
    left padding: the same tokens as the SDPA model."""
    prompts = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    sdpa = tiny_causal_lm(family, dtype=torch.float64)
    ours = ra_hf.apply(tiny_causal_lm(family, dtype=torch.float64), rope_precision="hf")
    with torch.no_grad():
        want = sdpa.generate(prompts, **kw)
        got = ours.generate(prompts, **kw)
    assert got.shape == (2, 15)
    assert torch.equal(got, want)


def test_ring_model_compiles_fullgraph_and_matches_eager():
    """A tiny Llama with ringattn over a fake ring of 2, packed documents given as cu_seq_lens, a
    sliding window: torch.compile(fullgraph=True) matches eager in logits and gradients."""
    from ringattn.ring import fake_ring, run_fake_ring

    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (1, 24), generator=gen)
    cu = torch.tensor([0, 9, 24], dtype=torch.int32)
    batch = {"input_ids": ids, "position_ids": torch.cat([torch.arange(9), torch.arange(15)])[None],
             "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 15, "max_length_k": 15}  # fmt: skip

    base = tiny_causal_lm("mistral", dtype=torch.float64)  # built once: threads would race on the RNG
    base.config.sliding_window = 6

    def run(comm, compiled):
        model = copy.deepcopy(base)
        ra_hf.apply(model, group=comm)
        local = ra_hf.shard_batch(batch, group=comm)
        # aot_eager: dynamo and AOT autograd without inductor, whose process state (it exports
        # _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR) breaks ranks that later tests spawn
        fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        inputs = {n: local[n] for n in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
        logits = fn(**inputs).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    eager = run_fake_ring(lambda c: run(c, False), fake_ring(2))
    compiled = run_fake_ring(lambda c: run(c, True), fake_ring(2))
    for (e_logits, e_grads), (c_logits, c_grads) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c_logits, e_logits, atol=1e-6, rtol=0)  # inductor's own fp64 math
        for name, grad in e_grads.items():
            torch.testing.assert_close(c_grads[name], grad, atol=1e-6, rtol=0, msg=name)
