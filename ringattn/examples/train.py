"""`python -m ringattn.examples.train`: long-context training over a ring, checked step by step against one process.

A small random-initialised transformers Llama (built from a config in code, nothing downloaded: 8 query
heads over 2 KV heads, RoPE theta = 45.2e9, RoPE fused into the kernel in exact-phase mode) trains on
packed documents of a long-tailed length mix (log-normal, median 128 tokens, up to 4096; the token
stream of each document is a fixed random bigram chain, so the loss has something to learn) for
``--steps`` steps of one ``--seq``-token sequence, over ``--ranks`` ranks with ring attention (the
``doc_zigzag`` layout where this ringattn has it, else ``zigzag``). Context parallel: every rank holds
``seq / ranks`` tokens of the same sequence, the losses of the shards add up to the sequence's loss
and the gradients are summed over the ranks (one all-reduce per step). Then the very same steps run in
one process (the whole sequence, ringattn's attention without a ring) as the reference.

Launching is torchrun's: run under ``torchrun --nproc-per-node W -m ringattn.examples.train`` (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from the environment), or plainly, in which case this
module starts the W ranks itself with the same environment. CPU tensors use gloo, CUDA ones NCCL
(one GPU per rank, ``cuda:LOCAL_RANK``). Rank 0 prints a progress bar.

Output in ``--out``: ``train.json`` (per-step loss ring vs one process, max |dloss|, tokens/s, peak
memory per rank and of the one process, bytes on the wire per step) and ``train.png`` (both loss
curves; peak memory per rank vs one process). In fp32 the ring's loss must equal the one-process loss
to ``PARITY_RTOL`` (1e-5) relative at every step; the exit status is 1 when it does not.

Peak memory is CPU RSS above the start of training (``/proc``'s high-water mark; the processes started
here run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS), or on a
GPU ``torch.cuda.max_memory_allocated`` above the start.

Defaults (``DEFAULTS``) are sized so that the whole run takes under 5 minutes on a 2-core CPU machine:
4 ranks, 16384 tokens, 4 layers of hidden size 128 (head dim 16), 6 steps. A run of the model the
issue describes (hidden 256, head dim 32, 20 steps) is ``--hidden 256 --steps 20``; on GPUs raise
``--seq`` as far as memory allows (``--seq 131072`` and up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from ..layouts import LAYOUTS
from .peak import PeakMemory

THETA = 45.2e9
PARITY_RTOL = 1e-5
# Document lengths: log-normal with this median (tokens) and sigma, clipped to [MIN_DOC, MAX_DOC].
MEDIAN_DOC, SIGMA_DOC, MIN_DOC, MAX_DOC = 128, 1.0, 16, 4096
# Each token has SUCCESSORS.numel() possible successors with these probabilities (entropy 1.14 nats).
SUCCESSORS = torch.tensor([0.55, 0.25, 0.12, 0.08])
BOS = 0


def _default_layout() -> str:
    """doc_zigzag (every document cut zigzag-wise: balanced causal work for packed documents) where this
    ringattn has it, else zigzag."""
    import inspect

    from ..ring import shard

    has_documents = "cu_seqlens" in inspect.signature(shard).parameters
    return "doc_zigzag" if "doc_zigzag" in LAYOUTS and has_documents else "zigzag"


DEFAULT_LAYOUT = _default_layout()
DEFAULTS = dict(
    ranks=4, seq=16384, steps=6, dtype="fp32", out="train_results", layers=4, hidden=128,
    vocab=256, lr=3e-3, seed=0, layout=DEFAULT_LAYOUT, device="auto", checkpointing=False,
)  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------- data


def document_lengths(seq: int, gen: torch.Generator) -> list[int]:
    """A long-tailed mix of document lengths that fills ``seq`` tokens exactly (the last one is cut)."""
    lengths: list[int] = []
    total = 0
    while total < seq:
        z = torch.randn((), generator=gen, dtype=torch.float64).item()
        length = int(round(MEDIAN_DOC * math.exp(SIGMA_DOC * z)))
        length = min(max(MIN_DOC, min(length, MAX_DOC)), seq - total)  # the last one is cut to fit
        lengths.append(length)
        total += length
    return lengths


def _successor_table(vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(10_007 + seed)
    return torch.randint(1, vocab, (vocab, SUCCESSORS.numel()), generator=gen).tolist()


def make_batch(step: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Step ``step``'s packed sequence, the same on every rank: ``input_ids``, ``labels`` (-100 where a
    document starts, so no token predicts the next document's first one), ``position_ids`` (restarting
    at 0 in each document) and the documents' ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    lengths = document_lengths(seq, gen)
    table = _successor_table(vocab, seed)
    choices = torch.multinomial(SUCCESSORS, seq, replacement=True, generator=gen).tolist()
    ids = [0] * seq
    positions = [0] * seq
    t = 0
    for length in lengths:
        previous = BOS
        for i in range(length):
            token = BOS if i == 0 else table[previous][choices[t]]
            ids[t], positions[t], previous = token, i, token
            t += 1
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    input_ids = torch.tensor(ids)[None]
    labels = input_ids.clone()
    labels[0, cu[:-1].long()] = -100
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": torch.tensor(positions)[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
    }


def full_inputs(batch: dict, device) -> dict:
    """The whole sequence as one process feeds it: labels shifted once here, exactly as ``shard_batch``
    shifts them before sharding (so both paths compute the same sum over the same targets)."""
    shift = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    inputs = {**batch, "labels": shift, "shift_labels": shift}
    return {k: v.to(device) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------ model


def model_config(args):
    import transformers

    heads = 8
    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=args.hidden // heads,
        max_position_embeddings=max(args.seq, MAX_DOC),
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=False,
    )


def build_model(args, device, group=None):
    """The same random weights in every process (seeded, built on the CPU), ringattn attention with
    fused exact RoPE, over ``group``'s ring when given."""
    import transformers

    from ..integrations import transformers as ra_hf

    ra_hf.register()
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(model_config(args), attn_implementation="ringattn")
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    ra_hf.apply(model, group=group, layout=args.layout)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def make_optimizer(model, lr: float):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def _device(args, local_rank: int = 0) -> torch.device:
    want = args.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(want)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on a terminal; one line per step elsewhere (logs, pytest)."""

    WIDTH = 24

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stdout.isatty()
        self.started = time.perf_counter()

    def update(self, done: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        filled = round(self.WIDTH * done / self.total)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - done) if done else float("nan")
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} "
            f"loss {loss:.5f}  {tokens_per_s:,.0f} tok/s  {elapsed:.0f}s elapsed, eta {eta:.0f}s"
        )
        if self.tty:
            end = "\n" if done == self.total else ""
            print("\r" + line, end=end, flush=True)
        else:
            print(line, flush=True)


# ----------------------------------------------------------------------------------------- ranks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rank(args) -> None:
    """One rank of the ring run (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the environment);
    rank 0 writes ``ring.json`` into ``args.out``."""
    import torch.distributed as dist

    from ..integrations import transformers as ra_hf
    from ..ring import ring_comm

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(args, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any CUDA work: NCCL needs each rank on its own GPU
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, _cpu_count() // local_world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        group = dist.group.WORLD
        model = build_model(args, device, group)
        optimizer = make_optimizer(model, args.lr)
        params = [p for p in model.parameters() if p.requires_grad]
        comm = ring_comm(group)
        comm.stats.clear()
        progress = Progress(f"ring x{world}", args.steps, enabled=rank == 0)
        meter = PeakMemory(device)
        meter.reset()
        losses, local_losses, times = [], [], []
        started = time.perf_counter()
        for step in range(args.steps):
            batch = make_batch(step, args.seq, args.vocab, args.seed)
            n_items = ra_hf.count_predicted_tokens(batch).to(device)
            local = {k: v.to(device) for k, v in ra_hf.shard_batch(batch, group, args.layout).items()}
            _sync(device)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(**local, num_items_in_batch=n_items).loss  # this shard's share of the sum
            loss.backward()
            # Context parallelism: every rank's gradient is its shard's share; the sum is the sequence's.
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            optimizer.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(total.item())
            local_losses.append(loss.item())
            progress.update(step + 1, losses[-1], args.seq / times[-1])
        wall = time.perf_counter() - started
        memory = meter.read()
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        mine = {
            "rank": rank,
            "local_losses": local_losses,
            "step_times_s": times,
            "peak_memory": memory.as_dict(),
            "wire_bytes": {
                "forward kv": sum(comm.stats.bytes_per_hop("forward kv").values()),
                "backward kv": sum(comm.stats.bytes_per_hop("backward kv").values()),
                "backward dkv": sum(comm.stats.bytes_per_hop("backward dkv").values()),
                "gradient all-reduce payload": flat.numel() * flat.element_size() * args.steps,
            },
            "wire_wait_s": comm.stats.wait_seconds(),
            "param_checksum": checksum.item(),
            "threads": torch.get_num_threads(),
            "device": str(device),
            "malloc": {k: os.environ.get(k) for k in MALLOC_ENV},
        }
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            result = {
                "ranks": world,
                "backend": dist.get_backend(),
                "losses": losses,
                "step_times_s": times,
                "wall_s": wall,
                "per_rank": everyone,
            }
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "ring.json").write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def run_single(args) -> None:
    """The reference: the same steps in this one process on the whole sequence; writes ``single.json``."""
    from ..integrations import transformers as ra_hf

    device = _device(args)
    if device.type == "cpu":
        torch.set_num_threads(_cpu_count())
    model = build_model(args, device)
    optimizer = make_optimizer(model, args.lr)
    progress = Progress("1 process", args.steps)
    meter = PeakMemory(device)
    meter.reset()
    losses, times = [], []
    started = time.perf_counter()
    for step in range(args.steps):
        batch = make_batch(step, args.seq, args.vocab, args.seed)
        n_items = ra_hf.count_predicted_tokens(batch).to(device)
        inputs = full_inputs(batch, device)
        _sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs, num_items_in_batch=n_items).loss
        loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        progress.update(step + 1, losses[-1], args.seq / times[-1])
    result = {
        "losses": losses,
        "step_times_s": times,
        "wall_s": time.perf_counter() - started,
        "peak_memory": meter.read().as_dict(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "documents_per_step": [
            len(document_lengths(args.seq, torch.Generator().manual_seed(args.seed * 1_000_003 + s)))
            for s in range(args.steps)
        ],
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "single.json").write_text(json.dumps(result, indent=1))


# -------------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, args) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    run_rank(args)


def _single_entry(args) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    run_single(args)


def _run_processes(targets: list[tuple], what: str, timeout: float | None = None) -> None:
    """Start ``(function, args)`` each in a spawned process; wait for all; if one fails, stop the rest."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=fn_args) for fn, fn_args in targets]
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (timeout, kill) stops them too
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    for p in procs:
        p.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs):
            failed = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                why = (
                    f"process {failed[0]} exited with {procs[failed[0]].exitcode}" if failed else "timed out"
                )
                raise SystemExit(f"{what}: {why}; stopping the others")
            time.sleep(0.05)
        failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise SystemExit(f"{what}: process {failed[0]} exited with {procs[failed[0]].exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through _run_processes, which stops the processes it started


# glibc keeps freed heap memory resident, so a CPU RSS peak would count fragmentation left by earlier
# steps; with every allocation of 64 KiB or more mmapped, freed tensors leave the RSS and the peak is
# the live memory. Set for the processes this module starts (under torchrun, set it yourself).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _measured_malloc() -> None:
    for name, value in MALLOC_ENV.items():
        os.environ.setdefault(name, value)  # inherited by the processes spawned next


def launch_ranks(args) -> None:
    """torchrun's environment for ``args.ranks`` local processes, started here."""
    _measured_malloc()
    port = _free_port()
    targets = [(_rank_entry, (rank, args.ranks, port, args)) for rank in range(args.ranks)]
    _run_processes(targets, f"ring run over {args.ranks} ranks")


def run_reference(args) -> None:
    """``run_single`` in a fresh process, so its peak memory is its own."""
    _measured_malloc()
    _run_processes([(_single_entry, (args,))], "one-process reference")


# ------------------------------------------------------------------------------------------ report


def _parity(ring: list[float], single: list[float]) -> tuple[list[float], list[float]]:
    abs_diff = [abs(a - b) for a, b in zip(ring, single, strict=True)]
    rel_diff = [
        d / abs(b) if b else (0.0 if d == 0 else math.inf) for d, b in zip(abs_diff, single, strict=True)
    ]
    return abs_diff, rel_diff


def _median_after_first(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def _environment() -> dict:
    import platform

    import transformers

    from .. import __version__

    return {
        "ringattn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": _cpu_count(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def report(args, wall_s: float | None = None) -> dict:
    """Join ``ring.json`` and ``single.json`` into ``train.json`` and ``train.png``; print a summary."""
    out = Path(args.out)
    ring = json.loads((out / "ring.json").read_text())
    single = json.loads((out / "single.json").read_text())
    abs_diff, rel_diff = _parity(ring["losses"], single["losses"])
    fp32 = args.dtype == "fp32"
    max_rel = max(rel_diff)
    ring_time = _median_after_first(ring["step_times_s"])
    single_time = _median_after_first(single["step_times_s"])
    per_step_wire = {
        label: [r["wire_bytes"][label] / args.steps for r in ring["per_rank"]]
        for label in ring["per_rank"][0]["wire_bytes"]
    }
    config = model_config(args)
    result = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "role"},
            "ranks": ring["ranks"],
            "model": {
                "family": "llama",
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "intermediate": config.intermediate_size,
                "heads_q": config.num_attention_heads,
                "heads_kv": config.num_key_value_heads,
                "head_dim": config.head_dim,
                "vocab": config.vocab_size,
                "rope_theta": THETA,
                "rope": "fused, exact phase",
            },
            "documents": {"median": MEDIAN_DOC, "sigma": SIGMA_DOC, "min": MIN_DOC, "max": MAX_DOC},
            "backend": ring["backend"],
        },
        "steps": [
            {
                "step": i,
                "loss_ring": ring["losses"][i],
                "loss_single": single["losses"][i],
                "abs_dloss": abs_diff[i],
                "rel_dloss": rel_diff[i],
                "documents": single["documents_per_step"][i],
            }
            for i in range(args.steps)
        ],
        "max_abs_dloss": max(abs_diff),
        "max_rel_dloss": max_rel,
        "parity_rtol": PARITY_RTOL if fp32 else None,
        "parity_ok": (max_rel <= PARITY_RTOL) if fp32 else None,
        "tokens_per_s": {"ring": args.seq / ring_time, "single": args.seq / single_time},
        "step_time_s_median": {"ring": ring_time, "single": single_time},
        "peak_memory": {
            "kind": single["peak_memory"]["kind"],
            "ring_per_rank": [r["peak_memory"] for r in ring["per_rank"]],
            "single": single["peak_memory"],
        },
        "wire_bytes_per_step_per_rank": per_step_wire,
        "wire_wait_s_per_rank": [r["wire_wait_s"] for r in ring["per_rank"]],
        "replicas_in_sync": len({r["param_checksum"] for r in ring["per_rank"]}) == 1,
        "wall_s": {"ring": ring["wall_s"], "single": single["wall_s"], "total": wall_s},
        "threads": {"ring_rank": ring["per_rank"][0]["threads"], "single": single["threads"]},
        "malloc_env_ring_rank0": ring["per_rank"][0].get("malloc"),
        "environment": _environment(),
    }
    (out / "train.json").write_text(json.dumps(result, indent=1))
    png = _plot(result, out / "train.png")
    _print_summary(result, out, png)
    return result


def _mib(n: int | None) -> float:
    return float("nan") if n is None else n / 2**20


def _plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    cfg = result["config"]
    steps = [s["step"] for s in result["steps"]]
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.6))
    ax_loss.plot(
        steps, [s["loss_single"] for s in result["steps"]], "o-", lw=3, alpha=0.45, label="one process"
    )
    ax_loss.plot(
        steps,
        [s["loss_ring"] for s in result["steps"]],
        "x--",
        color="k",
        label=f"ring, {cfg['ranks']} ranks",
    )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (mean over the sequence's targets)")
    ax_loss.set_title(
        f"loss: max |dloss| = {result['max_abs_dloss']:.2e}, max rel {result['max_rel_dloss']:.2e}"
    )
    ax_loss.legend()
    mem = result["peak_memory"]
    labels = [f"rank {r['rank']}" for r in _ranks(result)] + ["one process"]
    above = [_mib(m["above_baseline_bytes"]) for m in mem["ring_per_rank"]] + [
        _mib(mem["single"]["above_baseline_bytes"])
    ]
    colors = ["tab:blue"] * len(mem["ring_per_rank"]) + ["tab:orange"]
    ax_mem.bar(labels, above, color=colors)
    for i, v in enumerate(above):
        ax_mem.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom")
    ax_mem.set_ylabel("peak memory above the start, MiB")
    ax_mem.set_title(
        f"{cfg['seq']} tokens/step, {cfg['dtype']}, layout {cfg['layout']}: {mem['kind']}", fontsize=10
    )
    env = result["environment"]
    fig.suptitle(
        f"ringattn.examples.train: Llama {cfg['model']['layers']}L h{cfg['model']['hidden']} "
        f"{cfg['model']['heads_q']}q/{cfg['model']['heads_kv']}kv, theta {THETA:.3g}; "
        f"{env['gpu'] or 'CPU'} ({env['cpu_count']} cores), torch {env['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ranks(result: dict) -> list[dict]:
    return [{"rank": i} for i in range(len(result["peak_memory"]["ring_per_rank"]))]


def _print_summary(result: dict, out: Path, png: Path | None) -> None:
    cfg = result["config"]
    print()
    print("| step | loss, ring | loss, one process | abs dloss | rel dloss |")
    print("|---|---|---|---|---|")
    for s in result["steps"]:
        print(
            f"| {s['step']} | {s['loss_ring']:.7f} | {s['loss_single']:.7f} | {s['abs_dloss']:.2e} | {s['rel_dloss']:.2e} |"
        )
    tps = result["tokens_per_s"]
    mem = result["peak_memory"]
    ring_mem = ", ".join(f"{_mib(m['above_baseline_bytes']):.0f}" for m in mem["ring_per_rank"])
    wire = result["wire_bytes_per_step_per_rank"]
    print(
        f"\ntokens/s: ring {tps['ring']:,.0f} ({cfg['ranks']} ranks, {result['threads']['ring_rank']} threads "
        f"each), one process {tps['single']:,.0f} ({result['threads']['single']} threads)"
    )
    print(
        f"peak memory above the start ({mem['kind']}), MiB: ring per rank [{ring_mem}], "
        f"one process {_mib(mem['single']['above_baseline_bytes']):.0f}"
    )
    print(
        "bytes sent per step by each rank: "
        + ", ".join(f"{label} {_mib(int(max(v))):.1f} MiB" for label, v in wire.items())
    )
    print(f"replicas in sync after training: {result['replicas_in_sync']}")
    if result["parity_ok"] is None:
        print(
            f"max |dloss| {result['max_abs_dloss']:.2e} (max rel {result['max_rel_dloss']:.2e}); {cfg['dtype']}: no parity bound"
        )
    else:
        verdict = "OK" if result["parity_ok"] else "FAILED"
        print(
            f"parity {verdict}: max rel dloss {result['max_rel_dloss']:.2e} (bound {PARITY_RTOL:g}), "
            f"max |dloss| {result['max_abs_dloss']:.2e}"
        )
    print(f"wrote {out / 'train.json'}" + (f" and {png}" if png else ""))


# -------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ringattn.examples.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = DEFAULTS
    parser.add_argument("--ranks", type=int, default=d["ranks"], help="ring size W (ignored under torchrun)")
    parser.add_argument("--seq", type=int, default=d["seq"], help="tokens per step (one packed sequence)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=d["dtype"])
    parser.add_argument(
        "--out", type=Path, default=Path(d["out"]), help="folder for train.json and train.png"
    )
    parser.add_argument("--layers", type=int, default=d["layers"])
    parser.add_argument(
        "--hidden", type=int, default=d["hidden"], help="hidden size (8 query heads, 2 KV heads)"
    )
    parser.add_argument("--vocab", type=int, default=d["vocab"])
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--layout", choices=LAYOUTS, default=d["layout"])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d["device"])
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing (gradient_checkpointing_enable)",
    )
    parser.add_argument("--role", choices=("rank", "single", "report"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hidden % 8 or args.hidden < 16:
        parser.error(f"--hidden must be a multiple of 8 (8 query heads), got {args.hidden}")
    for name in ("ranks", "seq", "steps", "layers", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.vocab < 2:
        parser.error("--vocab must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    role = args.role or ("rank" if under_torchrun else "launch")
    if role == "single":
        run_single(args)
        return 0
    if role == "report":
        result = report(args)
        return 0 if result["parity_ok"] is not False else 1
    if role == "rank":
        run_rank(args)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        print(
            f"ringattn.examples.train: {args.ranks} ranks x {args.seq // args.ranks} tokens, {args.steps} steps, "
            f"{args.dtype}, layout {args.layout}, out {args.out}",
            flush=True,
        )
        launch_ranks(args)
    run_reference(args)
    result = report(args, wall_s=time.perf_counter() - started)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0 if result["parity_ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
