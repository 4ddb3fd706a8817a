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

    # kernel_backend='triton': the fused Triton convolution too (the experimental opt-in)
    halo_conv = "triton" if kernel_backend == "triton" else "cudnn"
    config = DistriConfig(mode=mode, warmup_steps=warmup_steps, halo_conv_backend=halo_conv)
    context = PatchContext(config, kernel_backend=kernel_backend)
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
    x0, x1, x2 = _images(1, (2, 3, 4 * world_size, 7), 3)
    sync_out = _step(context, patch, _band(x0, rank, world_size))  # step 0: synchronous
    stale_out = _step(context, patch, _band(x1, rank, world_size))  # step 1: step 0's halos
    # step 2: step 1's halos, which step 1's convolution wrote out as it read its band
    stale_out2 = _step(context, patch, _band(x2, rank, world_size))
    context.drain()
    rows = 4
    bottom_rows = 1 if stride == 1 else 0

    def expected(x, previous):
        top = previous[:, :, rank * rows - 1 : rank * rows] if rank > 0 else None
        bottom = (
            previous[:, :, (rank + 1) * rows : (rank + 1) * rows + bottom_rows] if rank < world_size - 1 else None
        )
        return halo_conv2d(_band(x, rank, world_size), top, bottom, conv.weight, conv.bias, stride, 1)

    stale = (stale_out, stale_out2)
    return sync_out, stale, (expected(x1, x0), expected(x2, x1)), F.conv2d(x0, conv.weight, conv.bias, stride, 1)


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
    for rank, (sync_out, stale_outs, expected_stales, _) in enumerate(results):
        torch.testing.assert_close(sync_out.double(), _band(whole, rank, world_size), rtol=1e-5, atol=1e-5)
        for stale_out, expected_stale in zip(stale_outs, expected_stales):
            torch.testing.assert_close(stale_out, expected_stale, rtol=stale_tolerance, atol=stale_tolerance)


GROUP_NORM_MODES = ("full_sync", "sync_gn", "corrected_async_gn", "stale_gn", "separate_gn", "naive_patch")


def _moments(x, groups):
    """``[E[x], E[x^2]]`` per (batch, group), float64, (2, B, G)."""
    grouped = x.double().reshape(x.shape[0], groups, -1)
    return torch.stack([grouped.mean(-1), (grouped * grouped).mean(-1)])


def _paper_statistics(mode, x0, x1, rank, world_size, groups):
    """The mean and variance per (batch, group) that step 1 (the first asynchronous step) of
    ``mode`` normalises band ``rank`` of ``x1`` with, in float64, from DistriFusion's definitions
    (E = [E[x], E[x^2]]; all = the whole image, own = this band; 0, 1 = the step):

    * corrected_async_gn: ``E_1(all) ~ E_0(all) + E_1(own) - E_0(own)``; a variance that is not
      positive is replaced by the band's own at step 1;
    * stale_gn: the mean over bands of ``E_0(band)`` for the other bands and ``E_1(own)``;
    * sync_gn, full_sync: ``E_1(all)``; separate_gn, naive_patch: ``E_1(own)``."""
    bands0 = [_moments(_band(x0, b, world_size), groups) for b in range(world_size)]
    own1 = _moments(_band(x1, rank, world_size), groups)
    if mode in ("full_sync", "sync_gn"):
        estimate = _moments(x1, groups)
    elif mode == "corrected_async_gn":
        estimate = _moments(x0, groups) + own1 - bands0[rank]
    elif mode == "stale_gn":
        estimate = sum(own1 if b == rank else bands0[b] for b in range(world_size)) / world_size
    else:
        estimate = own1
    mean, var = estimate[0], estimate[1] - estimate[0] ** 2
    if mode == "corrected_async_gn":
        var = torch.where(var > 0, var, own1[1] - own1[0] ** 2)
    return mean, var


def _normalise(band, mean, var, norm):
    batch, groups = band.shape[0], norm.num_groups
    grouped = band.double().reshape(batch, groups, -1)
    normed = ((grouped - mean[..., None]) / torch.sqrt(var[..., None] + norm.eps)).reshape(band.shape)
    return normed * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]


