"""Parsing recorded `nvidia-smi topo -m` texts (hand-written fixtures in tests/data) and NVML."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ringattn.topology import detect
from ringattn.topology.detect import (
    Link,
    TopologyUnavailable,
    detect_local,
    from_nvml,
    load_topology,
    parse_topo_matrix,
    synthetic_pcie_node,
)

DATA = Path(__file__).parent / "data"


def test_dual_socket_fixture_links_numa_nics():
    topo = load_topology(DATA / "topo_l40s_8gpu_dual_socket.txt")
    assert topo.gpus == tuple(f"GPU{i}" for i in range(8))
    # the fixture: switches A(0,1) B(4,5) on socket 0, C(2,3) D(6,7) on socket 1
    assert str(topo.link(0, 1)) == "PIX"
    assert str(topo.link(0, 4)) == "NODE"
    assert str(topo.link(0, 2)) == "SYS"
    assert str(topo.link(3, 6)) == "NODE"
    assert topo.numa == (0, 0, 1, 1, 0, 0, 1, 1)
    assert topo.nics == ("mlx5_0", "mlx5_1")  # names from the NIC legend
    assert str(topo.nic_links[0][0]) == "PIX" and str(topo.nic_links[0][1]) == "SYS"
    assert topo.switches() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.sockets() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert topo.switch_nics([6, 7]) == ["mlx5_1"]
    assert "GPU0 GPU1 + NIC mlx5_0" in topo.describe()


def test_single_socket_fixture_old_layout():
    # older drivers: NIC named in the header itself, no "GPU NUMA ID" column
    topo = load_topology(DATA / "topo_l40s_4gpu_single_socket.txt")
    assert topo.n_gpus == 4
    assert topo.nics == ("mlx5_0",)
    assert topo.numa == (0, 0, 0, 0)
    assert str(topo.link(1, 2)) == "NODE"
    assert topo.switches() == [[0, 1], [2, 3]]
    assert topo.sockets() == [[0, 1, 2, 3]]


def test_nvlink_fixture_with_terminal_colour_codes():
    topo = load_topology(DATA / "topo_nvlink_8gpu.txt")
    assert topo.n_gpus == 8
    assert topo.link(2, 5) == Link(0, 12)
    assert str(topo.link(2, 5)) == "NV12"
    assert topo.numa == (3, 3, 1, 1, 7, 7, 5, 5)
    assert topo.nics == ("mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3")
    # NVLink hides the PCIe path: no switch sharing can be inferred, NUMA comes from the column
    assert topo.switches() == [[i] for i in range(8)]
    assert topo.sockets() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_malformed_fixture_names_line_and_row():
    with pytest.raises(ValueError, match=r"line 4: row GPU2 has 2 link entries, expected 3"):
        load_topology(DATA / "topo_malformed.txt")


@pytest.mark.parametrize(
    "text, message",
    [
        ("nvidia-smi: command not found\n", "no `nvidia-smi topo -m` header"),
        ("\tGPU0\tGPU1\nGPU0\t X \tPCI\nGPU1\tPCI\t X \n", "entry GPU0-GPU1: unknown link class 'PCI'"),
        ("\tGPU0\tGPU1\nGPU0\t X \tPIX\nGPU1\tSYS\t X \n", "symmetric"),
        ("\tGPU0\tGPU1\nGPU0\tPIX\tPIX\nGPU1\tPIX\t X \n", "diagonal entry GPU0-GPU0 must be X"),
        ("\tGPU0\tGPU1\nGPU0\t X \tPIX\n", "no matrix row for GPU1"),
    ],
    ids=["no-header", "unknown-class", "asymmetric", "diagonal", "missing-row"],
)
def test_malformed_text_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_topo_matrix(text)


def test_bad_argument_types_and_paths(tmp_path):
    with pytest.raises(TypeError, match="text must be a str"):
        parse_topo_matrix(b"GPU0")
    with pytest.raises(ValueError, match="does not exist"):
        load_topology(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="worst must be one of"):
        synthetic_pcie_node(2).groups("PCI")


def test_link_quality_order():
    parse = Link.parse
    assert (
        parse("NV12")
        < parse("NV4")
        < parse("PIX")
        < parse("PXB")
        < parse("PHB")
        < parse("NODE")
        < parse("SYS")
    )
    assert parse("SOC") == parse("SYS")  # name used by old drivers


def test_synthetic_node():
    topo = synthetic_pcie_node(8, sockets=2, gpus_per_switch=2)
    assert [str(topo.link(0, j)) for j in range(1, 8)] == ["PIX", "NODE", "NODE", "SYS", "SYS", "SYS", "SYS"]
    assert "assumed" in topo.source
    with pytest.raises(ValueError, match="gpus .6. must be a multiple of sockets .4."):
        synthetic_pcie_node(6, sockets=4)
    with pytest.raises(ValueError, match="gpus must be a positive int"):
        synthetic_pcie_node(0)


def test_detect_local_without_gpu_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as when nvidia-ml-py is absent
    monkeypatch.setattr(detect.shutil, "which", lambda name: None)
    with pytest.raises(TopologyUnavailable, match=r"nvidia-smi not found.*--topo FILE"):
        detect_local()


def test_detect_local_runs_nvidia_smi(monkeypatch):
    text = (DATA / "topo_l40s_4gpu_single_socket.txt").read_text()
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=text, stderr="")

    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(detect.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(detect.subprocess, "run", fake_run)
    topo = detect_local()
    assert calls == [["/usr/bin/nvidia-smi", "topo", "-m"]]
    assert topo.n_gpus == 4 and str(topo.link(0, 1)) == "PIX"


class FakeNVML:
    """Four GPUs: 0-1 joined by two NVLinks, 2-3 under one switch, the pairs on different sockets."""

    NVML_NVLINK_MAX_LINKS = 4
    NVML_FEATURE_ENABLED = 1

    class NVMLError(Exception):
        pass

    bus = ["0000:01:00.0", "0000:02:00.0", "0000:81:00.0", "0000:82:00.0"]
    ancestor = {(0, 1): 40, (2, 3): 10, (0, 2): 50, (0, 3): 50, (1, 2): 50, (1, 3): 50}

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self.bus[h])

    def nvmlDeviceGetNvLinkState(self, h, lane):
        if h > 1:
            raise self.NVMLError("not supported")
        return 1 if lane < 2 else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, lane):
        return SimpleNamespace(busId=self.bus[1 - h])

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return self.ancestor[(min(a, b), max(a, b))]


def test_from_nvml_levels_and_nvlink_count():
    topo = from_nvml(FakeNVML())
    assert str(topo.link(0, 1)) == "NV2"
    assert str(topo.link(2, 3)) == "PIX"  # NVML_TOPOLOGY_SINGLE
    assert str(topo.link(1, 3)) == "SYS"  # NVML_TOPOLOGY_SYSTEM
    assert topo.source == "NVML"
