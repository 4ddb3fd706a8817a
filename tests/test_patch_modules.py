"""The patch-parallel modules one at a time, on real gloo processes: a synchronous step equals the
whole-image module; a stale step uses exactly the previous step's halos and statistics."""

import pytest
import torch
import torch.nn.functional as F


def _band(x, rank, world_size):
    rows = x.shape[2] // world_size
    return x[:, :, rank * rows : (rank + 1) * rows]


def _context(mode, world_size, rank, warmup_steps=1, kernel_backend="torch"):
    from distripy import DistriConfig
    from distripy.parallel import PatchContext
    from distripy.runtime.torch_comm import TorchComm

    context = PatchContext(DistriConfig(mode=mode, warmup_steps=warmup_steps), kernel_backend=kernel_backend)
    context.start_generation(TorchComm(timeout_s=60), rank, world_size)
    return context


def _step(context, module, x):
    context.begin_step()
    try:
        return module(x)
    finally:
        context.end_step(issue_pending=True)


def _images(seed, shape, steps):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).float() for _ in range(steps)]


def _conv_body(rank, world_size, stride, kernel_backend="torch"):
    from distripy.kernels import halo_conv2d
    from distripy.parallel import PatchConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, stride=stride, padding=1)
    context = _context("corrected_async_gn", world_size, rank, kernel_backend=kernel_backend)
    patch = PatchConv2d.from_conv(conv, context, "conv")
    x0, x1 = _images(1, (2, 3, 4 * world_size, 7), 2)
    sync_out = _step(context, patch, _band(x0, rank, world_size))  # step 0: synchronous
    stale_out = _step(context, patch, _band(x1, rank, world_size))  # step 1: last step's halos
    context.drain()
    rows = 4
    top = x0[:, :, rank * rows - 1 : rank * rows] if rank > 0 else None
    bottom_rows = 1 if stride == 1 else 0
    bottom = x0[:, :, (rank + 1) * rows : (rank + 1) * rows + bottom_rows] if rank < world_size - 1 else None
    expected_stale = halo_conv2d(_band(x1, rank, world_size), top, bottom, conv.weight, conv.bias, stride, 1)
    return sync_out, stale_out, expected_stale, F.conv2d(x0, conv.weight, conv.bias, stride, 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("world_size", [2, 4])
def test_patch_conv_sync_then_stale(run_ranks, world_size, stride):
    _check_conv_results(run_ranks(_conv_body, world_size, stride, timeout=120), world_size)


@pytest.mark.parametrize("stride", [1, 2])
def test_patch_conv_on_the_triton_kernel(run_ranks, stride):
    """The same, with kernel_backend='triton' (under Triton's interpreter without a GPU)."""
    _check_conv_results(run_ranks(_conv_body, 2, stride, "triton", timeout=300), 2, stale_tolerance=1e-5)


def _check_conv_results(results, world_size, stale_tolerance=1e-6):
    whole = results[0][3].double()
    for rank, (sync_out, stale_out, expected_stale, _) in enumerate(results):
        torch.testing.assert_close(sync_out.double(), _band(whole, rank, world_size), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stale_out, expected_stale, rtol=stale_tolerance, atol=stale_tolerance)


def _group_norm_of(band, image, groups, weight, bias, eps):
    """GroupNorm of ``band`` with the mean and variance of ``image`` per (batch, group), in float64:
    a direct computation, not the kernels' sums."""
    batch, channels = band.shape[:2]
    flat = image.double().reshape(batch, groups, -1)
    mean = flat.mean(-1)[:, :, None]
    var = flat.var(-1, unbiased=False)[:, :, None]
    grouped = band.double().reshape(batch, groups, -1)
    normed = ((grouped - mean) / torch.sqrt(var + eps)).reshape(band.shape)
    return normed * weight.double()[:, None, None] + bias.double()[:, None, None]


def _group_norm_body(rank, world_size, mode, kernel_backend="torch"):
    from distripy.parallel import PatchGroupNorm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    context = _context(mode, world_size, rank, kernel_backend=kernel_backend)
    patch = PatchGroupNorm.from_group_norm(norm, context, "norm")
    x0, x1 = _images(2, (2, 8, 3 * world_size, 5), 2)
    x1 = x1 * 2 + 0.5  # the statistics move between steps
    sync_out = _step(context, patch, _band(x0, rank, world_size))
    async_out = _step(context, patch, _band(x1, rank, world_size))
    context.drain()
    # The expectation, from the statistics of whole images in float64. corrected_async_gn: last
    # step's image with this band's rows replaced by this step's (its sums corrected by the band's
    # change); stale_gn: last step's image as it was.
    if mode == "corrected_async_gn":
        statistics_of = x0.clone()
        rows = x0.shape[2] // world_size
        statistics_of[:, :, rank * rows : (rank + 1) * rows] = _band(x1, rank, world_size)
    else:
        statistics_of = x0
    band1 = _band(x1, rank, world_size)
    expected = _group_norm_of(band1, statistics_of, 4, norm.weight, norm.bias, norm.eps)
    whole0 = F.group_norm(x0.double(), 4, norm.weight.double(), norm.bias.double(), norm.eps)
    return sync_out, async_out, expected, _band(whole0, rank, world_size)


@pytest.mark.parametrize(
    "mode, kernel_backend",
    [("corrected_async_gn", "torch"), ("stale_gn", "torch"), ("corrected_async_gn", "triton")],
)
def test_patch_group_norm_sync_then_async(run_ranks, mode, kernel_backend):
    results = run_ranks(_group_norm_body, 2, mode, kernel_backend, timeout=300)
    for sync_out, async_out, expected, whole in results:
        torch.testing.assert_close(sync_out.double(), whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(async_out.double(), expected, rtol=1e-5, atol=1e-5)


def _negative_variance_body(rank, world_size):
    """Step 0: rank 0's band is +-2^14 (exact in fp32, and so are its squares and their sums),
    rank 1's is ones with a little noise; step 1: rank 0's band is noisy ones too. Rank 0's corrected
    image sums are last step's minus its huge share plus its new band. In fp32 the noisy ones' sum
    of squares (about 48 per group) is lost next to the huge share's (48 * 2^28): the corrected sum
    of squares then holds rank 0's new band only while the sum holds both bands, so the corrected
    variance is about -0.5 -- negative -- and the group falls back to the band's fresh variance."""
    from distripy.parallel import PatchGroupNorm

    context = _context("corrected_async_gn", world_size, rank)
    norm = torch.nn.GroupNorm(8, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    patch = PatchGroupNorm.from_group_norm(norm, context, "norm")
    generator = torch.Generator().manual_seed(3)
    shape = (2, 16, 4, 6)
    signs = torch.tensor([1.0, -1.0]).repeat(3)  # every row of every group: three +, three -
    huge = (2.0**14 * signs).expand(shape).contiguous()
    ones = [1 + 0.1 * torch.randn(*shape, generator=generator) for _ in range(2)]
    step0 = huge if rank == 0 else ones[0]
    step1 = ones[1] if rank == 0 else ones[0]
    _step(context, patch, step0)
    out = _step(context, patch, step1)
    context.drain()
    # float64: the mean is the corrected image's (rank 1's step-0 band and rank 0's step-1 band for
    # rank 0; rank 0's huge band and rank 1's band for rank 1); the variance, where the fp32
    # corrected one is not positive (rank 0), the band's own.
    image = torch.cat([ones[1], ones[0]] if rank == 0 else [huge, ones[0]], dim=2).double()
    batch = shape[0]
    grouped_image = image.reshape(batch, 8, -1)
    grouped = step1.double().reshape(batch, 8, -1)
    mean = grouped_image.mean(-1, keepdim=True)
    var = (grouped if rank == 0 else grouped_image).var(-1, unbiased=False, keepdim=True)

    def affine(normed):
        return normed.reshape(shape) * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]

    expected = affine((grouped - mean) / torch.sqrt(var + norm.eps))
    clamped = affine((grouped - mean) / torch.sqrt(torch.zeros_like(var) + norm.eps))  # no fallback
    return out, expected, clamped


def test_a_negative_corrected_variance_falls_back_and_stays_finite(run_ranks):
    (out0, expected0, clamped0), (out1, expected1, _) = run_ranks(_negative_variance_body, 2, timeout=120)
    assert torch.isfinite(out0).all() and torch.isfinite(out1).all()
    # rank 0 normalised with its band's own variance, not with a clamped (or negative) one
    torch.testing.assert_close(out0.double(), expected0, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(out0.double(), clamped0, rtol=0.1, atol=0.1)
    torch.testing.assert_close(out1.double(), expected1, rtol=1e-3, atol=1e-3)


def _processor_body(rank, world_size):
    """Self-attention of a band with the whole image's keys: sync equals the whole image's attention;
    the stale step uses the previous step's keys/values of the other bands."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from distripy.parallel import PatchSelfAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    reference = Attention(query_dim=8, heads=2, dim_head=4)
    reference.load_state_dict(attn.state_dict())
    reference.set_processor(AttnProcessor2_0())
    context = _context("corrected_async_gn", world_size, rank)
    attn.set_processor(PatchSelfAttnProcessor(context, "attn"))
    x0, x1 = _images(4, (2, 8, 2 * world_size, 3), 2)
    with torch.no_grad():
        sync_out = _step(context, attn, _band(x0, rank, world_size))
        stale_out = _step(context, attn, _band(x1, rank, world_size))
        context.drain()
        whole0 = reference(x0)
        # stale: queries and this band's keys from x1, the other bands' keys from x0
        mixed = x0.clone()
        rows = 2
        mixed[:, :, rank * rows : (rank + 1) * rows] = _band(x1, rank, world_size)
        tokens = mixed.flatten(2).transpose(1, 2)
        band_tokens = _band(x1, rank, world_size).flatten(2).transpose(1, 2)
        expected = reference(band_tokens, encoder_hidden_states=tokens)
        expected = expected.transpose(1, 2).reshape(2, 8, rows, 3)
    return sync_out, stale_out, _band(whole0, rank, world_size), expected


def test_patch_self_attention_sync_then_stale(run_ranks):
    for sync_out, stale_out, whole, expected in run_ranks(_processor_body, 2, timeout=120):
        torch.testing.assert_close(sync_out, whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stale_out, expected, rtol=1e-5, atol=1e-5)


def _fused_norm_conv_body(rank, world_size, kernel_backend):
    """GroupNorm -> SiLU -> conv, fused (``conv(x, prologue=norm.prologue(x))``) and one module at a
    time, each in its own context, over a synchronous and a stale step."""
    from distripy.parallel import PatchConv2d, PatchGroupNorm

    torch.manual_seed(3)
    norm, conv = torch.nn.GroupNorm(2, 6), torch.nn.Conv2d(6, 5, 3, padding=1)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    fused_ctx, plain_ctx = (
        _context("corrected_async_gn", world_size, rank, 1, kernel_backend) for _ in range(2)
    )
    fused = (
        PatchGroupNorm.from_group_norm(norm, fused_ctx, "norm"),
        PatchConv2d.from_conv(conv, fused_ctx, "conv"),
    )
    plain = (
        PatchGroupNorm.from_group_norm(norm, plain_ctx, "norm"),
        PatchConv2d.from_conv(conv, plain_ctx, "conv"),
    )
    x0, x1 = _images(4, (2, 6, 3 * world_size, 7), 2)
    x1 = x1 * 1.5 - 0.2
    outputs = []
    for x in (x0, x1):
        band = _band(x, rank, world_size)
        fused_ctx.begin_step()
        outputs.append(fused[1](band, prologue=fused[0].prologue(band, silu=True)))
        fused_ctx.end_step(issue_pending=True)
        plain_ctx.begin_step()
        outputs.append(plain[1](F.silu(plain[0](band))))
        plain_ctx.end_step(issue_pending=True)
    fused_ctx.drain()
    plain_ctx.drain()
    whole0 = F.conv2d(
        F.silu(F.group_norm(x0.double(), 2, norm.weight.double(), norm.bias.double(), norm.eps)),
        conv.weight.double(),
        conv.bias.double(),
        padding=1,
    )
    return outputs, _band(whole0, rank, world_size)


@pytest.mark.parametrize("kernel_backend", ["torch", "triton"])
def test_fused_norm_conv_equals_the_modules_one_by_one(run_ranks, kernel_backend):
    for (fused0, plain0, fused1, plain1), whole0 in run_ranks(
        _fused_norm_conv_body, 2, kernel_backend, timeout=300
    ):
        torch.testing.assert_close(fused0.double(), whole0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain0.double(), whole0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused1, plain1, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused1, fused0)  # step 1 is a different image
