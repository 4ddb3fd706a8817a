"""What users call: ``parallelize`` (dispatch on the model's type) and ``unparallelize``,
``reset`` and ``generation`` (declaring a bare model's generations), ``alone``, ``reconfigure``,
``patch_context``, ``choose_mode`` (what ``mode="auto"`` runs for a number of steps) and ``plan``.

``parallelize`` makes a diffusers model patch-parallel by swapping its modules in place (their
weights are shared, not copied); ``distripy.pipelines`` holds how, for each kind of model.
"""

import contextlib
import dataclasses
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch.nn as nn

from distripy.config import EXCHANGE_CODECS, DistriConfig
from distripy.errors import InputTypeError
from distripy.parallel.context import PatchContext
from distripy.parallel.policy import ModeChoice, QualityWarning, choose_mode, warn_if_error_grows
from distripy.pipelines import parallelize_controlnet, parallelize_pipeline, parallelize_unet, parallelize_vae
from distripy.pipelines.generation import check_generation, declare
from distripy.pipelines.pipeline import denoisers, set_alone, unparallelize_pipeline
from distripy.pipelines.registry import uninstall
from distripy.pipelines.unet import installed_forward, require_installed_forward
from distripy.parallel.policy import check_steps
from distripy.planning import Plan, plan_configurations

__all__ = [
    "ModeChoice",
    "QualityWarning",
    "alone",
    "choose_mode",
    "generation",
    "parallelize",
    "patch_context",
    "plan",
    "reconfigure",
    "reset",
    "unparallelize",
]


def parallelize(model, config: Optional[DistriConfig] = None, *, comm=None):
    """Make ``model`` patch-parallel over the ranks of torch.distributed, in place, and return it.
    Every rank must call this, in the same order. On a single rank the model is returned untouched.

    ``model``: a diffusers ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL configurations, the SDXL
    refiner's); a ``ControlNetModel`` or ``MultiControlNetModel`` (each rank computes its band of
    the residuals, which its UNet band takes as they are); an ``AutoencoderKL`` (its decoder
    decodes bands, exactly); or a pipeline holding them (``pipelines.pipeline.SUPPORTED_PIPELINES``:
    SD and SDXL text-to-image, img2img, inpainting, ControlNet, and what ``AutoPipelineFor*``
    make of them), whose calls then give every rank the same images (see ``distripy.pipelines``).
    LoRA adapters (PEFT) and IP-Adapters may be loaded, switched, fused and unloaded before or after
    this: each declared generation (a pipeline call, ``reset``, ``generation``) starts by swapping in
    what was loaded since. ``unparallelize`` undoes it all.

    ``comm``: for a UNet, a ``Comm`` of all ranks to use instead of torch.distributed's, e.g.
    ``LoopbackComm(rank, world_size)`` to run one rank's share of an N-way split in this process
    alone (what ``bench/e2e.py`` measures); with ``split_batch`` it must provide ``subgroup``.

    Before anything is changed the whole model is checked; a spatial module whose band-wise result
    would not be exact is refused (``UnsupportedModuleError``) with its module path.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    config = DistriConfig() if config is None else config
    if not isinstance(config, DistriConfig):
        raise InputTypeError(f"parallelize: config must be a DistriConfig, got {type(config).__name__}")
    if comm is not None and not isinstance(model, UNet2DConditionModel):
        raise InputTypeError(
            f"parallelize: comm= is accepted for a UNet2DConditionModel only, got {type(model).__name__}"
        )
    if isinstance(model, DiffusionPipeline):
        return parallelize_pipeline(model, config)
    if isinstance(model, AutoencoderKL):
        return parallelize_vae(model, config)
    if isinstance(model, UNet2DConditionModel):
        return parallelize_unet(model, config, comm)
    if isinstance(model, (ControlNetModel, MultiControlNetModel)):
        return parallelize_controlnet(model, config)
    raise InputTypeError(
        "parallelize: expected a diffusers UNet2DConditionModel, AutoencoderKL or pipeline, got "
        f"{type(model).__name__} (a ControlNetModel or MultiControlNetModel is accepted too)"
    )


def _parts(model) -> list:
    """A pipeline's denoisers (its UNet and ControlNets), or the model itself."""
    if getattr(model, "unet", None) is not None and not isinstance(model, nn.Module):
        return denoisers(model)
    return [model]


def reset(model, steps: Optional[int] = None) -> None:
    """End the current generation and declare the next: wait for the transfers its last step
    issued and forget every stale buffer; take in what was loaded into the model since (a LoRA's
    layers, re-created attention processors). Call it before each image of a bare-UNet loop (or use
    ``distripy.generation``) and before tearing down torch.distributed; a parallelised pipeline
    declares its generations itself, at every call. A single-rank model (returned untouched by
    ``parallelize``) has nothing to reset; a pipeline resets its UNet and its ControlNets.

    ``steps``: the number of denoising steps of the generation, from which ``mode="auto"`` picks
    the mode and warm-up (``choose_mode``). Without it, ``auto`` runs ``corrected_async_gn`` with
    ``DistriConfig.warmup_steps``. The generation's first step checks, with every rank, that all
    were given the same input and models."""
    check_steps(steps)
    for part in _parts(model):
        declare(part, steps)


