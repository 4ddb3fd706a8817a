"""distripy inside ComfyUI: one SDXL image's UNet calls split across the GPUs of one process.

A custom-node package: ComfyUI loads ``NODE_CLASS_MAPPINGS`` from here through its
``comfyui.custom_nodes`` entry point (pip-installed forks) or a two-line folder in ``custom_nodes/``
(docs/comfyui.md). ComfyUI itself is imported only when the node runs, inside ComfyUI.
"""

from distripy.comfyui.nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    PatchParallelNode,
    parallel_unet_of,
    patch_parallel,
)
from distripy.comfyui.parallel_unet import PatchParallelUNet

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "PatchParallelNode",
    "PatchParallelUNet",
    "parallel_unet_of",
    "patch_parallel",
]
