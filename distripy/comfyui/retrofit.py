"""Making ComfyUI's SDXL-architecture UNet (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``)
patch-parallel without touching the model ComfyUI holds.

``retrofit(unet, context)`` returns a *structural copy* of ``unet`` (its ResBlocks' GroupNorm ->
SiLU -> convolution sequences fused: ``layers.FusedNormConv``): the containers on the way to
each layer that runs differently on a band (a ResNet block, a transformer block, the attention
module, the block lists, the UNet itself) are new objects, and those layers are patch-parallel
ones (``layers``) that read their weights from the original layers at every call; every other
layer (the linear projections, LayerNorms, 1x1 convolutions, embeddings) is the original object
itself. The copy costs no weight memory and never goes stale: a LoRA patched into the model in
place, a parameter ComfyUI replaces, a weight cast on the fly, all act on the copy too. The
original model is left exactly as it was.

Layers are matched by torch's base classes (ComfyUI's ``comfy.ops`` classes vary with the load
options, and custom nodes bring their own): a ``Conv2d`` taller than one row gets halos
(``check_conv`` refuses padding that is not band-exact), a ``GroupNorm`` the whole image's
statistics, a transformer block's ``attn1`` (unless it is a cross-attention:
``disable_self_attn``) the whole image's keys and values. What cannot run on bands is refused
before anything is made, naming the layer: a UNet that is not an SDXL-style image UNet (video and
temporal layers), 3-D or 1-D convolutions over tokens, transposed convolutions, pooling that is
not band-exact.

``replica(unet, device, dtype)`` makes another device's copy of the model for a rank of its own:
the same layers, plain (nothing cast on the fly), with weights of their own that ``sync_weights``
sets from the model's effective weights (patches applied, casts done) when they may have changed.
"""

import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from distripy.comfyui.layers import (
    ComfyPatchConv2d,
    ComfyPatchGroupNorm,
    ComfySelfAttention,
    FusedNormConv,
    casts_weights,
    fusable,
)
from distripy.errors import UnsupportedModuleError
from distripy.parallel.context import PatchContext
from distripy.parallel.conv import check_conv, conv_needs_halo
from distripy.pipelines.swap import REFUSED, check_pool

__all__ = ["check_unet", "downsamplings", "replica", "retrofit", "swap_plan", "sync_weights", "unet_blocks"]

_VIDEO_LAYERS = ("VideoResBlock", "SpatialVideoTransformer", "AlphaBlender")


def check_unet(unet: nn.Module) -> None:
    """Refuse a model that is not ComfyUI's image UNet (``openaimodel.UNetModel``)."""
    kind = type(unet)
    if kind.__name__ != "UNetModel" or not kind.__module__.endswith("diffusionmodules.openaimodel"):
        raise UnsupportedModuleError(
            f"patch parallelism in ComfyUI splits SDXL-architecture UNets (openaimodel.UNetModel); this "
            f"model's diffusion model is {kind.__module__}.{kind.__name__}"
        )


def swap_plan(unet: nn.Module) -> Dict[str, List[str]]:
    """Check every layer; the paths of the convolutions, norms and self-attentions to swap."""
    check_unet(unet)
    plan: Dict[str, List[str]] = {"conv": [], "norm": [], "attention": []}
    for path, module in unet.named_modules():
        kind = type(module).__name__
        if kind in _VIDEO_LAYERS:
            raise UnsupportedModuleError(f"{path}: {kind} (a temporal layer) cannot run on bands")
        if kind in REFUSED:
            raise UnsupportedModuleError(f"{path}: {kind} ({REFUSED[kind]}) cannot run on bands")
        if isinstance(module, (nn.Conv1d, nn.Conv3d)):
            raise UnsupportedModuleError(f"{path}: {kind} cannot run on bands of rows")
        if isinstance(module, nn.Conv2d):
            check_conv(module, path)
            if conv_needs_halo(module):
                plan["conv"].append(path)
        elif isinstance(module, nn.GroupNorm):
            plan["norm"].append(path)
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            check_pool(module, path)
        elif kind == "BasicTransformerBlock" and not getattr(module, "disable_self_attn", False):
            if getattr(module, "ff_in", False) or getattr(module, "switch_temporal_ca_to_sa", False):
                raise UnsupportedModuleError(f"{path}: a temporal transformer block cannot run on bands")
            plan["attention"].append(f"{path}.attn1")
    return plan


def unet_blocks(unet: nn.Module) -> List[nn.Module]:
    """The UNet's blocks in the order they run: where an asynchronous step's transfers leave."""
    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    return [block for block in blocks if block is not None]


def downsamplings(unet: nn.Module) -> int:
    """How many times the UNet halves the resolution (bands are counted in rows of the deepest)."""
    return sum(1 for block in unet.input_blocks for layer in block if type(layer).__name__ == "Downsample")


