"""``mode="exact"``: every step equals the single-device step, with each exchange issued before the
compute that does not need it.

* Teacher forcing on real gloo ranks (2, 3 and 4): every step's input is a fresh random latent
  given to both the patch-parallel UNet and the single-device one, so each step's noise prediction
  is compared on its own (a random-weight UNet is chaotic over a loop); SDXL- and SD1.x-style
  UNets, with and without CFG split, bands down to one row at the deepest level.
* The order of a step, on one rank (``LoopbackComm`` with a ``TrafficLog`` whose clock counts the
  convolutions and attention blocks computed so far): each halo exchange is issued before its
  convolution's interior rows and waited for after them, before the boundary rows; each attention
  issues one shift per other band before its first block and waits for shift ``d`` after ``d``
  blocks; GroupNorm's all-reduce is waited for at once (the step's only exposed waits).
* On a GPU (``cuda``): an exact step captured in a CUDA graph replays like the eager step.
"""

import pytest
import torch
from unet_models import (
    relative_error,
    sd15_conditioning,
    sdxl_conditioning,
    tiny_sd15_unet,
    tiny_sdxl_unet,
)

from distripy.kernels import interior_rows
from distripy.runtime import LoopbackComm, TrafficLog

EXACT = 1e-5
TIMESTEPS = (950, 500, 60)
WIDTH = 16


def _model(name, seed):
    return tiny_sd15_unet(seed) if name == "sd15" else tiny_sdxl_unet(seed)


def _inputs(name, batch, height, seed):
    """Per step, a fresh latent (teacher forcing: nothing depends on the previous output)."""
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(batch, 4, height, WIDTH, generator=generator) for _ in TIMESTEPS]
    conditioning = (sd15_conditioning if name == "sd15" else sdxl_conditioning)(batch, seed + 1)
    return latents, conditioning


def _predictions(unet, name, batch, height, seed):
    latents, conditioning = _inputs(name, batch, height, seed)
    with torch.no_grad():
        return [unet(x, t, **conditioning).sample for x, t in zip(latents, TIMESTEPS)]


def _exact_body(rank, world_size, runs):
    import distripy
    import distripy.parallel.attention as attention

    results = []
    for config, (name, batch, height, seed) in runs:
        config = dict(config)
        # one shift per launch instead of the small blocks' one launch for every band
        attention.SHIFT_LAUNCH_BYTES = config.pop("shift_launch_bytes", 8 << 20)
        unet = _model(name, seed)
        distripy.parallelize(unet, distripy.DistriConfig(mode="exact", **config))
        results.append(_predictions(unet, name, batch, height, seed))
        distripy.reset(unet)
    return results


# (config, (model, batch, latent height, seed)); the batch of 2 is CFG's (uncond, cond) pair.
RUNS = {
    2: [
        ({"split_batch": False}, ("sdxl", 2, 32, 0)),
        ({"split_batch": False, "kernel_backend": "torch"}, ("sdxl", 1, 32, 1)),  # reference attention
        ({"split_batch": False}, ("sd15", 2, 32, 2)),  # 2-row bands at the deepest level
    ],
    3: [
        ({}, ("sdxl", 2, 24, 3)),  # an odd number of ranks: no CFG split, 3 bands
        ({}, ("sd15", 1, 24, 4)),  # one-row bands at the deepest level
    ],
    4: [
        ({}, ("sdxl", 2, 32, 5)),  # CFG split: 2 groups of 2 bands
        ({"split_batch": False, "shift_launch_bytes": 1}, ("sdxl", 2, 32, 6)),  # 4 bands, 3 launches
        ({}, ("sd15", 2, 32, 7)),  # CFG split, SD 1.x
        ({"split_batch": False}, ("sd15", 1, 32, 8)),  # 4 one-row bands at the deepest level
    ],
}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_step_equals_the_single_device_step(run_ranks, world_size):
    runs = RUNS[world_size]
    per_rank = run_ranks(_exact_body, world_size, runs, timeout=300)
    for index, (config, case) in enumerate(runs):
        expected = _predictions(_model(case[0], case[3]), *case)
        for rank in range(world_size):
            for step, (got, want) in enumerate(zip(per_rank[rank][index], expected)):
                error = relative_error(got, want)
                assert error <= EXACT, f"{config} {case} rank {rank} step {step}: relative error {error:.2e}"


# -- the order of a step -------------------------------------------------------------------------


class _ComputeLog:
    """Counts the convolutions and attention blocks computed; the TrafficLog's clock."""

    def __init__(self, monkeypatch):
        import distripy.parallel.attention as attention
        import distripy.parallel.conv as conv

        self.events = []
        original_conv, original_attention = conv.halo_conv2d, attention.attention_with_lse

        def halo_conv2d(*args, **kwargs):
            x, weight, stride, padding, dilation = args[0], args[3], args[5], args[6], args[7]
            interior = interior_rows(x.shape[2], weight.shape[2], padding[0], stride[0], dilation[0])
            self.events.append(("conv", kwargs.get("rows"), kwargs.get("out") is not None, interior))
            return original_conv(*args, **kwargs)

        def attention_with_lse(*args, **kwargs):
            self.events.append(("attention", args[1].shape[2]))
            return original_attention(*args, **kwargs)

        monkeypatch.setattr(conv, "halo_conv2d", halo_conv2d)
        monkeypatch.setattr(attention, "attention_with_lse", attention_with_lse)

    def clock(self):
        return len(self.events)


