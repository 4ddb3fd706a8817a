"""The fp8 exchange codec (``distripy/kernels/fp8_codec.py``): the torch reference against e4m3
rounding written another way (float64 numpy: every e4m3 value listed, the nearest taken, ties to
the even code), the Triton kernels (``TRITON_INTERPRET=1`` on CPU) against the reference code for
code, the round trip within half an e4m3 step, and zero, huge, tiny and non-finite values. Fresh
random data in every test."""

import numpy as np
import pytest
import torch

from distripy.errors import InputError
from distripy.kernels.fp8_codec import E4M3_MAX, fp8_decode_, fp8_encode_, fp8_layout, nonfinite_rows

SHAPES = [(1, 1), (3, 13), (17, 37), (40, 300)]  # partial row blocks and column tiles
BACKENDS = ("torch", "triton")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _e4m3_table():
    """Every finite e4m3fn value by code (float64), written from the format: 1 sign, 4 exponent
    (bias 7), 3 mantissa bits; exponent 0 subnormal; 0x7F and 0xFF nan."""
    values = np.full(256, np.nan)
    for code in range(256):
        sign, exponent, mantissa = code >> 7, (code >> 3) & 15, code & 7
        if exponent == 15 and mantissa == 7:
            continue
        magnitude = mantissa * 2.0**-9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        values[code] = -magnitude if sign else magnitude
    return values


TABLE = _e4m3_table()


def _numpy_encode(x):
    """(scales, codes) in float64 numpy, row by row, element by element."""
    x = np.asarray(x, np.float64)
    rows, cols = x.shape
    scales, codes = np.zeros(rows), np.zeros((rows, cols), np.int64)
    positive = np.array([c for c in range(128) if not np.isnan(TABLE[c])])
    for i in range(rows):
        if not np.all(np.isfinite(x[i])):
            scales[i] = np.nan
            continue
        amax = np.abs(x[i]).max()
        e = -126
        while amax > E4M3_MAX * 2.0**e:
            e += 1
        scales[i] = 2.0**e
        for j in range(cols):
            y = x[i, j] / scales[i]
            distance = np.abs(TABLE[positive] - abs(y))
            nearest = positive[distance == distance.min()]
            code = int(nearest[0] if len(nearest) == 1 else nearest[nearest % 2 == 0][0])  # ties: even
            codes[i, j] = code | (128 if np.signbit(y) else 0)
    return scales, codes


