"""What the planner assumes about a machine: its GPU's step time and its fabric's transfers.

* ``Fabric``: the link between GPUs, as nccl-tests reports it (bus bandwidth of large collectives,
  point-to-point bandwidth, the latency of one launch of small messages), and the share of the SMs
  NCCL's kernels take while transfers run. Built in: the vendors' link rates with an assumed
  achieved fraction (``FABRICS``); measured: ``bench/comm.py``'s JSON (``load_fabric``).
* ``GpuProfile``: the seconds of one SDXL UNet step at batch 2 (classifier-free guidance) on one
  rank that computes a fraction ``f`` of an image of ``P`` latent pixels:
  ``f * (a P + b P^2) + c + d P`` with CUDA graphs -- the work that splits (convolutions and
  projections in ``P``, self-attention's queries of the band over every key in ``P^2``), and what
  does not (weights read once per step, per-kernel floors, ...) -- and, run eagerly, at least the
  host's time to launch a step (``host_s``, ``single_host_s`` for one GPU's plain diffusers UNet).
  Built in: H100 fitted to distripy's own measurement (``bench/results/e2e-h100-*``), A100 to the
  DistriFusion paper's latencies (``GPUS``); measured: ``bench/e2e.py``'s JSON (``load_gpu``).
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

from distripy.errors import ConfigError

__all__ = ["FABRICS", "FABRIC_ALIASES", "GPUS", "Fabric", "GpuProfile", "fit_gpu", "load_fabric", "load_gpu"]


@dataclass(frozen=True)
class Fabric:
    """Achievable transfers of one GPU's links (nccl-tests' busbw convention)."""

    name: str
    busbw_gbps: float  # bus bandwidth of large all-gathers / all-reduces, GB/s
    p2p_gbps: float  # one GPU's send-receive bandwidth to a neighbour, GB/s
    latency_us: float  # one collective or group launch of small messages, microseconds
    comm_sm_share: float  # fraction of the SMs NCCL's kernels occupy while transfers run
    source: str
    measured: bool = False
    # GPUs behind one PCIe switch / CPU socket (0: every GPU alike, as on NVSwitch); a group of
    # more spans sockets, and its transfers cross the CPUs' link at these rates
    domain_gpus: int = 0
    cross_busbw_gbps: float = 0.0
    cross_latency_us: float = 0.0

    def for_ranks(self, ranks: int) -> "Fabric":
        """The fabric a group of ``ranks`` GPUs sees: across sockets when it spans them."""
        if not self.domain_gpus or ranks <= self.domain_gpus:
            return self
        return replace(
            self,
            name=f"{self.name}, {ranks} GPUs across sockets",
            busbw_gbps=self.cross_busbw_gbps,
            p2p_gbps=self.cross_busbw_gbps,
            latency_us=self.cross_latency_us,
            domain_gpus=0,
        )


# Link rates from the vendors' specifications; the fraction of them NCCL achieves, the latencies
# and the SM shares are assumptions typical of nccl-tests on such machines.
FABRICS: Dict[str, Fabric] = {
    "nvlink3": Fabric(
        "A100 NVLink3 (NVSwitch)", 240.0, 240.0, 15.0, 0.15,
        "NVLink3 600 GB/s per GPU (300 GB/s each way), NVIDIA A100 datasheet; 80% achieved, 15 us, "
        "16 of 108 SMs: assumed",
    ),
    "nvlink4": Fabric(
        "H100 NVLink4 (NVSwitch)", 360.0, 360.0, 12.0, 0.12,
        "NVLink4 900 GB/s per GPU (450 GB/s each way), NVIDIA H100 datasheet; 80% achieved, 12 us, "
        "16 of 132 SMs: assumed",
    ),
    "pcie4": Fabric(
        "PCIe Gen4 x16", 22.0, 22.0, 25.0, 0.03,
        "16 GT/s x16 = 31.5 GB/s each way, PCI Express 4.0 specification; 70% achieved, 25 us, "
        "4 channels; beyond 4 GPUs (two sockets) 10 GB/s and 40 us through the CPUs: assumed",
        domain_gpus=4, cross_busbw_gbps=10.0, cross_latency_us=40.0,
    ),
    "pcie5": Fabric(
        "PCIe Gen5 x16", 44.0, 44.0, 20.0, 0.03,
        "32 GT/s x16 = 63 GB/s each way, PCI Express 5.0 specification; 70% achieved, 20 us, "
        "4 channels; beyond 4 GPUs (two sockets) 20 GB/s and 35 us through the CPUs: assumed",
        domain_gpus=4, cross_busbw_gbps=20.0, cross_latency_us=35.0,
    ),
}  # fmt: skip
FABRIC_ALIASES = {
    "a100-nvlink3": "nvlink3",
    "h100-nvlink4": "nvlink4",
    "pcie-gen4": "pcie4",
    "pcie-gen5": "pcie5",
}


@dataclass(frozen=True)
class GpuProfile:
    """One GPU's SDXL UNet step (see the module docstring): seconds = ``f * (a P + b P^2) + c + d P``
    with CUDA graphs, at least ``host_s`` eagerly (``single_host_s`` for one GPU's plain UNet)."""

    name: str
    a: float  # seconds per latent pixel of the work that splits
    b: float  # seconds per latent pixel squared (self-attention over the whole image)
    c: float  # seconds per step that do not split
    d: float  # seconds per latent pixel that do not split
    host_s: float  # an eager patch-parallel step's host time
    single_host_s: float  # an eager single-GPU step's host time (plain diffusers)
    source: str
    measured: bool = False

    def step_seconds(self, pixels: float, fraction: float, graphs: bool, single: bool = False) -> float:
        """One rank's step computing ``fraction`` of an image of ``pixels`` latent pixels."""
        gpu = fraction * (self.a * pixels + self.b * pixels * pixels) + self.c + self.d * pixels
        if graphs:
            return gpu
        return max(gpu, self.single_host_s if single else self.host_s)


# Fitted by ``fit_gpu`` (relative least squares; within 5% of every point it was fitted to).
GPUS: Dict[str, GpuProfile] = {
    "h100": GpuProfile(
        "H100 80GB HBM3", 1.622e-06, 1.522e-11, 1.277e-02, 1.016e-07, 0.178, 0.117,
        "distripy's measurement on one H100 (bench/results/e2e-h100-20261124T1950Z.json: T1 and "
        "one rank of 4 and 8, 1024² to 3840², CUDA graphs; eager host times from its eager rows)",
    ),
    "a100": GpuProfile(
        "A100 80GB SXM4", 4.449e-06, 3.329e-11, 1.552e-02, 2.238e-07, 0.178, 0.0,
        "the DistriFusion paper's A100 latencies (arXiv 2402.19481: one GPU, and one rank of 8 "
        "without communication, 1024² to 3840²; its one-GPU latency includes its host time); an "
        "eager patch-parallel step's host time assumed as measured on the H100's machine",
    ),
    "l40": GpuProfile(
        "L40 48GB (PCIe)", 8.863e-06, 8.316e-11, 4.951e-02, 3.939e-07, 0.178, 0.117,
        "the H100 profile scaled by the datasheets: work by dense fp16 tensor throughput (989 vs 181 "
        "TFLOP/s), the part that does not split by memory bandwidth (3.35 vs 0.864 TB/s): assumed",
    ),
}  # fmt: skip


def fit_gpu(name: str, points: Sequence[Tuple[float, float, float]], source: str, **host) -> GpuProfile:
    """A ``GpuProfile`` fitted to ``(latent pixels, fraction of the image, seconds per step)``
    points (at least four, two fractions or more): least squares of the relative error, with any
    coefficient that comes out negative dropped (held at zero) and the others refitted."""
    import numpy as np

    if len(points) < 4 or len({fraction for _, fraction, _ in points}) < 2:
        raise ConfigError(
            f"fit_gpu {name}: {len(points)} points; needs 4 or more, with one rank and several ranks"
        )
    seconds = np.array([s for _, _, s in points])
    if not (seconds > 0).all():
        raise ConfigError(f"fit_gpu {name}: every step time must be positive")
    # rows and times divided by the time: least squares of the relative error
    rows = np.array([[f * p, f * p * p, 1.0, p] for p, f, _ in points]) / seconds[:, None]
    active = list(range(4))
    while True:
        solution, *_ = np.linalg.lstsq(rows[:, active], np.ones_like(seconds), rcond=None)
        if (solution >= 0).all():
            break
        active.pop(int(np.argmin(solution)))
    coefficients = [0.0] * 4
    for index, value in zip(active, solution):
        coefficients[index] = float(value)
    defaults = GPUS["h100"]
    return GpuProfile(
        name,
        *coefficients,
        host.get("host_s", defaults.host_s),
        host.get("single_host_s", defaults.single_host_s),
        source,
        measured=True,
    )


def _read(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{what} {path}: cannot be read as JSON ({error})") from None


def load_fabric(path: Union[str, Path]) -> Fabric:
    """A fabric measured by ``bench/comm.py``: the largest all-gather's bus bandwidth and the
    smallest one's time as the launch latency."""
    data = _read(path, "--fabric")
    try:
        rows = [row for row in data["bandwidth"] if row["op"] == "all_gather"]
        largest, smallest = max(rows, key=lambda r: r["size"]), min(rows, key=lambda r: r["size"])
        busbw, latency = float(largest["distripy"]["busbw"]), float(smallest["distripy"]["time_us"])
        world = int(data.get("world_size", data.get("environment", {}).get("world_size", 0)) or 0)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"--fabric {path}: not a bench/comm.py result ({error!r})") from None
    if world == 1 or busbw <= 0:
        raise ConfigError(
            f"--fabric {path}: measured on one GPU (no link between GPUs); run bench/comm.py on 2 or more"
        )
    return Fabric(
        f"measured ({Path(path).name})", busbw, busbw, latency, 0.12, f"bench/comm.py: {path}", True
    )


def load_gpu(path: Union[str, Path]) -> GpuProfile:
    """A GPU measured by ``bench/e2e.py``: its CUDA-graph rows (one GPU, one rank of N) fitted, its
    eager rows giving the host times where they are host-bound (over twice the graph's time)."""
    data = _read(path, "--gpu")
    try:
        rows = data["rows"]
        device = data.get("environment", {}).get("device", Path(path).stem)
        points: List[Tuple[float, float, float]] = []
        graph_s: Dict[Tuple[int, int], float] = {}
        for row in rows:
            if row["variant"] == "graphs" and row.get("split_batch") in (False, None):
                pixels = (row["resolution"] / 8) ** 2
                points.append((pixels, 1.0 / row["gpus"], row["step_ms"] / 1e3))
                graph_s[(row["resolution"], row["gpus"])] = row["step_ms"] / 1e3
        host: Dict[str, float] = {}
        patched, single = [], []
        for row in rows:
            graph = graph_s.get((row["resolution"], row["gpus"]))
            if row["variant"] == "eager" and graph is not None and row["step_ms"] / 1e3 > 2 * graph:
                (single if row["gpus"] == 1 else patched).append(row["step_ms"] / 1e3)
        if patched:
            host["host_s"] = sorted(patched)[len(patched) // 2]
        if single:
            host["single_host_s"] = sorted(single)[len(single) // 2]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise ConfigError(f"--gpu {path}: not a bench/e2e.py result ({error!r})") from None
    return fit_gpu(str(device), points, f"bench/e2e.py: {path}", **host)
