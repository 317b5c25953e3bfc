"""A node's GPU topology, read from `nvidia-smi topo -m` text or from NVML.

Link classes, best to worst, as the nvidia-smi legend defines them:
NV# (a bonded set of # NVLinks), PIX (at most one PCIe bridge), PXB (several PCIe bridges, no host
bridge), PHB (through a PCIe host bridge, i.e. the CPU), NODE (between PCIe host bridges inside one
NUMA node), SYS (across the SMP interconnect between NUMA nodes, e.g. UPI / Infinity Fabric).
Old drivers print SOC for SYS. From the pairwise classes the graph follows: GPUs joined by PIX/PXB
share a PCIe switch tree, GPUs joined by anything better than SYS share a CPU socket / NUMA node, and
each NIC sits nearest to the GPUs it has its best link to.

GPU indices are nvidia-smi's, i.e. PCI bus order: torch's device order matches only with
CUDA_DEVICE_ORDER=PCI_BUS_ID.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LINK_CLASSES",
    "Link",
    "Topology",
    "TopologyUnavailable",
    "detect_local",
    "from_nvml",
    "load_topology",
    "parse_topo_matrix",
    "synthetic_pcie_node",
]

LINK_CLASSES = ("NV", "PIX", "PXB", "PHB", "NODE", "SYS")
_ATTRIBUTES = ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DEVICE = re.compile(r"^(GPU\d+|NIC\d+|mlx\d+_\d+)$")


class TopologyUnavailable(RuntimeError):
    """No GPU topology can be read on this machine (no driver, no GPU, or nvidia-smi failed)."""


@dataclass(frozen=True)
class Link:
    """One GPU-GPU or GPU-NIC link class; ordering follows quality (smaller is better)."""

    level: int  # index into LINK_CLASSES
    nvlinks: int = 0  # bonded NVLinks, for NV# only

    @property
    def kind(self) -> str:
        return LINK_CLASSES[self.level]

    @property
    def sort_key(self) -> tuple[int, int]:
        """Link quality as a sort key, smaller is better; more bonded NVLinks are better, hence the minus."""
        return (self.level, -self.nvlinks)

    @classmethod
    def parse(cls, token: str) -> Link:
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        match = re.fullmatch(r"NV(\d+)", token)
        if match:
            return cls(0, int(match.group(1)))
        token = "SYS" if token == "SOC" else token
        if token not in LINK_CLASSES[1:]:
            raise ValueError(f"unknown link class {token!r}; expected NV#, PIX, PXB, PHB, NODE or SYS")
        return cls(LINK_CLASSES.index(token))

    def __lt__(self, other: Link) -> bool:
        return self.sort_key < other.sort_key

    def __str__(self) -> str:
        return f"NV{self.nvlinks}" if self.level == 0 else self.kind


@dataclass(frozen=True)
class Topology:
    """GPUs of one node, their pairwise link classes, NUMA nodes and NICs."""

    gpus: tuple[str, ...]
    links: tuple[tuple[Link | None, ...], ...]  # GPU x GPU, None on the diagonal
    numa: tuple[int | None, ...] = ()
    nics: tuple[str, ...] = ()
    nic_links: tuple[tuple[Link, ...], ...] = ()  # GPU x NIC
    source: str = "<text>"

    def __post_init__(self):
        n = len(self.gpus)
        if n == 0:
            raise ValueError("gpus must name at least one GPU")
        if len(self.links) != n or any(len(row) != n for row in self.links):
            raise ValueError(f"links must be {n}x{n} for {n} GPUs")
        for i in range(n):
            for j in range(n):
                if (i == j) != (self.links[i][j] is None):
                    raise ValueError(f"links[{i}][{j}] must be None exactly on the diagonal")
                if self.links[i][j] != self.links[j][i]:
                    raise ValueError(
                        f"links must be symmetric: {self.gpus[i]}-{self.gpus[j]} is {self.links[i][j]} "
                        f"but {self.gpus[j]}-{self.gpus[i]} is {self.links[j][i]}"
                    )

    @property
    def n_gpus(self) -> int:
        return len(self.gpus)

    def link(self, i: int, j: int) -> Link:
        return self.links[i][j]

    def groups(self, worst: str) -> list[list[int]]:
        """GPUs joined (transitively) by PCIe links no worse than class ``worst`` ("PXB": switch trees).

        NVLink entries hide the PCIe path, so an NV pair counts as joined only when ``worst`` is "NV".
        """
        if worst not in LINK_CLASSES:
            raise ValueError(f"worst must be one of {LINK_CLASSES}, got {worst!r}")
        limit = LINK_CLASSES.index(worst)
        group_of = list(range(self.n_gpus))

        def root(i):
            while group_of[i] != i:
                i = group_of[i]
            return i

        for i in range(self.n_gpus):
            for j in range(i + 1, self.n_gpus):
                level = self.links[i][j].level
                if level <= limit and (level > 0 or limit == 0):
                    group_of[root(j)] = root(i)
        found: dict[int, list[int]] = {}
        for i in range(self.n_gpus):
            found.setdefault(root(i), []).append(i)
        return sorted(found.values())

    def switches(self) -> list[list[int]]:
        return self.groups("PXB")

    def sockets(self) -> list[list[int]]:
        """NUMA nodes from the NUMA affinity column when every GPU has one, else from the link classes."""
        if self.numa and None not in self.numa:
            return sorted([i for i in range(self.n_gpus) if self.numa[i] == n] for n in set(self.numa))
        return self.groups("NODE")

    def switch_nics(self, gpus: list[int]) -> list[str]:
        """NICs behind the same PCIe switch tree (PIX/PXB) as any of ``gpus``."""
        return [
            nic
            for k, nic in enumerate(self.nics)
            if any(self.nic_links[g][k].kind in ("PIX", "PXB") for g in gpus)
        ]

    def describe(self) -> str:
        lines = [f"topology from {self.source}: {self.n_gpus} GPUs, {len(self.nics)} NICs"]
        nvlink = [
            self.links[i][j] for i in range(self.n_gpus) for j in range(i) if self.links[i][j].level == 0
        ]
        if nvlink:
            lines.append(
                f"  NVLink: {len(nvlink)} GPU pairs, {min(link.nvlinks for link in nvlink)}+ links each"
            )
        for s, socket in enumerate(self.sockets()):
            numa = sorted({self.numa[i] for i in socket if self.numa and self.numa[i] is not None})
            numa_text = f" (NUMA {','.join(map(str, numa))})" if numa else ""
            lines.append(f"  socket/NUMA group {s}{numa_text}: {' '.join(self.gpus[i] for i in socket)}")
            for switch in self.switches():
                if switch[0] in socket and (len(switch) > 1 or self.switch_nics(switch)):
                    nics = self.switch_nics(switch)
                    nic_text = f" + NIC {','.join(nics)}" if nics else ""
                    lines.append(f"    PCIe switch tree: {' '.join(self.gpus[i] for i in switch)}{nic_text}")
        return "\n".join(lines)


def _numa_value(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_topo_matrix(text: str, source: str = "<text>") -> Topology:
    """Parse the matrix printed by `nvidia-smi topo -m` (tabs or spaces, with or without colour)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    header_at = next(
        (k for k, line in enumerate(lines) if line.split()[:1] == ["GPU0"] and line[:1].isspace()), None
    )
    if header_at is None:
        raise ValueError(
            f"{source}: no `nvidia-smi topo -m` header (a line starting with a tab, then GPU0 ...)"
        )
    header = lines[header_at].split()
    devices = []
    for token in header:
        if not _DEVICE.match(token):
            break
        devices.append(token)
    attributes = [name for name in _ATTRIBUTES if name in lines[header_at]]
    rows: dict[str, list[str]] = {}
    for number, line in enumerate(lines[header_at + 1 :], start=header_at + 2):
        tokens = line.split()
        if not tokens or tokens[0] not in devices:
            if tokens and tokens[0].startswith("Legend"):
                break
            continue
        if len(tokens) < 1 + len(devices):
            raise ValueError(
                f"{source} line {number}: row {tokens[0]} has {len(tokens) - 1} link entries, "
                f"expected {len(devices)}"
            )
        rows[tokens[0]] = tokens[1:]
    gpus = [d for d in devices if d.startswith("GPU")]
    nic_columns = [d for d in devices if not d.startswith("GPU")]
    missing = [g for g in gpus if g not in rows]
    if missing:
        raise ValueError(f"{source}: no matrix row for {', '.join(missing)}")

    def cell(row: str, col: str) -> Link | None:
        token = rows[row][devices.index(col)]
        if row == col:
            if token != "X":
                raise ValueError(f"{source}: diagonal entry {row}-{col} must be X, got {token!r}")
            return None
        try:
            return Link.parse(token)
        except ValueError as err:
            raise ValueError(f"{source}: entry {row}-{col}: {err}") from None

    links = tuple(tuple(cell(g, h) for h in gpus) for g in gpus)
    nic_links = tuple(tuple(cell(g, n) for n in nic_columns) for g in gpus)
    numa = []
    for g in gpus:
        values = rows[g][len(devices) :]
        named = dict(zip(attributes, values, strict=False))  # trailing attribute columns may be blank
        numa.append(_numa_value(named.get("NUMA Affinity", "")))
    # newer drivers name NICs NIC0.. in the matrix and list the device names in a legend
    legend = dict(re.findall(r"^\s*(NIC\d+):\s*(\S+)\s*$", "\n".join(lines), flags=re.M))
    nics = tuple(legend.get(n, n) for n in nic_columns)
    return Topology(tuple(gpus), links, tuple(numa), nics, nic_links, source)


def load_topology(path: str | Path) -> Topology:
    """Read a saved `nvidia-smi topo -m` output file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"topology file {str(path)!r} does not exist")
    return parse_topo_matrix(path.read_text(), source=str(path))


# NVML's nvmlGpuTopologyLevel_t values (nvml.h) and the nvidia-smi class each one prints as.
_NVML_LEVELS = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def from_nvml(nvml) -> Topology:
    """Build the topology through an initialised nvidia-ml-py (``pynvml``) module."""
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        raise TopologyUnavailable("NVML reports no GPUs")
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    bus_ids = [str(nvml.nvmlDeviceGetPciInfo(h).busId).lower() for h in handles]
    nvlinks = [[0] * count for _ in range(count)]
    for i, h in enumerate(handles):
        for lane in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                if nvml.nvmlDeviceGetNvLinkState(h, lane) != nvml.NVML_FEATURE_ENABLED:
                    continue
                remote = str(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, lane).busId).lower()
            except nvml.NVMLError:
                break  # GPUs without NVLink answer "not supported" on the first lane
            if remote in bus_ids:
                nvlinks[i][bus_ids.index(remote)] += 1

    def link(i, j):
        if i == j:
            return None
        if nvlinks[i][j]:
            return Link(0, nvlinks[i][j])
        level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
        return Link.parse(_NVML_LEVELS[int(level)])

    links = tuple(tuple(link(i, j) for j in range(count)) for i in range(count))
    gpus = tuple(f"GPU{i}" for i in range(count))
    return Topology(gpus, links, source="NVML")


def detect_local(timeout_s: float = 20.0) -> Topology:
    """This machine's topology: NVML when pynvml imports, else `nvidia-smi topo -m`.

    Raises TopologyUnavailable with the reason on a machine without an NVIDIA GPU or driver.
    """
    hint = "pass --topo FILE (the saved output of `nvidia-smi topo -m` from the target machine)"
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise TopologyUnavailable(
                f"NVML could not start ({err}): no NVIDIA driver/GPU here; {hint}"
            ) from None
        try:
            return from_nvml(pynvml)
        finally:
            pynvml.nvmlShutdown()
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise TopologyUnavailable(
            f"nvidia-smi not found and pynvml not installed: no NVIDIA GPU here; {hint}"
        )
    done = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise TopologyUnavailable(
            f"`nvidia-smi topo -m` failed ({done.stderr.strip() or done.returncode}); {hint}"
        )
    return parse_topo_matrix(done.stdout, source="nvidia-smi topo -m")


def synthetic_pcie_node(gpus: int, sockets: int = 1, gpus_per_switch: int = 2) -> Topology:
    """A made-up PCIe node for planning without a recorded topology: GPUs numbered switch by switch.

    Same switch: PIX; same socket, other switch: NODE; other socket: SYS.
    """
    for name, value in (("gpus", gpus), ("sockets", sockets), ("gpus_per_switch", gpus_per_switch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if gpus % sockets:
        raise ValueError(f"gpus ({gpus}) must be a multiple of sockets ({sockets})")
    per_socket = gpus // sockets

    def link(i, j):
        if i == j:
            return None
        if i // per_socket != j // per_socket:
            return Link.parse("SYS")
        return Link.parse("PIX" if i // gpus_per_switch == j // gpus_per_switch else "NODE")

    links = tuple(tuple(link(i, j) for j in range(gpus)) for i in range(gpus))
    numa = tuple(i // per_socket for i in range(gpus))
    source = f"synthetic ({sockets} socket(s), {gpus_per_switch} GPUs per PCIe switch; assumed)"
    return Topology(tuple(f"GPU{i}" for i in range(gpus)), links, numa, source=source)
