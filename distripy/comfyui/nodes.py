"""The ComfyUI node "Patch-parallel (distripy)" and ``patch_parallel``, the function behind it.

MODEL in, MODEL out: the output is a clone of the input model carrying a ``PatchParallelUNet`` as
two wrappers (``parallel_unet``); the input model and its options are untouched, and whatever is
cloned from the output (a LoRA loader after the node, a ControlNet apply) keeps the wrappers. The
node checks what it can before any sampling: the GPU count or indices against this machine, and
that the model's UNet can be split (otherwise a clear error now, never a wrong image later).
"""

from typing import Optional, Union

from distripy.comfyui.parallel_unet import PatchParallelUNet, resolve_devices
from distripy.comfyui.retrofit import swap_plan
from distripy.config import DEFAULT_WARMUP_STEPS, MODE_CHOICES, DistriConfig
from distripy.errors import ConfigError

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "PatchParallelNode",
    "WRAPPER_KEY",
    "parallel_unet_of",
    "patch_parallel",
]

WRAPPER_KEY = "distripy.patch_parallel"
"""The key of the node's wrappers on a model (one node's at a time: applying it again replaces them)."""

_SPLIT_CHOICES = {"enable": True, "disable": False, "auto": "auto"}


def patch_parallel(model, gpus: Union[int, str] = 2, mode: str = "auto", warmup: int = DEFAULT_WARMUP_STEPS,
                   split_batch: Union[bool, str] = True, timeout_s: float = None):  # fmt: skip
    """A clone of ComfyUI ``ModelPatcher`` ``model`` whose UNet calls run split across ``gpus``
    (a count, or GPU indices such as ``"0,1,3"``; rank 0 is the model's own device) in ``mode``
    with ``warmup`` synchronous steps (``DistriConfig``), the CFG batch split over two groups of
    GPUs with ``split_batch``."""
    import comfy.patcher_extension

    timeout = {} if timeout_s is None else {"timeout_s": timeout_s}
    parallel = PatchParallelUNet(gpus, DistriConfig(mode=mode, warmup_steps=warmup, split_batch=split_batch, **timeout))
    swap_plan(model.get_model_object("diffusion_model"))
    resolve_devices(parallel.gpus, model.load_device)  # refuse more GPUs than the machine has, now
    clone = model.clone()
    kinds = comfy.patcher_extension.WrappersMP
    for kind, wrapper in ((kinds.OUTER_SAMPLE, parallel.outer_sample), (kinds.DIFFUSION_MODEL, parallel.diffusion_model)):
        clone.remove_wrappers_with_key(kind, WRAPPER_KEY)
        clone.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return clone


def parallel_unet_of(model) -> Optional[PatchParallelUNet]:
    """The ``PatchParallelUNet`` a model (the node's output, or a clone of it) carries, or None."""
    wrappers = model.get_wrappers("diffusion_model", WRAPPER_KEY)
    return wrappers[0].__self__ if wrappers else None


class PatchParallelNode:
    """ComfyUI's node class (V1 API)."""

    DESCRIPTION = (
        "Splits each UNet call of one image across GPUs (DistriFusion's displaced patch parallelism): each "
        "GPU denoises one band of rows. exact and full_sync equal one GPU's image; the asynchronous modes "
        "are faster and close to it. Place it before the KSampler."
    )
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "gpus": ("STRING", {"default": "2", "tooltip": "how many GPUs, or which: 0,1,2,3"}),
                "mode": (list(MODE_CHOICES), {"default": "auto"}),
                "warmup": ("INT", {"default": DEFAULT_WARMUP_STEPS, "min": 0, "max": 10000}),
                "split_batch": (list(_SPLIT_CHOICES), {"default": "enable"}),
            }
        }

    def patch(self, model, gpus, mode, warmup, split_batch):
        if split_batch not in _SPLIT_CHOICES:
            raise ConfigError(f"split_batch={split_batch!r} must be one of {list(_SPLIT_CHOICES)}")
        return (patch_parallel(model, gpus, mode, warmup, _SPLIT_CHOICES[split_batch]),)


NODE_CLASS_MAPPINGS = {"DistripyPatchParallel": PatchParallelNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DistripyPatchParallel": "Patch-parallel (distripy)"}
