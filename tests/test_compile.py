"""The parallelised UNet under ``torch.compile``.

``torch.compile(unet)`` on a patch-parallel UNet traces the band's forward (the host-side step
logic -- generations, digests, the output gather -- runs eagerly, never traced) and breaks only
where transfers leave: at the communication checkpoints (block ends), whose issue runs eagerly.
Here, on CPU with a small SDXL-architecture UNet, for a synchronous then asynchronous steps:

* with ``LoopbackComm`` the compiled steps equal the eager ones bitwise, every graph break is at a
  checkpoint, and once the first asynchronous steps have compiled no step recompiles;
* on 2 gloo ranks the compiled steps equal the eager ones.

Those use dynamo's ``aot_eager`` / ``eager`` backends: what distripy's code decides (what is
traced, where it breaks, what guards a step) is dynamo's part. ``DistriConfig(compile=True)``
compiles the band's forward with inductor (its CPU backend here, C++ code generation): one test
checks it against eager on a smaller UNet still (``INDUCTOR_UNET``), within float32 rounding
(inductor reorders the reductions it fuses). ``bench/host_overhead.py --compile`` counts the kernels inductor generates.
"""

import torch
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy
from distripy.parallel.context import PatchContext
from distripy.pipelines.unet import installed_forward
from distripy.runtime import LoopbackComm

SMALL = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 2),
)
TIMESTEPS = [900.0, 800.0, 700.0, 600.0]


def _unet(comm, warmup_steps=1, **settings):
    unet = tiny_sdxl_unet(0, **SMALL)
    return distripy.parallelize(
        unet, distripy.DistriConfig(warmup_steps=warmup_steps, split_batch=False, **settings), comm=comm
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


# The inductor test's UNet: one cross-attention down block, one up block, no mid block, on an 8 x 8
# latent. Every compiled region is one C++ build on the CPU, so the fewer regions the shorter the
# test (each of its blocks and each small piece of the UNet's own forward is one).
INDUCTOR_UNET = dict(
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("UpBlock2D",),
    mid_block_type=None,
    block_out_channels=(32,),
    transformer_layers_per_block=(1,),
    attention_head_dim=(2,),
)


def test_compile_config_runs_the_band_forward_through_inductor():
    """``DistriConfig(compile=True)``: the band's forward compiled by inductor (C++ on CPU) equals
    the eager step within float32 rounding, a synchronous step then asynchronous ones; it breaks
    only at checkpoints, and the steady asynchronous step compiles nothing."""
    from torch._dynamo.utils import counters

    def parallel(compile):
        config = distripy.DistriConfig(
            warmup_steps=1, split_batch=False, compile=compile, use_cuda_graph=False
        )
        return distripy.parallelize(tiny_sdxl_unet(0, **INDUCTOR_UNET), config, comm=LoopbackComm(1, 2))

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
            if step == len(TIMESTEPS) - 1:
                frames_before = counters["stats"]["unique_graphs"]
            got = compiled(x, torch.tensor(t), **conditioning).sample
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert installed_forward(compiled)._compiled is not None  # made once, at the first step
    assert counters["inductor"], "inductor compiled nothing"
    assert counters["stats"]["unique_graphs"] == frames_before  # the steady step: no recompile
    reasons = list(counters["graph_break"])
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


def test_a_compiled_step_is_never_compiled_inside_a_cuda_graph_capture(monkeypatch):
    """``compile=True`` with CUDA graphs: ``StepGraphs`` runs a compiled key eagerly twice (the
    first run makes the persistent buffers, the second compiles for buffers that exist) and then
    captures it, and the capture finds the step compiled: a recompile there raises (a compile
    inside a capture would synchronise the capturing stream). On CPU with ``torch.cuda``'s graph
    entry points faked (``test_graph_bookkeeping.FakeCuda``: a capture runs the step on the host,
    a replay runs nothing) and dynamo's ``aot_eager`` backend standing in for inductor: what
    decides recompiles is dynamo's guards, here on the step's parity, not its number. Three
    generations of a synchronous step and three asynchronous ones: every kind of key is captured."""
    from test_graph_bookkeeping import FakeCuda

    from distripy.parallel.graphs import StepGraphs

    fake = FakeCuda()
    for name in ("Stream", "CUDAGraph", "graph", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **dict(kw, backend="aot_eager")))
    comm = LoopbackComm(1, 2)
    config = distripy.DistriConfig(warmup_steps=1, split_batch=False, compile=True, use_cuda_graph=False)
    unet = distripy.parallelize(tiny_sdxl_unet(0, **INDUCTOR_UNET), config, comm=comm)
    forward = installed_forward(unet)
    forward.context.static_buffers = True
    forward.graphs = StepGraphs(forward.context, [comm], eager_runs=2)
    monkeypatch.setattr(forward, "_input_problem", lambda *args: None)  # it wants a CUDA sample
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)
    torch._dynamo.reset()
    with torch.no_grad():
        for generation in range(3):
            distripy.reset(unet)
            for step in range(4):
                unet(latents + 0.01 * step, torch.tensor(900.0 - 100 * step), **conditioning)
    graphs = forward.graphs
    # keys: the synchronous first step (computing the cross-attention keys/values, once a
    # generation), the asynchronous parity 1 (twice) and parity 0 (once); each captured at its
    # third meeting: parity 1 in generation 1, the other two in generation 2
    assert graphs.captures == 3, graphs.captures
    assert graphs.replays == 2 + 4, graphs.replays