def _group_norm_modes_body(rank, world_size, kernel_backend, shrink):
    """Every mode's GroupNorm over a synchronous step 0 and an asynchronous step 1 of fresh random
    images; with ``shrink`` this band's values shrink sharply at step 1 on rank 0 (its corrected
    variance comes out negative and falls back)."""
    from distripy.parallel import PatchGroupNorm

    groups = 4
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x0, noise = _images(2, (2, 8, 3 * world_size, 5), 2)
    x1 = x0 * 1.3 + 0.4 + 0.3 * noise  # the statistics move between steps
    if shrink:
        rows = x0.shape[2] // world_size
        x0[:, :, :rows] = 3 * torch.sign(x0[:, :, :rows])
        x1[:, :, :rows] = 0.1 * noise[:, :, :rows]
    results = {}
    for mode in GROUP_NORM_MODES:
        context = _context(mode, world_size, rank, kernel_backend=kernel_backend)
        patch = PatchGroupNorm.from_group_norm(norm, context, "norm")
        outputs = [_step(context, patch, _band(x, rank, world_size)) for x in (x0, x1)]
        context.drain()
        band0 = _band(x0, rank, world_size)
        if mode == "naive_patch":
            stats0 = _moments(band0, groups)
        else:
            stats0 = _moments(x0, groups)
        expected0 = _normalise(band0, stats0[0], stats0[1] - stats0[0] ** 2, norm)
        expected1 = _normalise(
            _band(x1, rank, world_size), *_paper_statistics(mode, x0, x1, rank, world_size, groups), norm
        )
        results[mode] = (outputs, (expected0, expected1))
    # whether the corrected estimate's variance (before the fallback) is not positive somewhere
    raw = _moments(x0, groups) + _moments(_band(x1, rank, world_size), groups)
    raw = raw - _moments(_band(x0, rank, world_size), groups)
    return results, bool((raw[1] - raw[0] ** 2 <= 0).any())


@pytest.mark.parametrize("world_size, kernel_backend", [(2, "torch"), (3, "torch"), (2, "triton")])
def test_group_norm_of_every_mode_follows_the_papers_formulas(run_ranks, world_size, kernel_backend):
    for results, _ in run_ranks(_group_norm_modes_body, world_size, kernel_backend, False, timeout=300):
        for mode, (outputs, expected) in results.items():
            for step in (0, 1):
                torch.testing.assert_close(outputs[step].double(), expected[step], rtol=1e-5, atol=1e-5)
        # the estimates differ from each other at step 1, so each comparison above can fail
        async_modes = ("sync_gn", "corrected_async_gn", "stale_gn", "separate_gn")
        for i, a in enumerate(async_modes):
            for b in async_modes[i + 1 :]:
                assert not torch.allclose(results[a][0][1], results[b][0][1], rtol=1e-3, atol=1e-3), (a, b)


def test_a_negative_corrected_variance_falls_back_to_the_bands_own(run_ranks):
    """Rank 0's band goes from +-3 to about 0.1: the corrected E[x^2] extrapolates below E[x]^2, so
    its groups take the band's own fresh variance; the other modes keep their formulas."""
    (results0, negative0), (results1, _) = run_ranks(_group_norm_modes_body, 2, "torch", True, timeout=300)
    assert negative0, "the scenario must make rank 0's corrected variance negative"
    for results in (results0, results1):
        for mode, (outputs, expected) in results.items():
            assert torch.isfinite(outputs[1]).all(), mode
            torch.testing.assert_close(outputs[1].double(), expected[1], rtol=1e-5, atol=1e-5)


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
    x0, x1, x2 = _images(4, (2, 6, 3 * world_size, 7), 3)
    x1 = x1 * 1.5 - 0.2
    outputs = []
    for x in (x0, x1, x2):  # step 2 reads the halos step 1's convolutions wrote out
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
    for (fused0, plain0, fused1, plain1, fused2, plain2), whole0 in run_ranks(
        _fused_norm_conv_body, 2, kernel_backend, timeout=300
    ):
        torch.testing.assert_close(fused0.double(), whole0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain0.double(), whole0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused1, plain1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused2, plain2, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused1, fused0)  # step 1 is a different image
