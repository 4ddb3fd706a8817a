"""What can be checked before any rank starts, checked once, in one process: the model folder and
its weights (each safetensors header is opened, which finds a missing or truncated download), the
ControlNet and refiner folders, the LoRA files, the images and their sizes, the sizes for N ranks
(``geometry.BandGeometry``), the world against the GPUs present.

``distripy generate`` runs these in the launching process and hands the checked spec and request
to its ranks, which do not check again; an ``Engine`` runs them in its caller's process. Every
message names the bad value, under the caller's name for it (``labels``: the command's flags,
e.g. ``--lora``, or the Engine's argument names, the default), and raises ``CheckError``.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

from distripy.application.request import RESERVED_ARGUMENTS, TIMESTEP_SPACINGS, GenerationRequest
from distripy.application.spec import PipelineSpec
from distripy.config import MODE_CHOICES
from distripy.errors import BandGeometryError, InputError
from distripy.geometry import BandGeometry, bands_per_image

__all__ = [
    "CheckError",
    "SpecFacts",
    "check_request",
    "check_size",
    "check_spec",
    "check_world",
    "gpu_count",
    "image_size",
    "lora_file",
]

NO_LABELS: Mapping[str, str] = {}


class CheckError(InputError):
    """A bad input found before anything runs; its message names the value (the command prints it
    as one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class SpecFacts:
    """What checking a spec learned (None for a model factory, known only once loaded)."""

    geometry: Optional[BandGeometry] = None
    class_name: str = ""
    refiner_geometry: Optional[BandGeometry] = None


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as error:
        raise CheckError(f"{what}: {path} is not valid JSON ({error})") from None


def _check_weights(folder: Path, names, what: str) -> None:
    """Every model ``names`` of ``folder`` (a subfolder with a ``config.json``; tokenizers and
    schedulers have none) has weights, and its safetensors headers open."""
    from safetensors import SafetensorError, safe_open

    for name in names:
        component = folder / name
        if name.startswith("_") or not (component / "config.json").is_file():
            continue
        weights = sorted(p for p in component.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not weights:
            raise CheckError(f"{what}: {name}/ has a config.json but no weights (.safetensors or .bin)")
        for path in weights:
            if path.suffix != ".safetensors":
                continue
            try:
                with safe_open(str(path), "pt"):
                    pass
            except (SafetensorError, OSError) as error:
                raise CheckError(f"{what}: {name}/{path.name} is unreadable ({error})") from None


def _pipeline_folder(folder: Path, what: str) -> Tuple[BandGeometry, str]:
    """A diffusers pipeline folder with a UNet: its band geometry and class name."""
    if not folder.is_dir():
        raise CheckError(f"{what}: no such folder (a local diffusers pipeline folder is needed)")
    if not (folder / "model_index.json").is_file():
        raise CheckError(f"{what}: no model_index.json (not a diffusers pipeline folder)")
    index = _read_json(folder / "model_index.json", what)
    if "unet" not in index:
        raise CheckError(f"{what}: model_index.json names no 'unet' (a UNet pipeline is needed)")
    _check_weights(folder, index, what)
    unet = _read_json(folder / "unet" / "config.json", what)
    vae = _read_json(folder / "vae" / "config.json", what) if "vae" in index else None
    try:
        geometry = BandGeometry.from_configs(unet, vae)
    except InputError as error:
        raise CheckError(f"{what}: unet/config.json is malformed ({error})") from None
    return geometry, str(index.get("_class_name", ""))


def _component_folder(folder: Path, what: str) -> None:
    """A model folder (``config.json`` and readable weights), as ``ControlNetModel`` saves one."""
    if not folder.is_dir():
        raise CheckError(f"{what}: no such folder")
    _read_json(folder / "config.json", what)
    _check_weights(folder.parent, [folder.name], what)


def lora_file(path, what: str) -> str:
    """The ``.safetensors`` a LoRA path names (itself, or the one file in its folder), resolved:
    the path its adapter is named by (``request.adapter_name``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return str(path.resolve())
    found = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if len(found) != 1:
        problem = "no such file or folder" if not path.exists() else f"{len(found)} .safetensors files in it"
        raise CheckError(f"{what}: {problem} (a LoRA .safetensors, or a folder with one)")
    return str(found[0].resolve())


def _shown(image: Any) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>"


def image_size(image: Any, what: str) -> Tuple[int, int]:
    """(width, height) of a PIL image, or of an image file (read from its header)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, (str, Path)):
        if not isinstance(image, Image.Image):
            raise CheckError(f"{what}: must be a PIL image or an image file's path")
        return image.size
    if not Path(image).is_file():
        raise CheckError(f"{what}: no such file")
    try:
        with Image.open(image) as opened:
            return opened.size
    except (UnidentifiedImageError, OSError) as error:
        raise CheckError(f"{what}: not an image ({error})") from None


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_world(world: int, label: str = "nproc") -> None:
    """``world`` ranks: at least one, and no more than the GPUs present (when there are any)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CheckError(f"{label} {world}: needs at least 1")
    gpus = gpu_count()
    if gpus and world > gpus:
        raise CheckError(f"{label} {world}: only {gpus} GPUs are present")


def check_spec(spec: PipelineSpec, labels: Mapping[str, str] = NO_LABELS) -> Tuple[PipelineSpec, SpecFacts]:
    """The spec's folders and files; returns it checked (LoRA files resolved) and what was
    learned. A spec checked already is returned as it is."""
    if spec.checked:
        return spec, SpecFacts()

    def label(name: str) -> str:
        return labels.get(name, name)

    facts = SpecFacts()
    if spec.folder is not None:
        geometry, class_name = _pipeline_folder(spec.folder, f"{label('model')} {spec.model}")
        facts = SpecFacts(geometry, class_name)
    for folder in spec.controlnets:
        _component_folder(Path(folder), f"{label('controlnets')} {folder}")
    if spec.refiner is not None:
        what = f"{label('refiner')} {spec.refiner}"
        refiner_geometry, _ = _pipeline_folder(Path(spec.refiner), what)
        if spec.folder is not None and not facts.class_name.startswith("StableDiffusionXL"):
            raise CheckError(f"{what}: refines an SDXL model; {label('model')} is a {facts.class_name}")
        facts = dataclasses.replace(facts, refiner_geometry=refiner_geometry)
    loras = tuple(lora_file(path, f"{label('loras')} {path}") for path in spec.loras)
    return dataclasses.replace(spec, loras=loras, checked=True), facts


def _number(request: GenerationRequest, name: str, label, integer: bool, low=None) -> None:
    value = getattr(request, name)
    if value is None:
        return
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise CheckError(f"{label(name)} {value!r}: must be {'an integer' if integer else 'a number'}")
    if low is not None and value < low:
        raise CheckError(f"{label(name)} {value}: too small")


def _check_fields(request: GenerationRequest, label) -> None:
    """The request's fields by themselves."""
    from distripy.pipelines.schedulers import SCHEDULERS

    if request.scheduler not in SCHEDULERS:
        raise CheckError(
            f"{label('scheduler')} {request.scheduler}: unknown; use one of {', '.join(SCHEDULERS)}"
        )
    if request.timestep_spacing is not None and request.timestep_spacing not in TIMESTEP_SPACINGS:
        raise CheckError(
            f"{label('timestep_spacing')} {request.timestep_spacing}: use one of {', '.join(TIMESTEP_SPACINGS)}"
        )
    if request.mode is not None and request.mode not in MODE_CHOICES:
        raise CheckError(f"{label('mode')} {request.mode!r}: not one of {', '.join(MODE_CHOICES)}")
    for name, integer, low in (("steps", True, 1), ("warmup_steps", True, 0), ("seed", True, 0),
                               ("height", True, 1), ("width", True, 1), ("guidance", False, None)):  # fmt: skip
        _number(request, name, label, integer, low)
    for name in ("prompt", "negative_prompt"):
        value = getattr(request, name)
        texts = [value] if isinstance(value, str) or value is None else value
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) or t is None for t in texts):
            raise CheckError(f"{label(name)} {value!r}: must be a string or a list of strings")
    if not isinstance(request.extra, Mapping):
        raise CheckError(f"extra {request.extra!r}: must be a mapping of the pipeline's arguments")
    reserved = sorted(set(request.extra) & set(RESERVED_ARGUMENTS))
    if reserved:
        raise CheckError(f"{reserved[0]}: set by the request's own fields, not as an extra argument")


