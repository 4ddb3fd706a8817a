"""The parallelised UNet under ``torch.compile``.

``torch.compile(unet)`` on a patch-parallel UNet traces the band's forward (the host-side step
logic -- generations, digests, the output gather -- runs eagerly, never traced) and breaks only
where transfers leave: at the communication checkpoints (block ends), whose issue runs eagerly.
Here, on CPU with a small SDXL-architecture UNet, for a synchronous then asynchronous steps:

* with ``LoopbackComm`` the compiled steps equal the eager ones bitwise, every graph break is at a
  checkpoint, and once the first asynchronous steps have compiled no step recompiles;
* on 2 gloo ranks the compiled steps equal the eager ones.

The backend is dynamo's ``aot_eager`` / ``eager``: what distripy's code decides (what is traced,
where it breaks, what guards a step) is dynamo's part; inductor's C++ code generation of the same
graphs takes minutes on a 2-core CI machine and is run by ``bench/host_overhead.py --compile``.
"""

import torch
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy
from distripy.runtime import LoopbackComm

SMALL = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 2),
)
TIMESTEPS = [900.0, 800.0, 700.0, 600.0]


def _unet(comm, warmup_steps=1):
    unet = tiny_sdxl_unet(0, **SMALL)
    return distripy.parallelize(
        unet, distripy.DistriConfig(warmup_steps=warmup_steps, split_batch=False), comm=comm
    )


def _inputs(seed=0):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return latents, sdxl_conditioning(2, 1)


def test_compiled_steps_equal_eager_and_break_only_at_checkpoints():
    from torch._dynamo.utils import counters

    latents, conditioning = _inputs()
    eager = _unet(LoopbackComm(1, 2))
    compiled_unet = _unet(LoopbackComm(1, 2))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_unet, backend="aot_eager")
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            x = latents + 0.01 * step  # a latent that moves, as in a denoising loop
            expected = eager(x, torch.tensor(t), **conditioning).sample
            if step == len(TIMESTEPS) - 1:
                frames_before = counters["stats"]["unique_graphs"]
            got = compiled(x, torch.tensor(t), **conditioning).sample
            assert torch.equal(got, expected), (step, float((got - expected).abs().max()))
    # The steady asynchronous step compiled nothing new (no guard on the step number, the
    # timestep or a buffer's identity).
    assert counters["stats"]["unique_graphs"] == frames_before
    # Every graph break is a checkpoint's eager issue (a disabled function), none elsewhere.
    reasons = [reason for reason in counters["graph_break"]]
    assert reasons and all("disable" in reason for reason in reasons), reasons


def _compiled_on_ranks(rank, world_size):
    from distripy.runtime import TorchComm

    torch.manual_seed(0)
    latents, conditioning = _inputs()
    eager = _unet(TorchComm())
    compiled = torch.compile(_unet(TorchComm()), backend="eager")
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS[:2]):  # the synchronous step, then an asynchronous one
            x = latents + 0.01 * step
            expected = eager(x, torch.tensor(t), **conditioning).sample
            got = compiled(x, torch.tensor(t), **conditioning).sample
            assert torch.equal(got, expected), (rank, step, float((got - expected).abs().max()))
    return True


def test_compiled_steps_equal_eager_on_two_gloo_ranks(run_ranks):
    assert run_ranks(_compiled_on_ranks, 2, timeout=300) == [True, True]
