"""``DistriConfig(compile=True)``: the band's forward through inductor (``test_compile.py`` says
what the compile tests check)."""

import torch
from test_compile import ONE_LEVEL_UNET, TIMESTEPS
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy
from distripy.pipelines.unet import installed_forward
from distripy.runtime import LoopbackComm


def test_compile_config_runs_the_band_forward_through_inductor():
    """``DistriConfig(compile=True)``: the band's forward compiled by inductor (C++ on CPU) equals
    the eager step within float32 rounding, a synchronous step then asynchronous ones; it breaks
    only at checkpoints, and the asynchronous steps after the first compile nothing."""
    from torch._dynamo.utils import counters

    def parallel(compile):
        config = distripy.DistriConfig(
            warmup_steps=1, split_batch=False, compile=compile, use_cuda_graph=False
        )
        return distripy.parallelize(tiny_sdxl_unet(0, **ONE_LEVEL_UNET), config, comm=LoopbackComm(1, 2))

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)
    eager, compiled = parallel(False), parallel(True)
    torch._dynamo.reset()
    counters.clear()
    # Scalar C++ kernels: vectorised ones take several times longer to generate and build, and
    # which inductor emits is its own affair, not distripy's.
    with torch.no_grad(), torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        for step, t in enumerate(TIMESTEPS):
            x = latents + 0.01 * step
            expected = eager(x, torch.tensor(t), **conditioning).sample
            if step == 2:  # the second asynchronous step: compiled already, as the first
                frames_before = counters["stats"]["unique_graphs"]
            got = compiled(x, torch.tensor(t), **conditioning).sample
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert installed_forward(compiled)._compiled is not None  # made once, at the first step
    assert counters["inductor"], "inductor compiled nothing"
    assert counters["stats"]["unique_graphs"] == frames_before  # asynchronous steps 2, 3: no recompile
    reasons = list(counters["graph_break"])
    assert reasons and all("disable" in reason for reason in reasons), reasons
