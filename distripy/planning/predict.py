"""Predicted latency of one generation for one configuration: GPUs, CFG split, mode, CUDA graphs.

A step's time is its slowest rank's: that rank's compute (``GpuProfile``: the fraction of the
image it computes, whether it runs as a CUDA graph) plus the communication it cannot hide
(``Fabric``; the transfers from ``traffic.step_traffic``). Per step:

* synchronous (warm-up, ``full_sync``): every transfer is waited for where it is issued: all of it
  is exposed (one launch latency per exchange, a self-attention's keys and values as one);
* asynchronous (``corrected_async_gn`` after the warm-up): each block's transfers leave as one
  launch at its end and are waited for in the next step, so only what exceeds the step's compute is
  exposed, plus the SMs NCCL takes while it runs (``Fabric.comm_sm_share``); with CUDA graphs a
  step's transfers finish inside it, so at least the last block's transfers are exposed;
* ``exact``: GroupNorm's all-reduces are exposed (waited at once); halos and keys/values hide
  only behind the compute that does not need them (``EXACT_HIDDEN_SHARE``);
* every step ends with the all-gather of the output, exposed.

One GPU runs diffusers' plain UNet, eagerly (``GpuProfile.single_host_s``) or as a CUDA graph
(e.g. ``torch.compile(mode="reduce-overhead")``): a configuration's speedup is over one GPU run the
same way. The VAE decode and the text encoders are left out (the same on one GPU and on N). This is
a model: its built-in numbers (``hardware.GPUS``, ``hardware.FABRICS``) say where they come from;
measured files replace them.
"""

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from distripy.config import EXCHANGE_CODECS
from distripy.errors import ConfigError
from distripy.geometry import BandGeometry, bands_per_image
from distripy.planning.hardware import Fabric, GpuProfile
from distripy.planning.memory import (
    SDXL_PARAMETERS,
    MemoryEstimate,
    persistent_bytes,
    unet_activation_bytes,
    vae_decode_bytes,
)
from distripy.planning.traffic import SDXL_UNET, StepTraffic, band_units, step_traffic

__all__ = ["CODEC_BYTES_PER_S", "EXACT_HIDDEN_SHARE", "Prediction", "predict"]

EXACT_HIDDEN_SHARE = {"halo": 0.35, "kv": 0.2}
"""The share of an ``exact`` step's compute each kind of transfer can hide behind: a halo only
behind its convolution's interior rows (convolutions: about a third of SDXL's step), keys and
values only behind the attention over the blocks already received (assumed)."""

CODEC_BYTES_PER_S = 1.0e12
"""How fast the exchange codecs move memory (``Transfer.codec_bytes``), assumed until a GPU
measures them: one elementwise pass each way, memory-bound, at about a third of an H100's HBM
bandwidth (small passes over a band's keys and values do not reach the peak)."""

MODES = ("corrected_async_gn", "exact", "full_sync")
"""The modes the planner predicts (``sync_gn``, ``stale_gn``, ... cost what ``corrected_async_gn``
does, less or more GroupNorm all-reduces: negligible bytes)."""


@dataclass(frozen=True)
class Prediction:
    """One configuration's predicted generation."""

    gpus: int
    split_batch: bool
    mode: str
    warmup_steps: int
    graphs: bool
    seconds: float  # the generation's UNet steps
    single_seconds: float  # the same on one GPU (plain diffusers)
    step_compute_s: float  # one rank's compute per step (the slowest rank's)
    exposed_s: float  # communication not hidden, per step (averaged over the steps)
    sent_bytes: int  # bytes one rank sends per step (the busiest rank's; an asynchronous step's)
    compress: str = "none"  # the keys and values after the warm-up (DistriConfig.compress)
    memory: Optional[MemoryEstimate] = None  # the fullest rank's (planning.memory)

    @property
    def speedup(self) -> float:
        return self.single_seconds / self.seconds

    @property
    def efficiency(self) -> float:
        return self.speedup / self.gpus

    def as_dict(self) -> Dict:
        return {
            "gpus": self.gpus,
            "split_batch": self.split_batch,
            "mode": self.mode,
            "warmup_steps": self.warmup_steps,
            "cuda_graphs": self.graphs,
            "seconds": self.seconds,
            "speedup": self.speedup,
            "efficiency": self.efficiency,
            "step_compute_ms": self.step_compute_s * 1e3,
            "exposed_comm_ms_per_step": self.exposed_s * 1e3,
            "sent_mb_per_step": self.sent_bytes / 1e6,
            "compress": self.compress,
            "memory": None if self.memory is None else self.memory.as_dict(),
        }


