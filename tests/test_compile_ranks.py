"""The parallelised UNet under ``torch.compile`` on 2 gloo ranks (real ``TorchComm``): the compiled
steps, a synchronous then an asynchronous one, equal the eager ones (``test_compile.py`` says what
the compile tests check and why they use dynamo's ``eager`` backend)."""

import torch
from test_compile import TIMESTEPS, small_unet, step_inputs


def _compiled_on_ranks(rank, world_size):
    from distripy.runtime import TorchComm

    torch.manual_seed(0)
    latents, conditioning = step_inputs()
    eager = small_unet(TorchComm())
    compiled = torch.compile(small_unet(TorchComm()), backend="eager")
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS[:2]):  # the synchronous step, then an asynchronous one
            x = latents + 0.01 * step
            expected = eager(x, torch.tensor(t), **conditioning).sample
            got = compiled(x, torch.tensor(t), **conditioning).sample
            assert torch.equal(got, expected), (rank, step, float((got - expected).abs().max()))
    return True


def test_compiled_steps_equal_eager_on_two_gloo_ranks(run_ranks):
    assert run_ranks(_compiled_on_ranks, 2, timeout=300) == [True, True]
