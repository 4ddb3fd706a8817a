"""Cutting a model's inputs into this rank's band and putting the output bands back together.

* ``BandLayout``: how an image's rows are cut into bands, at every resolution of a model;
* ``BandPlan``: how one call's batch and rows are shared among the ranks (CFG split or not);
* ``take_band`` / ``take_batch_half``: this rank's rows / batch half of a tensor;
* ``gather_bands``: every rank's output band -> the whole output, on every rank (``pad_to``: a
  band's block padded to the tallest band's, for an all-gather of equal blocks);
* ``map_tensors``, ``tensors_in``, ``flatten_tensors`` / ``unflatten_tensors``: the tensors inside a
  call's nested arguments (dicts, lists, tuples of tensors and plain values), walked one way, by
  torch's own pytree (``flatten_tensors``, run at every CUDA-graph step, walks plain dicts, lists
  and tuples itself, and anything else by the pytree).
"""

from dataclasses import dataclass
from typing import Any, Callable, Hashable, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only, tree_unflatten

from distripy.errors import InputError
from distripy.planning import band_units

__all__ = [
    "BandLayout",
    "BandPlan",
    "pad_to",
    "flatten_tensors",
    "gather_bands",
    "map_tensors",
    "take_band",
    "take_batch_half",
    "tensors_in",
    "unflatten_tensors",
]


@dataclass(frozen=True)
class BandLayout:
    """How an image's rows are cut into ``count`` bands, at every resolution of a model.

    Bands are counted in *units*: the rows of the model's coarsest resolution (a UNet's deepest
    level, the VAE decoder's latent), the finest cut every resolution can follow. Band ``i`` holds
    ``units[i]`` of them; a resolution with ``s`` rows per unit gives it ``units[i] * s`` rows.
    ``split(total, count)`` makes the bands differ by at most one unit, the larger ones first
    (on top): any ``count`` up to ``total`` works, not only divisors.

    Sizes at any resolution follow from one band's: a band of ``own`` rows, tokens (rows x width)
    or elements has ``sizes(own, index)`` in every band (``own * units[b] / units[index]``), which
    is what a module that only sees its own band's tensor needs (an attention's key lengths, a
    GroupNorm's element count of the whole image)."""

    units: Tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        if not self.units or min(self.units) < 1:
            raise InputError(f"BandLayout: every band needs at least one unit row, got {self.units}")

    @staticmethod
    def split(total: int, count: int) -> "BandLayout":
        """``total`` unit rows in ``count`` bands differing by at most one, the larger first."""
        if not 1 <= count <= total:
            raise InputError(
                f"BandLayout: {count} bands need at least {count} rows at the coarsest resolution, "
                f"which has {total}"
            )
        return BandLayout(band_units(total, count))

    @property
    def count(self) -> int:
        return len(self.units)

    @property
    def total(self) -> int:
        return sum(self.units)

    @property
    def even(self) -> bool:
        """All bands the same size (one all-gather of equal blocks puts them together)."""
        return len(set(self.units)) == 1

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise InputError(f"BandLayout: band {index} is outside [0, {self.count})")

    def scale(self, rows: int) -> int:
        """Rows per unit of a resolution with ``rows`` rows."""
        if rows < self.total or rows % self.total:
            raise InputError(
                f"BandLayout: {rows} rows cannot be cut into bands of {self.units} units "
                f"(a multiple of {self.total} rows is needed)"
            )
        return rows // self.total

    def rows(self, index: int, rows: int) -> Tuple[int, int]:
        """Rows ``[start, stop)`` of band ``index`` at a resolution of ``rows`` rows."""
        self._check_index(index)
        scale = self.scale(rows)
        start = sum(self.units[:index]) * scale
        return start, start + self.units[index] * scale

    def sizes(self, own: int, index: int) -> Tuple[int, ...]:
        """Every band's size where band ``index``'s is ``own`` (rows, tokens or elements of one
        resolution)."""
        self._check_index(index)
        per_unit, remainder = divmod(own, self.units[index])
        if remainder:
            raise InputError(f"BandLayout: band {index} of {self.units[index]} units cannot be {own} long")
        return tuple(per_unit * units for units in self.units)

    def key(self) -> Tuple[int, ...]:
        return self.units


