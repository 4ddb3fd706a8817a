"""Which modules of a diffusers model can run on bands, and swapping them for the patch-parallel ones.

``plan_swaps`` checks every module before anything is changed: a spatial module whose band-wise
result would not be the band of its whole-image result (a transposed convolution, batch or
instance statistics, reflect padding, FIR resampling, ...) is refused with its module path, and
the paths of what must be swapped are returned:

* ``Conv2d`` with a kernel taller than one row -> ``PatchConv2d`` (halo rows from the neighbouring
  bands); 1x1 convolutions, linear layers and embeddings stay as they are (local);
* ``GroupNorm`` -> ``PatchGroupNorm`` (statistics of the whole image);
* self-attention -> ``PatchSelfAttnProcessor`` through diffusers' processor API;
* cross-attention (local to the band) with diffusers' standard processor ->
  ``PatchCrossAttnProcessor``, which computes its keys and values once per generation; any other
  cross-attention processor (IP-Adapter's, a user's) is left as it is.

``swap_modules`` then swaps them (sharing the original parameters) and fuses each plain
``ResnetBlock2D``'s GroupNorm -> SiLU -> conv (``PatchResnetForward``).

What is already patch-parallel is skipped, so ``swap_modules`` is also how a parallelised model
takes in what was loaded into it since (each generation starts with it): a LoRA's layers (PEFT
wraps a patch convolution; its ``lora_A``, a convolution as tall as the base one that PEFT makes of
the base layer's class, unattached, is swapped and gets halos like it), processors re-created by a loader (diffusers' IP-Adapter loader re-creates
every self-attention processor as ``type(processor)()``: an unbound patch processor, or a standard
one, is replaced by a bound one), an unloaded adapter's leftover states (forgotten).
``pipelines.registry`` does that when a model's loaded adapters or attention processors changed,
and digests its patch modules and adapters (their activity, scales, merges),
which the ranks compare and whose change drops captured CUDA graphs.
"""

import functools
from typing import Dict, List, Optional

import torch.nn as nn

from distripy.errors import UnsupportedModuleError
from distripy.parallel.attention import PatchCrossAttnProcessor, PatchSelfAttnProcessor
from distripy.parallel.context import PatchContext, PatchState
from distripy.parallel.conv import PatchConv2d, check_conv, conv_needs_halo
from distripy.parallel.group_norm import PatchGroupNorm
from distripy.parallel.resnet import PatchResnetForward, resnet_fusable

__all__ = [
    "REFUSED",
    "Surgery",
    "adapter_state",
    "check_pool",
    "lora_layers",
    "patch_states",
    "plan_swaps",
    "swap_modules",
    "undo_swaps",
]

# Modules whose result on a band is not the band of their result on the image, by class name
# (diffusers' and torch's), with the reason given in the error.
REFUSED = {
    "ConvTranspose1d": "a transposed convolution",
    "ConvTranspose2d": "a transposed convolution",
    "ConvTranspose3d": "a transposed convolution",
    "Conv3d": "a 3-D convolution",
    "BatchNorm2d": "batch statistics over the whole image",
    "SyncBatchNorm": "batch statistics over the whole image",
    "InstanceNorm2d": "instance statistics over the whole image",
    "LocalResponseNorm": "a cross-channel window norm",
    "AdaGroupNorm": "a GroupNorm computed outside nn.GroupNorm",
    "SpatialNorm": "a norm conditioned on an image-sized map",
    "FirUpsample2D": "FIR resampling",
    "FirDownsample2D": "FIR resampling",
    "KUpsample2D": "padded FIR resampling",
    "KDownsample2D": "padded FIR resampling",
    "GatedSelfAttentionDense": "GLIGEN self-attention over image and grounding tokens",
    "PatchEmbed": "patch embedding with absolute positions",
    "AdaptiveAvgPool2d": "pooling over the whole image",
    "AdaptiveMaxPool2d": "pooling over the whole image",
}


def check_pool(module: nn.Module, path: str) -> None:
    """Refuse pooling whose windows overlap or are padded (not band-exact)."""
    kernel, stride, padding = module.kernel_size, module.stride, module.padding
    kernel = kernel if isinstance(kernel, int) else kernel[0]
    stride = stride if isinstance(stride, int) else stride[0]
    padding = padding if isinstance(padding, int) else padding[0]
    if kernel != stride or padding != 0:
        raise UnsupportedModuleError(
            f"{path}: {type(module).__name__}(kernel={kernel}, stride={stride}, padding={padding}); only "
            "non-overlapping unpadded pooling is band-exact"
        )


