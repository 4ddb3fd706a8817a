"""``plan``: every configuration of a machine for one image size and step count, ranked by
predicted latency, and the one to use.

Candidates: 1 to ``gpus`` GPUs (every count the image's deepest-level rows can be cut into), with
and without the CFG split (even counts, an even batch), each mode given (``modes``: the mode and
warm-up each runs; the caller passes what ``mode="auto"`` would run for the step count, and the
modes that equal one GPU), the asynchronous mode with each exchange codec asked for
(``compress``), with and without CUDA graphs. The recommendation is the fastest
configuration, except that a configuration with fewer GPUs is preferred while it is within
``TOLERANCE`` of the fastest: GPUs that buy less than that are better spent on another image.
With ``memory_gib`` (the GPUs' memory), a configuration whose fullest rank's predicted peak
(``planning.memory``) does not fit is left out, and the plan says why.
"""

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from distripy.config import EXCHANGE_CODECS
from distripy.errors import ConfigError
from distripy.geometry import BandGeometry, bands_per_image
from distripy.planning.hardware import (
    FABRIC_ALIASES,
    FABRICS,
    GPUS,
    Fabric,
    GpuProfile,
    load_fabric,
    load_gpu,
)
from distripy.planning.memory import GIB
from distripy.planning.predict import Prediction, predict
from distripy.planning.traffic import SDXL_UNET

__all__ = ["TOLERANCE", "Plan", "plan_configurations", "resolve_fabric", "resolve_gpu"]

TOLERANCE = 0.05
"""A configuration with fewer GPUs is recommended while its latency is within 5% of the fastest."""


def resolve_fabric(fabric: Union[str, Fabric, None]) -> Fabric:
    """A built-in fabric by name (``nvlink4``, ``nvlink3``, ``pcie5``, ``pcie4``), a ``Fabric``, or a
    ``bench/comm.py`` JSON file's path."""
    if isinstance(fabric, Fabric):
        return fabric
    name = "nvlink4" if fabric is None else str(fabric)
    name = FABRIC_ALIASES.get(name, name)
    if name in FABRICS:
        return FABRICS[name]
    if name.endswith(".json"):
        return load_fabric(name)
    raise ConfigError(f"fabric {fabric!r}: one of {', '.join(FABRICS)}, or a bench/comm.py JSON file")


def resolve_gpu(gpu: Union[str, GpuProfile, None]) -> GpuProfile:
    """A built-in GPU by name (``h100``, ``a100``, ``l40``), a ``GpuProfile``, or a
    ``bench/e2e.py`` JSON file's path."""
    if isinstance(gpu, GpuProfile):
        return gpu
    name = "h100" if gpu is None else str(gpu)
    if name.lower() in GPUS:
        return GPUS[name.lower()]
    if name.endswith(".json"):
        return load_gpu(name)
    raise ConfigError(f"gpu {gpu!r}: one of {', '.join(GPUS)}, or a bench/e2e.py JSON file")


