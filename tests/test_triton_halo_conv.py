"""The Triton halo convolution (``kernels.halo_conv_triton``) against a float64 convolution of the
concatenated rows.

Without a GPU it runs under ``TRITON_INTERPRET=1`` on small shapes: bands of 1-3 rows, odd widths,
channel counts that do not fill a tile, kernel 1x1 and 3x3, stride 1 and 2, with and without bias,
the first / a middle / the last band (halos absent at the image's edges), NCHW, channels-last and
band views, each dtype the interpreter supports (bfloat16 on GPUs only); every case draws fresh
random inputs and every output element is checked. The fused GroupNorm (+ SiLU) prologue is checked
on every backend (``triton``, ``cudnn``, ``torch``) against a float64 GroupNorm -> SiLU -> conv.

The fused kernel is the experimental path: the patch layer runs it only when
``DistriConfig(halo_conv_backend="triton")`` opts in (checked below); its default on a GPU is the
halo-padded band + cuDNN. These tests ask for it by name (``backend="triton"``).
"""

import pytest
import torch
import torch.nn.functional as F

from distripy import DistriConfig
from distripy.errors import ConfigError
from distripy.kernels.halo_conv import GroupNormPrologue, halo_conv2d, halo_conv2d_reference, halo_rows
from distripy.kernels.halo_conv_triton import halo_conv2d_triton

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


# (kernel, stride, band rows, width, in channels, groups, out channels)
PROLOGUE_GEOMETRIES = [
    (3, 1, 1, 5, 4, 2, 6),
    (3, 1, 3, 7, 24, 4, 5),
    (3, 2, 2, 9, 6, 3, 40),
    (3, 2, 4, 6, 36, 6, 8),
]
PROLOGUE_CASES = [
    (geometry, POSITIONS[i % 4], LAYOUTS[i % 3], DTYPES[i % 3], i % 2 == 0, i % 3 != 1, backend)
    for i, geometry in enumerate(PROLOGUE_GEOMETRIES * 3)
    for backend in ("triton", "cudnn", "torch")
]


@pytest.mark.parametrize("geometry, position, layout, dtype, affine, silu, backend", PROLOGUE_CASES)
def test_fused_group_norm_prologue_matches_float64(geometry, position, layout, dtype, affine, silu, backend):
    """``halo_conv2d(prologue=...)``: the band normalised (+ SiLU) as it is loaded, the halos taken
    as given (already activated by the neighbours), zero padding of the activated image."""
    kernel, stride, rows, width, channels, groups, out_channels = geometry
    seed = 5000 + PROLOGUE_CASES.index((geometry, position, layout, dtype, affine, silu, backend))
    generator = torch.Generator().manual_seed(seed)
    padding = kernel // 2
    top_rows, bottom_rows = halo_rows(kernel, padding, stride)
    full = torch.randn(2, channels, rows + 2, width, generator=generator) * 2.0 + 0.5
    band = full[:, :, 1 : rows + 1] if layout == "band_view" else full[:, :, :rows].contiguous()
    if layout == "channels_last":
        band = band.contiguous(memory_format=torch.channels_last)
    has_top = position in ("middle", "last") and top_rows > 0
    has_bottom = position in ("first", "middle") and bottom_rows > 0
    top = torch.randn(2, channels, top_rows, width, generator=generator) if has_top else None
    bottom = torch.randn(2, channels, bottom_rows, width, generator=generator) if has_bottom else None
    weight = torch.randn(out_channels, channels, kernel, kernel, generator=generator) / channels**0.5
    bias = torch.randn(out_channels, generator=generator)
    mean = torch.randn(2, groups, generator=generator)
    rstd = torch.rand(2, groups, generator=generator) + 0.3
    norm_weight = torch.randn(channels, generator=generator) if affine else None
    norm_bias = torch.randn(channels, generator=generator) if affine else None

    def on_device(t, as_dtype=dtype):
        return None if t is None else t.to(DEVICE, as_dtype)

    prologue = GroupNormPrologue(
        on_device(mean, torch.float32),
        on_device(rstd, torch.float32),
        on_device(norm_weight),
        on_device(norm_bias),
        groups,
        silu,
    )
    out = halo_conv2d(
        on_device(band),
        on_device(top),
        on_device(bottom),
        on_device(weight),
        on_device(bias),
        stride,
        padding,
        prologue=prologue,
        backend=backend,
    )
    # float64: GroupNorm apply of the band as the kernel saw it, SiLU, zero padding, convolution
    x = on_device(band).double()
    y = (x.reshape(2, groups, -1) - mean.double()[..., None]) * rstd.double()[..., None]
    y = y.reshape(x.shape)
    if affine:
        y = (
            y * on_device(norm_weight).double()[None, :, None, None]
            + on_device(norm_bias).double()[None, :, None, None]
        )
    if silu:
        y = y * torch.sigmoid(y)
    rows_read = torch.cat(
        [
            on_device(top).double() if has_top else torch.zeros(2, channels, top_rows, width).double(),
            y,
            on_device(bottom).double()
            if has_bottom
            else torch.zeros(2, channels, bottom_rows, width).double(),
        ],
        2,
    )
    expected = F.conv2d(
        rows_read, on_device(weight).double(), on_device(bias).double(), (stride, stride), (0, padding)
    )[:, :, : rows // stride]
    assert out.shape == expected.shape and out.dtype == dtype
    scale = float(expected.abs().max())
    tolerance = _tolerance(dtype) if backend == "triton" or dtype != torch.float32 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * scale)


