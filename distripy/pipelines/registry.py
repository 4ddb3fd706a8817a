"""One record per parallelised model: everything ``parallelize`` changed in it, so that each
generation can take in what was loaded since and ``unparallelize`` can put it all back.

A record holds the band wrapper installed as the model's (or its decoder's) forward, its
``PatchContext``, the module swaps (``swap.Surgery``), the checkpoint hooks' handles, and what the
model had loaded when it last took adapters in. Taking them in (``refresh``) walks the model only
when the adapters PEFT records on it or its attention processors changed
(``parallel.generation.LoadedState``): a LoRA loaded, deleted or unloaded, an IP-Adapter's processors. A
switch of adapters or scales, or a fuse, changes only the digest of the LoRA layers found then.
"""

import dataclasses
import hashlib
from typing import Any, List, Optional

import torch.nn as nn

from distripy.errors import InputError
from distripy.parallel.context import PatchContext
from distripy.parallel.generation import LoadedState
from distripy.pipelines.swap import Surgery, adapter_state, lora_layers, swap_modules, undo_swaps

__all__ = ["ModelRecord", "install", "record_of", "refresh", "uninstall"]

_ATTRIBUTE = "_distripy_record"


@dataclasses.dataclass
class ModelRecord:
    """What ``parallelize`` did to one model."""

    model: nn.Module
    """The model parallelised (a UNet, a ControlNet, a VAE)."""
    target: nn.Module
    """The module whose forward is the wrapper: the model, or a VAE's decoder."""
    wrapper: Any
    """The band wrapper (``PatchUNetForward``, ``PatchControlNetForward``, ``PatchDecoderForward``)."""
    context: PatchContext
    swapped: nn.Module
    """The module whose submodules were swapped (the model, or a VAE's decoder)."""
    surgery: Surgery
    hooks: List[Any] = dataclasses.field(default_factory=list)
    forward_before: Any = None
    """``target``'s own ``forward`` attribute before (None: its class's)."""
    loaded: Optional[LoadedState] = None
    """The loaded adapters and processors when adapters were last taken in."""
    layers: List[tuple] = dataclasses.field(default_factory=list)
    paths: List[str] = dataclasses.field(default_factory=list)


def record_of(model) -> Optional[ModelRecord]:
    """The record of a parallelised model, or None."""
    return getattr(model, _ATTRIBUTE, None) if isinstance(model, nn.Module) else None


def install(
    model: nn.Module, target: nn.Module, swapped: nn.Module, wrapper, context: PatchContext, surgery: Surgery, hooks=()
) -> ModelRecord:
    """Make ``wrapper`` ``target``'s forward and record it all on ``model``."""
    if record_of(model) is not None:
        raise InputError(f"parallelize: this {type(model).__name__} is already patch-parallel")
    record = ModelRecord(model, target, wrapper, context, swapped, surgery, list(hooks), target.__dict__.get("forward"))
    target.forward = wrapper
    setattr(model, _ATTRIBUTE, record)
    _remember(record)
    return record


def _remember(record: ModelRecord) -> None:
    record.layers = lora_layers(record.swapped)
    record.paths = [state.patch_path for state in record.context.states]
    record.loaded = LoadedState.of(record.swapped, record.surgery.attention_modules)
    if hasattr(record.wrapper, "loaded"):  # a denoiser: its undeclared generations check it
        record.wrapper.loaded = record.loaded


def refresh(record: ModelRecord) -> str:
    """Take in what was loaded into the model since (``swap_modules``: a LoRA's layers, re-created
    attention processors), walking it only when that changed, and return a digest of what decides
    its computation besides its weights' values: its patch modules and its adapters' state. Ranks
    must agree on it, and a CUDA graph captured before it changed must not replay."""
    if record.loaded is None or record.loaded.changed():
        swap_modules(record.swapped, record.context, record.surgery)
        _remember(record)
    state = (record.paths, adapter_state(record.swapped, record.layers))
    return hashlib.sha256(repr(state).encode()).hexdigest()


def uninstall(model: nn.Module) -> bool:
    """Undo everything ``parallelize`` did to ``model`` (waiting for its transfers in flight first);
    False when it was not parallelised."""
    record = record_of(model)
    if record is None:
        return False
    record.context.drain()
    graphs = getattr(record.wrapper, "graphs", None)
    if graphs is not None:
        graphs.release()
    for handle in record.hooks:
        handle.remove()
    undo_swaps(record.swapped, record.surgery)
    if record.forward_before is None:
        record.target.__dict__.pop("forward", None)
    else:
        record.target.forward = record.forward_before
    delattr(model, _ATTRIBUTE)
    return True