@dataclass(frozen=True)
class Plan:
    """Ranked predictions (fastest first) and the recommended one."""

    size: Tuple[int, int]  # image height, width in pixels
    steps: int
    gpus: int
    gpu: GpuProfile
    fabric: Fabric
    candidates: Tuple[Prediction, ...]
    recommended: Prediction
    assumptions: Tuple[str, ...] = field(default=())
    memory_gib: Optional[float] = None  # the GPUs' memory the candidates were checked against
    left_out: Tuple[Prediction, ...] = field(default=())  # over memory_gib, fastest first

    def as_dict(self) -> Dict:
        return {
            "size": {"height": self.size[0], "width": self.size[1]},
            "steps": self.steps,
            "gpus": self.gpus,
            "gpu": {"name": self.gpu.name, "measured": self.gpu.measured, "source": self.gpu.source},
            "fabric": {
                "name": self.fabric.name,
                "measured": self.fabric.measured,
                "source": self.fabric.source,
            },
            "recommended": self.recommended.as_dict(),
            "candidates": [candidate.as_dict() for candidate in self.candidates],
            "memory_gib": self.memory_gib,
            "left_out": [candidate.as_dict() for candidate in self.left_out],
            "assumptions": list(self.assumptions),
        }

    def report(self, limit: Optional[int] = None) -> str:
        """What ``distripy plan`` prints: the machine, the table (``limit`` rows), the recommended
        configuration and the assumptions."""
        best = self.recommended
        height, width = self.size
        how = "one GPU"
        if best.gpus > 1:
            split = "with" if best.split_batch else "without"
            how = f"{best.gpus} GPUs, {split} the CFG split, mode {best.mode}"
            how += f", compress {best.compress}" if best.compress != "none" else ""
        lines = [
            f"distripy plan: {width}x{height}, {self.steps} steps, up to {self.gpus} GPUs: "
            f"{self.gpu.name} ({'measured' if self.gpu.measured else 'built in'}), "
            f"{self.fabric.name} ({'measured' if self.fabric.measured else 'built in'})",
            self.table(limit),
            "",
            f"recommended (*): {how}, CUDA graphs {'on' if best.graphs else 'off'}: "
            f"{best.seconds:.2f} s, {best.speedup:.2f}x one GPU",
        ]
        if best.memory is not None:
            lines.append(f"its fullest GPU: {best.memory.describe()}")
        if self.left_out:
            lines.append(f"left out, over {self.memory_gib:g} GiB per GPU ({len(self.left_out)}; the fastest):")
            lines += [f"  {_name(candidate)}: {candidate.memory.describe()}" for candidate in self.left_out[:limit]]
        return "\n".join(lines + [f"assumed: {assumption}" for assumption in self.assumptions])

    def table(self, limit: Optional[int] = None) -> str:
        """The candidates as a text table, the recommended one marked."""
        header = (
            f"{'':2}{'GPUs':>4} {'CFG split':>9} {'mode':<36} {'graphs':>6} {'latency s':>10} "
            f"{'speedup':>8} {'compute ms/step':>16} {'exposed comm ms/step':>21} {'peak GiB/GPU':>13}"
        )
        lines = [header]
        for candidate in self.candidates[:limit]:
            mark = "* " if candidate == self.recommended else "  "
            mode = candidate.mode if candidate.gpus > 1 else "one GPU"
            if candidate.gpus > 1 and candidate.mode == "corrected_async_gn":
                mode = f"{candidate.mode} (w{candidate.warmup_steps})"
                if candidate.compress != "none":
                    mode = f"{mode} {candidate.compress}"
            lines.append(
                f"{mark}{candidate.gpus:>4} {'yes' if candidate.split_batch else 'no':>9} {mode:<36} "
                f"{'yes' if candidate.graphs else 'no':>6} {candidate.seconds:>10.3f} "
                f"{candidate.speedup:>7.2f}x {candidate.step_compute_s * 1e3:>16.2f} "
                f"{candidate.exposed_s * 1e3:>21.3f} "
                f"{'-' if candidate.memory is None else f'{candidate.memory.peak / GIB:.1f}':>13}"
            )
        return "\n".join(lines)


def _name(candidate: Prediction) -> str:
    """``"4 GPUs, CFG split, corrected_async_gn (w13) residual2, graphs"``."""
    if candidate.gpus == 1:
        return f"1 GPU{', graphs' if candidate.graphs else ''}"
    mode = candidate.mode
    if mode == "corrected_async_gn":
        mode = f"{mode} (w{candidate.warmup_steps})" + (f" {candidate.compress}" if candidate.compress != "none" else "")
    split = ", CFG split" if candidate.split_batch else ""
    return f"{candidate.gpus} GPUs{split}, {mode}{', graphs' if candidate.graphs else ''}"


def _counts(gpus: int, deepest: int) -> List[int]:
    """The GPU counts whose bands (with the CFG split or without) get a deepest-level row each."""
    return [n for n in range(1, gpus + 1) if min(bands_per_image(n, s) for s in (False, True)) <= deepest]


