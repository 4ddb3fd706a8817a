"""Declaring generations from above the band wrappers, where the caller's intent is known.

``declare`` opens the next generation of a parallelised model (a UNet, a ControlNet, a VAE): it
takes in what was loaded into the model since (``registry.refresh``), names the machine
``split_batch="auto"`` plans for (``machine_for``, from the model's device), and hands the wrapper
its ``Generation``. A parallelised pipeline's call declares one generation for all its models
after a single agreement round (``pipelines.pipeline``); ``distripy.reset`` and
``distripy.generation`` declare one for a bare model, whose first step then checks its inputs
across ranks. ``set_alone`` is how ``distripy.alone`` reaches every wrapper: ``alone`` is a
setting of the generations, nowhere else.
"""

import functools
from typing import Optional, Tuple

import torch

from distripy.errors import DistripyError
from distripy.parallel.generation import Generation
from distripy.parallel.policy import check_steps
from distripy.parallel.split import machine_of
from distripy.pipelines.registry import record_of, refresh

__all__ = ["check_generation", "declare", "machine_for", "set_alone_model"]


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def machine_for(model) -> Optional[Tuple[str, str]]:
    """(GPU profile, fabric) the planner has for the GPU ``model`` is on; None on a CPU or a GPU it
    has no profile of (``split_batch="auto"`` then follows the plain rule)."""
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if parameter is None or parameter.device.type != "cuda":
        return None
    index = parameter.device.index if parameter.device.index is not None else torch.cuda.current_device()
    return machine_of(_device_name(index))


def take_in(model):
    """``refresh`` a parallelised model: (its state digest, None), or (None, the problem as
    (exception type, message)) when what was loaded into it cannot run on bands."""
    try:
        return refresh(record_of(model)), None
    except DistripyError as error:
        return None, (type(error), str(error))


def declare(model, steps: Optional[int] = None, **settings) -> bool:
    """End a parallelised model's current generation and declare the next: ``steps`` (None:
    unknown) and ``settings`` (``Generation``'s fields; by default this rank's ``alone`` kept, the
    machine of the model's device). A problem taking in what was loaded since is raised by the
    generation's first step on every rank. False when ``model`` is not parallelised."""
    check_steps(steps)
    record = record_of(model)
    if record is None:
        return False
    wrapper = record.wrapper
    current = wrapper.generation
    settings.setdefault("alone", current.alone)
    if hasattr(wrapper, "tracker"):  # a denoiser (UNet, ControlNet)
        settings.setdefault("machine", machine_for(model))
        state, problem = take_in(model)
        wrapper.declare(Generation(steps=steps, **settings), state, problem)
    else:  # a VAE decoder: one call per generation, no steps
        wrapper.declare(Generation(**{k: v for k, v in settings.items() if k in ("alone", "agreed")}))
    return True


def check_generation(model) -> None:
    """At the end of a parallelised denoiser's generation, every rank together: raise what its
    exchanges found wrong (``PatchUNetForward.check_nonfinite``). Nothing for another model."""
    record = record_of(model)
    if record is not None and hasattr(record.wrapper, "check_nonfinite"):
        record.wrapper.check_nonfinite()


def set_alone_model(model, alone: bool) -> bool:
    """Make a parallelised model run its next generations on this rank by itself (``alone``), or on
    every rank again; its current generation ends. False when it is not parallelised."""
    record = record_of(model)
    if record is None:
        return False
    return declare(model, record.wrapper.generation.steps, alone=alone)