def test_prologue_and_backend_are_checked_before_any_work():
    x = torch.randn(1, 4, 2, 3, device=DEVICE)
    weight = torch.randn(4, 4, 3, 3, device=DEVICE)
    mean, rstd = torch.zeros(1, 2, device=DEVICE), torch.ones(1, 2, device=DEVICE)
    with pytest.raises(ValueError, match="backend='cuda'"):
        halo_conv2d(x, None, None, weight, None, 1, 1, backend="cuda")
    with pytest.raises(ValueError, match="4 channels do not split into num_groups=3"):
        halo_conv2d(
            x, None, None, weight, None, 1, 1, prologue=GroupNormPrologue(mean, rstd, None, None, 3, True)
        )
    with pytest.raises(ValueError, match=r"prologue rstd must be \(1, 2\)"):
        bad = GroupNormPrologue(mean, torch.ones(2, 2, device=DEVICE), None, None, 2, True)
        halo_conv2d(x, None, None, weight, None, 1, 1, prologue=bad)
    with pytest.raises(ValueError, match=r"prologue weight must be \(4,\)"):
        bad = GroupNormPrologue(mean, rstd, torch.ones(3, device=DEVICE), None, 2, True)
        halo_conv2d(x, None, None, weight, None, 1, 1, prologue=bad, backend="triton")


def test_auto_is_the_reference_on_cpu_and_the_cudnn_path_on_a_gpu_unless_triton_is_asked_for(monkeypatch):
    """``auto``: the reference on CPU; on a GPU (``meta_as_gpu``: a meta tensor chooses as a CUDA
    one) the halo-padded band + cuDNN, the measured winner, or the fused Triton kernel only when
    ``cuda_backend="triton"`` opts in. No table, no per-shape choice."""
    from distripy.kernels import halo_conv, meta_as_gpu

    x = torch.randn(2, 8, 4, 16)
    weight = torch.randn(8, 8, 3, 3)
    torch.testing.assert_close(
        halo_conv2d(x, None, None, weight, None, 1, 1, backend="auto", cuda_backend="triton"),
        halo_conv2d_reference(x, None, None, weight, None, 1, 1),
        rtol=0,
        atol=0,
    )
    taken = []
    cudnn = halo_conv.halo_conv2d_cudnn

    def record(path, function):
        def run(*args, **kwargs):
            taken.append(path)
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(halo_conv, "halo_conv2d_cudnn", record("cudnn", cudnn))
    monkeypatch.setattr(halo_conv, "halo_conv2d_reference", record("torch", halo_conv2d_reference))
    meta_x, meta_weight = x.to("meta"), weight.to("meta")
    with meta_as_gpu():
        assert halo_conv2d(meta_x, None, None, meta_weight, None, 1, 1, backend="auto").shape == x.shape
        out = halo_conv2d(meta_x, None, None, meta_weight, None, 1, 1, backend="auto", cuda_backend="triton")
        assert out.shape == x.shape and out.is_meta  # the op's fake: neither the cuDNN path nor the reference
        halo_conv2d(meta_x, None, None, meta_weight, None, 1, 1, backend="auto", cuda_backend="cudnn")
    assert taken == ["cudnn", "cudnn"]
    with pytest.raises(ValueError, match="cuda_backend='cutlass'"):
        halo_conv2d(x, None, None, weight, None, 1, 1, cuda_backend="cutlass")


