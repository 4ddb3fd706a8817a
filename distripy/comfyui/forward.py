"""``ComfyUNetForward``: one rank's band step of ComfyUI's UNet, the ``PatchUNetForward`` of every
other patch-parallel model (the split, the generations, the band plan, the output gather, CUDA
graphs) with ComfyUI's call in place of diffusers':

* the call is ``UNetModel.forward``'s (``x``, ``timesteps``, ``context``, ``y``, ``control``,
  ``transformer_options``, and any extra conditioning), seen here as ``sample`` and ``timestep``;
* ``control`` (ControlNet and T2I-Adapter residuals, ``{"input": [...], "middle": [...],
  "output": [...]}``) is cut into the band like the latent;
* ``transformer_options`` is no conditioning (it holds the step's sigmas): not digested; each rank
  gets a copy of its own (the UNet writes into it), whose lists with one entry per chunk of the
  batch (``cond_or_uncond``, ``uuids``: a chunk is one cond's samples) and ``sigmas`` are this
  rank's half under the CFG split;
* the band runs the rest of ComfyUI's ``DIFFUSION_MODEL`` wrapper chain, after distripy's own
  wrapper, around the retrofitted copy's ``_forward`` (``next_wrappers``);
* the ranks are threads given one call: every generation is agreed (no round of digests).
"""

import dataclasses
from typing import Any, Dict, List, Tuple

import torch

from distripy.errors import InputTypeError
from distripy.parallel.band_inputs import input_problem, localize
from distripy.parallel.bands import BandPlan, take_batch_half
from distripy.parallel.generation import Generation
from distripy.parallel.unet import PatchUNetForward

__all__ = ["ComfyUNetForward"]

_PER_SAMPLE_OPTIONS = ("cond_or_uncond", "uuids")


class ComfyUNetForward(PatchUNetForward):
    """Called as ``forward(sample=, timestep=, context=, y=, control=, transformer_options=, **extra)``."""

    spatial_arguments = ("control",)
    per_step_arguments = ("transformer_options",)
    model_name = "ComfyUI UNet"

    def __init__(self, unet: torch.nn.Module, context, world_comm, patch_comms, levels: int) -> None:
        super().__init__(unet, context, world_comm, patch_comms, levels)
        self.unet = unet
        self.next_wrappers: Tuple[List, int] = ([], 0)  # the DIFFUSION_MODEL chain after distripy's

    def _bind(self, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if args:
            raise InputTypeError(f"ComfyUNetForward takes keyword arguments only, not {len(args)} positional ones")
        return dict(kwargs)

    def _start_generation(self, sample, arguments, plan, signature, generation: Generation) -> None:
        super()._start_generation(sample, arguments, plan, signature, dataclasses.replace(generation, agreed=True))

    def _input_problem(self, sample, arguments: Dict[str, Any], plan: BandPlan):
        # The input's dtype is ComfyUI's choice (a manual cast computes in another dtype than the
        # weights are stored in); its device must be this rank's.
        device = self.unet.__dict__.get("distripy_device")
        like = sample if device is None or not isinstance(sample, torch.Tensor) else sample.new_empty(0, device=device)
        return input_problem(
            sample,
            arguments,
            plan,
            parameter=like,
            geometry=self.geometry,
            spatial_arguments=self.spatial_arguments,
            graphs=self.graphs is not None,
            model_name=self.model_name,
        )

    def _localize(self, arguments: Dict[str, Any], plan: BandPlan) -> Dict[str, Any]:
        local = localize({k: v for k, v in arguments.items() if k != "transformer_options"}, plan, self.spatial_arguments)
        options = dict(arguments["transformer_options"])  # this rank's own: the UNet writes into it
        if plan.cut_batch:
            batch = arguments["sample"].shape[0]
            for name in _PER_SAMPLE_OPTIONS:  # one entry per chunk of the batch (a cond's samples)
                value = options.get(name)
                if isinstance(value, (list, tuple)) and len(value) % 2 == 0:
                    half = len(value) // 2
                    options[name] = type(value)(value[plan.batch_index * half : (plan.batch_index + 1) * half])
            if isinstance(options.get("sigmas"), torch.Tensor):
                options["sigmas"] = take_batch_half(options["sigmas"], batch, plan.batch_index)
        local["transformer_options"] = options
        return local

    def _forward_band(self, local: Dict[str, Any]) -> torch.Tensor:
        import comfy.patcher_extension

        local = dict(local)
        x = self.context.cut_band(local.pop("sample"))
        timesteps = local.pop("timestep")
        context, y, control = local.pop("context", None), local.pop("y", None), local.pop("control", None)
        options = local.pop("transformer_options")
        wrappers, index = self.next_wrappers
        chain = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self.unet._forward, self.unet, wrappers, idx=index
        )
        return chain.execute(x, timesteps, context, y, control, options, **local)

    def _output(self, prediction: torch.Tensor, return_dict: bool) -> torch.Tensor:
        return prediction
