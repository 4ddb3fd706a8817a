"""The kernels at SDXL's shapes on a GPU, against float64 references computed another way.

Shapes: the latents of 1024² (128 rows) and 3840² (480 rows) images at SDXL's UNet levels (320,
640, 1280 channels at 1, 1/2, 1/4 of the latent), as the bands of N = 1, 2, 4, 8 ranks; the up
blocks' concatenated inputs (2560 -> 1280); the stride-2 downsampling. Tolerances (relative
Frobenius error): fp32 <= 1e-5 for the GroupNorm kernels, <= 3e-4 for cuDNN's convolutions and
<= 1e-3 for Triton's (TF32 products, torch's default for cuDNN convolutions, which the Triton
kernel follows; see ``_conv_tolerance``); fp16/bf16 <= 1e-2. Every test draws fresh
random inputs; every output element enters the error, and NaN anywhere fails it.
"""

import pytest
import torch
import torch.nn.functional as F

from distripy.kernels import GroupNormPrologue, group_norm_apply, group_norm_stats, halo_conv2d, halo_rows

pytestmark = pytest.mark.cuda

GROUPS = 32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (latent rows, channels, downsampling, ranks) -> a band of rows / down / ranks rows
BANDS = [(128, 320, 1, 1), (128, 320, 1, 8), (128, 640, 2, 4), (128, 1280, 4, 2), (128, 1280, 4, 8)]
BANDS_4K = [(480, 320, 1, 8), (480, 640, 2, 4)]


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - expected).norm() / expected.norm())


def _conv_tolerance(dtype, backend="cudnn") -> float:
    """fp32 runs as TF32 (10-bit mantissa). cuDNN rounds its inputs to TF32 (< 3e-4 at every shape,
    H100); Triton's tf32 dot on Hopper truncates them, which doubles the error (6.6e-4 to 6.7e-4
    at every shape, H100): still TF32's class, far from what a wrong index or halo row would give."""
    if dtype != torch.float32:
        return 1e-2
    return 1e-3 if backend in ("triton", "auto") else 3e-4


def _band_input(rows, channels, down, ranks, dtype, seed, batch=2):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    band_rows, width = rows // down // ranks, rows // down
    x = torch.randn(batch, channels, band_rows, width, device="cuda", generator=generator) * 1.7 + 0.4
    return x.to(dtype).contiguous(memory_format=torch.channels_last), generator


@pytest.mark.parametrize("band", BANDS + BANDS_4K)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_kernels_at_sdxl_shapes(band, dtype):
    rows, channels, down, ranks = band
    seed = (BANDS + BANDS_4K).index(band) + 100 * DTYPES.index(dtype)
    x, generator = _band_input(rows, channels, down, ranks, dtype, seed)
    stats = group_norm_stats(x, GROUPS, backend="triton")
    grouped = x.double().reshape(x.shape[0], GROUPS, -1)
    expected = torch.stack((grouped.sum(-1), (grouped**2).sum(-1)), dim=-1)
    assert _relative_error(stats, expected) <= 1e-5
    mean = grouped.mean(-1).float()
    rstd = torch.rsqrt(grouped.var(-1, unbiased=False) + 1e-5).float()
    weight = torch.randn(channels, device="cuda", generator=generator)
    bias = torch.randn(channels, device="cuda", generator=generator)
    out = torch.full_like(x, float("nan"))
    group_norm_apply(x, mean, rstd, weight.to(dtype), bias.to(dtype), GROUPS, True, out=out, backend="triton")
    reference = F.silu(F.group_norm(x.double(), GROUPS, weight.to(dtype).double(), bias.to(dtype).double()))
    assert _relative_error(out, reference) <= (1e-5 if dtype == torch.float32 else 1e-2)


def _halo_conv_case(band, in_factor, stride, dtype, position, seed):
    rows, channels, down, ranks = band
    x, generator = _band_input(rows, channels * in_factor, down, ranks, dtype, seed)
    top_rows, bottom_rows = halo_rows(3, 1, stride)
    batch, in_channels, _, width = x.shape

    def halo(count):
        h = torch.randn(batch, in_channels, count, width, device="cuda", generator=generator).to(dtype)
        return h.contiguous(memory_format=torch.channels_last)

    top = halo(top_rows) if position != "first" and top_rows else None
    bottom = halo(bottom_rows) if position != "last" and bottom_rows else None
    weight = (
        torch.randn(channels, in_channels, 3, 3, device="cuda", generator=generator)
        / (9 * in_channels) ** 0.5
    )
    weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, device="cuda", generator=generator).to(dtype)
    return x, top, bottom, weight, bias, generator


