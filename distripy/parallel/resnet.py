"""``PatchResnetForward``: a diffusers ``ResnetBlock2D`` whose GroupNorm -> SiLU -> conv pairs run
fused.

In a ResNet block the normalised activation is written by the GroupNorm, read and rewritten by
the SiLU, then read by the convolution. Here the block asks ``PatchGroupNorm.prologue`` for the
statistics only and hands them to ``PatchConv2d.forward(x, prologue)``, which normalises the band
as the convolution loads it (``kernels.halo_conv``): the block reads its activation once. The
result is the block's own (the neighbours' halo rows are the same activated rows as unfused), so
the fused forward is used with every ``kernel_backend``; the references compute it unfused.

The fused forward mirrors ``ResnetBlock2D.forward`` for the configuration SD and SDXL use (no
up/down-sampling, ``time_embedding_norm='default'``, SiLU). Any other block, a block in training
with dropout, a call outside a patch-parallel step, or a block whose norm, activation or conv has
user hooks (which the fusion would skip), or whose convolutions a LoRA loaded since wraps (its
layer must see the activation), runs the original forward.
"""

from typing import Callable

import torch
import torch.nn as nn

from distripy.errors import InputError
from distripy.parallel.context import PatchContext
from distripy.parallel.conv import PatchConv2d
from distripy.parallel.group_norm import PatchGroupNorm

__all__ = ["PatchResnetForward", "has_hooks", "resnet_fusable"]


def resnet_fusable(block: nn.Module) -> bool:
    """Whether the block has the structure the fused forward mirrors (checked once, at install)."""
    return (
        type(block).__name__ == "ResnetBlock2D"
        and getattr(block, "upsample", None) is None
        and getattr(block, "downsample", None) is None
        and getattr(block, "time_embedding_norm", None) == "default"
        and isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
        and isinstance(block.norm1, PatchGroupNorm)
        and isinstance(block.norm2, PatchGroupNorm)
        and isinstance(block.conv1, PatchConv2d)
        and isinstance(block.conv2, PatchConv2d)
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether the module has forward hooks (a fused forward would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class PatchResnetForward:
    """Installed as the block's ``forward`` (an instance attribute; the class is untouched)."""

    def __init__(self, block: nn.Module, context: PatchContext) -> None:
        if not resnet_fusable(block):
            raise InputError(
                f"{type(block).__name__} is not a plain ResnetBlock2D with patch norms and convs"
            )
        self.block = block
        self.context = context
        self.original: Callable = block.forward

    def _fused_now(self, args, kwargs) -> bool:
        block = self.block
        if args or kwargs.get("scale") is not None or not self.context.has_neighbours:
            return False
        if not (isinstance(block.conv1, PatchConv2d) and isinstance(block.conv2, PatchConv2d)):
            return False  # wrapped since (a LoRA's layer around the conv): its own forward runs
        if block.training and block.dropout.p > 0:
            return False
        parts = (block.norm1, block.nonlinearity, block.conv1, block.norm2, block.dropout, block.conv2)
        return not any(has_hooks(part) for part in parts)

    def __call__(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._fused_now(args, kwargs):
            return self.original(input_tensor, temb, *args, **kwargs)
        block = self.block
        hidden = block.conv1(input_tensor, prologue=block.norm1.prologue(input_tensor, silu=True))
        if block.time_emb_proj is not None:
            if not block.skip_time_act:
                temb = block.nonlinearity(temb)
            temb = block.time_emb_proj(temb)[:, :, None, None]
        if temb is not None:
            hidden = hidden + temb
        hidden = block.conv2(hidden, prologue=block.norm2.prologue(hidden, silu=True))
        shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
        output = shortcut + hidden
        if block.output_scale_factor != 1.0:  # a division by one is a kernel that changes nothing
            output = output / block.output_scale_factor
        return output
