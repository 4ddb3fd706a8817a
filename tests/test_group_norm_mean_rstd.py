"""``group_norm_mean_rstd``: the patch GroupNorm's statistics combination as one op.

Both backends (the torch reference and the Triton kernel, under the interpreter on CPU) against the
formulas written out again in float64, on fresh random sums of real bands, for every combination,
including corrected groups whose extrapolated variance is negative (the fallback), and argument
checks. The band's sums also come as partial sums per spatial chunk (1 to 7 chunks), which the op
adds, writing the band's sums into NaN-poisoned output buffers when given (every element checked).
"""

import pytest
import torch

from distripy.errors import InputError
from distripy.kernels import Combine, group_norm_mean_rstd, group_norm_partial_stats


def _sums(x: torch.Tensor, groups: int) -> torch.Tensor:
    grouped = x.double().reshape(x.shape[0], groups, -1)
    return torch.stack((grouped.sum(-1), grouped.square().sum(-1)), dim=-1)


def _expected(own, image_prev, own_prev, mode, count, scale, eps):
    own, image_prev, own_prev = own.double(), image_prev.double(), own_prev.double()
    if mode is Combine.LOCAL:
        sums, total = own, count
    elif mode is Combine.CORRECTED:
        sums, total = image_prev + scale * (own - own_prev), count * scale
    else:
        sums, total = image_prev - own_prev + own, count * scale
    mean = sums[..., 0] / total
    var = sums[..., 1] / total - mean**2
    if mode is Combine.CORRECTED:
        own_var = own[..., 1] / count - (own[..., 0] / count) ** 2
        var = torch.where(var > 0, var, own_var)
    return mean, 1 / torch.sqrt(var.clamp_min(0) + eps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", list(Combine))
@pytest.mark.parametrize("bands", [2, 4, 3])
def test_matches_the_formulas_in_float64(backend, mode, bands):
    generator = torch.Generator().manual_seed(hash((backend, int(mode), bands)) % 2**31)
    batch, groups, channels, rows, width = 2, 8, 32, 4, 6
    image_prev = torch.randn(batch, channels, rows * bands, width, generator=generator) * 2 + 0.5
    image_now = image_prev + 0.05 * torch.randn(image_prev.shape, generator=generator)
    band = slice(rows, 2 * rows)
    own_now = _sums(image_now[:, :, band], groups).float()
    own_prev = _sums(image_prev[:, :, band], groups).float()
    image_sums = _sums(image_prev, groups).float()
    count = channels // groups * rows * width
    mean, rstd = group_norm_mean_rstd(
        own_now, image_sums, own_prev, mode, count, float(bands), 1e-5, backend=backend
    )
    expected_mean, expected_rstd = _expected(own_now, image_sums, own_prev, mode, count, float(bands), 1e-5)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-4, atol=1e-6)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (batch, groups)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_negative_corrected_variance_takes_the_bands_own(backend):
    generator = torch.Generator().manual_seed(7)
    count, bands = 10, 4
    own = torch.rand(3, 5, 2, generator=generator) * torch.tensor([1.0, 10.0]) + torch.tensor([0.0, 5.0])
    own_prev = own.clone()
    own_prev[..., 1] += 4.0  # the band's squares fell: extrapolated to the image, E[x^2] < E[x]^2
    image_prev = own_prev * bands
    mean, rstd = group_norm_mean_rstd(
        own, image_prev, own_prev, Combine.CORRECTED, count, bands, 1e-5, backend=backend
    )
    expected_mean, expected_rstd = _expected(own, image_prev, own_prev, Combine.CORRECTED, count, bands, 1e-5)
    own_var = own[..., 1].double() / count - (own[..., 0].double() / count) ** 2
    assert torch.allclose(expected_rstd, 1 / torch.sqrt(own_var + 1e-5))  # the fallback was taken
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-4, atol=1e-6)


def _split_into_chunks(sums: torch.Tensor, chunks: int, generator) -> torch.Tensor:
    """``(B, G, chunks, 2)`` random partial sums adding up (in float64) to ``sums``."""
    parts = torch.randn(sums.shape[:2] + (chunks, 2), generator=generator, dtype=torch.float64) * 10
    parts[:, :, -1] = sums.double() - parts[:, :, :-1].sum(dim=2)
    return parts.float()