def _check_upsample(module: nn.Module, path: str) -> None:
    if module.mode != "nearest" or module.size is not None:
        raise UnsupportedModuleError(
            f"{path}: nn.Upsample(mode={module.mode!r}, size={module.size}); "
            "only nearest scaling is band-exact"
        )


def _check_resnet(module: nn.Module, path: str) -> None:
    for name in ("upsample", "downsample"):
        resample = getattr(module, name, None)
        if (
            isinstance(resample, functools.partial)
            and getattr(resample.func, "__name__", "") != "interpolate"
        ):
            raise UnsupportedModuleError(
                f"{path}.{name}: {resample.func.__name__} resampling is not band-exact"
            )


# Cross-attention processors that compute exactly what PatchCrossAttnProcessor does.
_PLAIN_CROSS_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def _check_attention(module: nn.Module, path: str) -> Optional[str]:
    """``"self"`` for a self-attention to patch, ``"cross"`` for a cross-attention whose processor
    is a standard one (its keys and values are cached), None for one left as it is."""
    if getattr(module, "added_kv_proj_dim", None) is not None:
        raise UnsupportedModuleError(f"{path}: attention with added key/value projections (joint self/cross)")
    if getattr(module, "spatial_norm", None) is not None:
        raise UnsupportedModuleError(f"{path}: attention with a spatial norm")
    if getattr(module.processor, "patch_context", None) is not None:
        return None  # already a bound patch processor
    processor = type(module.processor).__name__
    if module.is_cross_attention:
        return "cross" if processor in _PLAIN_CROSS_PROCESSORS + ("PatchCrossAttnProcessor",) else None
    if processor not in (
        "PatchSelfAttnProcessor",
        "AttnProcessor",
        "AttnProcessor2_0",
        "FusedAttnProcessor2_0",
        "XFormersAttnProcessor",
    ):
        raise UnsupportedModuleError(
            f"{path}: self-attention with processor {processor}; patch parallelism replaces the standard "
            "processors only, so this one would be silently dropped"
        )
    return "self"


def plan_swaps(model: nn.Module) -> Dict[str, List[str]]:
    """Check every module; return the paths of the convolutions, norms, self-attentions and
    cross-attentions to swap (those not patch-parallel already), and of the unattached 1x1
    convolutions of ``PatchConv2d``'s class to make plain ``nn.Conv2d`` again."""
    from diffusers.models.attention_processor import Attention

    plan: Dict[str, List[str]] = {
        "conv": [],
        "plain_conv": [],
        "norm": [],
        "attention": [],
        "cross_attention": [],
    }
    for path, module in model.named_modules():
        path = path or type(model).__name__
        kind = type(module).__name__
        if isinstance(module, PatchState) and module.attached:
            continue  # swapped already
        if kind in REFUSED:
            raise UnsupportedModuleError(f"{path}: {kind} ({REFUSED[kind]}) cannot run on bands")
        if isinstance(module, nn.Conv2d):
            check_conv(module, path)
            if conv_needs_halo(module):
                plan["conv"].append(path)
            elif isinstance(module, PatchConv2d):
                plan["plain_conv"].append(path)  # a 1x1 of PatchConv2d's class (PEFT's lora_B)
        elif isinstance(module, nn.Conv1d):
            raise UnsupportedModuleError(f"{path}: Conv1d over a token sequence would need a halo")
        elif isinstance(module, nn.GroupNorm):
            plan["norm"].append(path)
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            check_pool(module, path)
        elif isinstance(module, nn.Upsample):
            _check_upsample(module, path)
        elif kind in ("ResnetBlock2D",):
            _check_resnet(module, path)
        elif isinstance(module, Attention):
            kind = _check_attention(module, path)
            if kind is not None:
                plan["attention" if kind == "self" else "cross_attention"].append(path)
        elif kind == "Transformer2DModel" and not getattr(module, "is_input_continuous", True):
            raise UnsupportedModuleError(
                f"{path}: Transformer2DModel on patches or vectors (absolute positions)"
            )
    return plan


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


class Surgery:
    """What ``swap_modules`` changed in one model, so that ``unparallelize`` can undo it: each patch
    module and the module it adopted, each attention module whose processor was replaced and its
    processor before, each module whose class was changed, each ResNet block given a fused forward.
    Kept across generations (what a later swap replaces is added)."""

    def __init__(self) -> None:
        self.originals: Dict[int, tuple] = {}  # id(patch module) -> (patch module, original)
        self.processors: Dict[int, tuple] = {}  # id(attention) -> (attention, original processor)
        self.resnets: List[nn.Module] = []  # blocks whose forward is a PatchResnetForward

    @property
    def attention_modules(self) -> List[nn.Module]:
        """The attention modules whose processors are patch-parallel (or were made so)."""
        return [attention for attention, _ in self.processors.values()]


