"""``parallelize(pipe)``: a diffusers pipeline whose calls run patch-parallel on every rank.

The pipeline's UNet is retrofitted (``distripy.parallelize``) and its VAE decodes bands
(``pipelines.vae``); the pipeline object stays the same object, of a subclass with the same name
whose ``__call__``

* first checks, with every rank, that all of them were called with the same arguments (a digest
  of each: prompts or embeddings, guidance, steps, timesteps, size, strength, generator state,
  latents, images), the same scheduler configuration and the same LoRA adapters and scales; a
  difference raises ``RankMismatchError`` on every rank, naming the arguments and the ranks;
* starts a new generation (``distripy.reset``) told its number of steps (``num_inference_steps``,
  or the length of ``timesteps`` / ``sigmas``), from which ``mode="auto"`` picks the mode and
  warm-up, and, at the end, waits for the last step's transfers, so consecutive calls may change
  height, width, steps, guidance and batch freely;
* gives every rank the same initial noise: without a ``generator`` or ``latents`` the ranks would
  each draw their own and make a wrong image, so rank 0 draws a seed and sends it to all (through
  the ``Comm``'s ``all_gather_object``);
* shows the progress bar on rank 0 only.

Every rank gets the same images back; writing them to files is the caller's choice (rank 0 alone).
Made for ``StableDiffusionXLPipeline`` and ``StableDiffusionPipeline`` and their img2img
variants; any pipeline whose denoiser is a ``UNet2DConditionModel`` called once per step with
the whole latent works the same way.
"""

import functools
import hashlib
import inspect
import random
from typing import Optional

import torch

from distripy.config import DistriConfig
from distripy.errors import InputError, InputTypeError
from distripy.parallel.agreement import agree
from distripy.parallel.digest import digest_arguments
from distripy.pipelines.unet import parallelize_unet, require_installed_forward, reset_unet
from distripy.pipelines.vae import parallelize_vae

__all__ = ["denoising_steps", "parallelize_pipeline", "shared_seed"]

_COMM_ATTRIBUTE = "_distripy_comm"


def shared_seed(comm) -> int:
    """A seed drawn by the comm's first rank, the same on every rank."""
    seed = random.SystemRandom().randrange(2**63) if comm.rank == 0 else None
    return int(comm.all_gather_object(seed)[0])


def _lora_state(pipe) -> Optional[str]:
    """A digest of the LoRA adapters active in the pipeline's models and their scales (PEFT
    layers keep them per layer), or None without any."""
    entries = [
        (component, path, tuple(module.active_adapters), tuple(sorted(module.scaling.items())))
        for component, model in pipe.components.items()
        if isinstance(model, torch.nn.Module)
        for path, module in model.named_modules()
        if hasattr(module, "scaling") and hasattr(module, "active_adapters")
    ]
    return hashlib.sha256(repr(entries).encode()).hexdigest() if entries else None


def _call_description(pipe, arguments) -> dict:
    """What decides the image, per name: every argument of the call (prompts or their embeddings,
    guidance, steps, timesteps, size, strength, generator state, latents, images, kwargs), the
    scheduler and its configuration, the active LoRA adapters and scales."""
    described = {name: value for name, value in arguments.items() if name != "self"}
    # Private entries are bookkeeping (``_use_default_values`` lists a set, in hash order).
    settings = {key: value for key, value in pipe.scheduler.config.items() if not key.startswith("_")}
    described["scheduler"] = (type(pipe.scheduler).__name__, settings)
    described["lora"] = _lora_state(pipe)
    return digest_arguments(described)


def denoising_steps(signature: inspect.Signature, arguments: dict) -> Optional[int]:
    """The number of denoising steps a pipeline call asks for: its ``timesteps`` or ``sigmas``
    when given, else its ``num_inference_steps`` (or that parameter's default); None when the
    call names none (what ``mode="auto"`` decides by)."""
    for name in ("timesteps", "sigmas"):
        if arguments.get(name) is not None:
            return len(arguments[name]) or None
    steps = arguments.get("num_inference_steps")
    if steps is None and "num_inference_steps" in signature.parameters:
        steps = signature.parameters["num_inference_steps"].default
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


def _parallel_call(pipe, original, args, kwargs):
    signature = inspect.signature(original)
    bound = signature.bind(pipe, *args, **kwargs)
    comm = getattr(pipe, _COMM_ATTRIBUTE)
    agree(comm, _call_description(pipe, bound.arguments), None, what="pipeline call")
    if bound.arguments.get("generator") is None and bound.arguments.get("latents") is None:
        bound.arguments["generator"] = torch.Generator().manual_seed(shared_seed(comm))
    reset_unet(pipe.unet, denoising_steps(signature, bound.arguments))
    try:
        return original(*bound.args, **bound.kwargs)
    finally:
        reset_unet(pipe.unet)


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

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise InputTypeError(
            f"parallelize: {type(pipe).__name__} has no UNet2DConditionModel 'unet'; distripy parallelises "
            "UNet pipelines (StableDiffusionXLPipeline, StableDiffusionPipeline and their img2img variants)"
        )
    if getattr(pipe, _COMM_ATTRIBUTE, None) is not None:
        raise InputError("parallelize: this pipeline is already patch-parallel")
    parallelize_unet(pipe.unet, config)
    if config.world_size == 1:
        return pipe
    comm = require_installed_forward(pipe.unet).world_comm
    if isinstance(getattr(pipe, "vae", None), AutoencoderKL):
        parallelize_vae(pipe.vae, config, comm)
    pipe.__class__ = _parallel_class(type(pipe))
    setattr(pipe, _COMM_ATTRIBUTE, comm)
    if comm.rank != 0:
        pipe.set_progress_bar_config(disable=True)
    return pipe
