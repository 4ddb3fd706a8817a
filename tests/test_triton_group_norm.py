"""The Triton GroupNorm kernels against their torch references (``distripy/kernels/group_norm_*.py``).

Without a GPU they run under ``TRITON_INTERPRET=1`` (set in conftest.py) on small shapes: odd
widths, bands of 1-3 rows, channel groups that do not fill a tile, NCHW, channels-last and band
views, each dtype; outputs are poisoned with NaN first and every element is checked; every case
draws fresh random inputs. The partial sums per spatial chunk (``group_norm_partial_stats``) and
their sum into kept buffers (``group_norm_sum_partials``) are checked against float64 sums of the
same chunks, for several chunk counts (1 included), with the outputs given or not.
"""

import itertools

import pytest
import torch

from distripy.errors import InputError
from distripy.kernels import group_norm_partial_stats, group_norm_sum_partials
from distripy.kernels.group_norm_apply import group_norm_apply_reference, group_norm_apply_triton
from distripy.kernels.group_norm_stats import group_norm_stats_triton, stats_tiling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, channels, groups, height, width)
SHAPES = [(1, 6, 2, 1, 7), (2, 12, 4, 3, 5), (1, 10, 2, 2, 9), (3, 8, 8, 1, 3), (1, 64, 32, 3, 11)]
LAYOUTS = ["nchw", "channels_last", "band_view"]


def _input(shape, dtype, layout, seed):
    batch, channels, _, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, channels, height + 2, width, generator=generator) * 1.5 + 0.3
    x = full[:, :, 1 : height + 1] if layout == "band_view" else full[:, :, :height].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device=DEVICE, dtype=dtype)


def _tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


CASES = list(itertools.product(SHAPES, DTYPES, LAYOUTS))


@pytest.mark.parametrize("shape, dtype, layout", CASES)
def test_stats_kernel_matches_the_reference(shape, dtype, layout):
    seed = CASES.index((shape, dtype, layout))
    x = _input(shape, dtype, layout, seed)
    groups = shape[2]
    stats = group_norm_stats_triton(x, groups, chunks=1 + seed % 3)  # 1, 2 or 3 spatial chunks
    grouped = x.double().reshape(shape[0], groups, -1)  # float64, computed another way
    expected = torch.stack((grouped.sum(-1), (grouped**2).sum(-1)), dim=-1)
    assert stats.dtype == torch.float32 and stats.shape == (shape[0], groups, 2)
    torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape, dtype, layout", CASES)
