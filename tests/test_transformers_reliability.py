"""transformers integration under misuse (reliability review, issue 14): re-applying, packed rows that
continue a document, bad ``cu_seq_lens_q``, ring mode without ``cu_seq_lens`` and communicator groups."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tiny_models import VOCAB, tiny_causal_lm  # noqa: E402

from ringattn.integrations import transformers as ra_hf  # noqa: E402
from ringattn.ring import fake_ring, run_fake_ring, shard  # noqa: E402

ATOL = RTOL = 1e-5


def _ids(length, seed):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def _rotary_is_identity(model, length=6):
    cos, sin = model.model.rotary_emb(torch.zeros(1, length, 4), torch.arange(length)[None])
    return bool((cos == 1).all() and (sin == 0).all())


def _untouched(model):
    """No trace of ringattn on the model's modules."""
    rotary = model.model.rotary_emb
    return (
        "forward" not in rotary.__dict__
        and "ringattn_saved_forward" not in rotary.__dict__
        and "ringattn_previous_attn" not in model.__dict__
        and not any("ringattn_state" in m.__dict__ for m in model.modules())
    )


# Defect 1 (review D5, D15): re-applying and removing.


def test_reapply_without_fused_rope_brings_the_models_rope_back():
    model = tiny_causal_lm("llama")
    ids = _ids(24, 1)
    sdpa = _logits(model, ids)
    ra_hf.apply(model)
    ra_hf.apply(model, fuse_rope=False)
    assert not _rotary_is_identity(model), "the model's own RoPE must run again"
    torch.testing.assert_close(_logits(model, ids), sdpa, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "applies",
    [
        [{}, {}],
        [{}, {"rope_precision": "hf"}],
        [{"fuse_rope": False}, {}],
        [{}, {"fuse_rope": False}, {}],
    ],
)
def test_remove_after_several_applies_restores_the_original(applies):
    model = tiny_causal_lm("llama", attn="eager")
    ids = _ids(20, 2)
    before = _logits(model, ids)
    for kwargs in applies:
        ra_hf.apply(model, **kwargs)
    assert model.config._attn_implementation == "ringattn"
    ra_hf.remove(model)
    assert model.config._attn_implementation == "eager"
    assert _untouched(model)
    torch.testing.assert_close(_logits(model, ids), before, atol=0, rtol=0)
    ra_hf.remove(model)  # removing again is a no-op
    assert model.config._attn_implementation == "eager"


def test_remove_keeps_an_instance_forward_installed_before_apply():
    model = tiny_causal_lm("llama")
    rotary = model.model.rotary_emb
    calls = []

    def hooked(x, position_ids):  # what e.g. an accelerate hook puts on the instance
        calls.append(1)
        return type(rotary).forward(rotary, x, position_ids)

    rotary.forward = hooked
    ra_hf.apply(model)
    ra_hf.apply(model)
    assert _rotary_is_identity(model)
    ra_hf.remove(model)
    assert rotary.__dict__.get("forward") is hooked
    calls.clear()
    assert not _rotary_is_identity(model) and calls


# Defect 2 (review D6): a packed row whose first document continues from the previous batch.

CONTINUED = [5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3, 4]


def test_documents_from_positions_count_a_continued_first_run():
    docs = ra_hf._documents_from_position_ids(torch.tensor(CONTINUED))
    assert docs.tolist() == [0, 3, 7, 12]
    assert ra_hf._documents_from_position_ids(torch.tensor([0, 1, 2, 0, 1])).tolist() == [0, 3, 5]
    assert ra_hf._documents_from_position_ids(torch.tensor([5, 6, 7])) is None  # one document
    assert ra_hf._documents_from_position_ids(torch.arange(6)) is None


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_row_continuing_a_document_equals_separate_runs(family):
    model = ra_hf.apply(tiny_causal_lm(family))
    positions = torch.tensor(CONTINUED)
    ids = _ids(len(CONTINUED), 3)
    together = _logits(model, ids, position_ids=positions[None])
    for start, end in ((0, 3), (3, 7), (7, 12)):
        alone = _logits(model, ids[:, start:end], position_ids=positions[None, start:end])
        torch.testing.assert_close(together[:, start:end], alone, atol=ATOL, rtol=RTOL)


# Defect 3 (review D6, H4): cu_seq_lens_q passed to the model is validated.


