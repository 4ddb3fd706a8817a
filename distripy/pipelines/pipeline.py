"""``parallelize(pipe)``: a diffusers pipeline whose calls run patch-parallel on every rank.

The pipeline's UNet is retrofitted (``distripy.parallelize``) and its VAE decodes bands
(``pipelines.vae``); the pipeline object stays the same object, of a subclass with the same name
whose ``__call__``

* declares one generation (``parallel.generation.Generation``) for its UNet, ControlNets and VAE
  decoder: its number of steps (``num_inference_steps``, or the length of ``timesteps`` /
  ``sigmas``), from which ``mode="auto"`` picks the mode and warm-up, the machine
  ``split_batch="auto"`` plans for, and whether this rank runs alone; each model first takes in
  what was loaded into it since (``registry.refresh``);
* runs **one** agreement round with every rank, which checks that all of them were called with
  the same arguments (a digest of each: prompts or embeddings, guidance, steps, timesteps, size,
  strength, generator state, latents, images), the same scheduler configuration, the same LoRA
  adapters and scales, the same models and settings, and carries rank 0's seed: without a
  ``generator`` or ``latents`` the ranks would each draw their own noise and make a wrong image,
  so they all use rank 0's. A difference raises ``RankMismatchError`` on every rank, naming the
  arguments and the ranks; the models' own checks then run on each rank without another round;
* at the end waits for the last step's transfers, so consecutive calls may change height, width,
  steps, guidance and batch freely;
* shows the progress bar on rank 0 only.

Every rank gets the same images back; writing them to files is the caller's choice (rank 0 alone).
The pipelines accepted are ``SUPPORTED_PIPELINES`` (SD and SDXL text-to-image, img2img, the SDXL
refiner, inpainting, ControlNet in each of those, and what ``AutoPipelineFor*`` make of them): a
``UNet2DConditionModel`` called once per step with the whole latent. A pipeline's ControlNets run
on bands too (``pipelines.controlnet``), sharing the UNet's communicators, and are reset with it
at every call. Models that are patch-parallel already (a pipeline made by ``from_pipe`` of a
parallelised one shares them) are kept as they are.
"""

import dataclasses
import functools
import hashlib
import inspect
import random
from typing import Any, Dict, Optional

import torch

from distripy.config import DistriConfig
from distripy.errors import InputError, InputTypeError
from distripy.parallel.agreement import agree
from distripy.parallel.digest import digest_arguments
from distripy.parallel.generation import Generation, LoadedState
from distripy.pipelines.controlnet import controlnets_of, parallelize_controlnet
from distripy.pipelines.generation import declare, machine_for, set_alone_model, take_in
from distripy.pipelines.swap import adapter_state, lora_layers
from distripy.pipelines.unet import installed_forward, parallelize_unet, require_installed_forward
from distripy.pipelines.vae import parallelize_vae, vae_is_parallel