@contextlib.contextmanager
def generation(model, steps: Optional[int] = None) -> Iterator[None]:
    """``with distripy.generation(unet, steps=n):`` around a bare-UNet loop's ``n`` steps of one
    image: declares the generation on entering (``reset(model, steps)``) and ends it on leaving
    (its last transfers waited for), so that the loop's timesteps are never needed to tell where
    an image begins. A block that ends normally checks the generation with every rank (a
    compressed exchange that met non-finite keys or values raises ``StepError``)."""
    reset(model, steps)
    try:
        yield
        for part in _parts(model):  # the block ended on every rank: the generation is checked
            check_generation(part)
    finally:
        reset(model)


def unparallelize(model):
    """Undo ``parallelize`` on a model or pipeline, in place, and return it: every swapped module,
    attention processor, forward, hook and class as it was, the transfers in flight waited for and
    the captured CUDA graphs dropped. The model computes and saves (``state_dict``) exactly as one
    never parallelised; it may be parallelised again. Nothing to undo on a model that was not
    parallelised (a single rank's), which is returned as it is."""
    if getattr(model, "unet", None) is not None and not isinstance(model, nn.Module):
        parts = denoisers(model) + [getattr(model, "vae", None)]
        for part in parts:
            if part is not None:
                uninstall(part)
        unparallelize_pipeline(model)
        return model
    nets = getattr(model, "nets", None)  # a MultiControlNetModel
    for part in list(nets) if nets is not None else [model]:
        uninstall(part)
    return model


@contextlib.contextmanager
def alone(model) -> Iterator[None]:
    """Inside ``with distripy.alone(model):`` a parallelised pipeline (or UNet, ControlNet, VAE)
    runs each call on this rank by itself: the whole image as one band, no transfer, no check that
    the ranks were called alike, no shared seed. Each rank may then run a different request at the
    same time (``Engine``'s ``throughput`` policy: N images at once instead of one N times faster).
    The result is the single-device model's. Nothing is re-created: the communicators stay, and
    the generation in progress ends on entering and on leaving (with CUDA graphs, the whole-image
    steps are captured as shapes of their own). A model on one rank is alone anyway."""
    set_alone(model, True)
    try:
        yield
    finally:
        set_alone(model, False)


def reconfigure(model, mode: Optional[str] = None, warmup_steps: Optional[int] = None) -> None:
    """Change the mode and warm-up a parallelised model (or pipeline: its UNet and ControlNets)
    runs from its next generation on, without parallelising it again (a served pipeline switches
    per request). The other settings are fixed at ``parallelize`` (the split, the communicators,
    the kernels). Every rank must make the same change: the ranks compare each generation's
    configuration. Ends the current generation (``reset``)."""
    models = _parts(model)
    forwards = [forward for forward in map(installed_forward, models) if forward is not None]
    changes = {
        name: value for name, value in (("mode", mode), ("warmup_steps", warmup_steps)) if value is not None
    }
    for forward in forwards:  # validated (DistriConfig checks) before any model changes
        changed = dataclasses.replace(forward.context.config, **changes)
    if mode is not None and forwards:
        warn_if_error_grows(changed.mode)
    for part, forward in zip(models, map(installed_forward, models)):
        if forward is not None:
            forward.context.config = dataclasses.replace(forward.context.config, **changes)
            declare(part, forward.steps)


def patch_context(model) -> PatchContext:
    """The ``PatchContext`` of a parallelised UNet (its step, band geometry and mode)."""
    return require_installed_forward(model).context


def plan(
    gpus: int,
    size: Union[int, Tuple[int, int]],
    steps: int = 50,
    *,
    fabric=None,
    gpu=None,
    guidance: bool = True,
    compress: Union[str, Sequence[str]] = ("none",),
    memory: Optional[float] = None,
) -> Plan:
    """The configurations of up to ``gpus`` GPUs for one image of ``size`` (pixels: a side, or
    (height, width)) in ``steps`` steps, ranked by predicted latency, and the one to use
    (``Plan.recommended``; ``Plan.table()``, ``Plan.as_dict()``).

    ``fabric``: ``"nvlink4"`` (default), ``"nvlink3"``, ``"pcie5"``, ``"pcie4"``, or a
    ``bench/comm.py`` JSON file measured on the machine; ``gpu``: ``"h100"`` (default),
    ``"a100"``, ``"l40"``, or a ``bench/e2e.py`` JSON file. ``guidance``: classifier-free guidance
    (a batch of 2 per UNet call, which the CFG split can share). The modes compared are what
    ``mode="auto"`` runs for ``steps`` (``choose_mode``) and the two that equal one GPU (``exact``,
    ``full_sync``). The model and its built-in numbers are described in ``distripy.planning``;
    ``Plan.assumptions`` lists the ones a measured file did not replace. ``compress``: the
    ``DistriConfig.compress`` settings to compare for the asynchronous mode: names, one string
    of them comma-separated, or ``"all"``. ``memory``: each GPU's memory in GiB (a "24 GB" card:
    24): the configurations whose fullest GPU's predicted peak exceeds it are left out
    (``Plan.left_out``; each prediction's ``memory`` says what a rank holds:
    ``distripy.planning.memory``)."""
    if isinstance(compress, str):
        compress = EXCHANGE_CODECS if compress == "all" else tuple(compress.split(","))
    height, width = (size, size) if isinstance(size, int) else size
    choice = choose_mode(DistriConfig(), steps)
    auto = choice.mode if choice.mode in ("exact", "full_sync") else "corrected_async_gn"
    modes = [(auto, choice.warmup_steps), ("exact", 0), ("full_sync", 0)]
    return plan_configurations(
        gpus, (height, width), steps, modes, fabric=fabric, gpu=gpu, batch=2 if guidance else 1, compress=compress,
        memory_gib=memory,
    )  # fmt: skip
