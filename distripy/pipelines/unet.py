"""Making a diffusers ``UNet2DConditionModel`` patch-parallel in place.

Its modules are checked and swapped (``pipelines.swap``), the end of each down, mid and up block
becomes a checkpoint where an asynchronous step's transfers leave, and ``forward`` becomes a
``PatchUNetForward`` (bands in, the whole prediction out; as CUDA graphs with ``use_cuda_graph``),
all recorded (``pipelines.registry``) so that ``unparallelize`` can undo it.
On a single rank the model is returned untouched.
"""

from typing import Optional

import torch.nn as nn

from distripy.config import DistriConfig
from distripy.errors import InputError, UnsupportedModuleError
from distripy.parallel.context import PatchContext
from distripy.parallel.policy import warn_if_error_grows
from distripy.parallel.unet import PatchUNetForward
from distripy.pipelines.registry import install, record_of
from distripy.pipelines.swap import Surgery, plan_swaps, swap_modules
from distripy.runtime.factory import check_backends, make_comms, on_cuda, resolve_defaults

__all__ = [
    "count_downsamplings",
    "install_forward",
    "installed_forward",
    "parallelize_unet",
    "require_installed_forward",
]


def count_downsamplings(model: nn.Module) -> int:
    """How many of the model's down blocks halve the resolution."""
    return sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))


def parallelize_unet(unet, config: DistriConfig, comm=None):
    """Make ``unet`` patch-parallel over the ranks of ``comm`` (default: torch.distributed's world,
    through the comm ``config`` asks for), in place, and return it. Every rank calls this, in the
    same order."""
    if record_of(unet) is not None:
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
    blocks = [b for b in list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks) if b is not None]
    forward = PatchUNetForward(unet, context, world_comm, patch_comms, count_downsamplings(unet))
    if config.use_cuda_graph:
        from distripy.parallel.graphs import StepGraphs

        context.static_buffers = True
        forward.graphs = StepGraphs(
            context, list(patch_comms.values()), eager_runs=2 if config.compile else 1
        )
    install_forward(unet, forward, blocks)
    return unet


def install_forward(model: nn.Module, forward: PatchUNetForward, blocks) -> None:
    """Swap the model's modules, make the end of each of ``blocks`` a checkpoint and ``forward``
    the model's forward, recording it all (``pipelines.registry``)."""
    surgery = Surgery()
    swap_modules(model, forward.context, surgery)
    hooks = forward.context.add_checkpoints(blocks)
    install(model, model, model, forward, forward.context, surgery, hooks)


def installed_forward(unet) -> Optional[PatchUNetForward]:
    """The ``PatchUNetForward`` of a parallelised UNet (or ControlNet), or None."""
    record = record_of(unet)
    return record.wrapper if record is not None and isinstance(record.wrapper, PatchUNetForward) else None


def require_installed_forward(unet) -> PatchUNetForward:
    """The ``PatchUNetForward`` of a parallelised UNet; raises if it is not one."""
    forward = installed_forward(unet)
    if forward is None:
        raise InputError(f"{type(unet).__name__} is not patch-parallel (parallelize it first)")
    return forward