__all__ = [
    "SUPPORTED_PIPELINES",
    "denoisers",
    "PipelineRecord",
    "denoising_steps",
    "parallelize_pipeline",
    "pipeline_record",
    "set_alone",
    "shared_seed",
    "unparallelize_pipeline",
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

_ATTRIBUTE = "_distripy_pipeline"


@dataclasses.dataclass
class PipelineRecord:
    """What ``parallelize`` did to a pipeline: its class before, the comm of its ranks, and the LoRA
    layers found in its models (by component: the adapters PEFT had
    recorded on it then, and its layers), walked again only when those adapters change."""

    original_class: type
    comm: Any
    progress_bar_config: Optional[dict] = None  # before parallelize changed it (rank > 0)
    adapters: Dict[str, tuple] = dataclasses.field(default_factory=dict)


def pipeline_record(pipe) -> Optional[PipelineRecord]:
    """The record of a parallelised pipeline, or None."""
    return pipe.__dict__.get(_ATTRIBUTE) if hasattr(pipe, "__dict__") else None


def shared_seed(comm) -> int:
    """A seed drawn by the comm's first rank, the same on every rank."""
    seed = random.SystemRandom().randrange(2**63) if comm.rank == 0 else None
    return int(comm.all_gather_object(seed)[0])


def _lora_state(pipe, record: PipelineRecord) -> Optional[str]:
    """A digest of the LoRA adapters active in the pipeline's models and their scales (PEFT
    layers keep them per layer), or None without any."""
    entries = []
    for component, model in pipe.components.items():
        if not isinstance(model, torch.nn.Module):
            continue
        loaded = LoadedState.adapters_of(model)
        known = record.adapters.get(component)
        if known is None or known[0] != loaded or known[1] is not model:
            known = record.adapters[component] = (loaded, model, lora_layers(model))
        state = adapter_state(model, known[2])
        if state:
            entries.append((component, state))
    return hashlib.sha256(repr(entries).encode()).hexdigest() if entries else None


def _call_description(pipe, arguments, record: PipelineRecord) -> dict:
    """What decides the image, per name: every argument of the call (prompts or their embeddings,
    guidance, steps, timesteps, size, strength, generator state, latents, images, kwargs), the
    scheduler and its configuration, the active LoRA adapters and scales."""
    described = {name: value for name, value in arguments.items() if name != "self"}
    # Private entries are bookkeeping (``_use_default_values`` lists a set, in hash order).
    settings = {key: value for key, value in pipe.scheduler.config.items() if not key.startswith("_")}
    described["scheduler"] = (type(pipe.scheduler).__name__, settings)
    described["lora"] = _lora_state(pipe, record)
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
    record = pipeline_record(pipe)
    steps = denoising_steps(signature, bound.arguments)
    models = denoisers(pipe)
    forwards = [require_installed_forward(model) for model in models]
    taken = [take_in(model) for model in models]  # what was loaded since: (state, problem) each
    problem = next((problem for _, problem in taken if problem is not None), None)
    machine = machine_for(pipe.unet)
    alone = forwards[0].alone  # ``distripy.alone`` is a setting of the models' generations only
    if alone:  # the call is this rank's own: nothing to agree on
        if problem is not None:
            raise problem[0](problem[1])
    else:
        description = None
        if problem is None:
            description = dict(
                _call_description(pipe, bound.arguments, record),
                models=tuple(state for state, _ in taken),
                settings=tuple(
                    (
                        f.context.config.mode,
                        f.context.config.warmup_steps,
                        str(f.context.config.split_batch),
                        f.context.config.compress,
                    )
                    for f in forwards
                ),
                plan=(steps, machine),
            )
        seeded = bound.arguments.get("generator") is None and bound.arguments.get("latents") is None
        seed = random.SystemRandom().randrange(2**63) if seeded and record.comm.rank == 0 else None
        seeds = agree(record.comm, description, problem, what="pipeline call", shared=seed)
        if seeded:
            bound.arguments["generator"] = torch.Generator().manual_seed(int(seeds[0]))
    generation = Generation(steps=steps, alone=alone, agreed=not alone, machine=machine)
    for forward, (state, _) in zip(forwards, taken):
        forward.declare(generation, state)
    vae = getattr(pipe, "vae", None)
    declare(vae, alone=alone, agreed=not alone) if vae is not None else None
    try:
        result = original(*bound.args, **bound.kwargs)
        for forward in forwards:  # the call returned on every rank: its image is checked, together
            forward.check_nonfinite()
        return result
    finally:
        # ended: wait for the last step's transfers; what runs next outside a call is checked again
        for forward in forwards:
            forward.declare(Generation(alone=alone, machine=machine))
        if vae is not None:
            declare(vae, alone=alone)


def set_alone(model, alone: bool) -> bool:
    """Make a parallelised pipeline (its UNet, ControlNets and VAE decoder, and the call's checks)
    or model run its next calls on this rank by itself (``alone``), or on every rank again; their
    current generations end. Returns whether anything here is parallel (False: a model on one rank,
    which is alone anyway)."""
    if isinstance(model, torch.nn.Module) or getattr(model, "unet", None) is None:
        return set_alone_model(model, alone)
    found = [set_alone_model(part, alone) for part in denoisers(model) + [getattr(model, "vae", None)]]
    return any(found)


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
    if pipeline_record(pipe) is not None:
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
    original_class = type(pipe)
    pipe.__class__ = _parallel_class(original_class)
    progress = pipe.__dict__.get("_progress_bar_config")
    pipe.__dict__[_ATTRIBUTE] = PipelineRecord(original_class, comm, None if progress is None else dict(progress))
    if comm.rank != 0:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def unparallelize_pipeline(pipe) -> bool:
    """Undo ``parallelize_pipeline``: the pipeline's class as it was (its models are restored by
    the caller, ``distripy.unparallelize``). False when it was not parallelised."""
    record = pipe.__dict__.pop(_ATTRIBUTE, None)
    if record is None:
        return False
    pipe.__class__ = record.original_class
    if record.progress_bar_config is None:
        pipe.__dict__.pop("_progress_bar_config", None)
    else:
        pipe._progress_bar_config = record.progress_bar_config
    return True
