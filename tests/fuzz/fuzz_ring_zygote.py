"""Ring fault trials over gloo: a warm "zygote" process forks the ranks of each trial.

Run as a script (``python fuzz_ring_zygote.py``): it imports torch and ringattn once, prints one JSON
line ``{"ready": true}``, then reads one trial spec per stdin line and answers one JSON report per
trial. Each rank is an ``os.fork()`` of the zygote that runs its part and then leaves through a
*normal* interpreter exit (SystemExit up the stack, atexit handlers, C++ destructors), like a user's
training script that died of the error; multiprocessing's children end in ``os._exit`` and would hide
a process that cannot exit (reliability review, D8). The zygote reaps the ranks, so it knows when each
one exited; ranks past the trial's deadline are killed and reported as hung.

Trial kinds:

* ``kill``: every rank loops forward + backward ring calls; the zygote SIGKILLs the victim at a
  random moment (``kill_after`` s after every rank is ready). Survivors must raise a RingError.
* ``silent``: the victim makes ``good_calls`` calls, then stops calling and sleeps ``silent_s``
  seconds (alive, sockets open). Survivors must raise RingTimeoutError after about ``ring_timeout``.
  Once every survivor has exited, the zygote kills the sleeping victim (nothing is left to measure).
* ``disagree``: each rank calls once with its own value of one option (``option``, ``values``).
  Every rank must raise the same ValueError naming the option.

Times are wall-clock (``time.time()``) on one machine: time to error is measured from the kill (or from
the start of the call that failed), time to exit from the rank's own error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _rope(value):
    from ringattn import RoPEConfig

    if value is None:
        return None
    return RoPEConfig(**value)


def _inputs(spec, rank, overrides):
    """This rank's zigzag shard of a seeded global sequence; ``overrides`` may change its shape/dtype."""
    import torch

    import ringattn

    W = spec["W"]
    shape = dict(B=1, S=spec.get("S", 16 * W), Hq=4, Hkv=2, D=32, dtype="float32")
    shape.update({k: v for k, v in overrides.items() if k in shape})
    dtype = getattr(torch, shape["dtype"])
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    B, S, Hq, Hkv, D = shape["B"], shape["S"], shape["Hq"], shape["Hkv"], shape["D"]
    full = [torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).to(dtype) for H in (Hq, Hkv, Hkv, Hq)]
    index = ringattn.ring.shard_indices(S, W, "zigzag")[rank]
    return [t.index_select(1, index) for t in full]


def _rank_main(spec: dict, rank: int, port: int, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    W, kind = spec["W"], spec["kind"]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
        timeout=timedelta(seconds=spec.get("pg_timeout", 60.0)),
    )  # fmt: skip
    options = dict(causal=True, layout="zigzag", rope=_rope({"dim": 32, "theta": 500000.0}))
    overrides = {}
    if kind == "disagree":
        value = spec["values"][rank]
        name = spec["option"]
        if name.startswith("rope."):
            rope = {"dim": 32, "theta": 500000.0, name.split(".", 1)[1]: value}
            options["rope"] = _rope(rope)
        elif name == "rope":
            options["rope"] = _rope(value)
        elif name in ("B", "S", "Hq", "Hkv", "D", "dtype"):
            overrides[name] = value
        elif name == "cu_seqlens":
            options["cu_seqlens"] = torch.tensor(value)
        elif name == "dkv_dtype":
            options["dkv_dtype"] = getattr(torch, value)
            overrides["dtype"] = "bfloat16"
        else:
            options[name] = value
    if overrides.get("D"):
        options["rope"] = _rope({"dim": overrides["D"], "theta": 500000.0})
    q, k, v, dout = _inputs(spec, rank, overrides)
    result = {"rank": rank, "status": "no-error", "calls": 0, "pid": os.getpid()}
    _write(os.path.join(workdir, f"ready{rank}"), {"t": time.time()})
    ring_timeout = spec.get("ring_timeout", 3.0)
    silent = kind == "silent" and rank == spec["victim"]
    loop_until = time.time() + spec.get("loop_s", 20.0)
    try:
        while True:
            if silent and result["calls"] >= spec.get("good_calls", 0):
                result["status"] = "went-silent"
                result["t_silent"] = time.time()
                _write(os.path.join(workdir, f"result{rank}.json"), result)
                time.sleep(spec.get("silent_s", 30.0))
                return
            result["t_call"] = time.time()
            result["phase"] = "forward"
            ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
            import ringattn

            out = ringattn.ring_attn_func(ql, kl, vl, timeout=ring_timeout, **options)
            result["phase"] = "backward"
            out.backward(dout)
            result["calls"] += 1
            if kind == "disagree" or time.time() > loop_until:
                result["status"] = "ok"
                break
    except Exception as exc:  # the survivor's error: what, when
        result.update(
            status="error",
            t_error=time.time(),
            exc_type=type(exc).__name__,
            exc_mro=[c.__name__ for c in type(exc).__mro__],
            message=str(exc)[:1500],
        )
    _write(os.path.join(workdir, f"result{rank}.json"), result)
    # Leave as a script that died of the error would: no destroy_process_group, a normal exit.