def _link_seconds(traffic: StepTraffic, fabric: Fabric, bands: int, ranks: int, kinds) -> float:
    """Bandwidth time of the transfers of ``kinds`` (no launch latency)."""
    total = 0.0
    for transfer in traffic.transfers:
        if transfer.kind not in kinds:
            continue
        n = ranks if transfer.kind == "output" else bands
        if transfer.op == "all_gather":  # algbw = n * send / t, busbw = algbw (n - 1) / n
            total += transfer.sent * (n - 1) / (fabric.busbw_gbps * 1e9)
        elif transfer.op == "all_reduce":  # busbw = algbw 2 (n - 1) / n
            total += transfer.sent * 2 * (n - 1) / n / (fabric.busbw_gbps * 1e9)
        else:
            total += max(transfer.sent, transfer.received) / (fabric.p2p_gbps * 1e9)
    return total


def _launches(traffic: StepTraffic, kinds) -> int:
    """Launches of a synchronous step: one per exchange; a self-attention's two all-gathers (keys
    and values) are one group."""
    halves = sum(1 for t in traffic.transfers if t.kind in kinds and t.kind == "kv" and t.op == "all_gather")
    others = sum(
        1 for t in traffic.transfers if t.kind in kinds and not (t.kind == "kv" and t.op == "all_gather")
    )
    return others + halves // 2


def _step_seconds(
    traffic: StepTraffic, compute: float, fabric: Fabric, bands: int, ranks: int, kind: str, graphs: bool
) -> Tuple[float, float]:
    """(step seconds, exposed communication seconds) of one rank's step of ``kind`` (``sync``,
    ``async`` or ``exact``)."""
    latency = fabric.latency_us * 1e-6
    between = ("halo", "gn_stats", "kv")
    output = (latency + _link_seconds(traffic, fabric, bands, ranks, ("output",))) if ranks > 1 else 0.0
    if kind == "sync":
        exposed = _launches(traffic, between) * latency + _link_seconds(
            traffic, fabric, bands, ranks, between
        )
    elif kind == "exact":
        norms = _launches(traffic, ("gn_stats",)) * latency
        norms += _link_seconds(traffic, fabric, bands, ranks, ("gn_stats",))
        exposed = norms
        for hidden in ("halo", "kv"):
            link = _launches(traffic, (hidden,)) * latency + _link_seconds(
                traffic, fabric, bands, ranks, (hidden,)
            )
            exposed += max(0.0, link - EXACT_HIDDEN_SHARE[hidden] * compute)
    else:
        blocks = {t.block for t in traffic.transfers if t.kind in between}
        link = len(blocks) * latency + _link_seconds(traffic, fabric, bands, ranks, between)
        exposed = max(0.0, link - compute) + fabric.comm_sm_share * min(link, compute)
        if graphs and blocks:  # joined before the graph ends: the last block's at least
            last = StepTraffic(tuple(t for t in traffic.transfers if t.block == max(blocks)), traffic.blocks)
            exposed = max(exposed, latency + _link_seconds(last, fabric, bands, ranks, between))
    return compute + exposed + output, exposed + output


