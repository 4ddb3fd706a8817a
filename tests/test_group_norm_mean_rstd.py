"""``group_norm_mean_rstd``: the patch GroupNorm's statistics combination as one op.

Both backends (the torch reference and the Triton kernel, under the interpreter on CPU) against the
formulas written out again in float64, on fresh random sums of real bands, for every combination,
including corrected groups whose extrapolated variance is negative (the fallback), and argument
checks.
"""

import pytest
import torch

from distripy.errors import InputError
from distripy.kernels import Combine, group_norm_mean_rstd


def _sums(x: torch.Tensor, groups: int) -> torch.Tensor:
    grouped = x.double().reshape(x.shape[0], groups, -1)
    return torch.stack((grouped.sum(-1), grouped.square().sum(-1)), dim=-1)


def _expected(own, image_prev, own_prev, mode, count, scale, eps):
    own, image_prev, own_prev = own.double(), image_prev.double(), own_prev.double()
    if mode is Combine.LOCAL:
        sums, total = own, count
    elif mode is Combine.CORRECTED:
        sums, total = image_prev + scale * (own - own_prev), count * scale
    else:
        sums, total = image_prev - own_prev + own, count * scale
    mean = sums[..., 0] / total
    var = sums[..., 1] / total - mean**2
    if mode is Combine.CORRECTED:
        own_var = own[..., 1] / count - (own[..., 0] / count) ** 2
        var = torch.where(var > 0, var, own_var)
    return mean, 1 / torch.sqrt(var.clamp_min(0) + eps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", list(Combine))
@pytest.mark.parametrize("bands", [2, 4, 3])
def test_matches_the_formulas_in_float64(backend, mode, bands):
    generator = torch.Generator().manual_seed(hash((backend, int(mode), bands)) % 2**31)
    batch, groups, channels, rows, width = 2, 8, 32, 4, 6
    image_prev = torch.randn(batch, channels, rows * bands, width, generator=generator) * 2 + 0.5
    image_now = image_prev + 0.05 * torch.randn(image_prev.shape, generator=generator)
    band = slice(rows, 2 * rows)
    own_now = _sums(image_now[:, :, band], groups).float()
    own_prev = _sums(image_prev[:, :, band], groups).float()
    image_sums = _sums(image_prev, groups).float()
    count = channels // groups * rows * width
    mean, rstd = group_norm_mean_rstd(
        own_now, image_sums, own_prev, mode, count, float(bands), 1e-5, backend=backend
    )
    expected_mean, expected_rstd = _expected(own_now, image_sums, own_prev, mode, count, float(bands), 1e-5)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-4, atol=1e-6)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (batch, groups)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_negative_corrected_variance_takes_the_bands_own(backend):
    generator = torch.Generator().manual_seed(7)
    count, bands = 10, 4
    own = torch.rand(3, 5, 2, generator=generator) * torch.tensor([1.0, 10.0]) + torch.tensor([0.0, 5.0])
    own_prev = own.clone()
    own_prev[..., 1] += 4.0  # the band's squares fell: extrapolated to the image, E[x^2] < E[x]^2
    image_prev = own_prev * bands
    mean, rstd = group_norm_mean_rstd(
        own, image_prev, own_prev, Combine.CORRECTED, count, bands, 1e-5, backend=backend
    )
    expected_mean, expected_rstd = _expected(own, image_prev, own_prev, Combine.CORRECTED, count, bands, 1e-5)
    own_var = own[..., 1].double() / count - (own[..., 0].double() / count) ** 2
    assert torch.allclose(expected_rstd, 1 / torch.sqrt(own_var + 1e-5))  # the fallback was taken
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-4, atol=1e-6)


def test_arguments_are_checked():
    own = torch.zeros(2, 4, 2)
    with pytest.raises(InputError, match="count must be positive"):
        group_norm_mean_rstd(own, count=0)
    with pytest.raises(InputError, match=r"own must be \(B, G, 2\) float32"):
        group_norm_mean_rstd(own.double(), count=3)
    with pytest.raises(InputError, match="CORRECTED needs image_prev"):
        group_norm_mean_rstd(own, None, own, Combine.CORRECTED, 3, 2.0)
    with pytest.raises(InputError, match="scale must be >= 1"):
        group_norm_mean_rstd(own, own, own, Combine.STALE, 3, 0.5)
