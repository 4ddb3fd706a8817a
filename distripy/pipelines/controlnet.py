"""Making a diffusers ``ControlNetModel`` (or a ``MultiControlNetModel`` of them) patch-parallel in
place: each rank computes its band of the residuals (``parallel.controlnet.PatchControlNetForward``).

Its modules are checked and swapped like the UNet's (``pipelines.swap``), in a context of its own,
with the end of each down block and of the mid block a checkpoint. It shares the communicators
of the UNet it conditions (a pipeline passes them): its transfers and the UNet's are issued in the
same order on every rank. A ControlNet whose conditions are pooled over the whole image
(``global_pool_conditions``, the "shuffle" ControlNets) is refused: its residuals are image means.
"""

from typing import Optional

from distripy.config import DistriConfig
from distripy.errors import InputError, InputTypeError, UnsupportedModuleError
from distripy.parallel.context import PatchContext
from distripy.parallel.controlnet import PatchControlNetForward
from distripy.parallel.policy import warn_if_error_grows
from distripy.pipelines.swap import plan_swaps
from distripy.pipelines.unet import count_downsamplings, install_forward, installed_forward
from distripy.runtime.factory import check_backends, make_comms, on_cuda, resolve_defaults

__all__ = ["controlnets_of", "parallelize_controlnet"]


def controlnets_of(model) -> list:
    """The ``ControlNetModel``s of ``model`` (itself, or a ``MultiControlNetModel``'s nets)."""
    nets = getattr(model, "nets", None)
    return list(nets) if nets is not None else [model]


def _check(controlnet) -> None:
    from diffusers import ControlNetModel

    if not isinstance(controlnet, ControlNetModel):
        raise InputTypeError(
            f"parallelize: {type(controlnet).__name__} is not supported; distripy parallelises "
            "ControlNetModel and MultiControlNetModel of them"
        )
    if controlnet.config.global_pool_conditions:
        raise UnsupportedModuleError(
            "ControlNetModel with global_pool_conditions=True: its residuals are means over the whole "
            "image, not bands of maps"
        )
    if installed_forward(controlnet) is not None:
        raise InputError("parallelize: this ControlNet is already patch-parallel")
    plan_swaps(controlnet)


def _condition_scale(controlnet) -> int:
    embedding = controlnet.controlnet_cond_embedding
    strided = [conv for conv in embedding.modules() if getattr(conv, "stride", (1,))[0] == 2]
    return 2 ** len(strided)


def parallelize_controlnet(model, config: DistriConfig, world_comm=None, patch_comms: Optional[dict] = None):
    """Make ``model`` (a ``ControlNetModel`` or ``MultiControlNetModel``) patch-parallel in place and
    return it (untouched on a single rank). ``world_comm`` / ``patch_comms``: the communicators of
    the UNet it conditions (``PatchUNetForward.world_comm`` / ``.patch_comms``); by default they are
    made here (every rank calls this together)."""
    nets = controlnets_of(model)
    for net in nets:  # check every net before changing any
        _check(net)
    config = resolve_defaults(config, world_comm, on_cuda(nets[0]))
    check_backends(config, world_comm)
    world_size = world_comm.world_size if world_comm is not None else config.world_size
    if world_size == 1:
        return model
    warn_if_error_grows(config.mode)
    if world_comm is None:
        world_comm, patch_comms = make_comms(config)
    for net in nets:
        forward = PatchControlNetForward(
            net, PatchContext(config), world_comm, patch_comms, count_downsamplings(net), _condition_scale(net)
        )
        install_forward(net, forward, list(net.down_blocks) + [net.mid_block])
    return model