def plan_configurations(
    gpus: int,
    size: Tuple[int, int],
    steps: int,
    modes: Sequence[Tuple[str, int]],
    fabric: Union[str, Fabric, None] = None,
    gpu: Union[str, GpuProfile, None] = None,
    batch: int = 2,
    vae_scale: int = 8,
    config: Optional[Dict] = None,
    compress: Sequence[str] = ("none",),
    memory_gib: Optional[float] = None,
    weights_bytes: Optional[int] = None,
) -> Plan:
    """Every configuration of up to ``gpus`` GPUs for an image of ``size`` (height, width pixels)
    and ``steps`` steps, for the ``modes`` given as (mode, warm-up steps); the asynchronous mode's
    once for each of ``compress`` (``DistriConfig.compress``). ``memory_gib``: each GPU's memory
    (GiB); the configurations whose fullest rank would not fit are left out (``Plan.left_out``).
    ``weights_bytes``: the pipeline's weights (default: SDXL's in fp16)."""
    compress = tuple(dict.fromkeys(compress))
    unknown = [name for name in compress if name not in EXCHANGE_CODECS]
    if not compress or unknown:
        raise ConfigError(f"plan: compress {list(compress)!r}: each must be one of {', '.join(EXCHANGE_CODECS)}")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"plan: gpus={gpus!r} must be an integer >= 1")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"plan: steps={steps!r} must be an integer >= 1")
    if memory_gib is not None and (
        isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) or not 0 < memory_gib < float("inf")
    ):
        raise ConfigError(f"plan: memory={memory_gib!r} must be a positive number of GiB")
    if weights_bytes is not None and (
        isinstance(weights_bytes, bool) or not isinstance(weights_bytes, int) or weights_bytes < 0
    ):
        raise ConfigError(f"plan: weights_bytes={weights_bytes!r} must be a non-negative integer")
    height, width = size
    geometry = replace(BandGeometry.from_configs(config or SDXL_UNET), vae_scale=vae_scale)
    unit = geometry.pixel_unit
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise ConfigError(
            f"plan: height {height} and width {width} are not whole rows at the UNet's deepest level: "
            f"both must be multiples of {unit} pixels"
        )
    gpu_profile, fabric_profile = resolve_gpu(gpu), resolve_fabric(fabric)
    latent = (height // vae_scale, width // vae_scale)
    deepest = geometry.deepest_rows(latent[0])
    candidates: List[Prediction] = []
    for count in _counts(gpus, deepest):
        for graphs in (True, False):
            if count == 1:
                candidates.append(
                    predict(
                        gpu_profile,
                        fabric_profile,
                        latent,
                        steps,
                        1,
                        False,
                        "full_sync",
                        0,
                        graphs,
                        batch,
                        config,
                        weights_bytes=weights_bytes,
                    )
                )
                continue
            for split in (False, True) if count % 2 == 0 and batch % 2 == 0 else (False,):
                if bands_per_image(count, split) > deepest:
                    continue
                for mode, warmup in dict.fromkeys(modes):
                    for codec in compress if mode == "corrected_async_gn" else ("none",):
                        candidates.append(
                            predict(
                                gpu_profile, fabric_profile, latent, steps, count, split, mode, warmup, graphs,
                                batch, config, compress=codec, weights_bytes=weights_bytes,
                            )
                        )  # fmt: skip
    # ties: fewer GPUs, then fewer bytes (the CFG split), then CUDA graphs
    ordered = sorted(candidates, key=lambda c: (round(c.seconds, 9), c.gpus, c.sent_bytes, not c.graphs))
    left_out: Tuple[Prediction, ...] = ()
    if memory_gib is not None:
        budget = memory_gib * GIB
        left_out = tuple(c for c in ordered if c.memory.peak > budget)
        ordered = [c for c in ordered if c.memory.peak <= budget]
        if not ordered:
            least = min(left_out, key=lambda c: c.memory.peak)
            raise ConfigError(
                f"plan: no configuration of up to {gpus} GPUs fits in {memory_gib:g} GiB per GPU for "
                f"{width}x{height}: the smallest, {_name(least)}, needs {least.memory.describe()}"
            )
    ranked = tuple(ordered)
    fastest = ranked[0].seconds
    recommended = min(
        (c for c in ranked if c.seconds <= fastest * (1 + TOLERANCE)), key=lambda c: (c.gpus, c.seconds)
    )
    assumptions = []
    if not gpu_profile.measured:
        assumptions.append(f"GPU: {gpu_profile.name}, {gpu_profile.source}")
    if not fabric_profile.measured:
        assumptions.append(f"fabric: {fabric_profile.name}, {fabric_profile.source}")
    assumptions.append(
        "SDXL's UNet steps only (the text encoders and the VAE decode are left out); batch "
        f"{batch} per call (one image with classifier-free guidance)"
    )
    weights = "SDXL's pipeline weights in fp16" if weights_bytes is None else f"{weights_bytes / GIB:.1f} GiB of weights"
    assumptions.append(
        f"memory: {weights} on every GPU; a band step's activations and the VAE decode estimated "
        "(planning.memory), not measured on a GPU"
    )
    return Plan(
        (height, width), steps, gpus, gpu_profile, fabric_profile, ranked, recommended, tuple(assumptions),
        memory_gib, left_out,
    )  # fmt: skip
