"""A band's convolution by output-row ranges, the ``exact`` mode's interior-first order: the rows
that read no halo computed before the halos exist (``None`` passed for them), then the boundary
rows into the same output. Against a float64 convolution of the whole image (the prologue, when
there is one, applied to the whole image first), for every backend (``torch``, ``cudnn`` — plain
``F.conv2d`` on a CPU — and ``triton``, under the interpreter without a GPU), strides 1 and 2,
one-row bands, the first / a middle / the last band, fresh random inputs per case."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from distripy.errors import InputError
from distripy.kernels.halo_conv import GroupNormPrologue, halo_conv2d, halo_rows, interior_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (kernel, stride, band rows, width, in channels, out channels)
GEOMETRIES = [
    (3, 1, 1, 5, 4, 6),  # one-row bands: no interior, both boundary ranges read both halos
    (3, 1, 4, 7, 8, 5),
    (3, 2, 2, 6, 4, 8),
    (3, 2, 6, 5, 8, 4),
    (1, 1, 3, 4, 6, 5),
    (3, 1, 16, 5, 4, 6),  # the cuDNN path's interior of a tall band: the whole band, then overwritten
    (3, 2, 16, 3, 4, 4),
]
BACKENDS = ["torch", "cudnn", "triton"]
POSITIONS = ["first", "middle", "last"]
CASES = [  # a one-row band in the middle reads both halos in each boundary range
    (geometry, backend, "middle" if geometry[2] == 1 else POSITIONS[i % 3], i % 2 == 0, i % 4 < 2)
    for i, (geometry, backend) in enumerate(itertools.product(GEOMETRIES, BACKENDS))
] + [((3, 1, 16, 5, 4, 6), "cudnn", "middle", False, True)]  # a new output, the whole-band interior


def _image_and_band(geometry, position, seed, prologue: bool):
    kernel, stride, rows, width, channels, out_channels = geometry
    generator = torch.Generator().manual_seed(seed)
    bands = 3
    index = POSITIONS.index(position)
    image = torch.randn(2, channels, rows * bands, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(out_channels, channels, kernel, kernel, generator=generator, dtype=torch.float64)
    bias = torch.randn(out_channels, generator=generator, dtype=torch.float64)
    norm = None
    activated = image
    if prologue:
        groups = 2
        mean = torch.randn(2, groups, generator=generator, dtype=torch.float64)
        rstd = torch.rand(2, groups, generator=generator, dtype=torch.float64) + 0.5
        scale = torch.randn(channels, generator=generator, dtype=torch.float64)
        shift = torch.randn(channels, generator=generator, dtype=torch.float64)
        norm = (mean, rstd, scale, shift, groups)
        grouped = (image.reshape(2, groups, -1) - mean[..., None]) * rstd[..., None]
        activated = grouped.reshape(image.shape) * scale[:, None, None] + shift[:, None, None]
        activated = F.silu(activated)
    padding = kernel // 2
    expected = F.conv2d(activated, weight, bias, stride, padding)
    top_rows, bottom_rows = halo_rows(kernel, padding, stride)
    start, stop = index * rows, (index + 1) * rows
    top = activated[:, :, start - top_rows : start] if index > 0 and top_rows else None
    bottom = activated[:, :, stop : stop + bottom_rows] if index < bands - 1 and bottom_rows else None
    out_rows = rows // stride
    return dict(
        band=image[:, :, start:stop],
        top=top,
        bottom=bottom,
        weight=weight,
        bias=bias,
        norm=norm,
        expected=expected[:, :, index * out_rows : (index + 1) * out_rows],
    )


def _on_device(tensor, dtype=torch.float32):
    return None if tensor is None else tensor.to(DEVICE, dtype).contiguous()


def _prologue(norm):
    if norm is None:
        return None
    mean, rstd, scale, shift, groups = norm
    return GroupNormPrologue(
        _on_device(mean), _on_device(rstd), _on_device(scale), _on_device(shift), groups, True
    )


@pytest.mark.parametrize("geometry, backend, position, given_out, prologue", CASES)
def test_interior_then_boundary_rows_equal_the_whole_image_convolution(
    geometry, backend, position, given_out, prologue
):
    kernel, stride, rows = geometry[:3]
    case = _image_and_band(
        geometry, position, CASES.index((geometry, backend, position, given_out, prologue)), prologue
    )
    band, top, bottom = _on_device(case["band"]), _on_device(case["top"]), _on_device(case["bottom"])
    weight, bias = _on_device(case["weight"]), _on_device(case["bias"])
    norm = _prologue(case["norm"])
    common = dict(stride=stride, padding=kernel // 2, prologue=norm, backend=backend)
    begin, end = interior_rows(rows, kernel, kernel // 2, stride)
    out = None
    if given_out:  # poisoned: every row must be written by one of the three calls
        out = torch.full(case["expected"].shape, float("nan"), device=DEVICE)
    out = halo_conv2d(band, None, None, weight, bias, out=out, rows=(begin, end), **common)
    out_rows = out.shape[2]
    halo_conv2d(band, top, bottom, weight, bias, out=out, rows=(0, begin), **common)
    halo_conv2d(band, top, bottom, weight, bias, out=out, rows=(end, out_rows), **common)
    assert torch.isfinite(out).all()
    tolerance = 3e-3 if DEVICE == "cuda" else 1e-5  # tf32 products on GPUs
    error = float((out.double().cpu() - case["expected"]).norm() / case["expected"].norm())
    assert error <= tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_range_leaves_the_other_rows_of_out_untouched(backend):
    geometry = (3, 1, 5, 6, 4, 4)
    case = _image_and_band(geometry, "middle", 99, prologue=False)
    band, weight, bias = _on_device(case["band"]), _on_device(case["weight"]), _on_device(case["bias"])
    out = torch.full(case["expected"].shape, float("nan"), device=DEVICE)
    halo_conv2d(band, None, None, weight, bias, 1, 1, backend=backend, out=out, rows=(1, 4))
    assert torch.isnan(out[:, :, [0, 4]]).all()
    torch.testing.assert_close(
        out[:, :, 1:4].double().cpu(), case["expected"][:, :, 1:4], rtol=1e-4, atol=1e-4
    )


def _reads_no_halo(row, height, kernel, padding, stride, dilation):
    first = row * stride - padding
    last = first + dilation * (kernel - 1)
    return first >= 0 and last <= height - 1


@pytest.mark.parametrize(
    "kernel, padding, stride, dilation",
    [(3, 1, 1, 1), (3, 1, 2, 1), (5, 2, 1, 1), (3, 2, 1, 2), (1, 0, 1, 1), (1, 0, 2, 1), (5, 2, 2, 1)],
)
def test_interior_rows_are_exactly_the_rows_that_read_no_halo(kernel, padding, stride, dilation):
    for height in range(stride, 10 * stride, stride):
        begin, end = interior_rows(height, kernel, padding, stride, dilation)
        inside = [
            r for r in range(height // stride) if _reads_no_halo(r, height, kernel, padding, stride, dilation)
        ]
        if inside:
            assert (begin, end) == (inside[0], inside[-1] + 1), height
        else:
            assert begin == end, height
        assert 0 <= begin <= end <= height // stride


def test_bad_ranges_and_outputs_are_refused_before_any_work():
    band = torch.randn(1, 2, 4, 5)
    weight = torch.randn(3, 2, 3, 3)
    for rows in ((-1, 2), (3, 2), (0, 5)):
        with pytest.raises(InputError, match="rows="):
            halo_conv2d(band, None, None, weight, None, 1, 1, rows=rows)
    with pytest.raises(InputError, match="out is"):
        halo_conv2d(band, None, None, weight, None, 1, 1, out=torch.empty(1, 3, 5, 5), rows=(0, 1))
    with pytest.raises(InputError, match="out is"):
        halo_conv2d(band, None, None, weight, None, 1, 1, out=torch.empty(1, 3, 4, 5, dtype=torch.float64))
