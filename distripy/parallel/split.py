"""``split_batch="auto"``: whether a generation splits its CFG batch across the ranks.

For a machine the planner has a profile of (the ``Generation``'s ``machine``, named from above
this layer where the devices are known: ``machine_of``), the planner's prediction
(``distripy.planning``) for the latent size, rank count and steps decides; for any other (an
unknown GPU, a CPU run, a generation nobody declared) the plain rule: split when the world is even
and at least 4 (with 2 ranks a split leaves one band per image, nothing to parallelise).

The decision depends only on what every rank of the image shares -- the latent's size, the world
size, the generation's steps and machine -- never on one call's batch, so the UNet and a
ControlNet (which in guess mode sees half the batch) decide alike; whether the batch is even is
the plan's own check. Every rank checks the resulting plan with the others (``agree``).
"""

import functools
from typing import Optional, Tuple

from distripy.config import DistriConfig
from distripy.parallel.policy import ModeChoice, choose_mode
from distripy.planning import plan_configurations

__all__ = ["DEFAULT_STEPS", "machine_of", "wants_split"]

DEFAULT_STEPS = 50
"""The step count assumed when a generation's is unknown (a bare UNet without ``reset(steps=)``)."""

# The GPU names the planner has a profile for, and the fabric such GPUs usually come with.
_MACHINES = (
    ("H100", "h100", "nvlink4"),
    ("H200", "h100", "nvlink4"),  # an H100's compute and fabric; a measured profile may replace it
    ("A100", "a100", "nvlink3"),
    ("L40", "l40", "pcie4"),
)


def machine_of(device_name: Optional[str]) -> Optional[Tuple[str, str]]:
    """(GPU profile, fabric) the planner has for a device, by its name; None for a GPU it has no
    profile of (and for no GPU): ``split_batch="auto"`` then follows the plain rule."""
    for marker, gpu, fabric in _MACHINES:
        if device_name and marker in device_name.upper():
            return gpu, fabric
    return None


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
    scale = 8  # the planner counts pixels: any scale converts the latent there and back alike
    size = (latent[0] * scale, latent[1] * scale)
    planned = plan_configurations(world, size, steps, [mode], fabric=fabric, gpu=gpu, vae_scale=scale)
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
    machine: Optional[Tuple[str, str]],
    choice: Optional[ModeChoice] = None,
) -> bool:
    """Whether a call whose batch can split (even batch, even world) should: ``config.split_batch``,
    or with ``"auto"`` the planner's choice for ``machine`` (an SDXL-like UNet of ``levels``
    downsamplings), or the plain rule without one. ``choice``: the generation's mode, when chosen
    already (``choose_mode(config, steps)`` otherwise)."""
    if config.split_batch != "auto":
        return bool(config.split_batch)
    factor = 2**levels
    if world % 2 or latent[0] % factor or latent[0] // factor < world // 2:
        return False  # no split possible (the call's input problem, if any, is reported as usual)
    if machine is None or latent[0] % 4 or latent[1] % 4:  # the planner's model: SDXL's UNet
        return world >= 4
    choice = choose_mode(config, steps) if choice is None else choice
    mode = choice.mode if choice.mode in ("exact", "full_sync") else "corrected_async_gn"
    return _split_is_faster(
        tuple(latent),
        world,
        steps or DEFAULT_STEPS,
        (mode, choice.warmup_steps),
        graphs,
        machine,
    )