OUTPUTS = {"both": (0, 1), "first": (0,), "second": (1,), "none": ()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", list(Combine))
@pytest.mark.parametrize(
    "chunks, outputs", [(1, "both"), (2, "first"), (3, "second"), (7, "none"), (4, "both")]
)
def test_partial_sums_are_added_and_written_out(backend, mode, chunks, outputs):
    generator = torch.Generator().manual_seed(hash((backend, int(mode), chunks, outputs, "partial")) % 2**31)
    batch, groups, channels, rows, width, bands = 3, 5, 15, 3, 7, 3  # odd: 3 channels a group
    image_prev = torch.randn(batch, channels, rows * bands, width, generator=generator) * 1.5 - 0.2
    change = 0.1 * torch.randn(batch, channels, rows, width, generator=generator)
    band = image_prev[:, :, rows : 2 * rows] + change
    own_now = _sums(band, groups)
    partials = _split_into_chunks(own_now, chunks, generator)
    own_prev = _sums(image_prev[:, :, rows : 2 * rows], groups).float()
    image_sums = _sums(image_prev, groups).float()
    count = channels // groups * rows * width
    poisoned = [torch.full((batch, groups, 2), float("nan")) for _ in range(2)]
    sums_out = [None, None]
    for index in OUTPUTS[outputs]:
        sums_out[index] = poisoned[index]
    mean, rstd = group_norm_mean_rstd(
        partials, image_sums, own_prev, mode, count, float(bands), 1e-5, backend=backend, sums_out=sums_out
    )
    added = partials.double().sum(dim=2)  # what the op adds, in float64
    expected_mean, expected_rstd = _expected(added, image_sums, own_prev, mode, count, float(bands), 1e-5)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-4, atol=1e-5)
    assert mean.shape == rstd.shape == (batch, groups)
    for index, out in enumerate(poisoned):
        if index in OUTPUTS[outputs]:
            torch.testing.assert_close(out.double(), added, rtol=1e-6, atol=1e-3)  # no NaN left
        else:
            assert torch.isnan(out).all()
    if outputs == "both":
        assert torch.equal(poisoned[0], poisoned[1])
    # one chunk given as (B, G, 1, 2) or as (B, G, 2) sums: the same
    if chunks == 1:
        again = group_norm_mean_rstd(
            partials[:, :, 0], image_sums, own_prev, mode, count, float(bands), 1e-5, backend=backend
        )
        assert torch.equal(again[0], mean) and torch.equal(again[1], rstd)


@pytest.mark.parametrize("mode", list(Combine))
def test_the_kernels_chunks_give_the_reference_result(mode):
    """From a band to mean, rstd and kept sums: the Triton path (partial sums kernel, then this
    kernel adding them) against the torch path, on 1 to 3 chunks of a band."""
    generator = torch.Generator().manual_seed(50 + int(mode))
    x = torch.randn(2, 6, 5, 13, generator=generator) + 0.4
    image_prev = _sums(torch.randn(2, 6, 10, 13, generator=generator), 3).float()
    own_prev = _sums(x[:, :, :, :] * 0.9, 3).float()
    count = 2 * 5 * 13
    for chunks in (1, 2, 3):
        results = {}
        for backend in ("torch", "triton"):
            partials = group_norm_partial_stats(x, 3, chunks, backend=backend)
            kept = torch.full((2, 3, 2), float("nan"))
            mean, rstd = group_norm_mean_rstd(
                partials, image_prev, own_prev, mode, count, 2.0, 1e-6, backend=backend, sums_out=(kept,)
            )
            results[backend] = (partials.shape[2], mean, rstd, kept)
        assert results["torch"][0] == results["triton"][0] == chunks
        for expected, got in zip(results["torch"][1:], results["triton"][1:]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results["triton"][3].double(), _sums(x, 3), rtol=1e-5, atol=1e-4)


def test_mean_rstd_op_passes_opcheck():
    opcheck_tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    partials = torch.rand(2, 4, 3, 2) + 1
    sums = torch.rand(2, 4, 2) * 3 + 3
    for own, first, second in (
        (partials, torch.empty(2, 4, 2), torch.empty(2, 4, 2)),
        (partials, None, torch.empty(2, 4, 2)),
        (sums, None, None),
    ):
        torch.library.opcheck(
            torch.ops.distripy.group_norm_mean_rstd.default,
            (own, sums * 2, sums, int(Combine.CORRECTED), 10, 2.0, 1e-5, first, second),
            test_utils=opcheck_tests,
        )


def test_partial_sums_and_outputs_are_checked():
    partials = torch.zeros(2, 4, 3, 2)
    sums = torch.zeros(2, 4, 2)
    with pytest.raises(InputError, match=r"own must be \(B, G, 2\) float32 sums or \(B, G, chunks, 2\)"):
        group_norm_mean_rstd(torch.zeros(2, 4, 3, 3), count=3)
    with pytest.raises(InputError, match=r"own has no chunk: shape \(2, 4, 0, 2\)"):
        group_norm_mean_rstd(torch.zeros(2, 4, 0, 2), count=3)
    with pytest.raises(InputError, match=r"STALE needs own_prev as \(B, G, 2\) float32 sums \(2, 4, 2\)"):
        group_norm_mean_rstd(partials, sums, partials, Combine.STALE, 3, 2.0)
    with pytest.raises(InputError, match=r"sums_out\[0\] must be a contiguous \(2, 4, 2\) float32 tensor"):
        group_norm_mean_rstd(partials, count=3, sums_out=(torch.zeros(2, 4, 3, 2),))
    with pytest.raises(InputError, match=r"sums_out\[1\] must be a contiguous .* torch.float64"):
        group_norm_mean_rstd(partials, count=3, sums_out=(None, sums.double()))
    with pytest.raises(InputError, match="sums_out holds at most 2 tensors, got 3"):
        group_norm_mean_rstd(partials, count=3, sums_out=(sums, sums.clone(), sums.clone()))
    with pytest.raises(InputError, match="mode must be one of"):
        group_norm_mean_rstd(partials, count=3, mode=3)


def test_arguments_are_checked():
    own = torch.zeros(2, 4, 2)
    with pytest.raises(InputError, match="count must be positive"):
        group_norm_mean_rstd(own, count=0)
    with pytest.raises(InputError, match=r"own must be \(B, G, 2\) float32"):
        group_norm_mean_rstd(own.double(), count=3)
    with pytest.raises(InputError, match="CORRECTED needs image_prev"):
        group_norm_mean_rstd(own, None, own, Combine.CORRECTED, 3, 2.0)
    with pytest.raises(InputError, match="scale must be >= 1"):
        group_norm_mean_rstd(own, own, own, Combine.STALE, 3, 0.5)
