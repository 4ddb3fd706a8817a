"""The patch-parallel modules: each runs on this rank's band and borrows what it needs from the
other bands through a ``Comm`` (see DESIGN.md, "parallel")."""

from distripy.parallel.attention import PatchSelfAttnProcessor
from distripy.parallel.context import PatchContext
from distripy.parallel.conv import PatchConv2d
from distripy.parallel.group_norm import PatchGroupNorm
from distripy.parallel.unet import PatchUNetForward

__all__ = ["PatchConv2d", "PatchContext", "PatchGroupNorm", "PatchSelfAttnProcessor", "PatchUNetForward"]