@pytest.mark.parametrize(
    ("cu", "error", "match"),
    [
        (torch.tensor([0, 7, 5, 12], dtype=torch.int32), ValueError, "non-decreasing"),
        (torch.tensor([1, 5, 12], dtype=torch.int32), ValueError, "start at 0"),
        (torch.tensor([0, 5, 10], dtype=torch.int32), ValueError, "end at the number of tokens"),
        (torch.tensor([0, 5, 14], dtype=torch.int32), ValueError, "end at the number of tokens"),
        (torch.tensor([0.0, 3.9, 12.0]), TypeError, "int32 or int64"),
        (torch.tensor([0, 5, 12], dtype=torch.int16), TypeError, "int32 or int64"),
        (torch.tensor([[0, 5, 12]], dtype=torch.int32), ValueError, "1-D"),
        (torch.tensor([0], dtype=torch.int32), ValueError, "at least 2"),
        ([0, 5, 12], TypeError, "torch.Tensor"),
    ],
)
def test_bad_cu_seq_lens_q_is_refused_naming_it(cu, error, match):
    model = ra_hf.apply(tiny_causal_lm("llama"))
    with pytest.raises(error, match=f"cu_seq_lens_q.*{match}"):
        _logits(model, _ids(12, 4), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)


def test_cu_seq_lens_k_alone_or_different_is_refused():
    model = ra_hf.apply(tiny_causal_lm("llama"))
    good = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_k.*non-decreasing"):
        _logits(model, _ids(12, 5), cu_seq_lens_q=good, cu_seq_lens_k=torch.tensor([0, 9, 5, 12]))
    with pytest.raises(NotImplementedError, match="cu_seq_lens_k"):
        _logits(model, _ids(12, 5), cu_seq_lens_k=good)


def test_valid_cu_seq_lens_in_either_int_dtype_work():
    model = ra_hf.apply(tiny_causal_lm("llama"))
    ids = _ids(12, 6)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6])[None]
    expected = _logits(model, ids, position_ids=positions)
    for dtype in (torch.int32, torch.int64):
        cu = torch.tensor([0, 5, 12], dtype=dtype)
        got = _logits(model, ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu.int())
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


# Defect 5 (review D14, H5): communicator groups.


def test_apply_refuses_a_bad_group_at_apply_time():
    model = tiny_causal_lm("llama")
    with pytest.raises(TypeError, match="group"):
        ra_hf.apply(model, group=object())
    assert _untouched(model) and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="layout"):
        ra_hf.apply(model, layout="bogus")


def test_apply_accepts_a_ring_communicator():
    ids = _ids(20, 7)
    expected = _logits(ra_hf.apply(tiny_causal_lm("llama")), ids)
    (comm,) = fake_ring(1)
    model = ra_hf.apply(tiny_causal_lm("llama"), group=comm)
    torch.testing.assert_close(_logits(model, ids), expected, atol=ATOL, rtol=RTOL)


# Defect 4 (review D10): ring mode with position_ids but no cu_seq_lens. Every rank runs its own copy
# of the model on the in-process fake ring (one thread per rank).

RING_POSITIONS = [5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]


def _ring_logits(model, ids, positions, world, layout, via_shard_batch):
    def rank(comm, replica):
        if via_shard_batch:
            local = ra_hf.shard_batch({"input_ids": ids, "position_ids": positions}, comm, layout)
            assert "cu_seq_lens_q" in local  # derived from the full sequence before sharding
            kwargs = {k: local[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
        else:  # sharded by hand: the attention derives the documents from the gathered positions
            kwargs = {
                "input_ids": shard(ids, 1, comm, layout),
                "position_ids": shard(positions, 1, comm, layout),
            }
        with torch.no_grad():
            logits = replica(**kwargs).logits
        return ra_hf.gather_sequence(logits, comm, layout)

    comms = fake_ring(world, timeout=60.0)
    replicas = [ra_hf.apply(copy.deepcopy(model), group=c, layout=layout) for c in comms]
    return run_fake_ring(lambda c: rank(c, replicas[c.rank]), comms)


@pytest.mark.parametrize(
    ("world", "layout", "via_shard_batch"),
    [(2, "zigzag", False), (3, "contiguous", False), (2, "zigzag", True)],
)
def test_ring_derives_documents_from_the_full_sequence(world, layout, via_shard_batch):
    model = tiny_causal_lm("llama")
    ids = _ids(len(RING_POSITIONS), 8)
    positions = torch.tensor(RING_POSITIONS)[None]
    expected = _logits(ra_hf.apply(copy.deepcopy(model)), ids, position_ids=positions)
    for got in _ring_logits(model, ids, positions, world, layout, via_shard_batch):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_shard_batch_derives_documents_only_for_one_row():
    (comm,) = fake_ring(1)
    ids = _ids(len(CONTINUED), 9)
    local = ra_hf.shard_batch({"input_ids": ids, "position_ids": torch.tensor(CONTINUED)[None]}, comm)
    assert local["cu_seq_lens_q"].tolist() == local["cu_seq_lens_k"].tolist() == [0, 3, 7, 12]
    local = ra_hf.shard_batch({"input_ids": ids}, comm)
    assert "cu_seq_lens_q" not in local
    two = torch.tensor(CONTINUED).expand(2, -1)
    local = ra_hf.shard_batch({"input_ids": ids.expand(2, -1), "position_ids": two}, comm)
    assert "cu_seq_lens_q" not in local  # several rows: each row is one sequence, as without a ring
