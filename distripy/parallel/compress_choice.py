"""``compress="auto"``: which codec a generation's asynchronous steps send keys and values with.

Compression trades a little of the image for fewer bytes (``parallel.compression``); it pays only
where the link cannot hide the uncompressed keys and values behind a step (PCIe, many GPUs, no CFG
split), and costs the codecs' work where it can. So ``auto`` asks the planner
(``distripy.planning``), for the generation's latent size, rank count, CFG split, steps and mode on
its machine, which of ``AUTO_CODECS`` is predicted fastest (``fp8``: half the bytes, the least
work; ``residual2``: about an eighth of them, more work, and half of ``fp8``'s memory), and takes it
if it is faster than sending them uncompressed by more than ``AUTO_GAIN``; on a machine the planner
has no profile of (an unknown GPU, a CPU run, a generation nobody declared) it never compresses. As ``split_batch="auto"``, the decision uses only
what every rank of the image shares, so the ranks decide alike (and check it: ``agree``).
"""

import functools
from typing import Optional, Tuple

from distripy.config import AUTO_MODE, DistriConfig
from distripy.errors import ConfigError
from distripy.parallel.policy import ModeChoice
from distripy.parallel.split import DEFAULT_STEPS
from distripy.parallel.step_policy import keeps_activations
from distripy.planning import predict, resolve_fabric, resolve_gpu

__all__ = ["AUTO_CODECS", "AUTO_GAIN", "chosen_codec"]

AUTO_CODECS = ("fp8", "residual2")
"""The codecs ``auto`` chooses among (``residual1``: nearly ``residual2``'s bytes, the scales
weighing more at 1 bit, with half its levels)."""

AUTO_GAIN = 0.05
"""How much faster than uncompressed a generation must be predicted before ``auto`` compresses:
below it, the image's small change is not worth the time."""


@functools.lru_cache(maxsize=256)
def _fastest_codec(
    latent: Tuple[int, int], world: int, split: bool, steps: int, warmup: int, graphs: bool, machine: Tuple[str, str]
) -> str:
    gpu, fabric = resolve_gpu(machine[0]), resolve_fabric(machine[1])
    common = dict(latent=latent, steps=steps, gpus=world, split_batch=split, mode="corrected_async_gn")
    try:
        seconds = {
            codec: predict(gpu, fabric, **common, warmup_steps=warmup, graphs=graphs, compress=codec).seconds
            for codec in ("none", *AUTO_CODECS)
        }
    except ConfigError:  # a UNet or size the planner's SDXL model does not cover
        return "none"
    fastest = min(AUTO_CODECS, key=lambda codec: (seconds[codec], AUTO_CODECS.index(codec)))
    return fastest if seconds[fastest] < seconds["none"] * (1 - AUTO_GAIN) else "none"


def chosen_codec(
    config: DistriConfig,
    latent: Tuple[int, int],
    world: int,
    split: bool,
    bands: int,
    steps: Optional[int],
    graphs: bool,
    machine: Optional[Tuple[str, str]],
    choice: ModeChoice,
) -> str:
    """The codec a generation's asynchronous steps use: ``config.compress``, or with ``"auto"``
    the planner's choice (module docstring) for a generation running ``choice`` on ``world``
    ranks, ``split`` or not, in ``bands`` bands per image (1: nothing exchanged)."""
    if config.compress != AUTO_MODE:
        return config.compress
    if machine is None or not keeps_activations(choice.mode) or bands < 2 or latent[0] % 4 or latent[1] % 4:
        return "none"
    return _fastest_codec(tuple(latent), world, split, steps or DEFAULT_STEPS, choice.warmup_steps, graphs, machine)
