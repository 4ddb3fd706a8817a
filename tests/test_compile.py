"""The parallelised UNet under ``torch.compile``.

``torch.compile(unet)`` on a patch-parallel UNet traces the band's forward (the host-side step
logic -- generations, digests, the output gather -- runs eagerly, never traced) and breaks only
where transfers leave: at the communication checkpoints (block ends), whose issue runs eagerly.
On CPU with a small SDXL-architecture UNet (``SMALL``), for a synchronous then asynchronous steps:

* here, with ``LoopbackComm``: the compiled steps equal the eager ones bitwise, every graph break is
  at a checkpoint, and once the first asynchronous step has compiled no step recompiles;
* ``test_compile_ranks.py``: on 2 gloo ranks the compiled steps equal the eager ones (a smaller
  UNet still, ``ONE_LEVEL_UNET``: what it adds is the real ``TorchComm``'s transfers under trace);
* ``test_compile_inductor.py``: ``DistriConfig(compile=True)`` compiles the band's forward with
  inductor (its CPU backend, C++ code generation), checked against eager on a smaller UNet still
  (``ONE_LEVEL_UNET``), within float32 rounding (inductor reorders the reductions it fuses);
* ``test_compile_graphs.py``: a compiled step is never compiled inside a CUDA-graph capture.

The dynamo tests use its ``aot_eager`` / ``eager`` backends: what distripy's code decides (what is
traced, where it breaks, what guards a step) is dynamo's part. ``aot_eager`` here, where the step's
graphs also go through AOTAutograd as inductor's do; ``eager`` where the test counts guards only. The four live in files of their own
so that the test workers share them out. ``bench/host_overhead.py --compile`` counts the kernels
inductor generates.
"""

import torch
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy
from distripy.parallel.context import PatchContext
from distripy.runtime import LoopbackComm

SMALL = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 2),
)
TIMESTEPS = [900.0, 800.0, 700.0, 600.0]


def small_unet(comm, warmup_steps=1, **settings):
    unet = tiny_sdxl_unet(0, **SMALL)
    return distripy.parallelize(
        unet, distripy.DistriConfig(warmup_steps=warmup_steps, split_batch=False, **settings), comm=comm
    )


def step_inputs(seed=0):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return latents, sdxl_conditioning(2, 1)


# The UNet of the tests that need every patch-parallel layer but not every block type: one
# cross-attention down block, one up block, no mid block, on an 8 x 8 latent. Every compiled region
# is traced (and, under inductor, one C++ build on the CPU), so the fewer regions the shorter the
# test (each of its blocks and each small piece of the UNet's own forward is one).
ONE_LEVEL_UNET = dict(
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("UpBlock2D",),
    mid_block_type=None,
    block_out_channels=(32,),
    transformer_layers_per_block=(1,),
    attention_head_dim=(2,),
)


def test_compiled_steps_equal_eager_and_break_only_at_checkpoints():
    from torch._dynamo.utils import counters

    latents, conditioning = step_inputs()
    eager = small_unet(LoopbackComm(1, 2))
    compiled_unet = small_unet(LoopbackComm(1, 2))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_unet, backend="aot_eager")
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            x = latents + 0.01 * step  # a latent that moves, as in a denoising loop
            expected = eager(x, torch.tensor(t), **conditioning).sample
            if step == 2:  # the second asynchronous step: compiled already, as the first
                frames_before = counters["stats"]["unique_graphs"]
            got = compiled(x, torch.tensor(t), **conditioning).sample
            assert torch.equal(got, expected), (step, float((got - expected).abs().max()))
    # The asynchronous steps after the first compiled nothing new (no guard on the step number,
    # the timestep or a buffer's identity, nor on whether the previous step was synchronous).
    assert counters["stats"]["unique_graphs"] == frames_before
    # Every graph break is a checkpoint's eager issue (a disabled function), none elsewhere.
    reasons = [reason for reason in counters["graph_break"]]
    assert reasons and all("disable" in reason for reason in reasons), reasons


def test_the_kernels_are_the_torch_references_while_compiling():
    """One property decides for every module: inside a trace the references (plain torch ops,
    fused by inductor), never the Triton custom ops; outside it the configured backend. It traces
    without a break."""
    context = PatchContext(distripy.DistriConfig(kernel_backend="triton"))

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x):
        return x + (1.0 if context.kernel_backend == "torch" else 2.0)

    assert traced(torch.zeros(1)).item() == 1.0
    assert context.kernel_backend == "triton"
    context.kernel_backend = "torch"  # settable, as bench/host_overhead.py does
    assert context.kernel_backend == "torch"
