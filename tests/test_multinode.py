"""Multi-node launch: the planner's rings (``ringattn-topology plan --json``) feed ``comm_from_rings`` in
``python -m ringattn.multinode``, rehearsed on one CPU machine as two torchrun "nodes" (two agents on
localhost meeting at a c10d rendezvous) of two gloo ranks each, running the module a cluster runs."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ringattn import multinode
from ringattn.topology.__main__ import main as topology_main


def _plan(tmp_path: Path, *args: str) -> dict:
    path = tmp_path / "plan.json"
    assert topology_main(["plan", *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_plan_json_two_level_rings(tmp_path, capsys):
    spec = _plan(
        tmp_path, "--gpus-per-node", "2", "--nodes", "2", "--seq", "4096", "--ring-size", "4",
        "--scheme", "two-level ring",
    )  # fmt: skip
    # 2 GPUs per node x 2 nodes, one ring of all 4 ranks: node 0's ranks 0, 1 then node 1's 2, 3;
    # inner rings of 2 (a node each), outer rings of 2 (one per inner position).
    assert spec["rings"] == [[0, 1, 2, 3]]
    assert (spec["scheme"], spec["inner"], spec["outer"], spec["world_size"]) == ("two-level ring", 2, 2, 4)
    assert spec["layout"] == "zigzag" and spec["causal"]
    assert "written to" in capsys.readouterr().out


def test_plan_json_rings_inside_nodes(tmp_path):
    spec = _plan(tmp_path, "--gpus-per-node", "4", "--nodes", "2", "--seq", "65536", "--ring-size", "4")
    assert spec["scheme"] in ("ring", "all-gather") and spec["inner"] is None
    # rings of 4 inside each node: one per node, each a permutation of that node's ranks
    assert [sorted(r) for r in spec["rings"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert spec["data_parallel"] == 2


def test_plan_refuses_a_scheme_no_candidate_has():
    with pytest.raises(SystemExit):  # argparse's error exit, naming the scheme
        topology_main(["plan", "--gpus-per-node", "4", "--seq", "4096", "--scheme", "two-level ring"])


def test_launch_env_from_torchrun_or_slurm():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}
    assert multinode.launch_env(env) == {"rank": 5, "world_size": 8, "local_rank": 1}  # torchrun wins
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "node0"}
    assert multinode.launch_env(slurm) == {"rank": 3, "world_size": 4, "local_rank": 1}
    assert (slurm["RANK"], slurm["WORLD_SIZE"], slurm["LOCAL_RANK"], slurm["MASTER_PORT"]) == (
        "3",
        "4",
        "1",
        "29500",
    )
    with pytest.raises(SystemExit, match="MASTER_ADDR"):
        multinode.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})
    with pytest.raises(SystemExit, match="torchrun"):
        multinode.launch_env({})


def test_plan_for_another_world_size_is_refused(tmp_path):
    spec = _plan(tmp_path, "--gpus-per-node", "2", "--nodes", "2", "--seq", "4096", "--ring-size", "4")
    with pytest.raises(SystemExit, match="2 node\\(s\\) x 2 = 4 ranks, but this launch has 8"):
        multinode.load_plan(tmp_path / "plan.json", 8)
    assert multinode.load_plan(tmp_path / "plan.json", 4) == spec


def test_two_node_torchrun_rehearsal_on_cpu(tmp_path):
    """torchrun --nnodes 2 on localhost, 2 x 2 gloo ranks: the planner's two-level ring, every rank's
    output and gradients checked against fp64 by the module itself, the summary written by rank 0."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun (installed with torch) not found"
    _plan(
        tmp_path, "--gpus-per-node", "2", "--nodes", "2", "--seq", "4096", "--ring-size", "4",
        "--scheme", "two-level ring",
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        torchrun, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rehearsal", "--max-restarts", "0",
        "-m", "ringattn.multinode", "--plan", str(tmp_path / "plan.json"), "--device", "cpu",
        "--seq", "192", "--iters", "2", "--timeout", "120", "--out", str(tmp_path / "summary.json"),
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["world_size"] == 4 and summary["backend"] == "gloo"
    assert summary["communicator"] == "TwoLevelComm" and summary["levels"] == [2, 2]
    assert sorted(summary["per_rank"], key=int) == ["0", "1", "2", "3"]
    assert all(r["ok"] for r in summary["per_rank"].values())
    for name, check in summary["rank0_checks"].items():
        assert check["ok"] and check["ours_err"] <= check["bound"], name
    assert any("check PASS on 4/4 ranks" in log for log in logs)
