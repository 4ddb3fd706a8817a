"""The parallelised UNet under ``torch.compile`` on 2 gloo ranks (real ``TorchComm``): the compiled
steps, a synchronous then an asynchronous one, equal the eager ones (``test_compile.py`` says what
the compile tests check and why they use dynamo's ``eager`` backend)."""

import torch
from test_compile import ONE_LEVEL_UNET, TIMESTEPS
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy


def _unet(comm):
    config = distripy.DistriConfig(warmup_steps=1, split_batch=False)
    return distripy.parallelize(tiny_sdxl_unet(0, **ONE_LEVEL_UNET), config, comm=comm)


def _compiled_on_ranks(rank, world_size):
    from distripy.runtime import TorchComm

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)
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
