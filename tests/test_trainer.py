"""transformers.Trainer with context parallelism: RingAttentionTrainer on a DP x CP mesh of gloo ranks
(launched as torchrun launches, environment variables and all) trains a tiny Llama on packed
documents to the same weights as the plain single-process Trainer, with gradient accumulation."""

import os
import pickle
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import GRAD_FACTOR, assert_within_peer_error

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from tiny_models import VOCAB, tiny_causal_lm  # noqa: E402

PER_DEVICE_BATCH = 2
GRAD_ACCUM = 2
STEPS = 2
CP = 2


def _dataset(n: int) -> list[dict]:
    """Documents of 5 to 40 tokens (some shorter than the ring, so ranks hold none of them)."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(5, 41, (n,), generator=gen).tolist()
    return [{"input_ids": torch.randint(0, VOCAB, (L,), generator=gen).tolist()} for L in lengths]


def _args(out_dir: str, batch: int, **kw):
    return transformers.TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=GRAD_ACCUM,
        max_steps=STEPS,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        average_tokens_across_devices=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **kw,
    )


def _trainer_kwargs(dp: int, out_dir: str, batch: int, model, **args_kw) -> dict:
    n = PER_DEVICE_BATCH * GRAD_ACCUM * STEPS * dp
    return dict(
        model=model,
        args=_args(out_dir, batch, **args_kw),
        train_dataset=_dataset(n),
        eval_dataset=_dataset(n)[: PER_DEVICE_BATCH * dp],
        data_collator=transformers.DataCollatorWithFlattening(),
    )


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)
    from ringattn.integrations.transformers import RingAttentionTrainer

    result = {}
    try:
        kwargs = _trainer_kwargs(
            world // CP, out_dir, PER_DEVICE_BATCH, tiny_causal_lm("llama", "sdpa"), ddp_backend="gloo"
        )
        trainer = RingAttentionTrainer(**kwargs, cp_size=CP, rope_precision="hf")
        trainer.train()
        metrics = trainer.evaluate()
        result = {
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "eval_loss": metrics["eval_loss"],
            "cp_ranks": torch.distributed.get_process_group_ranks(trainer.cp_group),
            "dp": (trainer.dp_rank, trainer.dp_size),
        }
    except BaseException:
        import traceback

        result = {"crash": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    os._exit(0)  # skip the gloo teardown


def _launch(world: int, out_dir: str, timeout: float = 240.0) -> list[dict]:
    import multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, port, out_dir), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
    assert not hung, f"ranks {hung} still running after {timeout:g} s"
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
            results.append(pickle.load(f))
        assert "crash" not in results[-1], f"rank {r} crashed:\n{results[-1]['crash']}"
    return results


def _single_process(dp: int, out_dir: str, dtype) -> dict:
    """The plain Trainer in this process, stock transformers attention (SDPA) and RoPE: one rank
    reading the batches of all ``dp`` data-parallel replicas at once."""
    kwargs = _trainer_kwargs(dp, out_dir, PER_DEVICE_BATCH * dp, tiny_causal_lm("llama", "sdpa", dtype))
    trainer = transformers.Trainer(**kwargs)
    trainer.train()
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "eval_loss": trainer.evaluate()["eval_loss"],
    }


@pytest.mark.parametrize("dp", [2, pytest.param(1, marks=pytest.mark.slow)], ids=lambda d: f"dp{d}xcp2")
def test_ring_trainer_matches_single_process_trainer(tmp_path, dp):
    world = dp * CP
    ring = _launch(world, str(tmp_path))
    assert [r["cp_ranks"] for r in ring] == [[2 * (r // 2), 2 * (r // 2) + 1] for r in range(world)]
    assert [r["dp"] for r in ring] == [(r // CP, dp) for r in range(world)]
    for r in range(1, world):  # DDP keeps every replica identical
        for name, p in ring[0]["params"].items():
            assert torch.equal(ring[r]["params"][name], p), f"rank {r} {name} differs from rank 0"
    ref = _single_process(dp, str(tmp_path / "ref"), torch.float64)
    peer = _single_process(dp, str(tmp_path / "peer"), torch.float32)
    initial = dict(tiny_causal_lm("llama", "sdpa").named_parameters())
    for name, p in ref["params"].items():
        assert not torch.equal(p.float(), initial[name]), f"{name} did not train"
        assert_within_peer_error(
            ring[0]["params"][name], p, peer["params"][name], factor=GRAD_FACTOR, eps=1e-7, name=name
        )
    assert len(ring[0]["losses"]) == len(ref["losses"]) == STEPS
    for ours, r64, r32 in zip(ring[0]["losses"], ref["losses"], peer["losses"], strict=True):
        assert_within_peer_error(
            torch.tensor(ours), torch.tensor(r64), torch.tensor(r32), eps=1e-6, name="loss"
        )
    assert_within_peer_error(
        torch.tensor(ring[0]["eval_loss"]),
        torch.tensor(ref["eval_loss"]),
        torch.tensor(peer["eval_loss"]),
        eps=1e-6,
        name="eval_loss",
    )


def test_trainer_refuses_padded_batches():
    """A padded batch cannot be sharded across a ring: a clear error, not wrong numbers."""
    from ringattn.integrations.transformers import RingAttentionMixin

    class Fake(RingAttentionMixin):
        def __init__(self):  # only what _shard_inputs reads
            self.cp_group = None

    batch = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0]] * 2),
    }
    with pytest.raises(NotImplementedError, match="DataCollatorWithFlattening"):
        Fake()._shard_inputs(batch)
