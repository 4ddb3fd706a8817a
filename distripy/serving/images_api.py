"""The images-generation request as OpenAI's API and its clients send it, read for an ``Engine``.

``POST /v1/images/generations`` takes every field of the API's request, so that the official
``openai`` client (``client.images.generate(...)``) and code written for it work unchanged, and
the names other image servers use besides. Every field is checked before the request is queued:
a bad one is a 400 that names it (``param``), an unknown one too.

The API's fields, and what each does here:

* ``prompt``: the prompt (required, non-empty).
* ``n``: images per prompt, 1 to ``LIMITS["n"]``.
* ``size``: ``"WIDTHxHEIGHT"`` in pixels, or ``"auto"`` (the model's default square; with an
  ``init_image``, its size); each side a multiple of the UNet's deepest row in pixels and the
  height tall enough for the ranks' bands (``BandGeometry``: a 400 says the sizes that fit).
* ``quality``: a preset of denoising steps, used when the request names no steps: ``low`` 15,
  ``medium`` 30, ``high`` 50, ``xhigh`` 75, ``max`` 100 (``QUALITY_STEPS``); ``auto`` and the
  legacy ``standard`` are ``medium``, the legacy ``hd`` is ``high``. Steps given explicitly win.
  The response's ``quality`` names the preset used (absent when the steps were explicit).
* ``output_format``: ``png`` (the default), ``jpeg`` or ``webp``; ``gif`` and ``svg`` are refused
  (this server makes still raster images), and so are their fields ``frame_count``,
  ``frame_duration_ms`` and ``svg``.
* ``output_compression``: 0-100, for ``jpeg`` and ``webp`` only (a 400 with ``png``): the
  encoder's quality, 100 (the API's default) the least loss, lower values smaller files.
* ``response_format``: ``b64_json`` (the default); ``url`` is refused: this server hosts no
  files.
* ``background``: ``auto`` or ``opaque`` (the images are opaque; the response says so);
  ``transparent`` is refused: the pipeline makes no alpha channel.
* ``stream``: ``false`` only; ``true`` is refused (no streaming: the images come whole, in one
  response). ``partial_images`` (0-3, streaming's) is accepted and ignored.
* ``model``: accepted and ignored: the server serves the one pipeline it loaded.
* ``style`` (``vivid`` / ``natural``), ``moderation`` (``low`` / ``auto``), ``complexity``
  (``low`` / ``medium`` / ``high``): checked against the API's values and ignored: a diffusion
  pipeline has no such setting (describe a style in the prompt), and this server does no
  moderation.
* ``user``, ``safety_identifier``: accepted and ignored but for the response, which echoes the
  effective ``safety_identifier`` (the API's rule: a non-empty ``safety_identifier``, else
  ``user``).

distripy's fields, with the diffusers names beside them (giving a name and its alias with
different values is a 400 naming both):

* ``steps`` or ``num_inference_steps``: denoising steps, 1 to ``LIMITS["steps"]``;
* ``guidance`` or ``guidance_scale``: classifier-free guidance (default 5.0);
* ``width`` / ``height``: the size in pixels, beside (and agreeing with) ``size``;
* ``seed`` (default: drawn by the server, returned in the response's ``distripy.seed``),
  ``negative_prompt``, ``mode``, ``warmup_steps``;
* ``scheduler`` (a name of ``pipelines.schedulers.SCHEDULERS``) and ``timestep_spacing``
  (``leading``, ``trailing`` or ``linspace``): default ``distripy serve --scheduler`` /
  ``--timestep-spacing`` (the pipeline's own unless given).

What ``distripy generate`` takes beside the prompt, for the pipeline the server loaded
(``serving.pipeline_fields``; images are base64 PNG, JPEG or WebP files, or ``data:`` URLs of
them, each at the request's size, up to ``LIMITS["image_bytes"]`` characters):

* ``init_image``: img2img's start image (the request's size, unless it names one, is this
  image's); with ``mask_image`` (white repainted): inpainting; ``strength`` in (0, 1]: how much
  of it is repainted (default: the pipeline's own);
* ``control_images``: a list of condition images, one per ControlNet the server loaded
  (``distripy serve --controlnet``), in their order; none: the plain pipeline;
* ``loras``: ``[{"path": ..., "scale": ...}, ...]``, the LoRAs active for this request, each one
  the server was started with (``distripy serve --lora``), named as it was given there or by its
  resolved file; ``scale`` defaults to the one given there (else 1). A path the server was not
  started with is refused: a server loads no file a client names. A request that names no
  ``loras`` gets the server's at their scales; ``[]``: none;
* ``refiner_start`` in (0, 1): where the server's refiner (``distripy serve --refiner``) takes
  over (default 0.8); refused without a refiner.
"""

