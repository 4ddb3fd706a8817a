"""``load(spec)``: the spec's pipeline on this rank's device, parallelised (every rank calls it, in
the same order): the model, the LoRAs the spec names, the ControlNets (with a text-to-image
pipeline of them, so that they are parallelised beside the UNet, sharing its communicators, when
every rank loads), and the SDXL refiner. Nothing is checked here: the spec was
(``application.checks``), once, before the ranks started.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from distripy.application.checks import NO_LABELS, CheckError
from distripy.application.request import adapter_names
from distripy.application.spec import PipelineSpec
from distripy.geometry import BandGeometry

__all__ = ["LoadedPipeline", "RANK_MODULES", "load", "rank_device", "torch_dtype"]

RANK_MODULES = (
    "torch",
    "torch.distributed",
    "distripy.api",
    "distripy.application.generate",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "transformers.models.clip.modeling_clip",
    "transformers.models.clip.tokenization_clip",
)
"""The modules a rank that loads and runs a pipeline imports first (the launcher's ``preload``,
``runtime.distributed.launch_local``): imported once for all ranks where they fork from one
server. A module missing here is imported by the rank itself."""


@dataclasses.dataclass
class LoadedPipeline:
    """What ``load`` made: the model's pipeline and what was loaded beside it, all parallelised."""

    spec: PipelineSpec
    pipe: Any
    """The model's own pipeline."""
    device: Any
    geometry: BandGeometry
    controlnet: Any = None
    """The ControlNet, or the list of them (None without)."""
    controlnet_pipe: Any = None
    """The text-to-image pipeline of the model with the ControlNets (None without)."""
    refiner: Any = None
    adapters: Dict[str, str] = dataclasses.field(default_factory=dict)
    """LoRA adapters loaded: name -> file."""
    progress_bar: bool = False


def rank_device(name: Optional[str] = None):
    """``name``'s device; by default this rank's GPU (``LOCAL_RANK``) when there are GPUs, else
    the CPU."""
    import torch

    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def torch_dtype(name: Optional[str]):
    import torch

    return None if name is None else getattr(torch, name)


def _loaded(what: str, load: Callable[[], Any]) -> Any:
    """``load()``, any failure reported as one line naming ``what``."""
    try:
        return load()
    except Exception as error:  # noqa: BLE001 - any loading failure is reported as one line
        raise CheckError(f"{what}: cannot load it ({type(error).__name__}: {error})") from None


def load_lora(pipe, path: str, name: str, label: str = "loras") -> None:
    """The LoRA file ``path`` into ``pipe``'s models, as adapter ``name``."""
    file = Path(path)
    _loaded(
        f"{label} {path}",
        lambda: pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name),
    )


def load(
    spec: PipelineSpec, progress_bar: bool = False, labels: Mapping[str, str] = NO_LABELS
) -> LoadedPipeline:
    """The spec's pipelines on this rank (module docstring). ``progress_bar``: diffusers' bar on
    rank 0 (a command's); off for a server's ranks."""
    import diffusers

    import distripy

    def label(name: str) -> str:
        return labels.get(name, name)

    device = rank_device(spec.device)
    dtype = torch_dtype(spec.dtype)
    if callable(spec.model):
        pipe = spec.model()
        if dtype is not None:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = _loaded(
            f"{label('model')} {spec.model}",
            lambda: diffusers.DiffusionPipeline.from_pretrained(
                spec.model, torch_dtype=dtype, local_files_only=True
            ),
        )
    dtype = dtype or pipe.unet.dtype
    loaded = LoadedPipeline(spec, pipe, device, BandGeometry.of_pipeline(pipe), progress_bar=progress_bar)
    for name, path in adapter_names([(path, 1.0) for path in spec.loras]):
        load_lora(pipe, path, name, label("loras"))
        loaded.adapters[name] = path
    loaded.pipe = distripy.parallelize(_quiet(pipe.to(device), progress_bar), spec.config)
    if spec.controlnets:
        nets = [
            _loaded(
                f"{label('controlnets')} {folder}",
                lambda f=folder: diffusers.ControlNetModel.from_pretrained(
                    f, torch_dtype=dtype, local_files_only=True
                ),
            ).to(device)
            for folder in spec.controlnets
        ]
        loaded.controlnet = nets[0] if len(nets) == 1 else nets
        with_nets = _loaded(
            f"{label('controlnets')} {spec.controlnets[0]}",
            lambda: diffusers.AutoPipelineForText2Image.from_pipe(loaded.pipe, controlnet=loaded.controlnet),
        )
        loaded.controlnet_pipe = distripy.parallelize(_quiet(with_nets, progress_bar), spec.config)
    if spec.refiner is not None:
        refiner = _loaded(
            f"{label('refiner')} {spec.refiner}",
            lambda: diffusers.AutoPipelineForImage2Image.from_pretrained(
                spec.refiner, torch_dtype=dtype, local_files_only=True
            ),
        )
        loaded.refiner = distripy.parallelize(_quiet(refiner.to(device), progress_bar), spec.config)
    return loaded


def _quiet(pipe, progress_bar: bool):
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe
