"""``LoopbackComm``: one process standing in for rank r of N.

Its peers hold copies of this rank's band, so a patch-parallel module on a LoopbackComm computes
exactly what the whole-image module computes on the image made of N copies of the band (checked
here in float64 for a middle rank, whose halos come from both sides). A UNet parallelised with it
runs one rank's share of an N-way split alone and issues that rank's transfers, which its log
records.
"""

import pytest
import torch
from unet_models import sdxl_conditioning, tiny_sdxl_unet

from distripy.runtime import LoopbackComm, TrafficLog


def _random(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- the protocol ---------------------------------------------------------------------------------


def test_all_gather_fills_every_slot_and_all_reduce_sums_identical_ranks():
    comm = LoopbackComm(2, 4)
    send = _random(2, 3, 5)
    recv = torch.full((4, 2, 3, 5), float("nan"), dtype=torch.float64)
    comm.all_gather(send, recv).wait()
    for slot in range(4):
        assert torch.equal(recv[slot], send)
    buf = _random(3, 7, seed=1)
    expected = buf * 4
    comm.all_reduce(buf).wait()
    assert torch.equal(buf, expected)


def test_halo_exchange_receives_the_rows_of_neighbours_holding_the_same_band():
    band = _random(1, 2, 6, 5)
    top_send, bottom_send = band[:, :, :1].clone(), band[:, :, -2:].clone()  # 1 row up, 2 rows down
    top_recv = torch.full((1, 2, 2, 5), float("nan"), dtype=torch.float64)
    bottom_recv = torch.full((1, 2, 1, 5), float("nan"), dtype=torch.float64)
    LoopbackComm(1, 3).halo_exchange(top_send, bottom_send, top_recv, bottom_recv).wait()
    assert torch.equal(top_recv, band[:, :, -2:])  # the rank above's last rows
    assert torch.equal(bottom_recv, band[:, :, :1])  # the rank below's first rows
    # The last rank never sends its bottom rows, so what it would receive from above is zeros.
    last_top = torch.full((1, 2, 2, 5), float("nan"), dtype=torch.float64)
    LoopbackComm(2, 3).halo_exchange(top_send, None, last_top, None).wait()
    assert torch.equal(last_top, torch.zeros_like(last_top))


def test_shift_receives_the_block_a_peer_holding_the_same_data_sends():
    block = _random(2, 3, 4)
    recv = torch.full_like(block, float("nan"))
    log = TrafficLog()
    LoopbackComm(1, 3, log=log).shift(block, recv, 2).wait()
    assert torch.equal(recv, block)
    (transfer,) = log.transfers
    assert (transfer.op, transfer.sent, transfer.received) == ("shift", block.numel() * 8, block.numel() * 8)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c.shift(torch.ones(2), torch.ones(2), 4), r"distance=4 must be an integer in \[1, 3\]"),
        (lambda c: c.all_gather(torch.ones(2, 3), torch.ones(3, 2, 3)), r"expected \(4, 2, 3\)"),
        (lambda c: c.halo_exchange(None, torch.ones(1, 1, 1, 2), None, torch.ones(1, 1, 1, 2)), "last of 4"),
        (lambda c: c.all_reduce(torch.ones(4, 4).t()), "must be contiguous"),
    ],
)
def test_bad_buffers_are_refused_like_every_comm(call, message):
    with pytest.raises(ValueError, match=message):
        call(LoopbackComm(3, 4))


@pytest.mark.parametrize("rank, world_size", [(-1, 2), (2, 2), (0, 0), (0, 1.5)])
def test_bad_rank_or_world_size_is_named(rank, world_size):
    with pytest.raises(ValueError, match="rank|world_size"):
        LoopbackComm(rank, world_size)


def test_the_log_records_bytes_and_where_each_transfer_was_issued_and_waited_for():
    ticks = iter(range(100))
    log = TrafficLog(clock=lambda: next(ticks))
    comm = LoopbackComm(1, 4, log=log)
    half = comm.subgroup([0, 1])
    assert (half.rank, half.world_size, half.log) == (1, 2, log)
    send = torch.ones(2, 8, dtype=torch.float16)
    gather = comm.all_gather(send, torch.empty(4, 2, 8, dtype=torch.float16))
    log.step = 1
    half.all_reduce(torch.ones(2, 4))
    gather.wait()
    gather.wait()  # only the first wait counts
    first, second = log.transfers
    assert (first.op, first.sent, first.received, first.step, first.issued_at) == ("all_gather", 32, 96, 0, 0)
    assert (first.waited_at, first.waited_step) == (2, 1)
    assert (second.op, second.world_size, second.sent, second.waited_at) == ("all_reduce", 2, 32, None)


# -- modules: a LoopbackComm rank computes the image of N copies of its band ------------------------


def _context(mode, band_index, band_count):
    from distripy import DistriConfig
    from distripy.parallel import PatchContext

    context = PatchContext(DistriConfig(mode=mode, warmup_steps=1))
    context.start_generation(LoopbackComm(band_index, band_count), band_index, band_count)
    context.begin_step()
    return context


