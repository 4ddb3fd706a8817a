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
The pipelines accepted are ``SUPPORTED_PIPELINES`` (SD and SDXL text-to-image, img2img, the SDXL
refiner, inpainting, ControlNet in each of those, and what ``AutoPipelineFor*`` make of them): a
``UNet2DConditionModel`` called once per step with the whole latent. A pipeline's ControlNets run
on bands too (``pipelines.controlnet``), sharing the UNet's communicators, and are reset with it
at every call. Models that are patch-parallel already (a pipeline made by ``from_pipe`` of a
parallelised one shares them) are kept as they are.
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
from distripy.pipelines.controlnet import controlnets_of, parallelize_controlnet
from distripy.pipelines.swap import adapter_state
from distripy.pipelines.unet import installed_forward, parallelize_unet, require_installed_forward, reset_unet
from distripy.pipelines.vae import decoder_forward, parallelize_vae, vae_is_parallel

__all__ = [
    "SUPPORTED_PIPELINES",
    "denoisers",
    "denoising_steps",
    "parallelize_pipeline",
    "set_alone",
    "shared_seed",
]

SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLControlNetInpaintPipeline",
)
"""The diffusers pipelines (and their subclasses) ``parallelize`` accepts: those whose denoiser is
a ``UNet2DConditionModel`` called once per step on the whole latent, tested against one device
(``AutoPipelineFor*`` make these; the SDXL refiner is ``StableDiffusionXLImg2ImgPipeline``)."""

_COMM_ATTRIBUTE = "_distripy_comm"
_ALONE_ATTRIBUTE = "_distripy_alone"


def shared_seed(comm) -> int:
    """A seed drawn by the comm's first rank, the same on every rank."""
    seed = random.SystemRandom().randrange(2**63) if comm.rank == 0 else None
    return int(comm.all_gather_object(seed)[0])


def _lora_state(pipe) -> Optional[str]:
    """A digest of the LoRA adapters active in the pipeline's models and their scales (PEFT
    layers keep them per layer), or None without any."""
    entries = [
        (component, adapter_state(model))
        for component, model in pipe.components.items()
        if isinstance(model, torch.nn.Module)
    ]
    entries = [entry for entry in entries if entry[1]]
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
    if not getattr(pipe, _ALONE_ATTRIBUTE, False):  # alone, the call is this rank's own
        agree(comm, _call_description(pipe, bound.arguments), None, what="pipeline call")
        if bound.arguments.get("generator") is None and bound.arguments.get("latents") is None:
            bound.arguments["generator"] = torch.Generator().manual_seed(shared_seed(comm))
    steps = denoising_steps(signature, bound.arguments)
    models = denoisers(pipe)
    for model in models:
        reset_unet(model, steps)
    try:
        return original(*bound.args, **bound.kwargs)
    finally:
        for model in models:
            reset_unet(model)


def set_alone(model, alone: bool) -> bool:
    """Make a parallelised pipeline (its UNet, ControlNets and VAE decoder, and the call's checks)
    or model run its next calls on this rank by itself (``alone``), or on every rank again; their
    current generations end. Returns whether anything here is parallel (False: a model on one rank,
    which is alone anyway)."""
    parts = [model]
    if not isinstance(model, torch.nn.Module) and getattr(model, "unet", None) is not None:
        parts = denoisers(model) + [getattr(model, "vae", None)]
        if getattr(model, _COMM_ATTRIBUTE, None) is not None:
            setattr(model, _ALONE_ATTRIBUTE, alone)
    found = False
    for part in parts:
        forward = installed_forward(part) if part is not None else None
        if forward is not None:
            forward.reset(forward.steps)
            forward.alone = alone
            found = True
        decoder = decoder_forward(part) if part is not None else None
        if decoder is not None:
            decoder.alone = alone
            found = True
    return found


def denoisers(pipe) -> list:
    """The pipeline's models run once per step: its UNet and its ControlNets."""
    controlnet = getattr(pipe, "controlnet", None)
    return [pipe.unet] + ([] if controlnet is None else controlnets_of(controlnet))


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


def _check_supported(pipe) -> None:
    import diffusers

    supported = tuple(getattr(diffusers, name) for name in SUPPORTED_PIPELINES if hasattr(diffusers, name))
    if not isinstance(pipe, supported):
        raise InputTypeError(
            f"parallelize: {type(pipe).__name__} is not supported (its denoiser is not a "
            "UNet2DConditionModel called once per step on the whole latent, or it is untested); "
            f"supported pipelines: {', '.join(SUPPORTED_PIPELINES)}"
        )


def parallelize_pipeline(pipe, config: DistriConfig):
    """Make ``pipe`` patch-parallel in place and return it (untouched on a single rank). Its models
    that are patch-parallel already (shared by ``from_pipe`` with a parallelised pipeline) are used
    as they are."""
    from diffusers import AutoencoderKL

    _check_supported(pipe)
    if getattr(pipe, _COMM_ATTRIBUTE, None) is not None:
        raise InputError("parallelize: this pipeline is already patch-parallel")
    controlnet = getattr(pipe, "controlnet", None)
    fresh_nets = (
        [] if controlnet is None else [n for n in controlnets_of(controlnet) if installed_forward(n) is None]
    )
    if fresh_nets and len(fresh_nets) != len(controlnets_of(controlnet)):
        raise InputError(
            "parallelize: some of the pipeline's ControlNets are patch-parallel already, some not"
        )
    if installed_forward(pipe.unet) is None:
        parallelize_unet(pipe.unet, config)
    if config.world_size == 1:
        return pipe
    unet_forward = require_installed_forward(pipe.unet)
    comm = unet_forward.world_comm
    if fresh_nets:
        parallelize_controlnet(controlnet, config, comm, unet_forward.patch_comms)
    if isinstance(getattr(pipe, "vae", None), AutoencoderKL) and not vae_is_parallel(pipe.vae):
        parallelize_vae(pipe.vae, config, comm)
    pipe.__class__ = _parallel_class(type(pipe))
    setattr(pipe, _COMM_ATTRIBUTE, comm)
    if comm.rank != 0:
        pipe.set_progress_bar_config(disable=True)
    return pipe