def predict(
    gpu: GpuProfile,
    fabric: Fabric,
    latent: Tuple[int, int],
    steps: int,
    gpus: int,
    split_batch: bool,
    mode: str,
    warmup_steps: int,
    graphs: bool,
    batch: int = 2,
    config: Optional[Dict] = None,
    compress: str = "none",
    weights_bytes: Optional[int] = None,
) -> Prediction:
    """The generation of ``steps`` steps of an SDXL-like UNet (``config``; default SDXL) on a
    ``latent`` (rows, columns) with ``batch`` images per UNet call (2: one image with CFG), on
    ``gpus`` GPUs; ``compress``: the keys and values of the steps after the warm-up sent so (the
    asynchronous steps', or ``full_sync``'s and ``exact``'s fresh ones; their codecs' time added to
    the step's compute, ``CODEC_BYTES_PER_S``). Its ``memory``: the fullest rank's
    (``planning.memory``), with ``weights_bytes`` of weights (default: SDXL's pipeline in fp16)."""
    if mode not in MODES:
        raise ConfigError(f"plan: mode {mode!r} is not one of {', '.join(MODES)}")
    if compress not in EXCHANGE_CODECS:
        raise ConfigError(f"plan: compress {compress!r} is not one of {', '.join(EXCHANGE_CODECS)}")
    if gpus < 1 or steps < 1:
        raise ConfigError(f"plan: {gpus} GPUs and {steps} steps; both must be >= 1")
    if split_batch and (gpus % 2 or batch % 2):
        raise ConfigError(
            f"plan: the CFG split needs an even number of GPUs and an even batch ({gpus}, {batch})"
        )
    config = SDXL_UNET if config is None else config
    geometry = BandGeometry.from_configs(config)
    bands = bands_per_image(gpus, split_batch)
    problem = geometry.latent_problem(latent[0], bands)
    if problem is not None:
        raise ConfigError(f"plan: {problem}")
    deepest = geometry.deepest_rows(latent[0])
    pixels = latent[0] * latent[1]
    single = steps * gpu.step_seconds(pixels, batch / 2, graphs, single=True)
    weights = 2 * sum(SDXL_PARAMETERS.values()) if weights_bytes is None else weights_bytes
    images = max(1, batch // 2)
    if gpus == 1:
        step = unet_activation_bytes(latent, batch, (deepest,), 0, config, synchronous=False)
        memory = MemoryEstimate(weights, 0, step, step if graphs else 0, vae_decode_bytes(latent, images, 1))
        return Prediction(1, False, "single", 0, graphs, single, single, single / steps, 0.0, 0, memory=memory)
    fabric = fabric.for_ranks(gpus)
    units = band_units(deepest, bands)
    per_band = batch // 2 if split_batch else batch
    worst, memory = None, None
    decode = vae_decode_bytes(latent, images, gpus)
    for index in sorted({0, bands // 2, bands - 1}):  # the edges, and a band with two neighbours
        fraction = units[index] / deepest * per_band / 2
        compute = gpu.step_seconds(pixels, fraction, graphs)
        halves = 2 if split_batch else 1
        walk = functools.partial(step_traffic, latent, per_band, units, index, config, halves=halves)
        fresh = mode in ("exact", "full_sync")  # every step exchanges fresh: one kind of step
        formula = "exact" if mode == "exact" else "sync"
        # the warm-up steps' walk and the later steps' (stale, or fresh and compressed), and how
        # each is timed (``_step_seconds``)
        per_kind = {"warm": walk(exact=mode == "exact")}
        kinds = {"warm": formula}
        if not fresh or compress != "none":
            per_kind["steady"] = walk(exact=mode == "exact", fresh=fresh, compress=compress)
            kinds["steady"] = formula if fresh else "async"
        computes = {kind: compute for kind in per_kind}
        if compress != "none":  # the later steps' keys and values compressed: the codecs' work
            computes["steady"] += sum(t.codec_bytes for t in per_kind["steady"].transfers) / CODEC_BYTES_PER_S
        times = {
            kind: _step_seconds(per_kind[kind], computes[kind], fabric, bands, gpus, kinds[kind], graphs)
            for kind in per_kind
        }
        keeps = not fresh  # the planner's modes: only corrected_async_gn reads stale values
        kept = persistent_bytes(list(per_kind.values()), graphs, keeps, keeps)
        step = unet_activation_bytes(latent, per_band, units, index, config, synchronous=mode != "exact")
        rank = MemoryEstimate(weights, kept, step, step if graphs else 0, decode)
        memory = rank if memory is None or rank.peak > memory.peak else memory
        # the warm-up: its first ``warmup_steps`` steps (at least one); every step of an
        # uncompressed full_sync or exact generation
        warm = min(steps, max(1, warmup_steps)) if "steady" in per_kind else steps
        count = {kind: n for kind, n in (("warm", warm), ("steady", steps - warm)) if n}
        seconds = sum(times[kind][0] * n for kind, n in count.items())
        exposed = sum(times[kind][1] * n for kind, n in count.items()) / steps
        steady = "steady" if "steady" in count else "warm"  # the kind of most steps' traffic
        sent = sum(t.sent for t in per_kind[steady].transfers)
        candidate = (seconds, computes[steady], exposed, sent)
        if worst is None or candidate[0] > worst[0]:
            worst = candidate
    seconds, compute, exposed, sent = worst
    return Prediction(
        gpus, split_batch, mode, warmup_steps, graphs, seconds, single, compute, exposed, sent, compress, memory
    )
