"""``BandGeometry``: where an image of a given UNet and VAE may be cut into bands, and how many.

Bands are whole rows of the UNet's deepest level (``levels`` downsamplings below the latent, whose
rows are ``vae_scale`` pixels each), so a side in pixels must be a multiple of ``pixel_unit`` and a
height cut into ``b`` bands at least ``b`` such rows; bands may then differ by one row
(``parallel.bands.BandLayout``). With the CFG split half the ranks share one image. This is the one
place those rules live: the CLI, the server, the Engine, the planner and the band wrappers ask it.
It is built from the models' configurations, without loading a weight.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from distripy.errors import BandGeometryError, InputError

__all__ = ["BandGeometry", "bands_per_image"]


def bands_per_image(world: int, split: bool) -> int:
    """Bands one image is cut into on ``world`` ranks: half of them with the CFG split (each half
    of the ranks takes half of the batch), all of them otherwise."""
    return world // 2 if split and world % 2 == 0 else world


def _config_of(model: Any) -> Mapping:
    config = getattr(model, "config", model)
    if not isinstance(config, Mapping):
        raise InputError(f"BandGeometry: expected a model configuration, got {type(config).__name__}")
    return config


@dataclasses.dataclass(frozen=True)
class BandGeometry:
    """The band rules of one UNet (or ControlNet) and VAE."""

    levels: int
    """The UNet's downsamplings: its deepest level has ``latent rows / 2 ** levels`` rows."""
    vae_scale: int = 8
    """Pixels per latent row (the VAE's downsampling)."""
    sample_size: Optional[int] = None
    """The UNet's default latent side, if its configuration names one."""

    def __post_init__(self) -> None:
        for name in ("levels", "vae_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "levels" else 1):
                raise InputError(f"BandGeometry: {name}={value!r} is not a valid count")

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_configs(cls, unet: Any, vae: Any = None) -> "BandGeometry":
        """From a UNet's (or ControlNet's) configuration and, optionally, its VAE's: a diffusers
        ``config`` mapping, a ``config.json``'s contents, or a model holding one. Without a VAE
        configuration, 8 pixels per latent row (every Stable Diffusion VAE)."""
        unet = _config_of(unet)
        try:
            levels = len(unet["down_block_types"]) - 1
        except (KeyError, TypeError) as error:
            raise InputError(f"BandGeometry: the UNet configuration has no down_block_types ({error!r})") from None
        vae_scale = 8
        if vae is not None:
            channels = _config_of(vae).get("block_out_channels")
            if channels is not None:
                vae_scale = 2 ** (len(channels) - 1)
        sample_size = unet.get("sample_size")
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0] if sample_size else None
        return cls(levels, vae_scale, sample_size if isinstance(sample_size, int) else None)

    @classmethod
    def from_folder(cls, folder: Union[str, Path], unet: str = "unet", vae: str = "vae") -> "BandGeometry":
        """From a diffusers pipeline folder's ``unet/config.json`` and ``vae/config.json`` (if any)."""
        folder = Path(folder)

        def read(name: str) -> Optional[dict]:
            path = folder / name / "config.json"
            if not path.is_file():
                return None
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise InputError(f"BandGeometry: {path} is not valid JSON ({error})") from None

        unet_config = read(unet)
        if unet_config is None:
            raise InputError(f"BandGeometry: {folder / unet / 'config.json'} is missing")
        return cls.from_configs(unet_config, read(vae))

    @classmethod
    def of_pipeline(cls, pipe: Any) -> "BandGeometry":
        """From a loaded diffusers pipeline: its UNet's configuration and ``vae_scale_factor``."""
        geometry = cls.from_configs(pipe.unet)
        scale = getattr(pipe, "vae_scale_factor", None)
        return dataclasses.replace(geometry, vae_scale=int(scale)) if scale else geometry

    # -- the rules -------------------------------------------------------------------------------

    @property
    def latent_unit(self) -> int:
        """Latent rows per row of the deepest level."""
        return 2**self.levels

    @property
    def pixel_unit(self) -> int:
        """Pixels per row of the deepest level: what a side must be a multiple of."""
        return self.vae_scale * self.latent_unit

    @property
    def default_size(self) -> Optional[int]:
        """The model's default image side in pixels (None when its configuration names none)."""
        return None if self.sample_size is None else self.sample_size * self.vae_scale

    def min_height(self, bands: int) -> int:
        """The shortest image in pixels that ``bands`` bands can share (one deepest row each)."""
        return self.pixel_unit * max(1, bands)

    def deepest_rows(self, latent_rows: int) -> Optional[int]:
        """Rows at the deepest level of a latent ``latent_rows`` tall; None when not whole rows."""
        return latent_rows // self.latent_unit if latent_rows % self.latent_unit == 0 else None

    def check_side(self, name: str, pixels: int, bands: int = 1, world: Optional[int] = None) -> int:
        """``pixels`` for the side ``name`` (e.g. ``"--height"``, ``"size"``): whole rows at the
        deepest level and, cut into ``bands`` bands, at least one per band; raises
        ``BandGeometryError`` naming the value otherwise, and returns it."""
        unit = self.pixel_unit
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels <= 0 or pixels % unit:
            raise BandGeometryError(
                f"{name} {pixels} is not supported: it must be a multiple of {unit} "
                f"({self.vae_scale} pixels per latent row x {self.latent_unit} latent rows per "
                "row of the UNet's deepest level)"
            )
        if pixels < unit * bands:
            ranks = f" on {world} ranks" if world is not None else ""
            raise BandGeometryError(
                f"{name} {pixels} is too small for {bands} bands{ranks}: each band needs at "
                f"least one row of the UNet's deepest level ({unit} pixels), so at least {unit * bands}"
            )
        return pixels

    def latent_problem(self, latent_rows: int, bands: int, model_name: str = "UNet") -> Optional[str]:
        """What is wrong with cutting a latent ``latent_rows`` tall into ``bands`` bands, or None."""
        factor = self.latent_unit
        if latent_rows % factor:
            return (
                f"latent height {latent_rows} is not a multiple of {factor}: the {model_name}'s "
                f"{self.levels} downsamplings would leave partial rows, which diffusers resizes "
                "across the whole image and bands cannot; use a height that is a multiple of "
                f"{factor} latent rows"
            )
        if latent_rows // factor < bands:
            return (
                f"latent height {latent_rows} cannot be cut into {bands} bands: the {model_name}'s "
                f"deepest level ({self.levels} downsamplings) has {latent_rows // factor} rows, fewer than "
                f"the bands; the latent height must be at least {factor * bands} ({factor} x {bands} "
                "bands)"
            )
        return None
