"""The kernels as ``torch.library`` ops (``distripy::*``): schema, fake (meta) implementations and
dispatch checked by ``torch.library.opcheck``; the ``backend`` switch of each kernel function; on a
GPU, the ops under ``torch.compile``. Without a GPU the Triton code runs under ``TRITON_INTERPRET=1``."""

import pytest
import torch

from distripy.kernels import GroupNormPrologue, group_norm_apply, group_norm_stats, halo_conv2d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# opcheck's autograd-registration test needs inputs that require grad; these ops have no backward.
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_static")


def _inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 3, 5, generator=generator).to(DEVICE)
    mean = torch.randn(2, 4, generator=generator).to(DEVICE)
    rstd = (torch.rand(2, 4, generator=generator) + 0.5).to(DEVICE)
    weight = torch.randn(6, 8, 3, 3, generator=generator).to(DEVICE)
    bottom = torch.randn(2, 8, 1, 5, generator=generator).to(DEVICE)
    return x, mean, rstd, weight, bottom


def test_ops_pass_opcheck():
    x, mean, rstd, weight, bottom = _inputs(0)
    torch.library.opcheck(torch.ops.distripy.group_norm_stats.default, (x, 4), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(
        torch.ops.distripy.group_norm_apply.default,
        (x, mean, rstd, None, None, 4, True),
        test_utils=OPCHECK_TESTS,
    )
    out = torch.empty_like(x)
    torch.library.opcheck(
        torch.ops.distripy.group_norm_apply_out.default,
        (x, mean, rstd, None, None, 4, False, out),
        test_utils=OPCHECK_TESTS,
    )
    torch.library.opcheck(
        torch.ops.distripy.halo_conv2d.default,
        (x, None, bottom, weight, None, [1, 1], [1, 1], [1, 1], None, None, None, None, 1, False),
        test_utils=OPCHECK_TESTS,
    )
    norm_weight = torch.randn(8, device=DEVICE)
    torch.library.opcheck(
        torch.ops.distripy.halo_conv2d.default,
        (x, None, bottom, weight, None, [1, 1], [1, 1], [1, 1], mean, rstd, norm_weight, None, 4, True),
        test_utils=OPCHECK_TESTS,
    )


def test_the_triton_backend_equals_the_torch_backend():
    x, mean, rstd, weight, bottom = _inputs(1)
    torch.testing.assert_close(
        group_norm_stats(x, 4, backend="triton"), group_norm_stats(x, 4), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(
        group_norm_apply(x, mean, rstd, None, None, 4, True, backend="triton"),
        group_norm_apply(x, mean, rstd, None, None, 4, True),
    )
    padded = torch.full((2, 8, 5, 5), float("nan"), device=DEVICE)
    group_norm_apply(x, mean, rstd, None, None, 4, out=padded[:, :, 1:4], backend="triton")
    torch.testing.assert_close(padded[:, :, 1:4], group_norm_apply(x, mean, rstd, None, None, 4))
    torch.testing.assert_close(
        halo_conv2d(x, None, bottom, weight, None, 1, 1, backend="triton"),
        halo_conv2d(x, None, bottom, weight, None, 1, 1),
        rtol=3e-3 if DEVICE == "cuda" else 1e-5,
        atol=3e-3 if DEVICE == "cuda" else 1e-5,
    )


@pytest.mark.cuda
def test_ops_under_torch_compile():
    x, mean, rstd, weight, bottom = _inputs(2)

    def block(x):
        stats = group_norm_stats(x, 4, backend="triton")
        mean = stats[..., 0] / 30
        rstd = torch.rsqrt((stats[..., 1] / 30 - mean * mean).clamp_min(0) + 1e-5)
        y = group_norm_apply(x, mean, rstd, None, None, 4, True, backend="triton")
        unfused = halo_conv2d(y, None, bottom, weight, None, 1, 1, backend="triton")
        prologue = GroupNormPrologue(mean, rstd, None, None, 4, True)
        fused = halo_conv2d(x, None, bottom, weight, None, 1, 1, prologue=prologue, backend="triton")
        chosen = halo_conv2d(x, None, bottom, weight, None, 1, 1, prologue=prologue, backend="auto")
        return unfused, fused, chosen

    compiled = torch.compile(block, fullgraph=True)
    for got, expected in zip(compiled(x), block(x)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
