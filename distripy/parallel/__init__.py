"""The patch-parallel modules: each runs on this rank's band and borrows what it needs from the
other bands through a ``Comm`` (see docs/architecture.md, "Contracts"). They ask their
``PatchContext`` what each step does and know no diffusers pipeline."""

from distripy.parallel.attention import PatchCrossAttnProcessor, PatchSelfAttnProcessor
from distripy.parallel.context import ActivationExchange, Exchange, PatchContext, StatisticsExchange
from distripy.parallel.conv import PatchConv2d
from distripy.parallel.group_norm import PatchGroupNorm
from distripy.parallel.unet import PatchUNetForward
from distripy.parallel.vae import PatchDecoderForward

__all__ = [
    "ActivationExchange",
    "Exchange",
    "PatchContext",
    "PatchConv2d",
    "PatchCrossAttnProcessor",
    "PatchDecoderForward",
    "PatchGroupNorm",
    "PatchSelfAttnProcessor",
    "PatchUNetForward",
    "StatisticsExchange",
]
