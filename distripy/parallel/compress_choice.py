"""``compress="auto"``: which codec a generation's asynchronous steps send keys and values with.

Compression trades a little of the image for fewer bytes (``parallel.compression``); it pays only
where the link cannot hide the uncompressed keys and values behind a step (PCIe, many GPUs, no CFG
split), and costs the codecs' work where it can. So ``auto`` asks the planner
(``distripy.planning``), for the generation's latent size, rank count, CFG split, steps and mode on
its machine, whether ``AUTO_CODEC`` is predicted faster than sending them uncompressed by more than
``AUTO_GAIN``; on a machine the planner has no profile of (an unknown GPU, a CPU run, a
generation nobody declared) it never compresses. As ``split_batch="auto"``, the decision uses only
what every rank of the image shares, so the ranks decide alike (and check it: ``agree``).
"""

import functools
from typing import Optional, Tuple

from distripy.config import AUTO_MODE, DistriConfig
from distripy.errors import ConfigError
from distripy.parallel.policy import ModeChoice
from distripy.parallel.split import DEFAULT_STEPS
from distripy.planning import predict, resolve_fabric, resolve_gpu

__all__ = ["AUTO_CODEC", "AUTO_GAIN", "chosen_codec"]

AUTO_CODEC = "residual2"
"""The codec ``auto`` picks: nearly ``residual1``'s bytes (the scales weigh more at 1 bit) with
twice its levels."""

AUTO_GAIN = 0.05
"""How much faster than uncompressed a generation must be predicted before ``auto`` compresses:
below it, the image's small change is not worth the time."""


@functools.lru_cache(maxsize=256)
def _compression_pays(
    latent: Tuple[int, int], world: int, split: bool, steps: int, warmup: int, graphs: bool, machine: Tuple[str, str]
) -> bool:
    gpu, fabric = resolve_gpu(machine[0]), resolve_fabric(machine[1])
    common = dict(latent=latent, steps=steps, gpus=world, split_batch=split, mode="corrected_async_gn")
    try:
        plain, packed = (
            predict(gpu, fabric, **common, warmup_steps=warmup, graphs=graphs, compress=codec)
            for codec in ("none", AUTO_CODEC)
        )
    except ConfigError:  # a UNet or size the planner's SDXL model does not cover
        return False
    return packed.seconds < plain.seconds * (1 - AUTO_GAIN)


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
    stale = choice.mode not in ("exact", "full_sync", "naive_patch")
    if machine is None or not stale or bands < 2 or latent[0] % 4 or latent[1] % 4:
        return "none"
    return AUTO_CODEC if _compression_pays(
        tuple(latent), world, split, steps or DEFAULT_STEPS, choice.warmup_steps, graphs, machine
    ) else "none"
