"""`python -m ringattn.examples.train`, short: 2 gloo ranks train a tiny Llama on packed documents for a
few steps; the ring's loss equals the one-process loss to 1e-5 relative at every step, step 0's loss is
the model's loss as stock transformers computes it (SDPA, one document at a time), and the JSON and
PNG it writes hold what they claim."""

import json

import pytest
import torch
from harness import assert_within_peer_error

transformers = pytest.importorskip("transformers")

from ringattn.examples import train  # noqa: E402

SHORT = ["--ranks", "2", "--seq", "401", "--steps", "3", "--layers", "2", "--hidden", "64", "--vocab", "64"]
RTOL = 1e-5  # the bound for fp32


def test_make_batch_packs_long_tailed_documents():
    batch = train.make_batch(step=3, seq=5000, vocab=50, seed=1)
    cu = batch["cu_seq_lens_q"].tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    assert cu[0] == 0 and cu[-1] == 5000 and all(n > 0 for n in lengths)
    assert max(lengths) > 4 * sorted(lengths)[len(lengths) // 2]  # a long tail over the median
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        assert pos[a:b].tolist() == list(range(b - a))  # positions restart in every document
        assert ids[a].item() == train.BOS and labels[a].item() == -100  # nothing predicts a document's start
        assert torch.equal(labels[a + 1 : b], ids[a + 1 : b])
    assert 0 <= ids.min() and ids.max() < 50
    assert torch.equal(train.make_batch(3, 5000, 50, 1)["input_ids"], batch["input_ids"])  # deterministic
    assert not torch.equal(train.make_batch(4, 5000, 50, 1)["cu_seq_lens_q"], batch["cu_seq_lens_q"])


def _stock_step0_loss(args, dtype) -> torch.Tensor:
    """Step 0's loss with the same initial weights, by stock transformers: SDPA attention and its own
    RoPE, one document at a time, summed cross-entropy over the targets."""
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(
        train.model_config(args), attn_implementation="sdpa"
    )
    model = model.to(dtype)
    batch = train.make_batch(0, args.seq, args.vocab, args.seed)
    cu = batch["cu_seq_lens_q"].tolist()
    ids = batch["input_ids"]
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            if b - a < 2:
                continue
            logits = model(input_ids=ids[:, a:b]).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, ids[0, a + 1 : b], reduction="sum")
            count += b - a - 1
    return total / count


def test_short_training_run_ring_equals_one_process(tmp_path):
    args = train.parse_args([*SHORT, "--out", str(tmp_path)])
    train.launch_ranks(args)  # 2 spawned gloo ranks, torchrun's environment
    train.run_single(args)  # the reference, here in this process
    result = train.report(args)
    steps = result["steps"]
    assert [s["step"] for s in steps] == list(range(3))
    ring = [s["loss_ring"] for s in steps]
    single = [s["loss_single"] for s in steps]
    for i, (a, b) in enumerate(zip(ring, single, strict=True)):
        assert abs(a - b) <= RTOL * abs(b), f"step {i}: ring {a} vs one process {b}"
    assert result["parity_ok"] is True
    assert result["max_abs_dloss"] == max(abs(a - b) for a, b in zip(ring, single, strict=True))
    assert min(single[1:]) < single[0], f"the loss does not fall: {single}"
    # Step 0 (same initial weights) is the model's true loss: stock transformers in fp64 and fp32.
    assert_within_peer_error(
        torch.tensor(ring[0]),
        _stock_step0_loss(args, torch.float64),
        _stock_step0_loss(args, torch.float32),
        eps=1e-6,
        name="step-0 loss",
    )
    # What the JSON claims.
    on_disk = json.loads((tmp_path / "train.json").read_text())
    assert on_disk["steps"] == steps
    assert on_disk["config"]["ranks"] == 2 and on_disk["config"]["seq"] == 401
    assert result["replicas_in_sync"] is True
    assert all(v > 0 for v in result["tokens_per_s"].values())
    mem = result["peak_memory"]
    assert len(mem["ring_per_rank"]) == 2
    assert all(m["peak_bytes"] >= m["baseline_bytes"] > 0 for m in [*mem["ring_per_rank"], mem["single"]])
    wire = result["wire_bytes_per_step_per_rank"]
    assert wire["forward kv"] == wire["backward kv"] and min(wire["forward kv"]) > 0
    n_params = sum(p.numel() for p in train.build_model(args, "cpu").parameters())
    assert wire["gradient all-reduce payload"] == [4 * n_params] * 2
    png = (tmp_path / "train.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_flags_a_loss_that_drifts(tmp_path):
    """The parity verdict is computed, not assumed: a drift of 2e-5 relative at one step fails it."""
    ring = {
        "ranks": 2,
        "backend": "gloo",
        "losses": [4.0, 3.9],
        "step_times_s": [1.0, 1.0],
        "wall_s": 2.0,
        "per_rank": [
            {
                "peak_memory": {"kind": "k", "peak_bytes": 2, "baseline_bytes": 1, "above_baseline_bytes": 1},
                "wire_bytes": {"forward kv": 8},
                "wire_wait_s": 0.0,
                "param_checksum": 1.0,
                "threads": 1,
            }
        ]
        * 2,
    }
    single = {
        "losses": [4.0, 3.9 * (1 + 2e-5)],
        "step_times_s": [1.0, 1.0],
        "wall_s": 2.0,
        "peak_memory": {"kind": "k", "peak_bytes": 2, "baseline_bytes": 1, "above_baseline_bytes": 1},
        "threads": 2,
        "documents_per_step": [1, 1],
    }
    (tmp_path / "ring.json").write_text(json.dumps(ring))
    (tmp_path / "single.json").write_text(json.dumps(single))
    args = train.parse_args(["--steps", "2", "--out", str(tmp_path)])
    result = train.report(args)
    assert result["parity_ok"] is False
    assert result["max_rel_dloss"] == pytest.approx(2e-5 / (1 + 2e-5), rel=1e-6)
    assert train.main(["--role", "report", "--steps", "2", "--out", str(tmp_path)]) == 1
