"""The Triton halo convolution against a float64 convolution of the concatenated rows.

Without a GPU it runs under ``TRITON_INTERPRET=1`` on small shapes: bands of 1-3 rows, odd widths,
channel counts that do not fill a tile, kernel 1x1 and 3x3, stride 1 and 2, with and without bias,
the first / a middle / the last band (halos absent at the image's edges), NCHW, channels-last and
band views, each dtype the interpreter supports (bfloat16 on GPUs only); every case draws fresh
random inputs and every output element is checked.
"""

import pytest
import torch
import torch.nn.functional as F

from distripy.kernels.halo_conv import halo_conv2d_triton, halo_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (kernel, stride, band rows, width, in channels, out channels)
GEOMETRIES = [
    (3, 1, 1, 5, 3, 6),
    (3, 1, 3, 7, 20, 5),
    (3, 2, 2, 9, 5, 40),
    (1, 1, 2, 3, 35, 7),
    (3, 2, 4, 6, 8, 8),
]
POSITIONS = ["first", "middle", "last", "only"]
LAYOUTS = ["nchw", "channels_last", "band_view"]
# Triton's interpreter computes tl.dot on bfloat16 wrongly (it has no numpy type); bf16 runs on GPUs.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [torch.float16])

CASES = [
    (geometry, POSITIONS[i % 4], LAYOUTS[i % 3], DTYPES[i % 3], i % 2 == 0)
    for i, geometry in enumerate(GEOMETRIES * 4)
]


def _tolerance(dtype):
    if dtype != torch.float32:
        return 1e-2
    return 3e-3 if DEVICE == "cuda" else 1e-5  # tf32 products on GPUs


@pytest.mark.parametrize("geometry, position, layout, dtype, with_bias", CASES)
def test_halo_conv_kernel_matches_a_float64_convolution(geometry, position, layout, dtype, with_bias):
    kernel, stride, rows, width, channels, out_channels = geometry
    seed = CASES.index((geometry, position, layout, dtype, with_bias))
    generator = torch.Generator().manual_seed(seed)
    padding = kernel // 2
    top_rows, bottom_rows = halo_rows(kernel, padding, stride)
    # the band sits in a taller image: rows above and below it are its halos
    image = torch.randn(2, channels, top_rows + rows + bottom_rows + 2, width, generator=generator)
    start = top_rows + 1
    band = image[:, :, start : start + rows]
    if layout != "band_view":
        band = band.contiguous()
    if layout == "channels_last":
        band = band.contiguous(memory_format=torch.channels_last)
    has_top = position in ("middle", "last") and top_rows > 0
    has_bottom = position in ("first", "middle") and bottom_rows > 0
    top = image[:, :, start - top_rows : start].contiguous() if has_top else None
    bottom = image[:, :, start + rows : start + rows + bottom_rows].contiguous() if has_bottom else None
    weight = torch.randn(out_channels, channels, kernel, kernel, generator=generator) / channels**0.5
    bias = torch.randn(out_channels, generator=generator) if with_bias else None

    def on_device(t):
        return None if t is None else t.to(DEVICE, dtype)

    out = halo_conv2d_triton(
        on_device(band),
        on_device(top),
        on_device(bottom),
        on_device(weight),
        on_device(bias),
        stride,
        padding,
    )
    # reference: the rows the band reads (zeros where there is no halo), convolved in float64
    zeros_top = torch.zeros(2, channels, top_rows, width)
    zeros_bottom = torch.zeros(2, channels, bottom_rows, width)
    rows_read = torch.cat(
        [
            top if top is not None else zeros_top,
            band.contiguous(),
            bottom if bottom is not None else zeros_bottom,
        ],
        2,
    )
    rows_read = on_device(rows_read).double()  # the inputs as the kernel saw them, rounded to dtype
    expected = F.conv2d(
        rows_read,
        on_device(weight).double(),
        None if bias is None else on_device(bias).double(),
        (stride, stride),
        (0, padding),
    )[:, :, : rows // stride]
    assert out.shape == expected.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    error = float((out.double() - expected).norm() / expected.norm())
    assert error <= _tolerance(dtype), f"relative error {error:.2e}"


def test_halo_conv_kernel_refuses_grouped_convolutions():
    x = torch.zeros(1, 4, 2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="groups=2; the kernel handles groups=1 only"):
        halo_conv2d_triton(x, None, None, torch.zeros(4, 2, 3, 3, device=DEVICE), None, 1, 1, groups=2)