@pytest.mark.parametrize(
    "rank, world_size, split_batch, launch_bytes",
    [(1, 4, False, None), (0, 2, False, None), (3, 4, True, None), (2, 4, False, 1)],
)
def test_each_transfer_is_issued_before_the_compute_it_overlaps(
    monkeypatch, rank, world_size, split_batch, launch_bytes
):
    import distripy
    import distripy.parallel.attention as attention
    from distripy.parallel import PatchGroupNorm

    if launch_bytes is not None:  # one shift per launch
        monkeypatch.setattr(attention, "SHIFT_LAUNCH_BYTES", launch_bytes)
    compute = _ComputeLog(monkeypatch)
    log = TrafficLog(clock=compute.clock)
    unet = tiny_sdxl_unet(0)
    config = distripy.DistriConfig(mode="exact", split_batch=split_batch)
    distripy.parallelize(unet, config, comm=LoopbackComm(rank, world_size, log=log))
    latents, conditioning = _inputs("sdxl", 2, 32, 9)
    with torch.no_grad():
        unet(latents[0], TIMESTEPS[0], **conditioning)
    distripy.reset(unet)
    bands = world_size // 2 if split_batch else world_size
    events = compute.events
    halos = [t for t in log.transfers if t.op == "halo_exchange"]
    shifts = [t for t in log.transfers if t.op == "shift"]
    reduces = [t for t in log.transfers if t.op == "all_reduce"]
    assert halos and shifts and reduces
    for transfer in halos:
        # issued, then the interior rows of a new output, then the wait, then the boundary rows
        kind, rows, given_out, interior = events[transfer.issued_at]
        assert (kind, rows, given_out) == ("conv", interior, False)
        assert transfer.waited_at == transfer.issued_at + 1
        top, bottom = events[transfer.waited_at : transfer.waited_at + 2]
        assert top[:3] == ("conv", (0, interior[0]), True)
        assert bottom[0] == "conv" and bottom[1][0] == interior[1] and bottom[2]
    # bands of 4+ rows at every level of a 2-band image have interior rows to hide the exchange
    if bands == 2:
        assert all(events[t.issued_at][1][1] > events[t.issued_at][1][0] for t in halos)
    # the shifts of one attention leave together, before its own block; shift d waits for d blocks
    by_issue = {}
    for transfer in shifts:
        by_issue.setdefault(transfer.issued_at, []).append(transfer)
    for issued_at, group in by_issue.items():
        assert len(group) == bands - 1
        # small blocks: one launch; with SHIFT_LAUNCH_BYTES of 1, one launch per shift
        assert len({t.group for t in group}) == (1 if launch_bytes is None else bands - 1)
        assert events[issued_at][0] == "attention"
        assert [t.waited_at - issued_at for t in group] == list(range(1, bands))
        assert all(kind == "attention" for kind, *_ in events[issued_at : issued_at + bands])
    # GroupNorm statistics: all-reduced and waited for at once, one per norm
    assert all(t.waited_at == t.issued_at for t in reduces)
    assert len(reduces) == sum(isinstance(m, PatchGroupNorm) for m in unet.modules())


def test_exact_is_a_mode_of_the_config_and_the_command():
    from distripy import DistriConfig, cli

    assert DistriConfig(mode="exact").mode == "exact"
    args = cli._parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--mode", "exact"])
    assert args.mode == "exact"


# -- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("kernel_backend", ["auto", "triton"])
def test_an_exact_step_on_cuda_equals_full_sync_and_replays_as_a_graph(kernel_backend, monkeypatch):
    """One rank of 4 on one GPU (``LoopbackComm``): ``exact`` (interior-first Triton or cuDNN
    convolutions, fused attention with log-sum-exp merged block by block) against ``full_sync``
    (whole-band convolutions, one attention over the gathered keys) on the same inputs and the same
    received data, eager and replayed from CUDA graphs. In IEEE float32: with TF32 (torch's default
    for cuDNN convolutions, which the Triton kernel follows) two summation orders differ by ~1e-3."""
    import distripy

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from distripy.pipelines.unet import require_installed_forward

    latents, conditioning = _inputs("sdxl", 2, 32, 11)
    conditioning = {
        k: v.cuda() if isinstance(v, torch.Tensor) else {n: t.cuda() for n, t in v.items()}
        for k, v in conditioning.items()
    }
    models = {}
    for mode, use_cuda_graph in (("full_sync", False), ("exact", False), ("exact", True)):
        unet = tiny_sdxl_unet(11).cuda()
        config = distripy.DistriConfig(
            mode=mode, split_batch=False, kernel_backend=kernel_backend, use_cuda_graph=use_cuda_graph
        )
        distripy.parallelize(unet, config, comm=LoopbackComm(1, 4))
        models[mode, use_cuda_graph] = unet
    with torch.no_grad():
        for step, (x, t) in enumerate(zip(latents * 2, TIMESTEPS * 2)):
            x = x.cuda()
            reference = models["full_sync", False](x, t, **conditioning).sample
            eager = models["exact", False](x, t, **conditioning).sample
            graphed = models["exact", True](x, t, **conditioning).sample
            torch.testing.assert_close(
                eager, reference, rtol=1e-4, atol=1e-5, msg=lambda m, step=step: f"step {step}: {m}"
            )
            torch.testing.assert_close(
                graphed, eager, rtol=1e-5, atol=1e-6, msg=lambda m, step=step: f"step {step}: {m}"
            )
    graphs = require_installed_forward(models["exact", True]).graphs
    assert graphs.captures == 2 and graphs.replays >= 2  # one graph per step parity
