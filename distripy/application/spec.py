"""``PipelineSpec``: what a served or generated pipeline is made of, declared once.

The same spec drives ``distripy generate`` (built from the command line, checked in the launching
process, handed to the ranks as a file) and an ``Engine`` (built from its arguments, checked in
the caller's process, sent to the ranks): the model (a diffusers folder, or a factory), its
dtype and device, the ControlNets and the SDXL refiner loaded beside it, the LoRAs loaded at
start, and the ``DistriConfig`` every rank parallelises with.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from distripy.config import DistriConfig
from distripy.errors import InputError, InputTypeError

__all__ = ["DTYPES", "PipelineSpec", "parse_lora"]

DTYPES = ("float16", "bfloat16", "float32")


def parse_lora(value: str) -> Tuple[Path, float]:
    """A LoRA as the commands name it, ``PATH[:SCALE]`` -> (path, scale): the scale is what
    follows the last colon when it is a number (a path may hold colons), else 1."""
    path, _, scale = value.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(value), 1.0)
    except ValueError:
        return Path(value), 1.0


def _folder(name: str, value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value:
        raise InputTypeError(f"PipelineSpec: {name}={value!r} must be a folder path")
    return value


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """A pipeline to load on every rank (module docstring).

    ``model``: a local diffusers pipeline folder, or a callable returning the pipeline (for an
    ``Engine`` it must pickle: a module-level function). ``dtype``: one of ``DTYPES``, None for
    the model's own. ``device``: e.g. ``"cpu"``; None: this rank's GPU (``LOCAL_RANK``) when
    there are GPUs, else the CPU. ``controlnets``: ``ControlNetModel`` folders (a request then
    gives one condition image each). ``refiner``: an SDXL refiner pipeline folder, which takes
    over each image at the request's ``refiner_start``. ``loras``: LoRA ``.safetensors`` files
    loaded at start (a request may name others: they are loaded when first asked for).
    ``checked``: set by ``application.checks.check_spec``; a checked spec is not checked again
    (the ranks of a launch trust the launching process's checks).
    """

    model: Union[str, Callable[[], Any]]
    dtype: Optional[str] = None
    device: Optional[str] = None
    controlnets: Tuple[str, ...] = ()
    refiner: Optional[str] = None
    loras: Tuple[str, ...] = ()
    config: DistriConfig = dataclasses.field(default_factory=DistriConfig)
    checked: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not callable(self.model):
            set_(self, "model", _folder("model", self.model))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"PipelineSpec: dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device is not None and not isinstance(self.device, str):
            raise InputTypeError(f"PipelineSpec: device={self.device!r} must be a string such as 'cpu'")
        for name in ("controlnets", "loras"):
            value = getattr(self, name)
            if isinstance(value, (str, Path)) or not isinstance(value, (list, tuple)):
                raise InputTypeError(f"PipelineSpec: {name}={value!r} must be a list of paths")
            set_(self, name, tuple(_folder(name, item) for item in value))
        if self.refiner is not None:
            set_(self, "refiner", _folder("refiner", self.refiner))
        if not isinstance(self.config, DistriConfig):
            raise InputTypeError(
                f"PipelineSpec: config must be a DistriConfig, got {type(self.config).__name__}"
            )

    @property
    def folder(self) -> Optional[Path]:
        """The model's folder (None for a factory)."""
        return None if callable(self.model) else Path(self.model)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values (a folder model only: a factory does not serialise)."""
        if callable(self.model):
            raise InputTypeError("PipelineSpec.to_dict: a model factory cannot be written as JSON")
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values.update(
            controlnets=list(self.controlnets), loras=list(self.loras), config=dataclasses.asdict(self.config)
        )
        return values

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "PipelineSpec":
        values = dict(values)
        values["config"] = DistriConfig(**values.get("config", {}))
        return cls(**values)
