"""The residual exchange codec (``distripy/kernels/residual_codec.py``): its torch reference against
the same math written another way (numpy, float64, element by element where the reference is
vectorised), the Triton kernels (``TRITON_INTERPRET=1`` on CPU) against the reference, a sender's
and its receivers' baselines bit-identical, error feedback keeping the error from growing, and
zero, huge and non-finite values. Fresh random data in every test."""

import numpy as np
import pytest
import torch

from distripy.errors import InputError
from distripy.kernels.residual_codec import (
    RESIDUAL_BITS,
    nonfinite_rows,
    residual_decode_,
    residual_encode_,
    residual_layout,
)

SHAPES = [(1, 1), (3, 13), (17, 37), (40, 64), (5, 130)]  # ragged last byte, partial row blocks
BACKENDS = ("torch", "triton")


def _pair(rows, cols, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    baseline = (torch.randn(rows, cols, generator=generator, dtype=torch.float64) * scale).to(dtype)
    x = (baseline.double() + 0.3 * scale * torch.randn(rows, cols, generator=generator, dtype=torch.float64)).to(dtype)
    return x, baseline


def _numpy_encode(x, baseline, bits):
    """The codec's math in float64 numpy, loops where the reference is vectorised: (codes per
    element, row scales, column scales, the updated baseline in float64)."""
    r = np.asarray(x, np.float64) - np.asarray(baseline, np.float64)
    rows, cols = r.shape
    bad = np.array([not np.all(np.isfinite(r[i])) for i in range(rows)])
    good_rows = [i for i in range(rows) if not bad[i]]
    a = np.array([np.abs(r[i]).mean() if not bad[i] else np.nan for i in range(rows)])
    col_means = np.array([np.mean([abs(r[i, j]) for i in good_rows]) if good_rows else 0.0 for j in range(cols)])
    mean = col_means.mean()
    c = col_means / mean if mean > 0 else np.zeros(cols)
    codes = np.zeros((rows, cols), np.int64)
    updated = np.asarray(baseline, np.float64).copy()
    for i in good_rows:
        for j in range(cols):
            s = a[i] * c[j]
            if bits == 1:
                code = int(r[i, j] >= 0)
                level = 2 * code - 1
            else:
                code = int(r[i, j] >= -s) + int(r[i, j] >= 0) + int(r[i, j] >= s)
                level = code - 1.5
            codes[i, j] = code
            updated[i, j] += level * s
    return codes, a, c, updated


def _unpacked(packed, layout):
    _, _, codes = layout.views(packed)
    out = np.zeros((layout.rows, layout.row_bytes * layout.per_byte), np.int64)
    for i in range(layout.rows):
        for k in range(layout.row_bytes):
            byte = int(codes[i, k])
            for p in range(layout.per_byte):
                out[i, k * layout.per_byte + p] = (byte >> (p * layout.bits)) & ((1 << layout.bits) - 1)
    return out[:, : layout.cols], out[:, layout.cols :]


@pytest.mark.parametrize("bits", RESIDUAL_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_reference_is_the_math_in_float64(bits, shape):
    x, baseline = _pair(*shape, torch.float64, seed=hash((bits, shape)) % 1000)
    codes, a, c, updated = _numpy_encode(x, baseline, bits)
    layout = residual_layout(*shape, bits)
    packed = torch.empty(layout.nbytes, dtype=torch.uint8)
    sender = baseline.clone()
    residual_encode_(x, sender, packed, bits, backend="torch")
    row_scales, col_scales, _ = layout.views(packed)
    got_codes, padding = _unpacked(packed, layout)
    np.testing.assert_array_equal(got_codes, codes)
    assert not padding.any()  # a row's last byte padded with zero codes
    np.testing.assert_allclose(row_scales.numpy(), a, rtol=1e-6)  # sent as fp32
    np.testing.assert_allclose(col_scales.numpy(), c, rtol=1e-6)
    np.testing.assert_allclose(sender.numpy(), updated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", RESIDUAL_BITS)
def test_receivers_end_with_the_senders_baseline_bit_for_bit(backend, dtype, bits):
    """Whatever the backend, a receiver decoding the packed bytes into its copy of the baseline
    holds exactly what the sender holds: they never drift apart."""
    x, baseline = _pair(33, 70, dtype, seed=bits + 7)
    layout = residual_layout(33, 70, bits)
    packed = torch.empty(layout.nbytes, dtype=torch.uint8)
    sender, receiver = baseline.clone(), baseline.clone()
    for step in range(3):
        residual_encode_(x + 0.05 * step, sender, packed, bits, backend=backend)
        residual_decode_(packed, receiver, bits, backend=backend)
        assert torch.equal(sender, receiver), (step, float((sender.float() - receiver.float()).abs().max()))
        assert not torch.equal(sender, baseline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", RESIDUAL_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 37), (40, 300)])
def test_the_triton_kernels_equal_the_reference(dtype, bits, shape):
    x, baseline = _pair(*shape, dtype, seed=sum(shape) + bits)
    layout = residual_layout(*shape, bits)
    packed = {b: torch.empty(layout.nbytes, dtype=torch.uint8) for b in BACKENDS}
    sender = {b: baseline.clone() for b in BACKENDS}
    for backend in BACKENDS:
        residual_encode_(x, sender[backend], packed[backend], bits, backend=backend)
    (rows_t, cols_t, _), (rows_k, cols_k, _) = (layout.views(packed[b]) for b in BACKENDS)
    torch.testing.assert_close(rows_k, rows_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cols_k, cols_t, rtol=1e-5, atol=1e-7)
    codes_t, _ = _unpacked(packed["torch"], layout)
    codes_k, _ = _unpacked(packed["triton"], layout)
    # a residual within rounding of a threshold may fall either side; nothing else differs
    assert (codes_t != codes_k).mean() <= 0.01, (codes_t != codes_k).sum()
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    different = (sender["triton"].float() - sender["torch"].float()).abs() > tolerance * (
        1 + sender["torch"].float().abs()
    )
    assert different.float().mean() <= 0.01
    # and the Triton decoder applies the reference's packed bytes as the reference does
    receiver = {b: baseline.clone() for b in BACKENDS}
    for backend in BACKENDS:
        residual_decode_(packed["torch"], receiver[backend], bits, backend=backend)
    torch.testing.assert_close(receiver["triton"], receiver["torch"], rtol=tolerance, atol=tolerance)


def _tracking_errors(bits, backend, seed, steps=50):
    """A slowly changing tensor (a drift plus noise, one draw per seed) sent for ``steps`` steps
    from a full-precision start (the warm-up's exchange): the receivers' relative error per step."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(24, 48, generator=generator)
    drift = torch.randn(24, 48, generator=generator)
    packed = torch.empty(residual_layout(24, 48, bits).nbytes, dtype=torch.uint8)
    baseline = start.clone()
    errors = []
    for step in range(1, steps + 1):
        x = start + 0.02 * step * drift + 0.01 * torch.randn(24, 48, generator=generator)
        residual_encode_(x, baseline, packed, bits, backend=backend)
        errors.append(float((baseline - x).norm() / x.norm()))
    return errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", RESIDUAL_BITS)
def test_error_feedback_keeps_the_error_from_growing(backend, bits):
    """Over 50 steps the receivers' baseline follows the tensor and its error does not grow step
    over step."""
    errors = _tracking_errors(bits, backend, seed=bits)
    assert max(errors[25:]) <= 1.5 * max(errors[:25]), errors
    assert errors[-1] < 0.1, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_bits_track_more_closely_than_one(backend):
    two, one = (_tracking_errors(bits, backend, seed=2) for bits in (2, 1))
    assert np.mean(two) < np.mean(one), (np.mean(two), np.mean(one))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", RESIDUAL_BITS)
def test_an_unchanged_tensor_sends_zero_scales_and_changes_nothing(backend, bits):
    _, baseline = _pair(9, 21, torch.float32, seed=3)
    layout = residual_layout(9, 21, bits)
    packed = torch.full((layout.nbytes,), 255, dtype=torch.uint8)
    sender, receiver = baseline.clone(), baseline.clone()
    residual_encode_(baseline.clone(), sender, packed, bits, backend=backend)
    residual_decode_(packed, receiver, bits, backend=backend)
    row_scales, col_scales, _ = layout.views(packed)
    assert not row_scales.any() and not col_scales.any()
    assert torch.equal(sender, baseline) and torch.equal(receiver, baseline)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 2e4), (torch.float32, 1e30), (torch.float32, 1e-30)])
def test_huge_and_tiny_values_stay_finite_and_tracked(backend, dtype, scale):
    x, baseline = _pair(12, 40, dtype, seed=5, scale=scale)
    layout = residual_layout(12, 40, 2)
    packed = torch.empty(layout.nbytes, dtype=torch.uint8)
    sender, receiver = baseline.clone(), baseline.clone()
    before = float((baseline.double() - x.double()).norm())
    residual_encode_(x, sender, packed, 2, backend=backend)
    residual_decode_(packed, receiver, 2, backend=backend)
    assert torch.isfinite(sender).all() and torch.equal(sender, receiver)
    assert int(nonfinite_rows(packed, 12)) == 0
    assert float((sender.double() - x.double()).norm()) < 0.7 * before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_value_marks_its_row_and_never_reaches_a_baseline(backend, bad):
    x, baseline = _pair(20, 33, torch.float32, seed=11)
    x[3, 7] = bad
    x[17, 0] = bad
    layout = residual_layout(20, 33, 2)
    packed = torch.empty(layout.nbytes, dtype=torch.uint8)
    sender, receiver = baseline.clone(), baseline.clone()
    residual_encode_(x, sender, packed, 2, backend=backend)
    residual_decode_(packed, receiver, 2, backend=backend)
    assert int(nonfinite_rows(packed, 20)) == 2
    clean = torch.empty_like(packed)
    residual_encode_(torch.randn(20, 33), baseline.clone(), clean, 2, backend=backend)
    # a batch of packed buffers (items, nbytes): one count over every item
    assert int(nonfinite_rows(torch.stack([packed, clean, packed]), 20)) == 4
    assert torch.isfinite(sender).all() and torch.isfinite(receiver).all()
    for row in (3, 17):  # left as they were, on both sides
        assert torch.equal(sender[row], baseline[row]) and torch.equal(receiver[row], baseline[row])
    # the other rows are encoded as if the marked ones were absent
    good = [row for row in range(20) if row not in (3, 17)]
    expected_codes, _, expected_c, expected = _numpy_encode(x[good], baseline[good], 2)
    np.testing.assert_allclose(layout.views(packed)[1].numpy(), expected_c, rtol=1e-4)
    np.testing.assert_allclose(sender[good].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(sender, receiver)


def test_bytes_on_the_wire():
    """A band's keys and values of SDXL's 1024² middle level (1024 tokens x 2 x 640 channels, fp16)
    take >= 7x fewer bytes at 2 bits and >= 14x at 1 bit, scales included."""
    fp16 = 1024 * 1280 * 2
    assert fp16 / residual_layout(1024, 1280, 2).nbytes >= 7
    assert fp16 / residual_layout(1024, 1280, 1).nbytes >= 14


def test_bad_arguments_are_refused_naming_them():
    x, baseline = _pair(4, 8, torch.float32, seed=0)
    packed = torch.empty(residual_layout(4, 8, 2).nbytes, dtype=torch.uint8)
    with pytest.raises(InputError, match="bits=3"):
        residual_encode_(x, baseline, packed, 3)
    with pytest.raises(InputError, match=r"uint8 \(\d+,\)"):
        residual_encode_(x, baseline, packed[:-4], 2)
    with pytest.raises(InputError, match="must agree"):
        residual_encode_(x.half(), baseline, packed, 2)
    with pytest.raises(InputError, match="2-D"):
        residual_encode_(x[None], baseline[None], packed, 2)
    with pytest.raises(InputError, match="contiguous"):
        residual_encode_(x.t().contiguous().t(), baseline, packed, 2)
    with pytest.raises(InputError, match="not be empty"):
        residual_layout(0, 8, 2)
    with pytest.raises(InputError, match="backend='fast'"):
        residual_decode_(packed, baseline, 2, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_a_wider_buffer_are_read_in_place(backend):
    """A band's slot in the gathered keys/values buffer is rows with a stride wider than the row."""
    x, baseline = _pair(10, 64, torch.float32, seed=2)
    wide_x = torch.zeros(10, 80)
    wide_b = torch.zeros(10, 80)
    wide_x[:, :64], wide_b[:, :64] = x, baseline
    layout = residual_layout(10, 64, 1)
    packed, expected = torch.empty(layout.nbytes, dtype=torch.uint8), torch.empty(layout.nbytes, dtype=torch.uint8)
    sender = baseline.clone()
    residual_encode_(wide_x[:, :64], wide_b[:, :64], packed, 1, backend=backend)
    residual_encode_(x, sender, expected, 1, backend=backend)
    assert torch.equal(packed, expected) and torch.equal(wide_b[:, :64], sender)
    assert not wide_b[:, 64:].any()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", RESIDUAL_BITS)
def test_on_a_gpu_the_kernels_keep_sender_and_receivers_bit_identical(dtype, bits):
    """The compiled kernels (FP contraction is the compiler's choice): the encoder's and the
    decoder's baseline updates agree bit for bit, at a band's size, and equal the reference's
    within rounding."""
    x, baseline = _pair(1024, 1280, dtype, seed=bits)
    x, baseline = x.cuda(), baseline.cuda()
    layout = residual_layout(1024, 1280, bits)
    packed = torch.empty(layout.nbytes, dtype=torch.uint8, device="cuda")
    sender, receiver, reference = baseline.clone(), baseline.clone(), baseline.clone()
    for step in range(3):
        residual_encode_(x + 0.05 * step, sender, packed, bits, backend="triton")
        residual_decode_(packed, receiver, bits, backend="triton")
        assert torch.equal(sender, receiver), step
    reference_packed = torch.empty_like(packed)
    for step in range(3):
        residual_encode_(x + 0.05 * step, reference, reference_packed, bits, backend="torch")
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    different = (sender.float() - reference.float()).abs() > tolerance * (1 + reference.float().abs())
    assert different.float().mean() <= 0.01
