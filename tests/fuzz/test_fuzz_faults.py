"""Ring fault trials (issue 14): killed, silent and disagreeing ranks over gloo processes.

The ranks are forks of a warm zygote (``fuzz_ring_zygote.py``) that leave through a normal interpreter
exit, so a rank that cannot exit shows up. Every trial prints its measurements: time to error (from
the kill, or from the start of the call that failed) and time to exit (from the rank's own error).

Bounds: a survivor raises within ``ring_timeout + 5`` s of the fault (a silent peer: not before the
timeout), and exits within ``EXIT_BOUND_S`` of its error; no rank is still alive at the trial's
deadline. The default tier runs one small trial of each kind; ``-m slow`` runs ``RINGATTN_FUZZ_CASES // 12``
(default 12) kill trials at random moments, silent peers before and after good calls, and one
disagreement trial per option.
"""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys

import pytest
from fuzz_cases import case_count, seed_id, seeds

ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_ring_zygote.py")
RING_TIMEOUT_S = 2.0
ERROR_SLACK_S = 5.0
EXIT_BOUND_S = 10.0


class Zygote:
    def __init__(self):
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        line = self._read(180.0)
        assert json.loads(line) == {"ready": True}, line

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the ring zygote gave no answer within {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the ring zygote exited (code {self.proc.poll()})")
        return line

    def trial(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        report = json.loads(self._read(spec.get("deadline", 60.0) + 60.0))
        report["exits"] = {int(r): t for r, t in report["exits"].items()}
        report["codes"] = {int(r): c for r, c in report["codes"].items()}
        report["results"] = {int(r): res for r, res in report["results"].items()}
        report["logs"] = {int(r): log for r, log in report["logs"].items()}
        return report

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _describe(report) -> str:
    lines = [f"trial {report['spec']}"]
    for rank, res in sorted(report["results"].items()):
        lines.append(f"  rank {rank}: exit code {report['codes'].get(rank)} result {res}")
        if report["logs"].get(rank):
            lines.append("    log: " + report["logs"][rank].strip().replace("\n", "\n    "))
    return "\n".join(lines)


def _survivors(report, victim):
    return [r for r in range(report["spec"]["W"]) if r != victim]


def _check_survivors(report, victim, *, since, expect, at_least=0.0):
    """Each survivor raised ``expect`` within the bound after ``since(result)`` and exited in time.
    Returns (times to error, times to exit) for the printout."""
    problems, t_err, t_exit = [], [], []
    if report["hung"]:
        problems.append(f"ranks {report['hung']} were still alive at the deadline")
    for rank in _survivors(report, victim):
        res = report["results"].get(rank)
        if res is None or res.get("status") != "error":
            problems.append(f"rank {rank} did not raise: {res}")
            continue
        if expect not in res["exc_mro"]:
            problems.append(f"rank {rank} raised {res['exc_type']}, expected {expect}: {res['message']}")
        to_error = res["t_error"] - since(res)
        to_exit = report["exits"][rank] - res["t_error"]
        t_err.append(round(to_error, 3))
        t_exit.append(round(to_exit, 3))
        bound = report["spec"]["ring_timeout"] + ERROR_SLACK_S
        if not at_least <= to_error <= bound:
            problems.append(
                f"rank {rank} raised {to_error:.2f} s after the fault, outside [{at_least:g}, {bound:g}] s"
            )
        if to_exit > EXIT_BOUND_S:
            problems.append(f"rank {rank} exited {to_exit:.2f} s after its error (bound {EXIT_BOUND_S:g} s)")
    return problems, t_err, t_exit


# ------------------------------------------------------------------------------------------ kill


def _kill_spec(seed: int) -> dict:
    rng = random.Random(f"kill-{seed}")
    W = rng.choice([2, 3, 4]) if seed else 2
    return dict(
        kind="kill", W=W, seed=seed, victim=rng.randrange(W), kill_after=round(rng.uniform(0.2, 1.5), 3),
        ring_timeout=RING_TIMEOUT_S, S=(rng.choice([32, 64, 128]) if seed else 32) * W, loop_s=30.0,
        deadline=60.0,
    )  # fmt: skip


def _run_kill(zygote, seed):
    report = zygote.trial(_kill_spec(seed))
    spec = report["spec"]
    assert report["kill_time"] is not None, "the victim was never killed\n" + _describe(report)
    problems, t_err, t_exit = _check_survivors(
        report, spec["victim"], since=lambda res: report["kill_time"], expect="RingError"
    )
    phases = [
        report["results"][r].get("phase")
        for r in _survivors(report, spec["victim"])
        if report["results"].get(r)
    ]
    print(
        f"\nfault kill seed={seed} W={spec['W']} victim={spec['victim']} at {spec['kill_after']} s "
        f"(phase {phases}): time to error {t_err} s, time to exit {t_exit} s"
    )
    assert not problems, "\n".join(problems) + "\n" + _describe(report)


def test_fault_kill(zygote):
    _run_kill(zygote, 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(1, max(case_count(150) // 12, 1)), ids=seed_id)
def test_fault_kill_slow(zygote, seed):
    _run_kill(zygote, seed)


# ---------------------------------------------------------------------------------------- silent


def _run_silent(zygote, W, good_calls, victim, ring_timeout=RING_TIMEOUT_S):
    spec = dict(
        kind="silent", W=W, victim=victim, good_calls=good_calls, silent_s=30.0,
        ring_timeout=ring_timeout, S=32 * W, loop_s=30.0, deadline=50.0,
    )  # fmt: skip
    report = zygote.trial(spec)
    problems, t_err, t_exit = _check_survivors(
        report,
        victim,
        since=lambda res: res["t_call"],
        expect="RingTimeoutError",
        at_least=0.9 * ring_timeout,
    )
    print(
        f"\nfault silent W={W} victim={victim} after {good_calls} good calls: time to error {t_err} s "
        f"(ring timeout {ring_timeout:g} s), time to exit {t_exit} s"
    )
    assert not problems, "\n".join(problems) + "\n" + _describe(report)


def test_fault_silent_peer(zygote):
    _run_silent(zygote, 2, 0, 1, ring_timeout=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("W,good_calls,victim", [(2, 1, 1), (3, 0, 2), (3, 3, 0), (4, 2, 1)])
def test_fault_silent_peer_slow(zygote, W, good_calls, victim):
    _run_silent(zygote, W, good_calls, victim)


# -------------------------------------------------------------------------------------- disagree

# option -> per-rank values (rank 0 first); every rank must raise the same ValueError naming it.
DISAGREE = {
    "rope.theta": [500000.0, 10000.0],
    "rope.interleaved": [False, True],
    "rope.precision": ["exact", "hf"],
    "rope.partial_rotary_factor": [1.0, 0.5],
    "rope.scaling": [None, {"rope_type": "linear", "factor": 2.0}],
    "rope": [{"dim": 32}, None],
    "causal": [True, False],
    "layout": ["zigzag", "stripe"],
    "softmax_scale": [None, 0.25],
    "backend": ["auto", "reference"],
    "deterministic": [False, True],
    "dkv_dtype": ["bfloat16", "float32"],
    "dtype": ["float32", "bfloat16"],
    "Hq": [4, 8],
    "Hkv": [2, 1],
    "D": [32, 16],
    "B": [1, 2],
    "S": [32, 34],
    "cu_seqlens": [[0, 10, 32], [0, 11, 32]],
}


def _run_disagree(zygote, option):
    values = DISAGREE[option]
    spec = dict(
        kind="disagree", W=2, option=option, values=values, ring_timeout=RING_TIMEOUT_S, S=32, deadline=40.0
    )
    report = zygote.trial(spec)
    problems, t_err, t_exit = _check_survivors(
        report, None, since=lambda res: res["t_call"], expect="ValueError"
    )
    messages = {res["message"] for res in report["results"].values() if res and res.get("status") == "error"}
    key = option.split(".")[-1] if option.startswith("rope.") else option
    if option == "S":
        key = "shard lengths"  # zigzag shards of 16 and 17 tokens cannot come from one sequence
    if not problems:
        if len(messages) != 1:
            problems.append(f"ranks raised different errors: {messages}")
        if not all(key.lower() in m.lower() for m in messages):
            problems.append(f"the error does not name {key!r}: {messages}")
    print(
        f"\nfault disagree on {option} {values}: time to error {t_err} s, time to exit {t_exit} s; {sorted(messages)[:1]}"
    )
    assert not problems, "\n".join(problems) + "\n" + _describe(report)


def test_fault_disagreeing_ranks(zygote):
    _run_disagree(zygote, "rope.theta")


@pytest.mark.slow
@pytest.mark.parametrize("option", [o for o in DISAGREE if o != "rope.theta"])
def test_fault_disagreeing_ranks_slow(zygote, option):
    _run_disagree(zygote, option)