def _float64_band_conv(x, top, bottom, weight, bias, stride, activated):
    """The band's rows and halos concatenated in float64 (zeros at the image's edge), convolved."""
    top_rows, bottom_rows = halo_rows(3, 1, stride)
    batch, channels, rows, width = x.shape

    def rows_or_zeros(halo, count):
        if halo is not None:
            return halo.double()
        return torch.zeros(batch, channels, count, width, device=x.device, dtype=torch.float64)

    parts = [rows_or_zeros(top, top_rows), activated, rows_or_zeros(bottom, bottom_rows)]
    out = F.conv2d(torch.cat(parts, 2), weight.double(), bias.double(), stride, (0, 1))
    return out[:, :, : rows // stride]


CONV_CASES = [
    (band, in_factor, stride, position)
    for band in BANDS
    for in_factor, stride, position in ((1, 1, "middle"), (2, 1, "first"), (1, 2, "last"))
] + [(band, 1, 1, "middle") for band in BANDS_4K]


@pytest.mark.parametrize("band, in_factor, stride, position", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "cudnn", "auto"])
def test_halo_conv_at_sdxl_shapes(band, in_factor, stride, position, dtype, backend):
    """The band's 3x3 convolution from separate halo buffers; ``in_factor`` 2 is an up block's
    concatenated input (e.g. 2560 -> 1280), stride 2 a downsampler."""
    seed = CONV_CASES.index((band, in_factor, stride, position)) + 100 * DTYPES.index(dtype)
    x, top, bottom, weight, bias, _ = _halo_conv_case(band, in_factor, stride, dtype, position, seed)
    out = halo_conv2d(x, top, bottom, weight, bias, stride, 1, backend=backend)
    expected = _float64_band_conv(x, top, bottom, weight, bias, stride, x.double())
    assert out.shape == expected.shape
    assert _relative_error(out, expected) <= _conv_tolerance(dtype, backend)


@pytest.mark.parametrize("band", BANDS + BANDS_4K)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "cudnn"])
def test_fused_group_norm_silu_conv_at_sdxl_shapes(band, dtype, backend):
    seed = 7000 + (BANDS + BANDS_4K).index(band) + 100 * DTYPES.index(dtype)
    x, top, bottom, weight, bias, generator = _halo_conv_case(band, 1, 1, dtype, "middle", seed)
    batch, channels = x.shape[:2]
    mean = torch.randn(batch, GROUPS, device="cuda", generator=generator) * 0.3 + 0.4
    rstd = torch.rand(batch, GROUPS, device="cuda", generator=generator) + 0.4
    norm_weight = torch.randn(channels, device="cuda", generator=generator).to(dtype)
    norm_bias = torch.randn(channels, device="cuda", generator=generator).to(dtype)
    prologue = GroupNormPrologue(mean, rstd, norm_weight, norm_bias, GROUPS, True)
    out = halo_conv2d(x, top, bottom, weight, bias, 1, 1, prologue=prologue, backend=backend)
    grouped = x.double().reshape(batch, GROUPS, -1)
    normalised = ((grouped - mean.double()[..., None]) * rstd.double()[..., None]).reshape(x.shape)
    activated = F.silu(normalised * norm_weight.double()[:, None, None] + norm_bias.double()[:, None, None])
    expected = _float64_band_conv(x, top, bottom, weight, bias, 1, activated)
    assert _relative_error(out, expected) <= _conv_tolerance(dtype, backend)


def test_kernels_replay_inside_a_cuda_graph():
    """Captured after a warm-up call (compilation and autotuning happen outside the capture), the
    kernels replay with new inputs copied into the captured buffers and give eager's results."""
    x, top, bottom, weight, bias, generator = _halo_conv_case(
        (128, 320, 1, 4), 1, 1, torch.float16, "middle", 1
    )

    def block(x):
        stats = group_norm_stats(x, GROUPS, backend="triton")
        count = x[0].numel() // GROUPS
        mean = stats[..., 0] / count
        rstd = torch.rsqrt((stats[..., 1] / count - mean * mean).clamp_min(0) + 1e-5)
        prologue = GroupNormPrologue(mean, rstd, None, None, GROUPS, True)
        return halo_conv2d(x, top, bottom, weight, bias, 1, 1, prologue=prologue, backend="triton")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block(x)  # warm-up: compile, autotune
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = block(x)
    for _ in range(3):
        fresh = torch.randn(x.shape, device="cuda", generator=generator).to(x.dtype)
        x.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(captured, block(fresh.contiguous(memory_format=torch.channels_last)))
