"""``GenerationRequest``: one image request, as ``distripy generate`` and an ``Engine`` both make
it, and the names its LoRAs get as adapters.

A LoRA's adapter is named by its file's path (resolved by ``application.checks``), not by the
order it was loaded in: ranks that ran different requests alone must still name the same adapter
alike (the ranks compare the active adapters), and the command and the server load a file under
the same name. A file named twice in one request is loaded twice, the second as ``<name>_2``.
"""

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from distripy.errors import InputError

__all__ = ["GenerationRequest", "REFINER_START", "RESERVED_ARGUMENTS", "TIMESTEP_SPACINGS", "adapter_names"]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
REFINER_START = 0.8
"""The fraction of the steps after which the refiner takes over, unless a request says."""

RESERVED_ARGUMENTS = (
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "generator", "height",
    "width", "image", "control_image", "mask_image", "strength", "denoising_start", "denoising_end",
    "callback_on_step_end",
)  # fmt: skip
"""Pipeline arguments a request sets from its own fields (``extra`` may not name them)."""

Image = Any  # a PIL image, or the path of an image file

_CALL_NAMES = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "height": "height", "width": "width",
    "num_inference_steps": "steps", "guidance_scale": "guidance", "mask_image": "mask_image",
    "strength": "strength",
}  # fmt: skip
"""A pipeline call's argument -> the request's field."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What one call generates (``application.checks.check_request`` validates it, naming any
    bad value). ``steps`` / ``guidance`` / ``height`` / ``width``: None for the pipeline's own
    (a start image's size for img2img). ``seed``: None to let rank 0 draw one. ``scheduler``: a
    name of ``pipelines.schedulers.SCHEDULERS``; ``timestep_spacing``: one of
    ``TIMESTEP_SPACINGS`` or the scheduler's own. ``loras``: ``(path, scale)`` pairs active for
    this request. ``control_images``: one per ControlNet of the spec; ``init_image`` (img2img),
    with ``mask_image`` (inpainting, white repainted) and ``strength``. ``refiner_start``: where
    the spec's refiner takes over (default ``REFINER_START``). ``mode`` / ``warmup_steps``: this
    request's (default: the spec's config). ``extra``: other arguments of the pipeline's call,
    passed as they are (``output_type``: the images' kind, PIL by default)."""

    prompt: Union[str, Sequence[str], None] = None
    negative_prompt: Union[str, Sequence[str], None] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    scheduler: str = "default"
    timestep_spacing: Optional[str] = None
    loras: Tuple[Tuple[str, float], ...] = ()
    control_images: Tuple[Image, ...] = ()
    init_image: Optional[Image] = None
    mask_image: Optional[Image] = None
    strength: Optional[float] = None
    refiner_start: Optional[float] = None
    mode: Optional[str] = None
    warmup_steps: Optional[int] = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of_call(cls, arguments: Mapping[str, Any], **fields: Any) -> "GenerationRequest":
        """A request from a pipeline call's ``arguments`` under diffusers' names (``prompt``,
        ``negative_prompt``, ``height``, ``width``, ``num_inference_steps``, ``guidance_scale``,
        ``mask_image``, ``strength``; any other is passed on as ``extra``) and the request's own
        ``fields``. ``control_images`` may be one image."""
        extra = dict(arguments)
        for name in ("image", "control_image"):
            if name in extra:
                raise InputError(
                    f"{name}: give a start image as init_image (img2img, inpainting) and ControlNet "
                    "conditions as control_images"
                )
        for name, field in _CALL_NAMES.items():
            if name in extra:
                if fields.get(field) is not None:
                    raise InputError(f"{name} and {field}: the same value, given twice")
                fields[field] = extra.pop(name)
        controls = fields.get("control_images")
        if controls is not None:
            single = isinstance(controls, (str, Path)) or hasattr(controls, "convert")
            fields["control_images"] = (controls,) if single else tuple(controls)
        if fields.get("loras") is not None:
            fields["loras"] = tuple(
                tuple(entry) if isinstance(entry, list) else entry for entry in fields["loras"]
            )
        fields = {name: value for name, value in fields.items() if value is not None}
        return cls(extra=extra, **fields)

    @property
    def task(self) -> Tuple[str, bool]:
        """(``text2img`` | ``img2img`` | ``inpaint``, with ControlNets)."""
        kind = (
            "inpaint"
            if self.mask_image is not None
            else "img2img"
            if self.init_image is not None
            else "text2img"
        )
        return kind, bool(self.control_images)

    def speed_key(self) -> Tuple:
        """What its speed depends on: height, width, steps, images per prompt."""
        return (self.height, self.width, self.steps, self.extra.get("num_images_per_prompt"))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values (images as paths only)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in ("init_image", "mask_image"):
            if values[name] is not None:
                values[name] = str(values[name])
        values.update(
            loras=[[path, scale] for path, scale in self.loras],
            control_images=[str(image) for image in self.control_images],
            extra=dict(self.extra),
        )
        return values

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "GenerationRequest":
        values = dict(values)
        values["loras"] = tuple((str(path), float(scale)) for path, scale in values.get("loras", ()))
        values["control_images"] = tuple(values.get("control_images", ()))
        return cls(**values)


def adapter_name(path: Union[str, Path]) -> str:
    """The adapter a LoRA file is loaded as: named by its path."""
    return "lora_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]


def adapter_names(loras: Sequence[Tuple[str, float]]) -> List[Tuple[str, str]]:
    """``(adapter name, path)`` for each of a request's LoRAs, in order (module docstring)."""
    seen: Dict[str, int] = {}
    names = []
    for path, _ in loras:
        seen[path] = seen.get(path, 0) + 1
        suffix = "" if seen[path] == 1 else f"_{seen[path]}"
        names.append((adapter_name(path) + suffix, path))
    return names