def _run_trial(spec: dict) -> dict:
    W = spec["W"]
    workdir = tempfile.mkdtemp(prefix="ringattn-fault-")
    port = _free_port()
    start = time.time()
    pids = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(W):
        pid = os.fork()
        if pid == 0:  # the rank: never returns into the zygote's loop
            log = os.open(os.path.join(workdir, f"log{rank}.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            code = 0
            try:
                _rank_main(spec, rank, port, workdir)
            except Exception:
                traceback.print_exc()
                code = 3
            raise SystemExit(code)  # a normal interpreter exit (finalisation runs)
        pids[rank] = pid
    exits, codes, hung = {}, {}, []
    kill_time = None
    deadline = start + spec.get("deadline", 60.0)
    ready_at = None
    while len(exits) < W:
        now = time.time()
        if ready_at is None and all(os.path.exists(os.path.join(workdir, f"ready{r}")) for r in range(W)):
            ready_at = now
        if spec["kind"] == "kill" and kill_time is None and ready_at is not None:
            if now >= ready_at + spec["kill_after"]:
                os.kill(pids[spec["victim"]], signal.SIGKILL)
                kill_time = time.time()
        victim = spec.get("victim")
        others = [r for r in range(W) if r != victim]
        if spec["kind"] == "silent" and victim not in exits and all(r in exits for r in others):
            os.kill(pids[victim], signal.SIGKILL)  # the survivors are out; the sleeper has served
        for rank, pid in pids.items():
            if rank in exits:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exits[rank] = time.time()
                codes[rank] = os.waitstatus_to_exitcode(status)
        if now > deadline:
            for rank, pid in pids.items():
                if rank not in exits:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    exits[rank] = time.time()
                    codes[rank] = "killed at the deadline"
                    hung.append(rank)
            break
        time.sleep(0.005)
    results, logs = {}, {}
    for rank in range(W):
        path = os.path.join(workdir, f"result{rank}.json")
        results[rank] = json.load(open(path)) if os.path.exists(path) else None
        log = os.path.join(workdir, f"log{rank}.txt")
        logs[rank] = open(log).read()[-3000:] if os.path.exists(log) else ""
    return {
        "spec": spec, "start": start, "ready": ready_at, "kill_time": kill_time, "exits": exits,
        "codes": codes, "hung": hung, "results": results, "logs": logs,
    }  # fmt: skip


def main() -> None:
    import torch  # noqa: F401 - warm: every rank is a fork of this process
    import torch.distributed  # noqa: F401

    import ringattn
    import ringattn.ring  # noqa: F401

    # Warm what the first ring call would import or build lazily (about a second per rank otherwise),
    # on one thread so no OpenMP pool exists at fork time: a single-rank fake ring, forward + backward.
    torch.set_num_threads(1)
    q = torch.randn(1, 8, 4, 32, requires_grad=True)
    kv = torch.randn(1, 8, 2, 32)
    comm = ringattn.ring.fake_ring(1)[0]
    rope = ringattn.RoPEConfig(32, theta=500000.0)
    ringattn.ring_attn_func(q, kv, kv, group=comm, rope=rope).sum().backward()

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        report = _run_trial(json.loads(line))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