def test_apply_kernel_matches_the_reference(shape, dtype, layout):
    seed = 1000 + CASES.index((shape, dtype, layout))
    silu = seed % 2 == 1  # every other case: SiLU is a constexpr branch, both are compiled
    batch, channels, groups, height, width = shape
    x = _input(shape, dtype, layout, seed)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, groups, generator=generator).to(DEVICE)
    rstd = (torch.rand(batch, groups, generator=generator) + 0.5).to(DEVICE)
    weight = torch.randn(channels, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(channels, generator=generator).to(DEVICE, dtype)
    expected = group_norm_apply_reference(x, mean, rstd, weight, bias, groups, silu)
    # into the interior rows of a NaN-poisoned buffer (as a halo-padded buffer would be)
    padded = torch.full((batch, channels, height + 2, width), float("nan"), device=DEVICE, dtype=dtype)
    interior = padded[:, :, 1 : height + 1]
    out = group_norm_apply_triton(x, mean, rstd, weight, bias, groups, silu, out=interior)
    assert out.data_ptr() == interior.data_ptr()
    torch.testing.assert_close(interior.float(), expected.float(), **_tolerance(dtype))
    assert torch.isnan(padded[:, :, 0]).all() and torch.isnan(padded[:, :, -1]).all()
    # without affine, into a fresh tensor
    plain = group_norm_apply_triton(x, mean, rstd, None, None, groups, silu)
    expected_plain = group_norm_apply_reference(x, mean, rstd, None, None, groups, silu)
    torch.testing.assert_close(plain.float(), expected_plain.float(), **_tolerance(dtype))


def _chunk_sums_float64(x, groups, chunk):
    """``(B, G, chunks, 2)`` float64 sums over chunks of ``chunk`` flat spatial positions, by
    slicing (not as the kernel or the reference do it)."""
    grouped = x.double().reshape(x.shape[0], groups, x.shape[1] // groups, -1)
    pieces = [grouped[..., start : start + chunk] for start in range(0, grouped.shape[-1], chunk)]
    return torch.stack(
        [torch.stack((piece.sum((-2, -1)), piece.square().sum((-2, -1))), dim=-1) for piece in pieces], dim=2
    )


# bands of 33 to 65 positions: up to 5 chunks of whole 16-position tiles; 3 and 5 channels a group
PARTIAL_SHAPES = [(2, 12, 4, 5, 13), (1, 10, 2, 7, 9), (3, 9, 3, 3, 11), (1, 64, 32, 3, 11)]
PARTIAL_CASES = list(itertools.product(PARTIAL_SHAPES, DTYPES, LAYOUTS))


@pytest.mark.parametrize("shape, dtype, layout", PARTIAL_CASES)
def test_partial_stats_kernel_matches_the_reference(shape, dtype, layout):
    seed = 2000 + PARTIAL_CASES.index((shape, dtype, layout))
    x = _input(shape, dtype, layout, seed)
    batch, _, groups, height, width = shape
    asked = [None, 1, 2, 3, 5][seed % 5]
    tiling = stats_tiling(x, groups, asked)
    partial = group_norm_partial_stats(x, groups, asked, backend="triton")
    expected = _chunk_sums_float64(x, groups, tiling.chunk)
    assert partial.dtype == torch.float32 and partial.shape == (batch, groups, tiling.chunks, 2)
    assert expected.shape == partial.shape  # the chunks cover the band, none empty
    torch.testing.assert_close(partial.double(), expected, rtol=1e-5, atol=1e-3)
    reference = group_norm_partial_stats(x, groups, asked, backend="torch")
    assert reference.shape == partial.shape
    torch.testing.assert_close(reference.double(), expected, rtol=1e-5, atol=1e-3)


def test_partial_stats_split_a_band_into_the_chunks_asked_for():
    x = _input((1, 8, 4, 4, 20), torch.float32, "nchw", 3000)  # 80 positions: 5 tiles of 16
    for asked, chunks in ((1, 1), (2, 2), (3, 3), (5, 5), (40, 5)):  # at least 16 positions a chunk
        partial = group_norm_partial_stats(x, 4, asked, backend="triton")
        assert partial.shape == (1, 4, chunks, 2), asked
        expected = _chunk_sums_float64(x, 4, stats_tiling(x, 4, asked).chunk)
        torch.testing.assert_close(partial.double(), expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(InputError, match="chunks must be positive, got 0"):
        group_norm_partial_stats(x, 4, 0)
    with pytest.raises(InputError, match="8 channels do not split into num_groups=3"):
        group_norm_partial_stats(x, 3)
    with pytest.raises(InputError, match=r"must not be empty, got shape \(1, 8, 0, 20\)"):
        group_norm_partial_stats(x[:, :, :0], 4, backend="triton")


# (batch, groups, chunks): odd group counts, one chunk, more chunks than a block holds groups
SUM_SHAPES = [(1, 3, 1), (2, 5, 2), (3, 7, 5), (2, 32, 9), (1, 1, 4)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("outputs", ["both", "first", "second", "none"])
@pytest.mark.parametrize("shape", SUM_SHAPES)
def test_sum_partials_writes_the_sums_into_every_buffer_given(backend, outputs, shape):
    seed = 4000 + 10 * SUM_SHAPES.index(shape) + ["both", "first", "second", "none"].index(outputs)
    generator = torch.Generator().manual_seed(seed)
    batch, groups, chunks = shape
    partials = (torch.randn(batch, groups, chunks, 2, generator=generator) * 50 + 3).to(DEVICE)
    expected = partials.double().sum(dim=2)
    poisoned = [torch.full((batch, groups, 2), float("nan"), device=DEVICE) for _ in range(2)]
    given = {
        "both": tuple(poisoned),
        "first": (poisoned[0], None),
        "second": (None, poisoned[1]),
        "none": (),
    }[outputs]
    sums = group_norm_sum_partials(partials, sums_out=given, backend=backend)
    assert sums.shape == (batch, groups, 2) and sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), expected, rtol=1e-6, atol=1e-4)
    written = [out for out in given if out is not None]
    if written:
        assert sums is written[0]
    for out in written:
        assert torch.equal(out, sums)  # every element overwritten, the same values in each
    for out in poisoned:
        if not any(out is w for w in written):
            assert torch.isnan(out).all()  # a buffer not given is not touched


@pytest.mark.parametrize("chunks", [1, 3])
def test_sum_partials_of_sums_is_a_copy(chunks):
    """(B, G, 2) sums are one chunk; (B, G, chunks, 2) sums of one chunk each add up exactly."""
    generator = torch.Generator().manual_seed(4100 + chunks)
    sums = torch.randn(2, 3, 2, generator=generator).to(DEVICE)
    partials = torch.zeros(2, 3, chunks, 2, device=DEVICE)
    partials[:, :, chunks // 2] = sums
    for backend in ("torch", "triton"):
        assert torch.equal(group_norm_sum_partials(sums, backend=backend), sums)
        assert torch.equal(group_norm_sum_partials(partials, backend=backend), sums)


def test_sum_partials_checks_its_arguments():
    partials = torch.zeros(2, 4, 3, 2)
    good = torch.zeros(2, 4, 2)
    with pytest.raises(InputError, match=r"partials must be \(B, G, 2\) float32 sums or"):
        group_norm_sum_partials(partials.double())
    with pytest.raises(InputError, match=r"sums_out\[1\] must be a contiguous \(2, 4, 2\) float32"):
        group_norm_sum_partials(partials, (good, torch.zeros(2, 4, 3)))
    with pytest.raises(InputError, match=r"sums_out\[0\] must be a contiguous"):
        group_norm_sum_partials(partials, (torch.zeros(2, 2, 4).transpose(1, 2),))
    with pytest.raises(InputError, match=r"sums_out\[0\] must be a contiguous .* torch.float16"):
        group_norm_sum_partials(partials, (good.half(),))
    with pytest.raises(InputError, match="at most 2 tensors, got 3"):
        group_norm_sum_partials(partials, (good, good.clone(), good.clone()))
    with pytest.raises(InputError, match="the same tensor twice"):
        group_norm_sum_partials(partials, (good, good))
    with pytest.raises(ValueError, match="backend='cuda'"):
        group_norm_sum_partials(partials, backend="cuda")


def test_partial_ops_pass_opcheck():
    opcheck_tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    x = _input((2, 12, 4, 3, 5), torch.float32, "band_view", 4200)
    for chunks in (None, 2):
        torch.library.opcheck(
            torch.ops.distripy.group_norm_partial_stats.default, (x, 4, chunks), test_utils=opcheck_tests
        )
    partials = group_norm_partial_stats(x, 4, 2, backend="triton")
    for second in (None, torch.empty(2, 4, 2, device=DEVICE)):
        torch.library.opcheck(
            torch.ops.distripy.group_norm_sum_partials.default,
            (partials, torch.empty(2, 4, 2, device=DEVICE), second),
            test_utils=opcheck_tests,
        )
