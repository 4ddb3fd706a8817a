"""The request fields that reach the pipeline beyond a prompt, as ``distripy serve`` reads them:
the start image and its mask (img2img, inpainting), the strength, the ControlNets' condition
images, the LoRAs, the refiner's start, the scheduler and its timestep spacing.

What a request may ask for depends on what the server loaded (``ServedPipeline``): one condition
image per ControlNet, a ``refiner_start`` only with a refiner, and LoRAs only among those the
server was started with. A server loads no file a client names: a LoRA path it was not started
with is refused (a 400 naming it), not loaded. Images arrive in the JSON body as base64 (or
``data:`` URLs) of PNG, JPEG or WebP files; each is checked from its header (format, size)
before its pixels are decoded.
"""

import base64
import binascii
import dataclasses
import io
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from distripy.application import TIMESTEP_SPACINGS, PipelineSpec
from distripy.pipelines.schedulers import SCHEDULERS

__all__ = [
    "IMAGE_FORMATS",
    "BadRequest",
    "RequestImages",
    "choice_field",
    "ServedPipeline",
    "call_arguments",
    "decode_image",
    "image_chars",
    "read_images",
]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""The image files a request may send (as PIL names them)."""


class BadRequest(Exception):
    """A request field the service refuses: a 400 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class ServedPipeline:
    """What a server's pipeline takes beyond a prompt, and what a request that names none gets.

    ``controlnets``: how many ControlNets it loaded (a request gives that many condition images,
    or none for the plain pipeline). ``refiner``: whether it loaded a refiner. ``loras``: every
    name a request may choose a loaded LoRA by (as ``distripy serve --lora`` was given it, and
    its resolved file) -> the resolved file. ``lora_names``: the names an error lists.
    ``default_loras``: ``(file, scale)`` active for a request that names no ``loras``.
    ``scheduler`` / ``timestep_spacing``: a request's unless it names its own (None: the
    pipeline's own)."""

    controlnets: int = 0
    refiner: bool = False
    loras: Mapping[str, str] = dataclasses.field(default_factory=dict)
    lora_names: Tuple[str, ...] = ()
    default_loras: Tuple[Tuple[str, float], ...] = ()
    scheduler: Optional[str] = None
    timestep_spacing: Optional[str] = None

    @classmethod
    def of(
        cls,
        spec: PipelineSpec,
        loras: Optional[Sequence[Tuple[str, float]]] = None,
        scheduler: Optional[str] = None,
        timestep_spacing: Optional[str] = None,
    ) -> "ServedPipeline":
        """What a checked ``spec`` serves. ``loras``: ``(path as given, scale)`` of each of the
        spec's LoRAs, in its order (``distripy serve --lora PATH[:SCALE]``): a request may also
        name them so, and one that names none gets them at these scales. None: the spec's files
        may be named, and none is active unless a request names it (an ``Engine``'s call)."""
        files = tuple(spec.loras)
        names: Dict[str, str] = {path: path for path in files}
        defaults: Tuple[Tuple[str, float], ...] = ()
        shown = files
        if loras is not None:
            given = [str(path) for path, _ in loras]
            names.update(zip(given, files))
            defaults = tuple((path, float(scale)) for path, (_, scale) in zip(files, loras))
            shown = tuple(given)
        return cls(len(spec.controlnets), spec.refiner is not None, names, shown, defaults, scheduler,
                   timestep_spacing)  # fmt: skip

    @property
    def image_fields(self) -> int:
        """How many images a request may send: a start image, its mask, a condition per ControlNet."""
        return 2 + self.controlnets


