"""The torch references in ``distripy/kernels/`` against computations done another way, in float64.

These functions define the math the Triton kernels must match, so they are checked here against
independent formulations: torch's own GroupNorm and a convolution of the whole image.
"""

import pytest
import torch
import torch.nn.functional as F

from distripy.kernels import (
    Combine,
    band_compatible,
    corrected_sums,
    elements_per_group,
    group_norm_apply,
    group_norm_mean_rstd_reference,
    group_norm_partial_stats_reference,
    group_norm_stats,
    group_norm_sum_partials_reference,
    halo_conv2d,
    halo_rows,
    mean_rstd,
    stale_sums,
)
from distripy.kernels.group_norm_stats import stats_tiling


def _random(*shape, seed, dtype=torch.float32, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype)


@pytest.mark.parametrize("shape, groups", [((2, 12, 5, 7), 4), ((1, 6, 1, 3), 3), ((3, 8, 9), 2)])
def test_group_norm_stats_are_sums_and_sums_of_squares(shape, groups):
    x = _random(*shape, seed=sum(shape), shift=0.5)
    stats = group_norm_stats(x, groups)
    grouped = x.double().reshape(shape[0], groups, -1)
    assert stats.dtype == torch.float32 and stats.shape == (shape[0], groups, 2)
    torch.testing.assert_close(stats[..., 0].double(), grouped.sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats[..., 1].double(), (grouped**2).sum(-1), rtol=1e-5, atol=1e-4)
    assert elements_per_group(x, groups) == grouped.shape[-1]


def test_group_norm_stats_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="10 channels do not split into num_groups=4"):
        group_norm_stats(torch.randn(1, 10, 2, 2), 4)