def _images_size(request: GenerationRequest, label, default_size: Optional[int]) -> Tuple[Any, Any]:
    """The request's (width, height): its own, else the start image's (img2img keeps it), else
    ``default_size``; every image exists and has that size."""
    images = [("init_image", request.init_image)] if request.init_image is not None else []
    images += [("control_images", image) for image in request.control_images]
    images += [("mask_image", request.mask_image)] if request.mask_image is not None else []
    sizes = [(name, image, image_size(image, f"{label(name)} {_shown(image)}")) for name, image in images]
    start = sizes[0][2] if request.init_image is not None else None
    width = request.width or (start[0] if start else default_size)
    height = request.height or (start[1] if start else default_size)
    for name, image, size in sizes:
        if width is not None and height is not None and size != (width, height):
            raise CheckError(
                f"{label(name)} {_shown(image)}: {size[0]}x{size[1]} pixels, but the image is "
                f"{width}x{height} ({label('width')} x {label('height')}); resize it or set those"
            )
    return width, height


def _lora_files(request: GenerationRequest, label) -> Tuple[Tuple[str, float], ...]:
    loras = []
    for entry in request.loras:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise CheckError(f"{label('loras')} {entry!r}: must be a (path, scale) pair")
        path, scale = entry
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise CheckError(f"{label('loras')} {path}: scale {scale!r} must be a number")
        loras.append((lora_file(path, f"{label('loras')} {path}"), float(scale)))
    return tuple(loras)


