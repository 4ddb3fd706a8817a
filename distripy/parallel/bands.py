"""Cutting a model's inputs into this rank's band and putting the output bands back together.

* ``BandPlan``: how one call's batch and rows are shared among the ranks (CFG split or not);
* ``band_rows``, ``take_band`` / ``take_batch_half``: this rank's rows / batch half of a tensor;
* ``gather_bands``: every rank's output band -> the whole output, on every rank;
* ``map_tensors``, ``tensors_in``, ``flatten_tensors`` / ``unflatten_tensors``: the tensors inside a
  call's nested arguments (dicts, lists, tuples of tensors and plain values), walked one way, by
  torch's own pytree.
"""

from typing import Any, Callable, Hashable, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only, tree_unflatten

from distripy.errors import InputError

__all__ = [
    "BandPlan",
    "band_rows",
    "flatten_tensors",
    "gather_bands",
    "map_tensors",
    "take_band",
    "take_batch_half",
    "tensors_in",
    "unflatten_tensors",
]


class BandPlan:
    """How one call's batch and rows are shared among ``world_size`` ranks: with ``split_batch`` the
    first half of the ranks takes the first half of the batch (classifier-free guidance's
    unconditional half) and the second half the rest; otherwise all ranks share the whole batch.
    Within its group, rank ``r`` holds band ``r % band_count`` of the rows.

    ``cut_batch=False`` (with ``split_batch``): the groups' band split, but each group computes the
    whole batch (a ControlNet in guess mode sees only the conditional half of the UNet's batch;
    its residuals must be cut into the UNet's bands)."""

    def __init__(
        self, rank: int, world_size: int, split_batch: bool, cut_batch: Optional[bool] = None
    ) -> None:
        self.split_batch = split_batch
        self.cut_batch = split_batch if cut_batch is None else cut_batch
        self.band_count = world_size // 2 if split_batch else world_size
        self.band_index = rank % self.band_count
        self.batch_index = rank // self.band_count  # 0 or 1 with split_batch, else 0

    @property
    def halves(self) -> int:
        return 2 if self.split_batch else 1

    def key(self) -> Tuple:
        """What every rank must agree on."""
        return (self.split_batch, self.cut_batch, self.band_count)


def band_rows(rows: int, index: int, count: int) -> Tuple[int, int]:
    """The rows ``[start, stop)`` of band ``index`` of ``count`` equal bands of ``rows`` rows."""
    if rows % count:
        raise InputError(f"band_rows: {rows} rows do not split into {count} bands")
    if not 0 <= index < count:
        raise InputError(f"band_rows: band {index} is outside [0, {count})")
    band = rows // count
    return index * band, (index + 1) * band


def take_band(tensor: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Rows ``[index * h / count, (index + 1) * h / count)`` of a ``(B, C, h, W)`` tensor (a view)."""
    start, stop = band_rows(tensor.shape[2], index, count)
    return tensor[:, :, start:stop]


def take_batch_half(tensor: torch.Tensor, batch: int, half_index: int) -> torch.Tensor:
    """Half ``half_index`` of the first dimension when it is the batch (``batch`` entries); any
    other tensor (a per-call constant, an embedding without a batch) as it is."""
    if tensor.dim() == 0 or tensor.shape[0] != batch:
        return tensor
    half = batch // 2
    return tensor[half_index * half : (half_index + 1) * half]


def gather_bands(comm, band: torch.Tensor, halves: int = 1) -> torch.Tensor:
    """Every rank's output band ``(B, C, rows, W)`` -> the whole output on every rank.

    The comm's ranks hold ``halves`` batch halves (CFG split) of ``world_size / halves`` bands each,
    in rank order; the result stacks the halves along the batch and the bands along the rows."""
    gathered = band.new_empty((comm.world_size,) + tuple(band.shape))
    comm.all_gather(band.contiguous(), gathered).wait()
    batch, channels, rows, width = band.shape
    bands = comm.world_size // halves
    # (halves, bands, batch, C, rows, W) -> (halves, batch, C, bands, rows, W)
    gathered = gathered.view(halves, bands, batch, channels, rows, width).permute(0, 2, 3, 1, 4, 5)
    return gathered.reshape(halves * batch, channels, bands * rows, width)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with every tensor inside it replaced by ``fn(tensor)``."""
    return tree_map_only(torch.Tensor, fn, value)


def tensors_in(value: Any) -> List[torch.Tensor]:
    """The tensors inside ``value``, in order."""
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _describe(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    try:
        hash(leaf)
    except TypeError:
        raise InputError(
            f"use_cuda_graph: a UNet argument of type {type(leaf).__name__} cannot be part of a graph's key"
        ) from None
    return ("value", leaf)


def flatten_tensors(value: Any) -> Tuple[List[torch.Tensor], Hashable]:
    """The tensors inside ``value`` and its structure with them taken out: hashable, and equal for
    two values that differ only in their tensors' contents (the key of a CUDA graph that can serve
    both). Every other value inside must be hashable."""
    leaves, spec = tree_flatten(value)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return tensors, (spec, tuple(_describe(leaf) for leaf in leaves))


def unflatten_tensors(structure: Hashable, tensors: List[torch.Tensor]) -> Any:
    """The value ``flatten_tensors`` took apart, with ``tensors`` in its tensors' places."""
    spec, described = structure
    expected = sum(1 for kind, *_ in described if kind == "tensor")
    if len(tensors) != expected:
        raise InputError(f"unflatten_tensors: {len(tensors)} tensors for a structure that holds {expected}")
    fresh = iter(tensors)
    leaves = [next(fresh) if entry[0] == "tensor" else entry[1] for entry in described]
    return tree_unflatten(leaves, spec)
