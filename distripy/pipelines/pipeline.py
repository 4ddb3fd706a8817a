"""``parallelize(pipe)``: a diffusers pipeline whose calls run patch-parallel on every rank.

The pipeline's UNet is retrofitted (``distripy.parallelize``) and its VAE decodes bands
(``pipelines.vae``); the pipeline object stays the same object, of a subclass with the same name
whose ``__call__``

* starts a new generation (``distripy.reset``) and, at the end, waits for the last step's
  transfers, so consecutive calls may change height, width, steps, guidance and batch freely;
* gives every rank the same initial noise: without a ``generator`` or ``latents`` the ranks would
  each draw their own and make a wrong image, so rank 0 draws a seed and sends it to all;
* shows the progress bar on rank 0 only.

Every rank gets the same images back; writing them to files is the caller's choice (rank 0 alone).
Made for ``StableDiffusionXLPipeline`` and ``StableDiffusionPipeline`` and their img2img
variants; any pipeline whose denoiser is a ``UNet2DConditionModel`` called once per step with
the whole latent works the same way.
"""

import functools
import inspect
import random

import torch
import torch.distributed as dist

from distripy.config import DistriConfig

__all__ = ["parallelize_pipeline"]


def _shared_seed(comm) -> int:
    seed = [random.SystemRandom().randrange(2**63) if comm.rank == 0 else None]
    dist.broadcast_object_list(
        seed, src=dist.get_global_rank(comm.process_group, 0), group=comm.process_group
    )
    return int(seed[0])


def _parallel_call(pipe, original, args, kwargs):
    import distripy

    bound = inspect.signature(original).bind(pipe, *args, **kwargs)
    if bound.arguments.get("generator") is None and bound.arguments.get("latents") is None:
        bound.arguments["generator"] = torch.Generator().manual_seed(_shared_seed(pipe._distripy_comm))
    distripy.reset(pipe.unet)
    try:
        return original(*bound.args, **bound.kwargs)
    finally:
        distripy.reset(pipe.unet)


@functools.lru_cache(maxsize=None)
def _parallel_class(cls: type) -> type:
    """``cls`` with the patch-parallel ``__call__``; same name and module, so that
    ``save_pretrained`` records the original class."""

    @functools.wraps(cls.__call__)
    def __call__(self, *args, **kwargs):
        return _parallel_call(self, cls.__call__, args, kwargs)

    return type(
        cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__doc__": cls.__doc__}
    )


def parallelize_pipeline(pipe, config: DistriConfig):
    """Make ``pipe`` patch-parallel in place and return it (untouched on a single rank)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from distripy.api import _forward_of, parallelize
    from distripy.pipelines.vae import parallelize_vae

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise TypeError(
            f"parallelize: {type(pipe).__name__} has no UNet2DConditionModel 'unet'; distripy parallelises "
            "UNet pipelines (StableDiffusionXLPipeline, StableDiffusionPipeline and their img2img variants)"
        )
    if getattr(pipe, "_distripy_comm", None) is not None:
        raise ValueError("parallelize: this pipeline is already patch-parallel")
    parallelize(pipe.unet, config)
    if config.world_size == 1:
        return pipe
    comm = _forward_of(pipe.unet).world_comm
    if isinstance(getattr(pipe, "vae", None), AutoencoderKL):
        parallelize_vae(pipe.vae, config, comm)
    pipe.__class__ = _parallel_class(type(pipe))
    pipe._distripy_comm = comm
    if comm.rank != 0:
        pipe.set_progress_bar_config(disable=True)
    return pipe
