"""A compiled step under CUDA graphs (``test_compile.py`` says what the compile tests check)."""

import torch
from test_compile import ONE_LEVEL_UNET
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy
from distripy.pipelines.unet import installed_forward
from distripy.runtime import LoopbackComm


def test_a_compiled_step_is_never_compiled_inside_a_cuda_graph_capture(monkeypatch):
    """``compile=True`` with CUDA graphs: ``StepGraphs`` runs a compiled key eagerly twice (the
    first run makes the persistent buffers, the second compiles for buffers that exist) and then
    captures it, and the capture finds the step compiled: a recompile there raises (a compile
    inside a capture would synchronise the capturing stream). On CPU with ``torch.cuda``'s graph
    entry points faked (``test_graph_bookkeeping.FakeCuda``: a capture runs the step on the host,
    a replay runs nothing) and dynamo's ``eager`` backend standing in for inductor: what decides
    recompiles is dynamo's guards, whatever the backend, here on the step's parity, not its number. Three
    generations of a synchronous step and three asynchronous ones: every kind of key is captured."""
    from test_graph_bookkeeping import FakeCuda

    from distripy.parallel.graphs import StepGraphs

    fake = FakeCuda()
    for name in ("Stream", "CUDAGraph", "graph", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **dict(kw, backend="eager")))
    comm = LoopbackComm(1, 2)
    config = distripy.DistriConfig(warmup_steps=1, split_batch=False, compile=True, use_cuda_graph=False)
    unet = distripy.parallelize(tiny_sdxl_unet(0, **ONE_LEVEL_UNET), config, comm=comm)
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
