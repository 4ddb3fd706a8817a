"""Making a diffusers ``UNet2DConditionModel`` patch-parallel in place.

Its modules are checked and swapped (``pipelines.swap``), the end of each down, mid and up block
becomes a checkpoint where an asynchronous step's transfers leave, and ``forward`` becomes a
``PatchUNetForward`` (bands in, the whole prediction out; as CUDA graphs with ``use_cuda_graph``).
On a single rank the model is returned untouched.
"""

import functools
from typing import Optional

import torch.nn as nn

from distripy.config import DistriConfig
from distripy.errors import InputError, UnsupportedModuleError
from distripy.parallel.context import PatchContext
from distripy.parallel.policy import check_steps, warn_if_error_grows
from distripy.parallel.unet import PatchUNetForward
from distripy.pipelines.swap import plan_swaps, refresh_model, swap_modules
from distripy.runtime.factory import check_backends, make_comms, on_cuda, resolve_defaults

__all__ = [
    "count_downsamplings",
    "install_forward",
    "installed_forward",
    "parallelize_unet",
    "require_installed_forward",
    "reset_unet",
]

_ATTRIBUTE = "_distripy_forward"


def count_downsamplings(model: nn.Module) -> int:
    """How many of the model's down blocks halve the resolution."""
    return sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))


def parallelize_unet(unet, config: DistriConfig, comm=None):
    """Make ``unet`` patch-parallel over the ranks of ``comm`` (default: torch.distributed's world,
    through the comm ``config`` asks for), in place, and return it. Every rank calls this, in the
    same order."""
    if hasattr(unet, _ATTRIBUTE):
        raise InputError("parallelize: this model is already patch-parallel")
    if unet.config.addition_embed_type == "image_hint":
        raise UnsupportedModuleError(
            "UNet2DConditionModel with addition_embed_type='image_hint' (a spatial hint)"
        )
    config = resolve_defaults(config, comm, on_cuda(unet))
    check_backends(config, comm)
    world_size = comm.world_size if comm is not None else config.world_size
    if world_size == 1:
        return unet
    plan_swaps(unet)  # refuse before creating communicators
    warn_if_error_grows(config.mode)

    world_comm, patch_comms = make_comms(config, comm)
    context = PatchContext(config)
    swap_modules(unet, context)
    context.add_checkpoints(
        block
        for block in list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
        if block is not None
    )
    forward = PatchUNetForward(unet, context, world_comm, patch_comms, count_downsamplings(unet))
    if config.use_cuda_graph:
        from distripy.parallel.graphs import StepGraphs

        context.static_buffers = True
        forward.graphs = StepGraphs(
            context, list(patch_comms.values()), eager_runs=2 if config.compile else 1
        )
    install_forward(unet, forward)
    return unet


def install_forward(model: nn.Module, forward: PatchUNetForward) -> None:
    """Make ``forward`` the model's forward; at the start of each generation it swaps in what was
    loaded into the model since (``swap_modules``: a LoRA's layers, re-created processors)."""
    forward.refresh_modules = functools.partial(refresh_model, model, forward.context)
    model.forward = forward
    setattr(model, _ATTRIBUTE, forward)


def installed_forward(unet) -> Optional[PatchUNetForward]:
    """The ``PatchUNetForward`` of a parallelised UNet, or None."""
    return getattr(unet, _ATTRIBUTE, None)


def require_installed_forward(unet) -> PatchUNetForward:
    """The ``PatchUNetForward`` of a parallelised UNet; raises if it is not one."""
    forward = installed_forward(unet)
    if forward is None:
        raise InputError(f"{type(unet).__name__} is not patch-parallel (parallelize it first)")
    return forward


def reset_unet(unet, steps: Optional[int] = None) -> None:
    """End a parallelised UNet's generation (see ``distripy.reset``); nothing for any other model
    (``steps`` is still checked)."""
    forward = installed_forward(unet)
    if forward is not None:
        forward.reset(steps)
    else:
        check_steps(steps)