def check_request(
    request: GenerationRequest,
    spec: PipelineSpec,
    labels: Mapping[str, str] = NO_LABELS,
    default_size: Optional[int] = None,
    controls_required: bool = False,
) -> GenerationRequest:
    """The request for ``spec``'s pipeline: its values, images, LoRA files and refiner settings.
    Returns it with the LoRA files resolved and, where it names none, the size set: the start
    image's (img2img keeps it), else ``default_size``. ``controls_required``: a spec with
    ControlNets needs their images (else a request without any runs the plain pipeline)."""

    def label(name: str) -> str:
        return labels.get(name, name)

    _check_fields(request, label)
    controls = len(request.control_images)
    if len(spec.controlnets) != controls and (controls or controls_required):
        raise CheckError(
            f"{label('controlnets')} given {len(spec.controlnets)} times and {label('control_images')} "
            f"{controls}: one condition image per ControlNet"
        )
    if request.mask_image is not None and request.init_image is None:
        raise CheckError(
            f"{label('mask_image')} {_shown(request.mask_image)}: inpainting needs {label('init_image')} too"
        )
    _number(request, "strength", label, False)
    if request.strength is not None:
        if request.init_image is None:
            raise CheckError(f"{label('strength')} {request.strength:g}: only with {label('init_image')}")
        if not 0 < request.strength <= 1:
            raise CheckError(f"{label('strength')} {request.strength:g}: must be in (0, 1]")
    width, height = _images_size(request, label, default_size)
    loras = _lora_files(request, label)
    start = request.refiner_start
    _number(request, "refiner_start", label, False)
    if spec.refiner is not None:
        if request.mask_image is not None or (controls and request.init_image is not None):
            raise CheckError(
                f"{label('refiner')} {spec.refiner}: refines text-to-image, img2img or ControlNet "
                "text-to-image generations (not inpainting, not ControlNet img2img)"
            )
        if start is not None and not 0 < start < 1:
            raise CheckError(f"{label('refiner_start')} {start:g}: must be in (0, 1)")
    elif start is not None:
        raise CheckError(f"{label('refiner_start')} {start:g}: there is no refiner")
    return dataclasses.replace(request, loras=loras, width=width, height=height)


def check_size(
    request: GenerationRequest,
    geometry: BandGeometry,
    world: int,
    split: bool,
    labels: Mapping[str, str] = NO_LABELS,
) -> None:
    """The request's height and width for a model of ``geometry`` on ``world`` ranks (the height
    cut into bands, half as many with the CFG split of a guided call; the width needs whole rows
    at the deepest level)."""
    guided = request.guidance is None or request.guidance > 1.0
    bands = bands_per_image(world, split and guided)
    try:
        geometry.check_side(labels.get("height", "height"), request.height, bands, world)
        geometry.check_side(labels.get("width", "width"), request.width, 1, world)
    except BandGeometryError as error:
        raise CheckError(str(error)) from None