def pad_to(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``tensor`` itself, or padded along ``dim`` to ``length`` (a band's block sent as the
    tallest band's, for an all-gather of equal blocks; the padding is never read)."""
    if tensor.shape[dim] == length:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = length
    padded = tensor.new_empty(shape)
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return padded


class BandPlan:
    """How one call's batch and rows are shared among ``world_size`` ranks: with ``split_batch`` the
    first half of the ranks takes the first half of the batch (classifier-free guidance's
    unconditional half) and the second half the rest; otherwise all ranks share the whole batch.
    Within its group, rank ``r`` holds band ``r % band_count`` of the rows, as ``layout`` cuts
    them (``units``: the coarsest resolution's rows; without them, equal bands).

    ``cut_batch=False`` (with ``split_batch``): the groups' band split, but each group computes the
    whole batch (a ControlNet in guess mode sees only the conditional half of the UNet's batch;
    its residuals must be cut into the UNet's bands)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        split_batch: bool,
        cut_batch: Optional[bool] = None,
        units: Optional[int] = None,
    ) -> None:
        self.split_batch = split_batch
        self.cut_batch = split_batch if cut_batch is None else cut_batch
        self.band_count = world_size // 2 if split_batch else world_size
        self.band_index = rank % self.band_count
        self.batch_index = rank // self.band_count  # 0 or 1 with split_batch, else 0
        self.layout = BandLayout.split(
            self.band_count if units is None else max(units, self.band_count), self.band_count
        )

    @property
    def halves(self) -> int:
        return 2 if self.split_batch else 1

    def key(self) -> Tuple:
        """What every rank must agree on."""
        return (self.split_batch, self.cut_batch, self.band_count, self.layout.key())


def take_band(tensor: torch.Tensor, layout: BandLayout, index: int) -> torch.Tensor:
    """Band ``index``'s rows of a ``(B, C, h, W)`` tensor (a view)."""
    start, stop = layout.rows(index, tensor.shape[2])
    return tensor[:, :, start:stop]


def take_batch_half(tensor: torch.Tensor, batch: int, half_index: int) -> torch.Tensor:
    """Half ``half_index`` of the first dimension when it is the batch (``batch`` entries); any
    other tensor (a per-call constant, an embedding without a batch) as it is."""
    if tensor.dim() == 0 or tensor.shape[0] != batch:
        return tensor
    half = batch // 2
    return tensor[half_index * half : (half_index + 1) * half]


def gather_bands(comm, band: torch.Tensor, layout: BandLayout, halves: int = 1) -> torch.Tensor:
    """Every rank's output band ``(B, C, rows, W)`` -> the whole output on every rank.

    The comm's ranks hold ``halves`` batch halves (CFG split) of ``layout.count`` bands each, in
    rank order; the result stacks the halves along the batch and the bands along the rows.

    Unequal bands travel padded to the tallest: one all-gather of equal blocks (what NCCL's
    collectives and torch's ``all_gather_into_tensor`` take), then each band's rows are cut out.
    Grouped sends and receives of the exact sizes would save the padding -- at most one unit row
    per band, a few percent of a latent sent once per step -- but give up the collective's
    algorithms (NVLink SHARP, rings) for N-1 point-to-point launches per rank."""
    bands = comm.world_size // halves
    if bands != layout.count:
        raise InputError(f"gather_bands: {bands} bands per batch half but a layout of {layout.count}")
    index = comm.rank % bands
    batch, channels, rows, width = band.shape
    sizes = layout.sizes(rows, index)
    tallest = max(sizes)
    band = pad_to(band, tallest, dim=2)
    gathered = band.new_empty((comm.world_size, batch, channels, tallest, width))
    comm.all_gather(band.contiguous(), gathered).wait()
    # (halves, bands, batch, C, rows, W) -> (halves, batch, C, bands, rows, W)
    gathered = gathered.view(halves, bands, batch, channels, tallest, width).permute(0, 2, 3, 1, 4, 5)
    if layout.even:
        return gathered.reshape(halves * batch, channels, bands * tallest, width)
    parts = [gathered[:, :, :, b, : sizes[b]] for b in range(bands)]
    return torch.cat(parts, dim=3).reshape(halves * batch, channels, sum(sizes), width)


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
    return ("value", type(leaf), leaf)


# What a call's arguments are made of, walked here without the pytree machinery (every step of a
# CUDA-graph step computes a key from them): containers by exact type, and leaves that are plain
# values. Anything else (a namedtuple, an OrderedDict, a registered pytree node, an unhashable
# value) goes the pytree way.
_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


_NOT_PLAIN = object()  # what ``_walk`` returns for a value it leaves to the pytree


def _walk(value: Any, tensors: List[torch.Tensor]) -> Hashable:
    """``value``'s structure, its tensors appended to ``tensors``; ``_NOT_PLAIN`` if anything in it
    is neither a plain container nor a plain leaf."""
    kind = type(value)
    if kind is dict or kind is list or kind is tuple:
        items = value.items() if kind is dict else enumerate(value)
        described = []
        for key, item in items:
            entry = _walk(item, tensors)
            if entry is _NOT_PLAIN:
                return _NOT_PLAIN
            described.append((key, entry))
        return (kind, tuple(described))
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return (torch.Tensor, value.shape, value.dtype, value.device, value.stride())
    if isinstance(value, _PLAIN_LEAVES):
        return (kind, value)  # the type too: 1, 1.0 and True are equal, but not the same argument
    return _NOT_PLAIN


def _rebuild(described: Hashable, tensors) -> Any:
    kind, content = described[0], described[1]
    if kind is dict:
        return {key: _rebuild(item, tensors) for key, item in content}
    if kind is list or kind is tuple:
        return kind(_rebuild(item, tensors) for _, item in content)
    if kind is torch.Tensor:
        return next(tensors)
    return content


def flatten_tensors(value: Any) -> Tuple[List[torch.Tensor], Hashable]:
    """The tensors inside ``value`` and its structure with them taken out: hashable, and equal for
    two values that differ only in their tensors' contents (the key of a CUDA graph that can serve
    both). Every other value inside must be hashable."""
    tensors: List[torch.Tensor] = []
    described = _walk(value, tensors)
    if described is not _NOT_PLAIN:
        return tensors, ("plain", len(tensors), described)
    leaves, spec = tree_flatten(value)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return tensors, ("pytree", len(tensors), spec, tuple(_describe(leaf) for leaf in leaves))


def unflatten_tensors(structure: Hashable, tensors: List[torch.Tensor]) -> Any:
    """The value ``flatten_tensors`` took apart, with ``tensors`` in its tensors' places."""
    expected = structure[1]
    if len(tensors) != expected:
        raise InputError(f"unflatten_tensors: {len(tensors)} tensors for a structure that holds {expected}")
    if structure[0] == "plain":
        return _rebuild(structure[2], iter(tensors))
    _, _, spec, described = structure
    fresh = iter(tensors)
    leaves = [next(fresh) if entry[0] == "tensor" else entry[2] for entry in described]
    return tree_unflatten(leaves, spec)
