"""``BandLayout`` and the output gather of unequal bands, against numpy's ``array_split`` (which
also makes the first bands the larger) and a whole tensor cut another way."""

import numpy as np
import pytest
import torch

from distripy.errors import InputError
from distripy.parallel.bands import BandLayout, BandPlan, gather_bands, take_band


def _reference_units(total, count):
    return [len(part) for part in np.array_split(np.arange(total), count)]


@pytest.mark.parametrize("total", [1, 2, 7, 8, 30, 36, 45])
def test_split_matches_array_split_and_differs_by_at_most_one(total):
    for count in range(1, total + 1):
        layout = BandLayout.split(total, count)
        assert list(layout.units) == _reference_units(total, count)
        assert max(layout.units) - min(layout.units) <= 1
        assert layout.even == (total % count == 0)


@pytest.mark.parametrize("total, count", [(7, 3), (36, 8), (20, 8), (6, 5)])
def test_rows_tile_every_resolution_and_sizes_agree(total, count):
    layout = BandLayout.split(total, count)
    for scale in (1, 2, 4, 8):
        rows = total * scale
        bounds = [layout.rows(index, rows) for index in range(count)]
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(count - 1))
        expected = [scale * units for units in _reference_units(total, count)]
        assert [stop - start for start, stop in bounds] == expected
        for index, (start, stop) in enumerate(bounds):
            width = 5  # a band's tokens: rows x width
            assert layout.sizes((stop - start) * width, index) == tuple(e * width for e in expected)


def test_layout_refuses_what_it_cannot_cut():
    with pytest.raises(
        InputError, match="3 bands need at least 3 rows at the coarsest resolution, which has 2"
    ):
        BandLayout.split(2, 3)
    layout = BandLayout.split(7, 3)
    with pytest.raises(InputError, match="a multiple of 7 rows"):
        layout.rows(0, 20)
    with pytest.raises(InputError, match="band 3 is outside"):
        layout.rows(3, 14)
    with pytest.raises(InputError, match="cannot be 7 long"):
        layout.sizes(7, 0)  # band 0 has 3 units


def test_plan_cuts_the_deepest_rows_of_each_batch_half():
    plan = BandPlan(4, 6, split_batch=True, units=7)  # rank 4: band 1 of the second half
    assert (plan.band_index, plan.batch_index, plan.layout.units) == (1, 1, (3, 2, 2))
    assert BandPlan(4, 6, split_batch=False, units=7).layout.units == (2, 1, 1, 1, 1, 1)
    assert plan.key() != BandPlan(4, 6, split_batch=True, units=8).key()


class _SharedGather:
    """The all-gather of ``world_size`` ranks whose sends are known up front (one process)."""

    def __init__(self, rank, sends):
        self.rank, self.world_size, self.sends = rank, len(sends), sends

    def all_gather(self, send, recv):
        assert send.shape == self.sends[self.rank].shape
        for index, other in enumerate(self.sends):
            recv[index].copy_(other)
        return self

    def wait(self):
        pass


def _padded_send(band, tallest):
    padded = torch.full(band.shape[:2] + (tallest,) + band.shape[3:], float("nan"), dtype=band.dtype)
    padded[:, :, : band.shape[2]] = band
    return padded


@pytest.mark.parametrize(
    "halves, count, total, scale", [(1, 3, 7, 4), (2, 3, 7, 2), (1, 5, 6, 1), (2, 2, 4, 8)]
)
def test_gather_of_unequal_bands_is_the_whole_output(halves, count, total, scale):
    """Every rank gets the whole output, halves along the batch, bands along the rows; the padding
    (NaN here) is never part of it."""
    batch, channels, width = 2, 3, 5
    whole = torch.randn(halves * batch, channels, total * scale, width, dtype=torch.float64)
    layout = BandLayout.split(total, count)
    bounds = np.cumsum([0] + _reference_units(total, count)) * scale
    bands = [
        whole[h * batch : (h + 1) * batch, :, bounds[b] : bounds[b + 1]]
        for h in range(halves)
        for b in range(count)
    ]
    for rank, band in enumerate(bands):
        assert torch.equal(take_band(whole[:batch], layout, rank % count), bands[rank % count])
        tallest = max(bounds[1:] - bounds[:-1])
        comm = _SharedGather(rank, [_padded_send(b, tallest) for b in bands])
        gathered = gather_bands(comm, band, layout, halves)
        assert torch.equal(gathered, whole), rank