@pytest.mark.parametrize("chunks", [1, 2, 3, None])
@pytest.mark.parametrize("shape, groups", [((2, 12, 5, 7), 4), ((1, 15, 3, 11), 3), ((3, 8, 33), 2)])
def test_partial_stats_are_the_stats_of_each_chunk_of_positions(shape, groups, chunks):
    x = _random(*shape, seed=sum(shape) + (chunks or 0), shift=-0.4)
    tiling = stats_tiling(x, groups, chunks)
    partial = group_norm_partial_stats_reference(x, groups, chunks)
    assert partial.dtype == torch.float32 and partial.shape == (shape[0], groups, tiling.chunks, 2)
    flat = x.flatten(2)
    for index in range(tiling.chunks):
        piece = flat[..., index * tiling.chunk : (index + 1) * tiling.chunk]
        assert piece.shape[-1] > 0  # no chunk is empty
        grouped = piece.double().reshape(shape[0], groups, -1)
        expected = torch.stack((grouped.sum(-1), grouped.square().sum(-1)), dim=-1)
        torch.testing.assert_close(partial[:, :, index].double(), expected, rtol=1e-5, atol=1e-4)
    assert (tiling.chunks - 1) * tiling.chunk < flat.shape[-1] <= tiling.chunks * tiling.chunk  # all covered
    grouped = x.double().reshape(shape[0], groups, -1)
    expected = torch.stack((grouped.sum(-1), grouped.square().sum(-1)), dim=-1)
    torch.testing.assert_close(partial.sum(dim=2).double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("mode", list(Combine))
def test_mean_rstd_of_partial_sums_is_mean_rstd_of_their_sum(mode, chunks):
    x = _random(2, 9, 6, 13, seed=20 + chunks, scale=1.5, shift=0.2)
    groups, count, scale, eps = 3, elements_per_group(x, 3), 2.0, 1e-5
    partial = group_norm_partial_stats_reference(x, groups, chunks)
    own = group_norm_stats(x, groups)
    own_prev = group_norm_stats(x * 0.8 + 0.1, groups)
    image_prev = own_prev + group_norm_stats(_random(2, 9, 6, 13, seed=21), groups)
    kept = [torch.full((2, groups, 2), float("nan")) for _ in range(2)]
    mean, rstd = group_norm_mean_rstd_reference(partial, image_prev, own_prev, mode, count, scale, eps, kept)
    expected = group_norm_mean_rstd_reference(own, image_prev, own_prev, mode, count, scale, eps)
    torch.testing.assert_close(mean, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, expected[1], rtol=1e-5, atol=1e-5)
    for out in kept:  # NaN-poisoned, fully overwritten with the band's sums
        torch.testing.assert_close(out, own, rtol=1e-5, atol=1e-4)
    summed = [torch.full((2, groups, 2), float("nan")), None]
    group_norm_sum_partials_reference(partial, *summed)
    torch.testing.assert_close(summed[0], own, rtol=1e-5, atol=1e-4)


def test_partial_stats_mean_rstd_apply_equal_torch_group_norm():
    x = _random(2, 12, 7, 9, seed=22, scale=2.0, shift=0.5)
    partial = group_norm_partial_stats_reference(x, 4, 4)
    assert partial.shape == (2, 4, 4, 2)  # 63 positions: 4 chunks of 16
    mean, rstd = group_norm_mean_rstd_reference(
        partial, None, None, Combine.LOCAL, elements_per_group(x, 4), 1.0, 1e-5
    )
    y = group_norm_apply(x, mean, rstd, None, None, 4)
    torch.testing.assert_close(y.double(), F.group_norm(x.double(), 4, eps=1e-5), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_stats_mean_rstd_apply_equal_torch_group_norm(silu, affine):
    x = _random(2, 12, 6, 5, seed=3, scale=2.0, shift=-0.7)
    groups, eps = 3, 1e-5
    weight = _random(12, seed=4) if affine else None
    bias = _random(12, seed=5) if affine else None
    mean, rstd = mean_rstd(group_norm_stats(x, groups), elements_per_group(x, groups), eps)
    y = group_norm_apply(x, mean, rstd, weight, bias, groups, silu=silu)
    expected = F.group_norm(
        x.double(),
        groups,
        None if weight is None else weight.double(),
        None if bias is None else bias.double(),
        eps,
    )
    if silu:
        expected = F.silu(expected)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=2e-5)


def test_sums_of_bands_give_the_image_statistics():
    """Sync combination: the sum of the bands' sums is the image's; mean/rstd equal GroupNorm's."""
    x = _random(2, 8, 12, 5, seed=6, shift=0.3)
    groups, eps = 4, 1e-6
    bands = x.chunk(3, dim=2)
    image = sum(group_norm_stats(band, groups) for band in bands)
    mean, rstd = mean_rstd(image, elements_per_group(bands[0], groups) * 3, eps)
    y = torch.cat([group_norm_apply(band, mean, rstd, None, None, groups) for band in bands], dim=2)
    torch.testing.assert_close(y.double(), F.group_norm(x.double(), groups, eps=eps), rtol=1e-5, atol=2e-5)


def test_stale_sums_replace_this_bands_stale_share():
    groups = 2
    previous = [_random(1, 4, 3, 5, seed=s) for s in (7, 8)]
    now = _random(1, 4, 3, 5, seed=9, scale=3.0)
    image_prev = group_norm_stats(previous[0], groups) + group_norm_stats(previous[1], groups)
    estimate = stale_sums(image_prev, group_norm_stats(previous[0], groups), group_norm_stats(now, groups))
    # exactly the statistics of (the other band as it was) + (this band as it is now)
    expected = group_norm_stats(torch.cat([now, previous[1]], dim=2), groups)
    torch.testing.assert_close(estimate, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bands", [2, 3, 8])
def test_corrected_sums_move_the_image_means_by_the_bands_change(bands):
    """DistriFusion: E_t(all) ~ E_{t-1}(all) + (E_t(own) - E_{t-1}(own)), for E[x] and E[x^2];
    the expectation from float64 means of the tensors themselves."""
    groups, rows = 2, 3
    image_prev = _random(2, 4, rows * bands, 5, seed=12)
    own_prev = image_prev[:, :, :rows]
    own_now = _random(2, 4, rows, 5, seed=13, scale=2.0, shift=0.5)
    count = elements_per_group(own_now, groups)
    estimate = corrected_sums(
        group_norm_stats(image_prev, groups),
        group_norm_stats(own_prev, groups),
        group_norm_stats(own_now, groups),
        image_per_band=bands,
    )

    def moments(x):
        grouped = x.double().reshape(2, groups, -1)
        return torch.stack([grouped.mean(-1), grouped.pow(2).mean(-1)], dim=-1)

    expected = moments(image_prev) + moments(own_now) - moments(own_prev)
    torch.testing.assert_close(estimate.double() / (count * bands), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="image_per_band must be >= 1, got 0.5"):
        corrected_sums(estimate, estimate, estimate, 0.5)


def test_non_positive_variance_falls_back_to_the_local_variance():
    local = group_norm_stats(_random(2, 4, 3, 3, seed=10, scale=0.5), 2)
    count = 2 * 9
    # group (0, 0): E[x^2] < E[x]^2 -> negative; group (1, 1): exactly zero; others valid
    estimate = local.clone() * 2
    estimate[0, 0] = torch.tensor([4.0 * count, 1.0 * count])
    estimate[1, 1] = torch.tensor([1.0 * count, 1.0 * count])
    mean, rstd = mean_rstd(estimate, count * 2, 1e-5, fallback_sums=local, fallback_count=count)
    assert torch.isfinite(rstd).all() and torch.isfinite(mean).all()
    local_var = local[..., 1] / count - (local[..., 0] / count) ** 2
    image_var = estimate[..., 1] / (2 * count) - (estimate[..., 0] / (2 * count)) ** 2
    expected_var = torch.where(image_var > 0, image_var, local_var)
    torch.testing.assert_close(rstd, torch.rsqrt(expected_var + 1e-5))
    torch.testing.assert_close(mean, estimate[..., 0] / (2 * count))
    # without a fallback the negative group would be NaN-free only through the clamp
    _, clamped = mean_rstd(estimate, count * 2, 1e-5)
    assert torch.isfinite(clamped).all()


def test_mean_rstd_rejects_bad_counts():
    with pytest.raises(ValueError, match="count must be positive, got 0"):
        mean_rstd(torch.ones(1, 1, 2), 0, 1e-5)
    with pytest.raises(ValueError, match="fallback_count must be positive"):
        mean_rstd(torch.ones(1, 1, 2), 4, 1e-5, fallback_sums=torch.ones(1, 1, 2))


def test_group_norm_apply_writes_into_a_view():
    x = _random(1, 4, 3, 5, seed=11)
    mean, rstd = mean_rstd(group_norm_stats(x, 2), elements_per_group(x, 2), 1e-5)
    padded = torch.full((1, 4, 5, 5), float("nan"))
    out = group_norm_apply(x, mean, rstd, None, None, 2, out=padded[:, :, 1:4])
    torch.testing.assert_close(padded[:, :, 1:4], group_norm_apply(x, mean, rstd, None, None, 2))
    assert out.data_ptr() == padded[:, :, 1:4].data_ptr()
    assert torch.isnan(padded[:, :, 0]).all() and torch.isnan(padded[:, :, 4]).all()
    with pytest.raises(ValueError, match=r"mean must have shape \(1, 2\)"):
        group_norm_apply(x, mean[:, :1], rstd, None, None, 2)


# -- halo convolution ------------------------------------------------------------------------------


def _band_outputs(x, weight, bias, stride, padding, dilation, groups, bands):
    """Every band's output from its rows and halo rows cut out of the whole image."""
    kernel = weight.shape[2]
    top_rows, bottom_rows = halo_rows(kernel, padding[0], stride, dilation)
    height = x.shape[2]
    rows = height // bands
    outputs = []
    for b in range(bands):
        start, stop = b * rows, (b + 1) * rows
        top = x[:, :, start - top_rows : start] if b > 0 else None
        bottom = x[:, :, stop : stop + bottom_rows] if b < bands - 1 else None
        outputs.append(
            halo_conv2d(x[:, :, start:stop], top, bottom, weight, bias, stride, padding, dilation, groups)
        )
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, groups, bands, height, width",
    [
        (3, 1, (1, 1), 1, 1, 3, 12, 7),
        (3, 2, (1, 1), 1, 1, 2, 8, 9),
        (3, 2, (1, 1), 1, 1, 4, 8, 5),  # 2-row bands, stride 2: one output row each
        (1, 1, (0, 0), 1, 1, 3, 9, 4),
        (5, 1, (2, 2), 1, 2, 2, 8, 6),
        (3, 1, (2, 2), 2, 1, 3, 9, 5),  # dilated
        (4, 2, (1, 1), 1, 1, 2, 8, 8),  # even kernel, stride 2
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_halo_conv_bands_equal_the_whole_image_convolution(
    kernel, stride, padding, dilation, groups, bands, height, width, with_bias
):
    seed = kernel * 100 + stride * 10 + bands
    x = _random(2, 4, height, width, seed=seed)
    weight = _random(6, 4 // groups, kernel, kernel, seed=seed + 1)
    bias = _random(6, seed=seed + 2) if with_bias else None
    out = _band_outputs(x, weight, bias, stride, padding, dilation, groups, bands)
    expected = F.conv2d(
        x.double(),
        weight.double(),
        None if bias is None else bias.double(),
        stride,
        padding,
        dilation,
        groups,
    )
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_halo_conv_with_no_halo_is_zero_padding_at_the_band_edges():
    x = _random(1, 3, 4, 5, seed=12)
    weight = _random(2, 3, 3, 3, seed=13)
    out = halo_conv2d(x, None, None, weight, None, 1, (1, 1))
    torch.testing.assert_close(out, F.conv2d(x, weight, None, 1, (1, 1)))


def test_halo_rows_and_band_compatibility():
    assert halo_rows(3, 1, 1) == (1, 1)
    assert halo_rows(3, 1, 2) == (1, 0)  # stride 2: only a top halo
    assert halo_rows(1, 0, 1) == (0, 0)
    assert halo_rows(3, 2, 1, dilation=2) == (2, 2)
    assert not band_compatible(3, 0, 1)  # a 'valid' convolution shrinks the image
    assert not band_compatible(3, 0, 2)  # diffusers' asymmetric padding=0 downsample
    with pytest.raises(ValueError, match="kernel=3, padding=0, stride=1"):
        halo_rows(3, 0, 1)


def test_halo_conv_validates_its_halos():
    x = _random(1, 3, 4, 5, seed=14)
    weight = _random(2, 3, 3, 3, seed=15)
    with pytest.raises(ValueError, match=r"top halo must have shape \(1, 3, 1, 5\), got \(1, 3, 2, 5\)"):
        halo_conv2d(x, torch.zeros(1, 3, 2, 5), None, weight, None, 1, (1, 1))
    with pytest.raises(ValueError, match="bottom halo is torch.float64"):
        halo_conv2d(x, None, torch.zeros(1, 3, 1, 5, dtype=torch.float64), weight, None, 1, (1, 1))
    with pytest.raises(ValueError, match="band height 3 is not a multiple of the stride 2"):
        halo_conv2d(x[:, :, :3], None, None, weight, None, 2, (1, 1))