def _structural_copy(unet: nn.Module, paths: List[str]) -> nn.Module:
    """``unet`` with every container on the way to ``paths`` a shallow copy of its own (its own
    table of children) and everything else shared."""
    copies: Dict[str, nn.Module] = {}

    def copied(path: str) -> nn.Module:
        if path in copies:
            return copies[path]
        parent_path, _, name = path.rpartition(".")
        original = unet if not path else copied(parent_path).get_submodule(name)
        module = copy.copy(original)
        module.__dict__["_modules"] = dict(original._modules)
        for attribute, value in original.__dict__.items():  # hooks added to the copy: the copy's only
            if attribute.endswith("hooks") and isinstance(value, dict):
                module.__dict__[attribute] = type(value)(value)
        if path:
            copied(parent_path)._modules[name] = module
        copies[path] = module
        return module

    root = copied("")
    for path in paths:
        parent_path, _, _ = path.rpartition(".")
        copied(parent_path)
    blocks = {id(block) for block in unet_blocks(unet)}
    for name, module in unet.named_modules():  # the blocks: they get the copy's checkpoint hooks
        if id(module) in blocks:
            copied(name)
    return root


def retrofit(unet: nn.Module, context: PatchContext) -> nn.Module:
    """A patch-parallel structural copy of ``unet`` bound to ``context`` (module docstring)."""
    plan = swap_plan(unet)
    attentions = plan["attention"]
    model = _structural_copy(unet, plan["conv"] + plan["norm"] + attentions)

    def place(path: str, module: nn.Module) -> None:  # into the copy's own table of children
        parent_path, _, name = path.rpartition(".")
        model.get_submodule(parent_path)._modules[name] = module

    for path in plan["conv"]:
        place(path, ComfyPatchConv2d.of(unet.get_submodule(path), context, path))
    for path in plan["norm"]:
        place(path, ComfyPatchGroupNorm.of(unet.get_submodule(path), context, path))
    for path in attentions:
        attention = copy.copy(unet.get_submodule(path))  # a container of its own, sharing its layers
        attention.forward = ComfySelfAttention(attention, context, path)
        place(path, attention)
    for module in model.modules():  # ResBlocks' GroupNorm -> SiLU -> conv, fused
        if fusable(module):
            module.forward = FusedNormConv(module)
    return model


def replica(unet: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``unet`` on ``device`` for another rank: the same layers, nothing cast on the fly
    (no ``weight_function``, no ``comfy_cast_weights``), parameters of its own, still to be set
    (``sync_weights``). Nothing of ``unet``'s weights or on-the-fly patches is copied here."""
    check_unet(unet)
    memo: Dict[int, object] = {}
    for module in unet.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:  # an empty placeholder: sync_weights makes the copy's own
                memo[id(tensor)] = torch.empty(0, device="meta")
        for name in ("weight_function", "bias_function"):
            if name in module.__dict__:
                memo[id(module.__dict__[name])] = []
    copied = copy.deepcopy(unet, memo)
    for module in copied.modules():
        if "comfy_cast_weights" in module.__dict__:
            module.comfy_cast_weights = False
    copied.__dict__["distripy_device"] = torch.device(device)
    return copied


def sync_weights(unet: nn.Module, copied: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """Set ``copied``'s (a ``replica``'s) parameters and buffers to ``unet``'s effective ones on the
    replica's device: a layer ComfyUI casts or patches on the fly gives the weights its forward
    would use (``comfy.ops.cast_bias_weight``, in ``dtype``: the model's compute dtype), any
    other its own tensors. Copied into the replica's tensors where they have the shape and dtype
    (the first time, or after a change of dtype, new tensors)."""
    device = copied.__dict__["distripy_device"]
    originals = dict(unet.named_modules())
    # The replica's tensors are normal ones (made outside inference mode), which either mode may
    # update in place (ComfyUI samples under inference mode; a direct call may not).
    with torch.inference_mode(False), torch.no_grad():
        for path, target in copied.named_modules():
            source = originals[path]
            effective = {}
            if casts_weights(source) and getattr(source, "weight", None) is not None:
                import comfy.ops

                weight, bias = comfy.ops.cast_bias_weight(source, None, dtype=dtype, device=device, bias_dtype=dtype)
                effective = {"weight": weight, "bias": bias}
            for name, tensor in source._parameters.items():
                value = None if tensor is None else effective.get(name, tensor).detach()
                current = target._parameters.get(name)
                if _fits(current, value):
                    current.copy_(value)
                else:
                    target._parameters[name] = None if value is None else nn.Parameter(value.to(device, copy=True), requires_grad=False)
            for name, tensor in source._buffers.items():
                current = target._buffers.get(name)
                if _fits(current, tensor):
                    current.copy_(tensor)
                else:
                    target._buffers[name] = None if tensor is None else tensor.detach().to(device, copy=True)


def _fits(current: Optional[torch.Tensor], value: Optional[torch.Tensor]) -> bool:
    """Whether ``value`` can be copied into ``current`` as it is (a real tensor of its shape and dtype)."""
    return (
        current is not None
        and value is not None
        and not current.is_meta
        and current.shape == value.shape
        and current.dtype == value.dtype
    )
