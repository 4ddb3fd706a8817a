"""The receivers' fused step over fp8 baselines (``distripy/kernels/residual_fp8_decode.py``): the
Triton kernel (``TRITON_INTERPRET=1`` on CPU) against its reference, the composition of the three
ops it fuses (fp8 decode, residual decode, fp8 encode), bit for bit in ``out`` and in the stored
bytes; and a receiver that runs it holds the bytes its sender (the three ops around its encode)
holds. Fresh random data in every test: zero rows, rows marked non-finite in the change and in the
baseline, values near the dtype's largest, shapes with partial row blocks and column tiles."""

import pytest
import torch

from distripy.errors import InputError
from distripy.kernels.fp8_codec import fp8_decode_, fp8_encode_, fp8_layout
from distripy.kernels.residual_codec import RESIDUAL_BITS, residual_decode_, residual_encode_, residual_layout
from distripy.kernels.residual_fp8_decode import residual_fp8_decode_, residual_fp8_decode_reference_

SHAPES = [(1, 1), (3, 13), (17, 37), (20, 300)]  # ragged last byte, partial row blocks and column tiles
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _exchange(rows, cols, dtype, bits, seed, scale=1.0, backend="torch"):
    """A sender's fp8 baseline and the change it sends: ``(store, packed, sender_store)``, where
    ``sender_store`` is the sender's baseline after its step (decoded, encoded against, stored:
    the three ops, on ``backend``)."""
    generator = torch.Generator().manual_seed(seed)
    baseline = (torch.randn(rows, cols, generator=generator, dtype=torch.float64) * scale).to(dtype)
    if rows > 2:
        baseline[1] = 0  # a zero row
    store = torch.empty(fp8_layout(rows, cols).nbytes, dtype=torch.uint8)
    fp8_encode_(baseline, store, "torch")
    x = (baseline.double() + 0.3 * scale * torch.randn(rows, cols, generator=generator, dtype=torch.float64)).to(dtype)
    if rows > 2:
        x[2, cols // 2] = float("nan")  # a row the encoder marks: not changed on either side
    sender = store.clone()
    own = torch.empty(rows, cols, dtype=dtype)
    fp8_decode_(sender, own, backend)
    packed = torch.empty(residual_layout(rows, cols, bits).nbytes, dtype=torch.uint8)
    residual_encode_(x, own, packed, bits, backend)
    fp8_encode_(own, sender, backend)
    return store, packed, sender


def _bytes(store, rows, cols):
    """The row scales and codes of a packed fp8 buffer (its padding is never written)."""
    return store[: 4 * rows + rows * cols]


def _composed(packed, store, out, bits, backend):
    """The three ops the kernel fuses, one after the other, on ``backend``."""
    fp8_decode_(store, out, backend)
    residual_decode_(packed, out, bits, backend)
    fp8_encode_(out, store, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", RESIDUAL_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_is_the_three_ops_bit_for_bit(shape, bits, dtype):
    """On each backend, the fused step is its three ops, bit for bit, and a receiver stores what its
    sender stored. Across backends: equal for fp16 and fp32; for bf16 the interpreter rounds its
    casts otherwise than torch, so only close."""
    seed = hash((shape, bits, str(dtype))) % 1000
    results = {}
    for backend in ("torch", "triton"):
        store, packed, sender = _exchange(*shape, dtype, bits, seed, backend=backend)
        kept, out = store.clone(), torch.full(shape, float("nan"), dtype=dtype)
        residual_fp8_decode_(packed, kept, out, bits, backend=backend)
        composed_store, composed = store.clone(), torch.full(shape, float("nan"), dtype=dtype)
        _composed(packed, composed_store, composed, bits, backend)
        assert torch.equal(_bytes(kept, *shape), _bytes(composed_store, *shape)), backend
        assert torch.equal(out.view(torch.uint8), composed.view(torch.uint8)), backend
        assert torch.equal(_bytes(kept, *shape), _bytes(sender, *shape)), backend  # as its sender stored
        assert torch.isfinite(out).all()
        results[backend] = (kept, out)
    # the kernel and the reference on the same bytes (the two encoders' sums may round apart)
    store, packed, _ = _exchange(*shape, dtype, bits, seed)
    for backend in ("torch", "triton"):
        kept, out = store.clone(), torch.full(shape, float("nan"), dtype=dtype)
        residual_fp8_decode_(packed, kept, out, bits, backend=backend)
        results[backend] = (kept, out)
    (kept, out), (kernel_kept, kernel_out) = results["torch"], results["triton"]
    if dtype != torch.bfloat16:
        assert torch.equal(_bytes(kernel_kept, *shape), _bytes(kept, *shape))
        assert torch.equal(kernel_out.view(torch.uint8), out.view(torch.uint8))
    else:
        torch.testing.assert_close(kernel_out, out, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_marked_rows_and_overflow(backend):
    """A baseline row marked non-finite keeps ``out``'s row (plus the change), as the fp8 decoder
    leaves it; a sum that overflows the dtype is stored marked."""
    rows, cols, bits, dtype = 5, 40, 2, torch.float16
    store, packed, _ = _exchange(rows, cols, dtype, bits, seed=3, scale=2.0e4)
    scales = store[: 4 * rows].view(torch.float32)
    scales[3] = float("nan")  # the baseline's row 3 marked
    before = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4)).to(dtype)
    expected_store, expected = store.clone(), before.clone()
    residual_fp8_decode_reference_(packed, expected_store, expected, bits)
    kept, out = store.clone(), before.clone()
    residual_fp8_decode_(packed, kept, out, bits, backend=backend)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(_bytes(kept, rows, cols), _bytes(expected_store, rows, cols))
    changed = before.clone()  # row 3: ``out``'s own, plus the change
    residual_decode_(packed, changed, bits, "torch")
    assert torch.equal(out[3], changed[3]) and not torch.equal(out[3], before[3])
    overflowed = ~torch.isfinite(out).all(dim=1)
    assert torch.equal(torch.isnan(kept[: 4 * rows].view(torch.float32)), overflowed), overflowed


def test_bad_arguments_are_named():
    out = torch.zeros(4, 8)
    store = torch.empty(fp8_layout(4, 8).nbytes, dtype=torch.uint8)
    packed = torch.empty(residual_layout(4, 8, 2).nbytes, dtype=torch.uint8)
    with pytest.raises(InputError, match="out must be 2-D"):
        residual_fp8_decode_(packed, store, out[0], 2)
    with pytest.raises(InputError, match="residual codec"):
        residual_fp8_decode_(packed[:-4], store, out, 2, backend="triton")
    with pytest.raises(InputError, match="fp8 codec"):
        residual_fp8_decode_(packed, store[:-4], out, 2)
    with pytest.raises(InputError, match="bits=3"):
        residual_fp8_decode_(packed, store, out, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", RESIDUAL_BITS)
def test_on_a_gpu_a_receiver_stores_what_its_sender_stores(dtype, bits):
    """The compiled kernels (FP contraction is the compiler's choice), at a band's size: the fused
    step equals its three ops bit for bit, and what a receiver stores is what its sender (its three
    ops around the Triton encoder) stored."""
    rows, cols = 1024, 1280
    store, packed, sender = (t.cuda() for t in _exchange(rows, cols, dtype, bits, seed=bits, backend="torch"))
    own = torch.empty(rows, cols, dtype=dtype, device="cuda")
    x = torch.randn(rows, cols, dtype=torch.float32, device="cuda").to(dtype)
    sender = store.clone()
    fp8_decode_(sender, own, "triton")
    residual_encode_(x, own, packed, bits, "triton")
    fp8_encode_(own, sender, "triton")
    kept, out = store.clone(), torch.empty(rows, cols, dtype=dtype, device="cuda")
    residual_fp8_decode_(packed, kept, out, bits, backend="triton")
    composed_store, composed = store.clone(), torch.empty(rows, cols, dtype=dtype, device="cuda")
    _composed(packed, composed_store, composed, bits, "triton")
    assert torch.equal(out.view(torch.uint8), composed.view(torch.uint8))
    assert torch.equal(_bytes(kept, rows, cols), _bytes(composed_store, rows, cols))
    assert torch.equal(_bytes(kept, rows, cols), _bytes(sender, rows, cols))