def _tiled(band, copies):
    return torch.cat([band] * copies, dim=2)


def test_a_middle_rank_conv_and_group_norm_equal_the_image_of_copies_of_its_band():
    from distripy.parallel import PatchConv2d, PatchGroupNorm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1).double()
    norm = torch.nn.GroupNorm(4, 8).double()
    band = _random(2, 8, 5, 7, seed=3)
    context = _context("full_sync", 1, 3)
    patch_conv = PatchConv2d.from_conv(conv, context, "conv")
    patch_norm = PatchGroupNorm.from_group_norm(norm, context, "norm")
    conv_out, norm_out = patch_conv(band), patch_norm(band)
    image = _tiled(band, 3)
    torch.testing.assert_close(conv_out, conv(image)[:, :, 5:10], rtol=1e-12, atol=1e-12)
    # The statistics are sums in float32 by design.
    torch.testing.assert_close(norm_out, norm(image)[:, :, 5:10], rtol=1e-5, atol=1e-6)


def test_a_loopback_rank_self_attention_equals_attention_over_copies_of_its_band():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from distripy.parallel import PatchSelfAttnProcessor

    torch.manual_seed(0)
    attention = Attention(16, heads=2, dim_head=8).double()
    tokens = _random(2, 6, 16, seed=4)
    image_tokens = torch.cat([tokens] * 4, dim=1)
    attention.set_processor(AttnProcessor2_0())
    expected = attention(image_tokens)[:, 6:12]
    attention.set_processor(PatchSelfAttnProcessor(_context("full_sync", 1, 4), "attn1"))
    torch.testing.assert_close(attention(tokens), expected, rtol=1e-12, atol=1e-12)


# -- a UNet: one rank's share, alone ----------------------------------------------------------------


def _count(unet, kind):
    from distripy.parallel import PatchConv2d, PatchGroupNorm, PatchSelfAttnProcessor

    if kind == "attention":
        return sum(isinstance(getattr(m, "processor", None), PatchSelfAttnProcessor) for m in unet.modules())
    return sum(isinstance(m, {"conv": PatchConv2d, "norm": PatchGroupNorm}[kind]) for m in unet.modules())


@pytest.mark.parametrize("mode", ["corrected_async_gn", "full_sync", "exact", "naive_patch"])
@pytest.mark.parametrize("rank, world_size, split_batch", [(1, 4, False), (3, 4, True), (0, 2, False)])
def test_a_unet_runs_one_ranks_share_and_logs_its_transfers(mode, rank, world_size, split_batch):
    import distripy

    unet = tiny_sdxl_unet(0)
    log = TrafficLog()
    config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=split_batch)
    distripy.parallelize(unet, config, comm=LoopbackComm(rank, world_size, log=log))
    latents = _random(2, 4, 32, 24, seed=5, dtype=torch.float32)
    conditioning = sdxl_conditioning(2, 6)
    steps = []
    with torch.no_grad():
        for step, timestep in enumerate((900, 800, 700)):
            log.step = step
            log.clear()
            output = unet(latents, timestep, **conditioning).sample
            assert output.shape == latents.shape and torch.isfinite(output).all()
            steps.append(list(log.transfers))
    distripy.reset(unet)

    ops = [[t.op for t in transfers] for transfers in steps]
    for transfers in ops:
        assert transfers[-1] == "all_gather"  # the output bands, over every rank
    if mode == "naive_patch":
        assert all(transfers == ["all_gather"] for transfers in ops)
        return
    bands = world_size // 2 if split_batch else world_size  # the batch of 2 splits in two groups
    for transfers in ops:
        assert transfers.count("all_reduce") == _count(unet, "norm")
        if mode == "exact":  # K and V in one block, one shift to every other band
            assert transfers.count("shift") == (bands - 1) * _count(unet, "attention")
            assert transfers.count("all_gather") == 1
        else:
            # K and V side by side, one all-gather per batch item of the band's share
            per_rank_batch = 1 if split_batch else 2
            assert transfers.count("all_gather") - 1 == per_rank_batch * _count(unet, "attention")
        # every conv but conv_in, whose halo rows come from the latent every rank holds
        assert transfers.count("halo_exchange") == _count(unet, "conv") - 1
    # (A stride-2 conv's band below the first sends nothing up: no output row needs it.)
    assert sum(t.sent for t in steps[-1] if t.op == "halo_exchange") > 0
    if mode == "corrected_async_gn":
        # An asynchronous step's transfers are waited for in the next step; the output's at once.
        for transfer in steps[1]:
            assert transfer.waited_step == (
                1 if len(transfer.shape) == 4 and transfer.op == "all_gather" else 2
            )


def test_comm_is_for_a_unet_only():
    import distripy
    from diffusers import AutoencoderKL

    with pytest.raises(TypeError, match="UNet2DConditionModel only"):
        distripy.parallelize(AutoencoderKL(), comm=LoopbackComm(0, 2))