def swap_modules(model: nn.Module, context: PatchContext, surgery: Optional[Surgery] = None) -> None:
    """Check every module of ``model``, then swap its convolutions, GroupNorms and self-attention
    and cross-attention processors that are not patch-parallel yet for the patch-parallel ones of
    ``context``, fuse its ResNet blocks, and make ``context`` forget the modules no longer in it.
    ``surgery`` records what was changed."""
    surgery = Surgery() if surgery is None else surgery
    plan = plan_swaps(model)
    for path in plan["conv"]:
        original = model.get_submodule(path)
        swapped = PatchConv2d.from_conv(original, context, path)
        surgery.originals[id(swapped)] = (swapped, original)
        _set_submodule(model, path, swapped)
    for path in plan["plain_conv"]:
        model.get_submodule(path).__class__ = nn.Conv2d  # needs no halo: local, as it is
    for path in plan["norm"]:
        original = model.get_submodule(path)
        swapped = PatchGroupNorm.from_group_norm(original, context, path)
        surgery.originals[id(swapped)] = (swapped, original)
        _set_submodule(model, path, swapped)
    for kind, cls in (("attention", PatchSelfAttnProcessor), ("cross_attention", PatchCrossAttnProcessor)):
        for path in plan[kind]:
            attention = model.get_submodule(path)
            surgery.processors.setdefault(id(attention), (attention, attention.processor))
            attention.set_processor(cls(context, path))
    # ResNet blocks: GroupNorm -> SiLU -> conv fused (the same result, the activation read once).
    for module in model.modules():
        if resnet_fusable(module) and not isinstance(module.__dict__.get("forward"), PatchResnetForward):
            module.forward = PatchResnetForward(module, context)
            surgery.resnets.append(module)
    context.retain(patch_states(model))


def undo_swaps(model: nn.Module, surgery: Surgery) -> None:
    """Put back what ``swap_modules`` changed: every patch module still in ``model`` (wherever it is
    now: a LoRA wrapper may hold it) replaced by the module it adopted, the attention processors
    and classes as they were, the ResNet blocks' own forwards; fused projections unfused."""
    for path, module in list(model.named_modules()):
        entry = surgery.originals.get(id(module))
        if entry is not None and entry[0] is module and path:
            original = entry[1]
            if isinstance(original, PatchState):  # a PEFT layer made of a patch class, unattached
                original.__class__ = type(original).__mro__[1]
            _set_submodule(model, path, original)
    for attention, processor in surgery.processors.values():
        current = attention.processor
        if isinstance(current, PatchSelfAttnProcessor):
            current.unfuse()
        if isinstance(current, (PatchSelfAttnProcessor, PatchCrossAttnProcessor)):
            if isinstance(processor, PatchState):  # an unbound one a loader made: the standard one
                from diffusers.models.attention_processor import AttnProcessor2_0

                processor = AttnProcessor2_0()
            attention.set_processor(processor)
    for module in surgery.resnets:
        if isinstance(module.__dict__.get("forward"), PatchResnetForward):
            del module.forward
    surgery.__init__()


def lora_layers(model: nn.Module) -> List[tuple]:
    """The LoRA (PEFT) layers of ``model``, as (path, layer)."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if hasattr(module, "scaling") and hasattr(module, "active_adapters")
    ]


def adapter_state(model: nn.Module, layers: Optional[List[tuple]] = None) -> list:
    """The LoRA (PEFT) layers of ``model`` (or ``layers``, as ``lora_layers`` found them) by path:
    their active adapters, scales and whether they are merged into the base weights."""
    return [
        (
            path,
            tuple(module.active_adapters),
            tuple(sorted(module.scaling.items())),
            bool(getattr(module, "merged", False)),
        )
        for path, module in (lora_layers(model) if layers is None else layers)
    ]


def patch_states(model: nn.Module) -> List[PatchState]:
    """The patch-parallel modules and attention processors now in ``model``."""
    from diffusers.models.attention_processor import Attention

    states = []
    for module in model.modules():
        if isinstance(module, PatchState) and module.attached:
            states.append(module)
        elif isinstance(module, Attention) and isinstance(module.processor, PatchState):
            states.append(module.processor)
    return states