class _Chosen(Exception):
    """Stops the step at the first band convolution, with the backends it was handed."""


def _patch_conv_backends(monkeypatch, kernel_backend, **config):
    """The ``(backend, cuda_backend)`` a PatchConv2d of the tiny UNet hands ``halo_conv2d`` for a
    ``DistriConfig(**config)`` and the patch layer's ``kernel_backend`` (its first band convolution,
    where the step is stopped: every convolution chooses alike)."""
    import distripy
    import distripy.parallel.conv as patch_conv
    from distripy.runtime import LoopbackComm
    from unet_models import sdxl_conditioning, tiny_sdxl_unet

    def chosen(*args, backend, cuda_backend, **kwargs):
        raise _Chosen(backend, cuda_backend)

    monkeypatch.setattr(patch_conv, "halo_conv2d", chosen)
    unet = tiny_sdxl_unet(0)
    distripy.parallelize(unet, DistriConfig(split_batch=False, **config), comm=LoopbackComm(1, 2))
    distripy.api.patch_context(unet).kernel_backend = kernel_backend
    with torch.no_grad(), pytest.raises(_Chosen) as stopped:
        unet(torch.randn(2, 4, 16, 16), 900, **sdxl_conditioning(2, 1))
    return stopped.value.args


def test_the_patch_layer_runs_the_cudnn_path_unless_the_config_opts_in_to_triton(monkeypatch):
    """``DistriConfig.halo_conv_backend``: ``cudnn`` by default wherever the kernels are Triton's
    (``kernel_backend`` ``triton``, or ``auto`` on CUDA); ``triton`` only when asked for; the
    references stay the references."""
    assert DistriConfig().halo_conv_backend == "cudnn"
    assert _patch_conv_backends(monkeypatch, "auto") == ("auto", "cudnn")
    assert _patch_conv_backends(monkeypatch, "triton") == ("cudnn", "cudnn")
    assert _patch_conv_backends(monkeypatch, "torch") == ("torch", "cudnn")
    opted = dict(halo_conv_backend="triton")
    assert _patch_conv_backends(monkeypatch, "auto", **opted) == ("auto", "triton")
    assert _patch_conv_backends(monkeypatch, "triton", **opted) == ("triton", "triton")
    assert _patch_conv_backends(monkeypatch, "torch", **opted) == ("torch", "triton")
    with pytest.raises(ConfigError, match="halo_conv_backend='cutlass' is not one of 'cudnn', 'triton'"):
        DistriConfig(halo_conv_backend="cutlass")


def test_the_packed_weight_follows_changes_to_the_weight():
    """The kernel reads a channels-last copy of an OIHW weight, cached per weight: reused while the
    weight is unchanged, re-packed after an in-place change or a new ``.data``, dropped with it."""
    from distripy.kernels import halo_conv_triton as module

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1, 8, 4, 6, generator=generator)
    top, bottom = torch.randn(1, 8, 1, 6, generator=generator), torch.randn(1, 8, 1, 6, generator=generator)
    weight = torch.nn.Parameter(torch.randn(5, 8, 3, 3, generator=generator), requires_grad=False)

    def check(weight):
        padded = torch.cat((top, x, bottom), dim=2).double()
        expected = F.conv2d(padded, weight.double(), padding=(0, 1))
        got = halo_conv2d_triton(x, top, bottom, weight, None, 1, 1).double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    check(weight)
    packed = module._PACKED_WEIGHTS[id(weight)][4]
    check(weight)
    assert module._PACKED_WEIGHTS[id(weight)][4] is packed  # reused
    weight.mul_(-2.0)  # a LoRA fused in place
    check(weight)
    weight.data = torch.randn(5, 8, 3, 3, generator=generator)  # diffusers' way of fusing
    check(weight)
    key = id(weight)
    del weight
    assert key not in module._PACKED_WEIGHTS


def test_autotuned_tiles_name_the_tuner_key_and_the_tile(monkeypatch):
    """What ``bench/kernel_speed.py`` records beside its times: each autotuned key and its tile."""
    import triton

    from distripy.kernels import halo_conv_triton

    config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    key = (320, 320, 16, 128, 1, 1, 3, 3, True, "torch.float16", "torch.float16")
    monkeypatch.setattr(halo_conv_triton._halo_conv2d_tuned, "cache", {key: config}, raising=False)
    assert halo_conv_triton.autotuned_tiles() == {
        repr(key[:9]): {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    }