import base64
import dataclasses
import io
import re
from typing import Any, Dict, Optional, Tuple

from distripy.config import MODE_CHOICES
from distripy.errors import BandGeometryError
from distripy.serving.pipeline_fields import (
    BadRequest,
    choice_field,
    ServedPipeline,
    call_arguments,
    image_chars,
    read_images,
)

__all__ = [
    "ALIASES",
    "DEFAULT_STEPS",
    "FIELDS",
    "LIMITS",
    "OUTPUT_FORMATS",
    "QUALITY_STEPS",
    "BadRequest",
    "ImageRequest",
    "ServedPipeline",
    "encode_image",
    "parse_request",
]

LIMITS = {
    "n": (1, 8), "steps": (1, 200), "guidance": (0.0, 50.0), "body_bytes": 64 * 1024, "side": 8192,
    "image_bytes": 32 * 1024 * 1024,
}  # fmt: skip
"""The largest request the service takes (``n`` images, ``steps``, ``guidance`` range, the body's
size besides its images, image side in pixels, base64 characters per image sent)."""

QUALITY_STEPS = {"low": 15, "medium": 30, "high": 50, "xhigh": 75, "max": 100}
"""The denoising steps of each ``quality`` (when the request names no steps)."""
_QUALITY_NAMES = {"auto": "medium", "standard": "medium", "hd": "high"}
DEFAULT_STEPS = QUALITY_STEPS["medium"]
DEFAULT_GUIDANCE = 5.0

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
"""The ``output_format``s served, by the name PIL encodes them under."""

ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
"""The diffusers names accepted beside distripy's."""

OPENAI_FIELDS = (
    "prompt", "model", "n", "quality", "response_format", "size", "style", "user", "background",
    "moderation", "output_format", "output_compression", "partial_images", "stream", "complexity",
    "frame_count", "frame_duration_ms", "safety_identifier", "svg",
)  # fmt: skip
DISTRIPY_FIELDS = (
    "steps", "num_inference_steps", "guidance", "guidance_scale", "seed", "negative_prompt",
    "width", "height", "mode", "warmup_steps", "scheduler", "timestep_spacing", "init_image",
    "mask_image", "strength", "control_images", "loras", "refiner_start",
)  # fmt: skip
FIELDS = frozenset(OPENAI_FIELDS + DISTRIPY_FIELDS)
"""Every field a request may hold; any other is refused."""

_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """A checked request: the ``Engine`` call and how to answer it."""

    call: Dict[str, Any]
    """The ``Engine`` call's arguments (``prompt``, ``height``, ``num_inference_steps``,
    ``seed``, ...)."""
    output_format: str = "png"
    output_compression: int = 100
    quality: Optional[str] = None
    """The ``quality`` preset that chose the steps; None when the request named them."""
    safety_identifier: Optional[str] = None

    @property
    def size(self) -> str:
        return f"{self.call['width']}x{self.call['height']}"

    def response_fields(self) -> Dict[str, Any]:
        """The response's fields besides ``created`` and ``data``, as the API names them."""
        fields: Dict[str, Any] = dict(background="opaque", output_format=self.output_format, size=self.size)
        if self.quality is not None:
            fields["quality"] = self.quality
        if self.safety_identifier is not None:
            fields["safety_identifier"] = self.safety_identifier
        return fields

    def encode(self, image) -> str:
        """``image`` (PIL) encoded as asked, in base64."""
        return base64.b64encode(encode_image(image, self.output_format, self.output_compression)).decode()