def _data(rows, cols, dtype, seed, scale=None):
    """Normal values whose rows differ in magnitude; or, with ``scale``, within ``3 * scale``."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    if scale is None:
        values *= torch.exp(2 * torch.randn(rows, 1, generator=generator, dtype=torch.float64))
    else:
        values = values.clamp(-3, 3) * scale  # fp16's largest is 65504
    return values.to(dtype)


def _encoded(x, backend):
    layout = fp8_layout(*x.shape)
    packed = torch.zeros(layout.nbytes, dtype=torch.uint8, device=x.device)  # the padding compares equal
    fp8_encode_(x, packed, backend=backend)
    return packed, layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_the_reference_rounds_to_the_nearest_e4m3_value_ties_to_even(dtype, shape):
    x = _data(*shape, dtype, seed=hash((str(dtype), shape)) % 1000)
    x[0, 0] = 0.0
    packed, layout = _encoded(x, "torch")
    scales, codes = layout.views(packed)
    want_scales, want_codes = _numpy_encode(x.double())
    np.testing.assert_array_equal(scales.numpy(), want_scales)
    np.testing.assert_array_equal(codes.numpy().astype(np.int64), want_codes)


def test_ties_round_to_the_even_code_in_both_ranges():
    """Halfway between two e4m3 values, normal and subnormal: the even code; just past: the next."""
    row = [448.0, 1.0625, 1.1875, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-10, 1.0625 + 2.0**-12]
    x = torch.tensor([row], dtype=torch.float32)
    for backend in BACKENDS:
        packed, layout = _encoded(x, backend)
        _, codes = layout.views(packed)
        # 448; 1.0625 -> 1 (code 56, even), 1.1875 -> 1.25 (58); 1.5 and 2.5 subnormal steps -> 2 and 2;
        # half a step -> 0; just past a tie -> up
        assert codes[0].tolist() == [126, 56, 58, 2, 2, 0, 57], backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_triton_kernels_equal_the_reference(dtype, shape):
    x = _data(*shape, dtype, seed=hash((str(dtype), shape, "triton")) % 1000)
    x[-1, -1] = -0.0
    got, layout = _encoded(x, "triton")
    want, _ = _encoded(x, "torch")
    assert torch.equal(got, want)
    outs = {backend: torch.full(shape, 7.0, dtype=dtype) for backend in BACKENDS}
    for backend, out in outs.items():
        fp8_decode_(got, out, backend=backend)
    assert torch.equal(outs["triton"], outs["torch"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_round_trip_is_within_half_an_e4m3_step(backend, dtype):
    x = _data(33, 70, dtype, seed=5)
    packed, layout = _encoded(x, backend)
    out = torch.empty_like(x)
    fp8_decode_(packed, out, backend=backend)
    scales, _ = layout.views(packed)
    values, decoded = x.double().numpy(), out.double().numpy()
    scale = scales.double().numpy()[:, None]
    y = np.abs(values) / scale
    # half the spacing of e4m3 at |y| (2^-10 below 2^-6), in the row's units, plus the output's rounding
    step = np.where(y < 2.0**-6, 2.0**-9, 2.0 ** (np.floor(np.log2(np.maximum(y, 2.0**-6))) - 3))
    rounding = np.abs(values) * {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[dtype]
    assert np.all(np.abs(decoded - values) <= step / 2 * scale + rounding)
    assert np.all(np.abs(values).max(axis=1) <= E4M3_MAX * scale[:, 0])  # nothing saturated


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 2e4), (torch.float32, 1e30), (torch.float32, 1e-30)])
def test_zero_huge_and_tiny_rows_stay_finite(backend, dtype, scale):
    x = _data(5, 40, dtype, seed=11, scale=scale)
    x[2] = 0.0
    packed, layout = _encoded(x, backend)
    scales, codes = layout.views(packed)
    assert torch.isfinite(scales).all() and int(nonfinite_rows(packed, 5)) == 0
    assert scales[2] == 2.0**-126 and not codes[2].any()
    out = torch.empty_like(x)
    fp8_decode_(packed, out, backend=backend)
    assert torch.isfinite(out).all() and not out[2].any()
    relative = (out.double() - x.double()).abs() / x.double().abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    assert relative.max() <= 2.0**-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_value_marks_its_row_which_the_decoder_leaves_alone(backend, bad):
    x = _data(6, 20, torch.float16, seed=13)
    x[1, 7] = bad
    x[4, 0] = bad
    packed, layout = _encoded(x, backend)
    scales, codes = layout.views(packed)
    assert torch.isnan(scales).tolist() == [False, True, False, False, True, False]
    assert int(nonfinite_rows(packed, 6)) == 2 and not codes[1].any() and not codes[4].any()
    before = torch.randn(6, 20, generator=torch.Generator().manual_seed(14)).half()
    out = before.clone()
    fp8_decode_(packed, out, backend=backend)
    assert torch.equal(out[[1, 4]], before[[1, 4]])
    good = [0, 2, 3, 5]
    assert (out[good].float() - x[good].float()).abs().max() <= 2.0**-4 * x[good].float().abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_a_wider_buffer_are_read_and_written_in_place(backend):
    wide = _data(9, 50, torch.bfloat16, seed=17)
    x = wide[:, 10:40]
    packed, layout = _encoded(x, backend)
    want, _ = _encoded(x.contiguous(), "torch")
    assert torch.equal(packed, want)
    target = torch.zeros(9, 50, dtype=torch.bfloat16)
    fp8_decode_(packed, target[:, 5:35], backend=backend)
    expected = torch.empty(9, 30, dtype=torch.bfloat16)
    fp8_decode_(want, expected, backend="torch")
    assert torch.equal(target[:, 5:35], expected) and not target[:, :5].any() and not target[:, 35:].any()


def test_bytes_on_the_wire():
    """A band's K/V at SDXL's 1024^2 middle level (1024 tokens x 1280 fp16): half, plus 4 bytes a row."""
    layout = fp8_layout(1024, 1280)
    assert layout.nbytes == 1024 * 4 + 1024 * 1280
    assert 2 * 1024 * 1280 / layout.nbytes > 1.99
    assert fp8_layout(3, 5).nbytes == 12 + 16  # the codes padded to 4 bytes


def test_bad_arguments_are_refused_naming_them():
    x = torch.randn(4, 6)
    packed = torch.empty(fp8_layout(4, 6).nbytes, dtype=torch.uint8)
    with pytest.raises(InputError, match="2-D"):
        fp8_encode_(x[None], packed)
    with pytest.raises(InputError, match="empty"):
        fp8_layout(0, 6)
    with pytest.raises(InputError, match="uint8 \\(40,\\)"):
        fp8_encode_(x, packed[:-4])
    with pytest.raises(InputError, match="int32 is not a floating type"):
        fp8_encode_(x.int(), packed)
    with pytest.raises(InputError, match="stride 1"):
        fp8_decode_(packed, torch.empty(6, 4).t())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_on_a_gpu_the_kernels_equal_the_reference(dtype):
    """On the GPU's own arithmetic (FP contraction, flushed subnormals are the compiler's): the
    kernels' codes and values equal the reference's at SDXL's 1024^2 middle level."""
    x = _data(1024, 1280, dtype, seed=19).cuda()
    got, layout = _encoded(x, "triton")
    want, _ = _encoded(x, "torch")
    assert torch.equal(got, want)
    out, expected = torch.empty_like(x), torch.empty_like(x)
    fp8_decode_(got, out, backend="triton")
    fp8_decode_(want, expected, backend="torch")
    assert torch.equal(out, expected)
