"""The Triton halo convolution against a float64 convolution of the concatenated rows.

Without a GPU it runs under ``TRITON_INTERPRET=1`` on small shapes: bands of 1-3 rows, odd widths,
channel counts that do not fill a tile, kernel 1x1 and 3x3, stride 1 and 2, with and without bias,
the first / a middle / the last band (halos absent at the image's edges), NCHW, channels-last and
band views, each dtype the interpreter supports (bfloat16 on GPUs only); every case draws fresh
random inputs and every output element is checked. The fused GroupNorm (+ SiLU) prologue is checked
on every backend (``triton``, ``cudnn``, ``torch``) against a float64 GroupNorm -> SiLU -> conv.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from distripy.kernels.halo_conv import (
    GroupNormPrologue,
    halo_conv2d,
    halo_conv2d_reference,
    halo_conv2d_triton,
    halo_rows,
)

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


def test_auto_takes_the_reference_on_cpu_and_the_measured_winner_on_cuda(monkeypatch, tmp_path):
    from distripy.kernels import halo_conv_dispatch

    x = torch.randn(2, 8, 4, 16)
    weight = torch.randn(8, 8, 3, 3)
    key = halo_conv_dispatch.dispatch_key("Some GPU", x, weight, 1)
    assert key == ("Some GPU", "float32", 2, 8, 8, 3, 3, 1, 1, 4, 16)
    table = tmp_path / "paths.json"
    entry = dict(device="Some GPU", dtype="float32", batch=2, in_channels=8, out_channels=8, kernel=[3, 3])
    entry.update(stride=[1, 1], rows=4, width=16, path="triton")
    table.write_text(json.dumps({"entries": [entry]}))
    assert halo_conv_dispatch.load_table(str(table)) == {key: "triton"}
    entry["path"] = "cuda"
    table.write_text(json.dumps({"entries": [entry]}))
    with pytest.raises(ValueError, match="names path 'cuda'"):
        halo_conv_dispatch.load_table.__wrapped__(str(table))
    # on CPU, auto is the reference whatever the table says
    monkeypatch.setattr(
        halo_conv_dispatch, "choose_halo_conv_path", lambda *a: pytest.fail("dispatched on CPU")
    )
    torch.testing.assert_close(
        halo_conv2d(x, None, None, weight, None, 1, 1, backend="auto"),
        halo_conv2d_reference(x, None, None, weight, None, 1, 1),
        rtol=0,
        atol=0,
    )


def test_the_benchmark_writes_a_dispatch_table_that_the_dispatcher_reads(monkeypatch, tmp_path):
    """``bench/kernels.py --write-dispatch`` and ``halo_conv_dispatch`` agree on the table's keys."""
    import importlib.util
    from pathlib import Path

    from distripy.kernels import halo_conv_dispatch

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))  # for its sibling module timing.py
    spec = importlib.util.spec_from_file_location("bench_kernels", bench / "kernels.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)

    row = dict(in_channels=640, out_channels=320, stride=1, batch=1, band_rows=16, width=128)
    row.update(ms={"norm_conv_triton": 0.1, "norm_conv_cudnn_path": 0.2}, fused_conv_winner="triton")
    table = tmp_path / "paths.json"
    bench_kernels.write_dispatch_table([row], "Some GPU", table)
    x, weight = torch.empty(1, 640, 16, 128, dtype=torch.float16), torch.empty(320, 640, 3, 3)
    key = halo_conv_dispatch.dispatch_key("Some GPU", x, weight, 1)
    assert halo_conv_dispatch.load_table.__wrapped__(str(table)) == {key: "triton"}


def test_the_packed_weight_follows_changes_to_the_weight():
    """The kernel reads a channels-last copy of an OIHW weight, cached per weight: reused while the
    weight is unchanged, re-packed after an in-place change or a new ``.data``, dropped with it."""
    from distripy.kernels import halo_conv as module

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
    """What ``bench/kernels.py`` records beside its times: each autotuned key and its tile."""
    import triton

    from distripy.kernels import halo_conv

    config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    key = (320, 320, 16, 128, 1, 1, 3, 3, True, "torch.float16", "torch.float16")
    monkeypatch.setattr(halo_conv._halo_conv2d_tuned, "cache", {key: config}, raising=False)
    assert halo_conv.autotuned_tiles() == {
        repr(key[:9]): {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    }