def _data(field: str, value: Any, which: str) -> bytes:
    """The file's bytes from base64 or a ``data:`` URL (whitespace, as MIME wraps it, allowed)."""
    expected = "must be a base64 PNG, JPEG or WebP image, or a data: URL of one"
    if not isinstance(value, str) or not value:
        raise BadRequest(field, f"{which}{expected}")
    text = value
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadRequest(field, f"{which}a data: URL must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadRequest(field, f"{which}not valid base64 ({error}); {expected}") from None


def decode_image(field: str, value: Any, limit: int, index: Optional[int] = None):
    """The image a field sends (``index``: its place in a list field; ``limit``: the most base64
    characters), opened from its header: its pixels are decoded when converted, after its size is
    checked."""
    from PIL import Image, UnidentifiedImageError

    which = "" if index is None else f"image {index}: "
    if isinstance(value, str) and len(value) > limit:
        raise BadRequest(field, f"{which}{len(value)} characters of base64, over {limit}")
    data = _data(field, value, which)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise BadRequest(field, f"{which}not a PNG, JPEG or WebP image ({error})") from None
    if image.format not in IMAGE_FORMATS:
        raise BadRequest(field, f"{which}a {image.format} image: send PNG, JPEG or WebP")
    return image


def _pixels(field: str, image, mode: str):
    """The image decoded, in ``mode``."""
    try:
        return image.convert(mode)
    except (OSError, ValueError) as error:  # a truncated or corrupt file
        raise BadRequest(field, f"the image cannot be decoded ({error})") from None


def image_chars(body: Mapping[str, Any]) -> int:
    """The characters of the images in ``body`` (its size besides them is limited apart)."""
    values = [body.get("init_image"), body.get("mask_image")]
    controls = body.get("control_images")
    values += controls if isinstance(controls, list) else [controls]
    return sum(len(value) for value in values if isinstance(value, str))


@dataclasses.dataclass
class RequestImages:
    """The images of a request, opened (``read_images``), then checked against its size
    (``call_arguments``)."""

    init_image: Any = None
    mask_image: Any = None
    control_images: Tuple[Any, ...] = ()

    @property
    def start_size(self) -> Optional[Tuple[int, int]]:
        """The start image's (width, height): an img2img request's size unless it names one."""
        return None if self.init_image is None else self.init_image.size


def read_images(body: Mapping[str, Any], served: ServedPipeline, limit: int) -> RequestImages:
    """The request's images, opened and counted (``limit``: base64 characters per image)."""
    fields = RequestImages()
    for name in ("init_image", "mask_image"):
        if body.get(name) is not None:
            setattr(fields, name, decode_image(name, body[name], limit))
    if fields.mask_image is not None and fields.init_image is None:
        raise BadRequest("mask_image", "inpainting needs init_image too (the image to repaint)")
    controls = body.get("control_images")
    if controls is not None and not isinstance(controls, list):
        raise BadRequest("control_images", "must be a list of base64 images, one per ControlNet")
    if controls:
        if len(controls) != served.controlnets:
            loaded = f"{served.controlnets} ControlNet{'s' * (served.controlnets != 1)}"
            raise BadRequest(
                "control_images",
                f"{len(controls)} image{'s' * (len(controls) != 1)}, but the server loaded {loaded}: "
                "one condition image each"
                + (" (distripy serve --controlnet)" if not served.controlnets else ""),
            )
        fields.control_images = tuple(
            decode_image("control_images", value, limit, index) for index, value in enumerate(controls)
        )
    return fields


def _fraction(body: Mapping[str, Any], field: str, top_included: bool) -> Optional[float]:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(field, f"must be a number, got {value!r}")
    if not (0 < value <= 1 if top_included else 0 < value < 1):
        raise BadRequest(field, f"{value} must be in (0, 1{']' if top_included else ')'}")
    return float(value)


def _loras(body: Mapping[str, Any], served: ServedPipeline) -> Tuple[Tuple[str, float], ...]:
    """The request's LoRAs as ``(file, scale)``: among the server's only (module docstring)."""
    if body.get("loras") is None:
        return served.default_loras
    entries = body["loras"]
    shape = 'must be a list of {"path": ..., "scale": ...}'
    if not isinstance(entries, list):
        raise BadRequest("loras", f"{shape}, got {entries!r}")
    scales = dict(served.default_loras)
    chosen: Dict[str, float] = {}
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or set(entry) - {"path", "scale"}
        ):
            raise BadRequest("loras", f"{shape}, got {entry!r}")
        path = served.loras.get(entry["path"])
        if path is None:
            served_names = ", ".join(served.lora_names) if served.lora_names else "none"
            raise BadRequest(
                "loras",
                f"{entry['path']!r} is not a LoRA this server was started with (a server loads no file "
                f"a request names; distripy serve --lora loads them); it serves: {served_names}",
            )
        if path in chosen:
            raise BadRequest("loras", f"{entry['path']!r}: named twice")
        scale = entry.get("scale", scales.get(path, 1.0))
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise BadRequest("loras", f"{entry['path']!r}: scale {scale!r} must be a finite number")
        chosen[path] = float(scale)
    return tuple(chosen.items())


def choice_field(
    body: Mapping[str, Any], field: str, choices: Sequence[str], default: Optional[str] = None
) -> Optional[str]:
    """``body[field]`` if it is one of ``choices`` (``default`` when absent); a 400 naming it otherwise."""
    value = body.get(field)
    if value is None:
        return default
    if value not in choices:
        raise BadRequest(field, f"{value!r} is not one of {', '.join(choices)}")
    return value


def call_arguments(
    body: Mapping[str, Any], served: ServedPipeline, images: RequestImages, width: int, height: int
) -> Dict[str, Any]:
    """The ``Engine`` call's pipeline arguments: each image the request's size (and decoded), the
    strength with a start image, the LoRAs among the server's, the refiner's start with a
    refiner, the scheduler and spacing (the server's defaults where the request names none)."""
    named = [("init_image", "", images.init_image), ("mask_image", "", images.mask_image)]
    named += [("control_images", f"image {i} is ", image) for i, image in enumerate(images.control_images)]
    for field, which, image in named:
        if image is not None and image.size != (width, height):
            raise BadRequest(
                field,
                f"{which}{image.size[0]}x{image.size[1]} pixels, but the request's size is "
                f"{width}x{height}; resize it or ask for its size",
            )
    strength = _fraction(body, "strength", top_included=True)
    if strength is not None and images.init_image is None:
        raise BadRequest("strength", "only with init_image (how much of it to repaint)")
    refiner_start = _fraction(body, "refiner_start", top_included=False)
    if refiner_start is not None and not served.refiner:
        raise BadRequest("refiner_start", "there is no refiner (distripy serve --refiner loads one)")
    if served.refiner and images.mask_image is not None:
        raise BadRequest("mask_image", "the server's refiner refines every image, and not inpainting")
    if served.refiner and images.init_image is not None and images.control_images:
        raise BadRequest(
            "control_images", "the server's refiner refines every image, and not ControlNet img2img"
        )
    return dict(
        init_image=None if images.init_image is None else _pixels("init_image", images.init_image, "RGB"),
        mask_image=None if images.mask_image is None else _pixels("mask_image", images.mask_image, "L"),
        strength=strength,
        control_images=tuple(_pixels("control_images", image, "RGB") for image in images.control_images),
        loras=_loras(body, served),
        refiner_start=refiner_start,
        scheduler=choice_field(body, "scheduler", tuple(SCHEDULERS), served.scheduler),
        timestep_spacing=choice_field(body, "timestep_spacing", TIMESTEP_SPACINGS, served.timestep_spacing),
    )
