"""The cost model against hand-computed cases, the ring simulator, and the CLI.

Expected values are worked out here from the formulas (the per-hop overlap arithmetic: compute
4·c²·d·Hq·m / (η·362e12) s against K and V on the wire 4·c·d·Hkv / 25e9 s; the FLOP formula of
docs/design.md), written as literals or arithmetic on literals, never by calling the code under test.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from ringattn.topology.__main__ import main
from ringattn.topology.detect import load_topology, synthetic_pcie_node
from ringattn.topology.plan import (
    MODELS,
    Hardware,
    hop_times,
    memory_bytes,
    plan,
    ring_pass_s,
    two_level_pass_s,
)
from ringattn.topology.simulate import block_fractions, simulate_ring

DATA = Path(__file__).parent / "data"
LLAMA = MODELS["llama3-8b"]
ROOT = Path(__file__).resolve().parent.parent


def test_llama3_8b_shapes():
    m = LLAMA
    assert (m.layers, m.hidden, m.heads_q, m.heads_kv, m.head_dim) == (32, 4096, 32, 8, 128)
    assert (m.intermediate, m.vocab) == (14336, 128256)


def test_hop_times_hand_case():
    hop = hop_times(LLAMA, Hardware(efficiency=0.5), 4096)
    # 4 * 4096^2 * 128 * 32 = 274,877,906,944 FLOPs; causal zigzag halves it: 137,438,953,472
    # at 0.5 * 362e12 = 181e12 FLOP/s
    assert hop.compute_fwd == pytest.approx(137_438_953_472 / 181e12, rel=1e-12)
    assert hop.compute_bwd == pytest.approx(2.5 * 137_438_953_472 / 181e12, rel=1e-12)
    # K and V: 2 tensors * 4096 tokens * 8 heads * 128 * 2 bytes; backward adds dK, dV in fp32
    assert hop.bytes_fwd == 16_777_216
    assert hop.bytes_bwd == 16_777_216 + 33_554_432
    assert hop_times(LLAMA, Hardware(), 4096, grad_bytes=2).bytes_bwd == 2 * 16_777_216
    assert hop_times(LLAMA, Hardware(), 4096, causal=False).compute_fwd == pytest.approx(
        274_877_906_944 / 181e12
    )


def test_crossover_matches_facts():
    # L40S: 362e12 bf16 FLOP/s dense, ~25 GB/s over PCIe. Compute 0.5*4*c^2*d*Hq/(eta*362e12) equals
    # the wire 4*c*d*Hkv/25e9 at c = Hkv*eta*362e12 / (0.5*Hq*25e9) = 8 * 181e12 / 400e9 = 3620 tokens
    # (inside the 1.8K-4.5K tokens per rank where compute starts to hide the wire, eta 0.5)
    hop = hop_times(LLAMA, Hardware(efficiency=0.5), 3620)
    assert hop.compute_fwd == pytest.approx(hop.bytes_fwd / 25e9, rel=1e-9)


def test_ring_and_two_level_pass_hand_cases():
    # 4 ranks, compute 1 ms, wire 3 ms, overhead 0.1 ms: 3 * (3 + 0.1) + 1 + 0.1 = 10.4 ms
    assert ring_pass_s(1e-3, 3e-3, 4, 1e-4) == pytest.approx(10.4e-3)
    # compute-bound: 3 * (1 + 0.1) + 1.1 = 4.4 ms
    assert ring_pass_s(1e-3, 0.5e-3, 4, 1e-4) == pytest.approx(4.4e-3)
    # inner 4 ranks: 3 * 1 + 1 = 4; network 4 chunks * 2 + 0.1 = 8.1 per outer step; 2 * 8.1 + 4 = 20.2
    assert two_level_pass_s(1.0, 0.5, 2.0, 4, 3, 0.0, 0.1) == pytest.approx(20.2)


def test_simulator_matches_closed_form_and_slowest_link():
    uniform = simulate_ring([[1.0] * 5 for _ in range(5)], [3.0] * 5, overhead_s=0.5)
    assert uniform.total_s == pytest.approx(4 * (3 + 0.5) + 1.5)
    # one slow link (rank 2 -> 3), worked step by step by hand: finish times 11.1, 6.2, 4, 16
    slow = simulate_ring([[1.0] * 4 for _ in range(4)], [0.1, 0.1, 5.0, 0.1])
    assert slow.finish_s == pytest.approx((11.1, 6.2, 4.0, 16.0))
    assert slow.total_s == pytest.approx(3 * 5 + 1)
    assert slow.exposed_s == pytest.approx(16 - 4)


def test_layout_work_fractions():
    contiguous = block_fractions("contiguous", 4, 1024)
    assert contiguous[3] == [0.5, 1.0, 1.0, 1.0]  # last rank sees every earlier block
    assert contiguous[0] == [0.5, 0.0, 0.0, 0.0]
    assert block_fractions("zigzag", 4, 1024) == [[0.5] * 4] * 4
    # causal pairs of S = W*c tokens: S(S+1)/2; over c^2 per block: W^2/2 + W/(2c)
    w, c = 6, 10
    stripe = block_fractions("stripe", w, c)
    assert sum(map(sum, stripe)) == pytest.approx(w * w / 2 + w / (2 * c))
    assert block_fractions("stripe", 3, 5, causal=False) == [[1.0] * 3] * 3
    with pytest.raises(ValueError, match="layout must be"):
        block_fractions("ring", 4, 8)


def test_contiguous_layout_is_slower_when_compute_bound():
    # no wire: zigzag 8 * 0.5 = 4; contiguous critical path = last rank 0.5 + 7 * 1 = 7.5
    zig = simulate_ring([[0.5] * 8 for _ in range(8)], [0.0] * 8)
    cont = simulate_ring(block_fractions("contiguous", 8, 64), [0.0] * 8)
    assert zig.total_s == pytest.approx(4.0)
    assert cont.total_s == pytest.approx(7.5)


def test_memory_hand_case():
    # c = 32768 on 512 GPUs: states 16 * 8.03e9 / 512; checkpoints 32 * c * 4096 * 2;
    # one layer c * 2 * (6*4096 + 3*14336) + ring buffers c * 8*128 * (12 + 2*2*4); logits c * 128256 * 4
    expected = 250_937_500 + 8_589_934_592 + 4_429_185_024 + 939_524_096 + 16_810_770_432
    assert memory_bytes(LLAMA, 32768, 512) == pytest.approx(expected, rel=1e-12)
    # all-gather holds the whole sequence's K, V (bf16) and dK, dV (fp32) of a layer: S * 1024 * 12 bytes
    extra = memory_bytes(LLAMA, 32768, 512, gathered_seq=1 << 20) - memory_bytes(LLAMA, 32768, 512)
    assert extra == pytest.approx((1 << 20) * 1024 * 12)


def test_plan_single_node_hand_case():
    # 4-GPU fixture, ring of 4, 65536 tokens, no recompute: c = 16384, ring worst hop NODE = 20 GB/s
    topo = load_topology(DATA / "topo_l40s_4gpu_single_socket.txt")
    p = plan(LLAMA, Hardware(efficiency=0.5), topo, 1, 65536, ring_size=4, recompute=False)
    ring = next(c for c in p.candidates if c.scheme == "ring")
    t = 0.5 * 4 * 16384**2 * 128 * 32 / 181e12  # forward compute per hop
    wire_f, wire_b = 2 * 16384 * 8 * 128 * 2 / 20e9, 2 * 16384 * 8 * 128 * 6 / 20e9
    assert t > wire_f and 2.5 * t > wire_b  # compute-bound: the wire is hidden
    o = 20e-6
    attention = 32 * ((3 * (t + o) + t + o) + (3 * (2.5 * t + o) + 2.5 * t + o))
    other = 16384 * 6 * 8.03e9 / 181e12
    assert ring.wire_fwd_s == pytest.approx(wire_f)
    assert ring.step_s == pytest.approx(attention + other, rel=1e-9)
    assert ring.tokens_per_s_per_gpu == pytest.approx(16384 / (attention + other), rel=1e-9)
    assert ring.exposed_s == pytest.approx(32 * 8 * o, rel=1e-6)  # only the per-hop overheads
    # 16 bytes/param on 4 GPUs is already 32.1 GB of 0.9 * 48: nothing fits; with 96 GB the ring does
    assert p.best is None
    roomy = plan(LLAMA, Hardware(efficiency=0.5, memory_gb=96), topo, 1, 65536, ring_size=4, recompute=False)
    assert roomy.best.scheme == "ring" and roomy.best.step_s == pytest.approx(ring.step_s)


def test_plan_512_gpus_1m_picks_smallest_ring_that_fits():
    # memory per GPU at c = 65536 (ring 16) is about 62 GB > 0.9 * 48; at c = 32768 (ring 32) about 31 GB
    p = plan(LLAMA, Hardware(), synthetic_pcie_node(8, 2), 64, 1 << 20)
    assert p.best.ring_size == 32 and p.best.data_parallel == 16
    assert p.best.scheme == "two-level ring" and (p.best.inner, p.best.outer) == (8, 4)
    assert not any(c.fits for c in p.candidates if c.ring_size == 16)
    # compute-bound, so tokens/s per GPU = c / (c * FLOPs per token / 181e12), FLOPs per token with
    # recompute: 32 layers * 4.5 * (0.5 * 4 * 2^20 * 128 * 32) + 8 * 8.03e9 (overheads add < 0.1 %)
    flops_per_token = 32 * 4.5 * (0.5 * 4 * 2**20 * 128 * 32) + 8 * 8.03e9
    assert p.best.tokens_per_s_per_gpu == pytest.approx(181e12 / flops_per_token, rel=2e-3)
    assert p.layout_slowdown["contiguous"] > 1.8 and p.layout_slowdown["stripe"] == pytest.approx(
        1.0, abs=1e-3
    )


def test_plan_short_sequences_pick_all_gather():
    # 2048 tokens on 8 GPUs: c = 256, forward compute per hop 0.5*4*256^2*128*32/181e12 ≈ 3 us and backward
    # ≈ 7.4 us, both under the 20 us hop overhead, so overlap cannot pay for the ring's hops
    assert 0.5 * 4 * 256**2 * 128 * 32 * 2.5 / 181e12 < 20e-6
    p = plan(LLAMA, Hardware(), synthetic_pcie_node(8, 2), 1, 2048, ring_size=8)
    assert p.best.scheme == "all-gather"


def test_plan_argument_errors():
    topo = synthetic_pcie_node(8, 2)
    with pytest.raises(ValueError, match="ring_size must be one of"):
        plan(LLAMA, Hardware(), topo, 2, 4096, ring_size=3)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        plan(LLAMA, Hardware(), topo, 1, 0)
    with pytest.raises(TypeError, match="model must be a ModelShape"):
        plan("llama3-8b", Hardware(), topo, 1, 4096)
    with pytest.raises(ValueError, match="efficiency must be in"):
        Hardware(efficiency=1.5)
    with pytest.raises(ValueError, match="link_gbs must give"):
        Hardware(link_gbs={"PIX": 24.0})
    with pytest.raises(ValueError, match="tokens_per_rank must be a positive int"):
        hop_times(LLAMA, Hardware(), 0)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ringattn.topology", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_cli_plan_512_gpus():
    done = run_cli(
        "plan", "--gpus-per-node", "8", "--nodes", "64", "--seq", "1048576", "--model", "llama3-8b"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "MODELED" in out and "not measured" in out
    assert "64 node(s) x 8 GPUs = 512 GPUs" in out
    assert "two-level ring, context-parallel size 32 = 8 inside a node x 4 nodes, data-parallel 16" in out
    assert "layout zigzag" in out
    assert "worst hop SYS, used 2 time(s)" in out


def test_cli_recorded_topology():
    topo_file = str(DATA / "topo_l40s_8gpu_dual_socket.txt")
    done = run_cli("plan", "--topo", topo_file, "--seq", "65536", "--no-recompute")
    assert done.returncode == 0, done.stderr
    assert "GPU0 -> GPU1 -> " in done.stdout and "worst hop SYS, used 2 time(s)" in done.stdout
    assert "recompute none" in done.stdout and "MODELED" in done.stdout


def test_cli_detect_and_errors_in_process(capsys):
    assert main(["detect", "--topo", str(DATA / "topo_l40s_8gpu_dual_socket.txt")]) == 0
    assert "PCIe switch tree: GPU0 GPU1 + NIC mlx5_0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--topo", str(DATA / "topo_malformed.txt"), "--seq", "4096"])
    assert exit_info.value.code == 2
    assert "row GPU2 has 2 link entries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--gpus-per-node", "4", "--topo", str(DATA / "topo_nvlink_8gpu.txt"), "--seq", "4096"])
    assert "--gpus-per-node 4 disagrees" in capsys.readouterr().err