def encode_image(image, output_format: str = "png", compression: int = 100) -> bytes:
    """``image`` (PIL) as ``output_format``'s bytes; ``compression`` is the quality of the lossy
    formats (``jpeg``, ``webp``: 100 the least loss)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format=OUTPUT_FORMATS[output_format], quality=int(compression))
    return buffer.getvalue()


# -- reading fields -----------------------------------------------------------------------------


def _given(body: dict, field: str) -> bool:
    """Whether the request gives ``field`` (a JSON null is the same as leaving it out)."""
    return body.get(field) is not None


def _number(body: dict, field: str, kind, default, bounds=None):
    if not _given(body, field):
        return default
    value = body[field]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise BadRequest(field, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise BadRequest(field, f"{value} is outside [{bounds[0]}, {bounds[1]}]")
    return value


def _string(body: dict, field: str) -> Optional[str]:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(field, f"must be a string, got {value!r}")
    return value


def _refused(body: dict, field: str, message: str) -> None:
    if _given(body, field):
        raise BadRequest(field, message)


def _named(body: dict, name: str, alias: str) -> str:
    """Which of ``name`` and its ``alias`` the request gives (``name`` if neither); both, with
    different values, is a 400 naming both."""
    if _given(body, name) and _given(body, alias):
        if body[name] != body[alias] or isinstance(body[name], bool) != isinstance(body[alias], bool):
            raise BadRequest(
                alias, f"{name}={body[name]!r} and {alias}={body[alias]!r} disagree: give one of them"
            )
    return alias if _given(body, alias) and not _given(body, name) else name


def _size(body: dict, default: int, start=None) -> Tuple[Tuple[int, str], Tuple[int, str]]:
    """``((width, its field), (height, its field))`` from ``size`` and ``width`` / ``height``,
    which must agree (the default: ``start``, the start image's (width, height), else the model's
    own square)."""
    size = body.get("size")
    from_size: Optional[Tuple[int, int]] = None
    if size is not None and size != "auto":
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise BadRequest("size", f"must be 'WIDTHxHEIGHT' or 'auto', got {size!r}")
        from_size = (int(match.group(1)), int(match.group(2)))
    sides = []
    for index, name in enumerate(("width", "height")):
        value = _number(body, name, int, None)
        if value is not None and from_size is not None and value != from_size[index]:
            raise BadRequest(name, f"{name}={value} and size={size!r} disagree: give one of them")
        if value is not None:
            sides.append((value, name))
        elif from_size is not None:
            sides.append((from_size[index], "size"))
        else:
            sides.append((default, "size") if start is None else (start[index], "init_image"))
    for value, field in sides:
        if not 0 < value <= LIMITS["side"]:
            raise BadRequest(field, f"{value} pixels: each side must be in [1, {LIMITS['side']}]")
    return sides[0], sides[1]


def _check_sides(engine, width: Tuple[int, str], height: Tuple[int, str], guidance: float) -> None:
    """Each side whole rows of the UNet's deepest level, the height at least one per band
    (``BandGeometry.check_side``); a 400 names the field that gave the side."""
    for (pixels, field), name, bands in ((width, "width", 1), (height, "height", engine.bands(guidance))):
        try:
            engine.geometry.check_side(name, pixels, bands, engine.nproc)
        except BandGeometryError as error:
            raise BadRequest(field, str(error)) from None


# -- the request --------------------------------------------------------------------------------


def parse_request(
    body, engine, served: Optional[ServedPipeline] = None, body_bytes: Optional[int] = None
) -> ImageRequest:
    """The engine call a request body asks for, and how to answer it; raises ``BadRequest``
    naming the first bad field. ``engine``: an ``Engine`` (its ``geometry``, ``bands``,
    ``nproc``, ``default_size`` and ``spec``); ``served``: what its pipeline takes and the
    server's defaults (default: its spec's, none active); ``body_bytes``: the body's size, which
    besides its images may be at most ``LIMITS["body_bytes"]``."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    besides = None if body_bytes is None else body_bytes - image_chars(body)
    if besides is not None and besides > LIMITS["body_bytes"]:
        raise BadRequest("body", f"{besides} bytes besides the images, over {LIMITS['body_bytes']}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(unknown[0], "unknown field")
    served = ServedPipeline.of(engine.spec) if served is None else served
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt", "a non-empty string is required")
    negative = _string(body, "negative_prompt")
    for name in ("model", "user", "safety_identifier"):
        _string(body, name)
    # what cannot be served, refused clearly
    if choice_field(body, "response_format", ("b64_json", "url"), "b64_json") == "url":
        raise BadRequest("response_format", "'url' is not served: this server hosts no files; use 'b64_json'")
    if body.get("stream") not in (None, False):
        raise BadRequest(
            "stream", "streaming is not served: leave it out (the images come whole, in one response)"
        )
    output_format = choice_field(body, "output_format", ("png", "jpeg", "webp", "gif", "svg"), "png")
    if output_format in ("gif", "svg"):
        raise BadRequest("output_format", f"{output_format!r} is not served: use png, jpeg or webp")
    for name in ("frame_count", "frame_duration_ms", "svg"):
        wanted = "svg" if name == "svg" else "gif"
        _refused(body, name, f"is for output_format {wanted}, which is not served")
    if choice_field(body, "background", ("transparent", "opaque", "auto")) == "transparent":
        raise BadRequest("background", "'transparent' is not served: the pipeline makes opaque images")
    compression = _number(body, "output_compression", int, 100, (0, 100))
    if _given(body, "output_compression") and output_format == "png":
        raise BadRequest("output_compression", "applies to output_format jpeg and webp, not png")
    # accepted, checked, and ignored (module docstring)
    choice_field(body, "style", ("vivid", "natural"))
    choice_field(body, "moderation", ("low", "auto"))
    choice_field(body, "complexity", ("low", "medium", "high"))
    _number(body, "partial_images", int, None, (0, 3))
    # the generation
    quality = choice_field(body, "quality", tuple(QUALITY_STEPS) + tuple(_QUALITY_NAMES))
    quality = _QUALITY_NAMES.get(quality, quality) if quality is not None else "medium"
    steps_field = _named(body, "steps", "num_inference_steps")
    guidance_field = _named(body, "guidance", "guidance_scale")
    steps = _number(body, steps_field, int, None, LIMITS["steps"])
    if steps is not None:
        quality = None
    else:
        steps = QUALITY_STEPS[quality]
    guidance = _number(body, guidance_field, float, DEFAULT_GUIDANCE, LIMITS["guidance"])
    n = _number(body, "n", int, 1, LIMITS["n"])
    seed = _number(body, "seed", int, None, (0, 2**63 - 1))
    warmup = _number(body, "warmup_steps", int, None, (0, LIMITS["steps"]))
    mode = choice_field(body, "mode", MODE_CHOICES)
    images = read_images(body, served, LIMITS["image_bytes"])
    width, height = _size(body, engine.default_size, images.start_size)
    _check_sides(engine, width, height, guidance)
    identifier = body.get("safety_identifier") or body.get("user") or None
    call = dict(
        prompt=prompt, negative_prompt=negative, num_images_per_prompt=n, height=height[0], width=width[0],
        num_inference_steps=steps, guidance_scale=guidance, seed=seed, mode=mode, warmup_steps=warmup,
        **call_arguments(body, served, images, width[0], height[0]),
    )  # fmt: skip
    return ImageRequest(call, output_format, compression, quality, identifier)
