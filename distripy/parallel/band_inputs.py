"""A band wrapper's call, seen from its inputs: what is wrong with them, which of them every rank
must be given alike, and this rank's share of each (its batch half, its band of the spatial
conditioning). Pure functions of the arguments and the call's ``BandPlan``.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from distripy.errors import BandGeometryError, InputError
from distripy.geometry import BandGeometry
from distripy.parallel.bands import BandPlan, map_tensors, take_band, take_batch_half, tensors_in
from distripy.parallel.generation import PLAIN_VALUES

__all__ = ["agreed_part", "input_problem", "localize", "map_arguments", "residual_is_whole"]

Problem = Optional[Tuple[type, str]]


def map_arguments(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``map_tensors`` (``value`` with every tensor in it replaced by ``fn(tensor)``), walking the
    plain dicts, lists and tuples a call's arguments are made of itself: it runs every step, and
    torch's pytree costs more than the cut. Any other container goes through ``map_tensors``."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, PLAIN_VALUES):
        return value
    kind = type(value)
    if kind is dict:
        return {key: map_arguments(item, fn) for key, item in value.items()}
    if kind is list or kind is tuple:
        return kind(map_arguments(item, fn) for item in value)
    return map_tensors(value, fn)


def residual_is_whole(tensor, sample: torch.Tensor, plan: BandPlan) -> Optional[bool]:
    """Whether a spatial conditioning tensor (a ControlNet or adapter residual) is the whole map of
    its resolution (True) or this rank's band of it (False; what a patch-parallel ControlNet
    returns); None when it is neither, or cannot be cut into the plan's bands. Its resolution is
    found from its width (the latent's, halved ``k`` times, rounded up), which a band keeps."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        return None
    height, width = sample.shape[2], sample.shape[3]
    for _ in range(64):
        if tensor.shape[3] == width:
            break
        if width <= 1:
            return None
        height, width = -(-height // 2), -(-width // 2)
    else:
        return None
    layout = plan.layout
    if height < layout.total or height % layout.total:
        return None
    if tensor.shape[2] == height:
        return True
    start, stop = layout.rows(plan.band_index, height)
    return False if tensor.shape[2] == stop - start else None


def input_problem(
    sample,
    arguments: Dict[str, Any],
    plan: BandPlan,
    *,
    parameter: torch.Tensor,
    geometry: BandGeometry,
    spatial_arguments: Sequence[str],
    graphs: bool,
    model_name: str,
) -> Problem:
    """What is wrong with this rank's input, if anything, as (exception type, message)."""
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        return InputError, f"sample must be a (batch, channels, height, width) tensor, got {shape}"
    if sample.dtype != parameter.dtype:
        return InputError, f"sample is {sample.dtype} but the {model_name}'s parameters are {parameter.dtype}"
    if sample.device != parameter.device:
        return (
            InputError,
            f"sample is on {sample.device} but the {model_name}'s parameters are on {parameter.device}",
        )
    if graphs and sample.device.type != "cuda":
        return (
            InputError,
            f"the {model_name} runs its steps as CUDA graphs (use_cuda_graph, on by default for a "
            f"model that was on CUDA at parallelize) and needs a CUDA device; it is on {sample.device} "
            "(parallelize a CPU model with DistriConfig(use_cuda_graph=False))",
        )
    problem = geometry.latent_problem(sample.shape[2], plan.band_count, model_name)
    if problem is not None:
        return BandGeometryError, problem
    for name in spatial_arguments:
        for tensor in tensors_in(arguments.get(name)):
            if residual_is_whole(tensor, sample, plan) is None:
                return BandGeometryError, (
                    f"{name}: a tensor of shape {tuple(tensor.shape)} is neither a whole map of the "
                    f"{tuple(sample.shape[2:])} latent's resolutions cut into {plan.band_count} bands of "
                    "rows nor this rank's band of one (a patch-parallel ControlNet's output). A "
                    "ControlNet with guess_mode on an odd batch without classifier-free guidance "
                    "splits differently from the UNet under split_batch: use split_batch=False"
                )
    return None


def agreed_part(arguments: Dict[str, Any], plan: BandPlan, spatial_arguments: Sequence[str]) -> Dict[str, Any]:
    """The arguments every rank must be given alike: a residual of this rank's band or batch
    half (a patch-parallel ControlNet's, whose inputs were agreed on by its own call) by its
    shape only."""
    sample = arguments["sample"]

    def shape_of_band(tensor: torch.Tensor):
        whole = residual_is_whole(tensor, sample, plan)
        if whole and tensor.shape[0] == sample.shape[0]:
            return tensor
        shape = tuple(tensor.shape)
        if whole is False:  # this rank's band: described by the whole map's shape, alike on
            # every rank whether or not the bands are of equal height
            rows = sum(plan.layout.sizes(shape[2], plan.band_index))
            shape = shape[:2] + (rows,) + shape[3:]
        return ("local", shape, str(tensor.dtype))

    return {
        name: map_tensors(value, shape_of_band) if name in spatial_arguments else value
        for name, value in arguments.items()
    }


def localize(arguments: Dict[str, Any], plan: BandPlan, spatial_arguments: Sequence[str]) -> Dict[str, Any]:
    """This rank's share of every argument: its batch half, then its band of rows of the spatial
    conditioning. The latent stays whole: the wrapper cuts it through its context."""
    local = dict(arguments)
    if plan.cut_batch:
        batch = arguments["sample"].shape[0]
        local = map_arguments(local, lambda t: take_batch_half(t, batch, plan.batch_index))

    sample = arguments["sample"]

    def band_of_whole(tensor: torch.Tensor) -> torch.Tensor:
        # A patch-parallel ControlNet's residuals are this rank's band already.
        if residual_is_whole(tensor, sample, plan):
            return take_band(tensor, plan.layout, plan.band_index)
        return tensor

    for name in spatial_arguments:
        if local.get(name) is not None:
            local[name] = map_arguments(local[name], band_of_whole)
    return local
