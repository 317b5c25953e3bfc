"""A 4-rank gloo training step of a tiny Llama with the sharded batch equals the single-process step."""

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import GRAD_FACTOR, assert_within_peer_error

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_causal_lm  # noqa: E402

WORLD = 4
SEQ_LEN = 45  # not a multiple of 2 * WORLD: shards are uneven
DOCS = [0, 13, 13, 40, 45]  # three documents, one of them empty


def _batch():
    input_ids = torch.randint(0, 97, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    cu = torch.tensor(DOCS, dtype=torch.int32)
    return {"input_ids": input_ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}


def _worker(rank: int, port: int, out_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from ringattn.integrations import transformers as ra_hf

        model = ra_hf.apply(tiny_causal_lm("llama", "sdpa"), group=dist.group.WORLD, rope_precision="hf")
        batch = _batch()
        local = ra_hf.shard_batch(batch)
        loss = model(**local, num_items_in_batch=ra_hf.count_predicted_tokens(batch)).loss
        loss.backward()
        dist.all_reduce(loss.detach(), op=dist.ReduceOp.SUM)
        grads = {}
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            grads[name] = p.grad
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads}, out_path)
    finally:
        dist.destroy_process_group()


def _single_process_step(model):
    """Each document run on its own, logits concatenated, one global shifted cross-entropy."""
    input_ids = _batch()["input_ids"]
    logits = torch.cat(
        [
            model(input_ids=input_ids[:, s:e]).logits
            for s, e in zip(DOCS[:-1], DOCS[1:], strict=True)
            if e > s
        ],
        dim=1,
    )
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_four_rank_ring_training_step_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "rank0.pt")
    ctx = mp.start_processes(_worker, args=(port, out_path), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):  # join returns as each rank exits
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("4-rank training step did not finish within 240 s")
    ring = torch.load(out_path)
    # transformers' own SDPA path, one document at a time: fp64 reference and fp32 peer.
    ref_loss, ref_grads = _single_process_step(tiny_causal_lm("llama", "sdpa", torch.float64))
    peer_loss, peer_grads = _single_process_step(tiny_causal_lm("llama", "sdpa"))
    assert_within_peer_error(ring["loss"], ref_loss, peer_loss, name="loss")
    for name in ref_grads:
        assert_within_peer_error(
            ring["grads"][name], ref_grads[name], peer_grads[name], factor=GRAD_FACTOR, eps=1e-7, name=name
        )
