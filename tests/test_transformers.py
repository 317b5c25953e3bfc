"""transformers integration: tiny random models of four families, ringattn (fused RoPE) vs SDPA."""

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


def test_padding_mask_is_rejected_clearly():
    model = ra_hf.apply(tiny_causal_lm("llama"))
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(NotImplementedError, match="padding"):
        model(input_ids=ids, attention_mask=mask)
