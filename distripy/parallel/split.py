"""``split_batch="auto"``: whether a generation splits its CFG batch across the ranks, by the
planner's prediction (``distripy.planning``) for its latent size, rank count and steps.

The decision depends only on what every rank of the image shares -- the latent's size, the world
size, the generation's steps and the GPU's name -- never on one call's batch, so the UNet and a
ControlNet (which in guess mode sees half the batch) decide alike.
Every rank checks the resulting plan with the others before a generation (``agree``).
"""

import functools
from typing import Optional, Tuple

from distripy.config import DistriConfig
from distripy.parallel.policy import choose_mode
from distripy.planning import plan_configurations

__all__ = ["DEFAULT_STEPS", "machine_of", "wants_split"]

DEFAULT_STEPS = 50
"""The step count assumed when a generation's is unknown (a bare UNet without ``reset(steps=)``)."""

# The GPU names the planner has a profile for, and the fabric such GPUs usually come with.
_MACHINES = (
    ("H100", "h100", "nvlink4"),
    ("H200", "h100", "nvlink4"),
    ("A100", "a100", "nvlink3"),
    ("L40", "l40", "pcie4"),
)


def machine_of(device_name: Optional[str]) -> Tuple[str, str]:
    """(GPU profile, fabric) the planner assumes for a device: by its name, H100 on NVLink4
    otherwise (CPU runs, unknown GPUs)."""
    for marker, gpu, fabric in _MACHINES:
        if device_name and marker in device_name.upper():
            return gpu, fabric
    return "h100", "nvlink4"


@functools.lru_cache(maxsize=256)
def _split_is_faster(
    latent: Tuple[int, int],
    world: int,
    steps: int,
    mode: Tuple[str, int],
    graphs: bool,
    machine: Tuple[str, str],
) -> bool:
    gpu, fabric = machine
    height, width = latent[0] * 8, latent[1] * 8
    planned = plan_configurations(world, (height, width), steps, [mode], fabric=fabric, gpu=gpu)
    ours = [c for c in planned.candidates if c.gpus == world and c.graphs == graphs]
    split = [c.seconds for c in ours if c.split_batch]
    whole = [c.seconds for c in ours if not c.split_batch]
    return bool(split) and (not whole or min(split) <= min(whole))


def wants_split(
    config: DistriConfig,
    latent: Tuple[int, int],
    world: int,
    levels: int,
    steps: Optional[int],
    graphs: bool,
    device_name: Optional[str],
) -> bool:
    """Whether a call whose batch can split (even batch, even world) should: ``config.split_batch``,
    or with ``"auto"`` the planner's choice (an SDXL-like UNet of ``levels`` downsamplings)."""
    if config.split_batch != "auto":
        return bool(config.split_batch)
    factor = 2**levels
    if world % 2 or latent[0] % factor or latent[0] // factor < world // 2:
        return False  # no split possible (the call's input problem, if any, is reported as usual)
    if latent[0] % 4 or latent[1] % 4:  # the planner's model is SDXL's UNet (two downsamplings)
        return True
    choice = choose_mode(config, steps)
    mode = choice.mode if choice.mode in ("exact", "full_sync") else "corrected_async_gn"
    return _split_is_faster(
        tuple(latent),
        world,
        steps or DEFAULT_STEPS,
        (mode, choice.warmup_steps),
        graphs,
        machine_of(device_name),
    )
