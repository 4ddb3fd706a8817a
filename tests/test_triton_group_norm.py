"""The Triton GroupNorm kernels against their torch references (``kernels/group_norm_*.py``).

Without a GPU they run under ``TRITON_INTERPRET=1`` (set in conftest.py) on small shapes: odd
widths, bands of 1-3 rows, channel groups that do not fill a tile, NCHW, channels-last and band
views, each dtype; outputs are poisoned with NaN first and every element is checked; every case
draws fresh random inputs.
"""

import itertools

import pytest
import torch

from distripy.kernels.group_norm_apply import group_norm_apply_reference, group_norm_apply_triton
from distripy.kernels.group_norm_stats import group_norm_stats_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, channels, groups, height, width)
SHAPES = [(1, 6, 2, 1, 7), (2, 12, 4, 3, 5), (1, 10, 2, 2, 9), (3, 8, 8, 1, 3), (1, 64, 32, 3, 11)]
LAYOUTS = ["nchw", "channels_last", "band_view"]


def _input(shape, dtype, layout, seed):
    batch, channels, _, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, channels, height + 2, width, generator=generator) * 1.5 + 0.3
    x = full[:, :, 1 : height + 1] if layout == "band_view" else full[:, :, :height].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device=DEVICE, dtype=dtype)


def _tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


CASES = list(itertools.product(SHAPES, DTYPES, LAYOUTS))


@pytest.mark.parametrize("shape, dtype, layout", CASES)
def test_stats_kernel_matches_the_reference(shape, dtype, layout):
    seed = CASES.index((shape, dtype, layout))
    x = _input(shape, dtype, layout, seed)
    groups = shape[2]
    stats = group_norm_stats_triton(x, groups, chunks=1 + seed % 3)  # 1, 2 or 3 spatial chunks
    grouped = x.double().reshape(shape[0], groups, -1)  # float64, computed another way
    expected = torch.stack((grouped.sum(-1), (grouped**2).sum(-1)), dim=-1)
    assert stats.dtype == torch.float32 and stats.shape == (shape[0], groups, 2)
    torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape, dtype, layout", CASES)
def test_apply_kernel_matches_the_reference(shape, dtype, layout):
    seed = 1000 + CASES.index((shape, dtype, layout))
    silu = seed % 2 == 1  # every other case: SiLU is a constexpr branch, both are compiled
    batch, channels, groups, height, width = shape
    x = _input(shape, dtype, layout, seed)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, groups, generator=generator).to(DEVICE)
    rstd = (torch.rand(batch, groups, generator=generator) + 0.5).to(DEVICE)
    weight = torch.randn(channels, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(channels, generator=generator).to(DEVICE, dtype)
    expected = group_norm_apply_reference(x, mean, rstd, weight, bias, groups, silu)
    # into the interior rows of a NaN-poisoned buffer (as a halo-padded buffer would be)
    padded = torch.full((batch, channels, height + 2, width), float("nan"), device=DEVICE, dtype=dtype)
    interior = padded[:, :, 1 : height + 1]
    out = group_norm_apply_triton(x, mean, rstd, weight, bias, groups, silu, out=interior)
    assert out.data_ptr() == interior.data_ptr()
    torch.testing.assert_close(interior.float(), expected.float(), **_tolerance(dtype))
    assert torch.isnan(padded[:, :, 0]).all() and torch.isnan(padded[:, :, -1]).all()
    # without affine, into a fresh tensor
    plain = group_norm_apply_triton(x, mean, rstd, None, None, groups, silu)
    expected_plain = group_norm_apply_reference(x, mean, rstd, None, None, groups, silu)
    torch.testing.assert_close(plain.float(), expected_plain.float(), **_tolerance(dtype))
