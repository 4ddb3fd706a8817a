"""CUDA-graph steps (``use_cuda_graph=True``) and the persistent buffers they rest on.

On CPU: with ``static_buffers`` every buffer a step keeps for the next is one of two persistent
tensors chosen by the step's parity (what lets an even and an odd graph replay each other's
results), and the results are bitwise those of fresh buffers, on LoopbackComm and on real gloo
ranks. On a GPU (``cuda``): graph replays equal eager steps in every mode, across generations and
shapes, with the expected number of captures.
"""

import pytest
import torch
from unet_models import sdxl_conditioning, tiny_sdxl_unet

from distripy.pipelines.unet import require_installed_forward
from distripy.runtime import LoopbackComm


def _latents(batch, height, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, height, 24, generator=generator).to(device)


def _steps(unet, latents, conditioning, timesteps):
    with torch.no_grad():
        return [unet(latents + 0.01 * i, t, **conditioning).sample.clone() for i, t in enumerate(timesteps)]


def _stale_pointers(context):
    pointers = set()
    for state in context.states:
        if state.exchange is not None:
            pointers.update(t.data_ptr() for t in state.exchange.buffers if t is not None and t.numel())
    return pointers


def test_flatten_and_unflatten_round_trip_and_refuse_unhashable_values():
    from distripy.parallel.bands import flatten_tensors, unflatten_tensors

    def value_with(a, c, number):
        return {"a": a, "b": {"c": (c, number), "d": None}, "e": [torch.ones(1)]}

    value = value_with(torch.ones(2), torch.zeros(3), 4.0)
    tensors, structure = flatten_tensors(value)
    assert len(tensors) == 3
    # The structure is a graph's key: other tensor contents of the same layout map to the same key.
    same_layout = value_with(torch.randn(2), torch.randn(3), 4.0)
    graphs = {structure: "graph"}
    assert graphs[flatten_tensors(same_layout)[1]] == "graph"
    fresh = [t + 1 for t in tensors]
    rebuilt = unflatten_tensors(structure, list(fresh))
    assert rebuilt["a"] is fresh[0] and rebuilt["b"]["c"][0] is fresh[1] and rebuilt["e"][0] is fresh[2]
    assert rebuilt["b"]["c"][1] == 4.0 and rebuilt["b"]["d"] is None
    # A different number, shape, dtype or stride is a different graph.
    for other in (
        value_with(torch.ones(2), torch.zeros(3), 5.0),
        value_with(torch.ones(3), torch.zeros(3), 4.0),
        value_with(torch.ones(2, dtype=torch.float64), torch.zeros(3), 4.0),
        value_with(torch.ones(4)[::2], torch.zeros(3), 4.0),
    ):
        assert flatten_tensors(other)[1] not in graphs
    with pytest.raises(ValueError, match="type set"):
        flatten_tensors({"x": {1, 2}})


@pytest.mark.parametrize("mode", ["corrected_async_gn", "sync_gn", "stale_gn"])
def test_static_buffers_alternate_by_parity_and_change_nothing(mode):
    import distripy

    config = distripy.DistriConfig(mode=mode, warmup_steps=2, split_batch=False)
    latents, conditioning = _latents(2, 32, 0), sdxl_conditioning(2, 1)
    timesteps = [900, 800, 700, 600, 500, 400]
    eager = tiny_sdxl_unet(0)
    distripy.parallelize(eager, config, comm=LoopbackComm(1, 4))
    expected = _steps(eager, latents, conditioning, timesteps)

    static = tiny_sdxl_unet(0)
    distripy.parallelize(static, config, comm=LoopbackComm(1, 4))
    context = distripy.api.patch_context(static)
    context.static_buffers = True
    pointers = []
    with torch.no_grad():
        for generation in range(2):
            for i, t in enumerate(timesteps):
                output = static(latents + 0.01 * i, t, **conditioning).sample
                assert torch.equal(output, expected[i]), f"generation {generation} step {i}"
                pointers.append(_stale_pointers(context))
            distripy.reset(static)
    assert all(pointers)
    for i in range(2, len(pointers)):
        assert pointers[i] == pointers[i - 2], f"step {i} kept its exchange in new buffers"
        assert not pointers[i] & pointers[i - 1], f"step {i} wrote into the buffers it reads"


def _static_body(rank, world_size):
    import distripy

    results = []
    for static in (False, True):
        unet = tiny_sdxl_unet(0)
        distripy.parallelize(unet, distripy.DistriConfig(warmup_steps=1))
        distripy.api.patch_context(unet).static_buffers = static
        results.append(_steps(unet, _latents(2, 32, 3), sdxl_conditioning(2, 4), [900, 700, 500, 300]))
        distripy.reset(unet)
    return results


def test_static_buffers_on_real_ranks_change_nothing(run_ranks):
    for fresh, static in run_ranks(_static_body, 2, timeout=240):
        for step, (a, b) in enumerate(zip(fresh, static)):
            assert torch.equal(a, b), f"step {step}"


def test_use_cuda_graph_is_refused_without_a_gpu_or_with_torch_distributed(monkeypatch):
    import distripy

    unet = tiny_sdxl_unet(0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_cuda_graph=True needs CUDA GPUs"):
            distripy.parallelize(unet, distripy.DistriConfig(use_cuda_graph=True), comm=LoopbackComm(0, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="comm_backend 'nccl' or 'auto'"):
        distripy.parallelize(unet, distripy.DistriConfig(use_cuda_graph=True, comm_backend="torch"))

    class NoGraphs(LoopbackComm):
        supports_cuda_graphs = False

    with pytest.raises(ValueError, match="NoGraphs cannot be captured"):
        distripy.parallelize(unet, distripy.DistriConfig(use_cuda_graph=True), comm=NoGraphs(0, 2))


# -- on a GPU -------------------------------------------------------------------------------------


def _cuda_conditioning(batch):
    def to_cuda(value):
        return value.cuda() if isinstance(value, torch.Tensor) else {k: v.cuda() for k, v in value.items()}

    return {name: to_cuda(value) for name, value in sdxl_conditioning(batch, 7).items()}


def _graphed_and_eager(mode, rank, world_size, split_batch, warmup_steps=2):
    import distripy

    models = []
    for use_cuda_graph in (False, True):
        unet = tiny_sdxl_unet(0).cuda()
        config = distripy.DistriConfig(
            mode=mode, warmup_steps=warmup_steps, split_batch=split_batch, use_cuda_graph=use_cuda_graph
        )
        distripy.parallelize(unet, config, comm=LoopbackComm(rank, world_size))
        models.append(unet)
    return models


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["corrected_async_gn", "full_sync", "exact", "sync_gn", "naive_patch"])
@pytest.mark.parametrize("rank, world_size, split_batch", [(1, 4, False), (2, 4, True)])
def test_graph_replays_equal_eager_steps(mode, rank, world_size, split_batch):
    import distripy

    eager, graphed = _graphed_and_eager(mode, rank, world_size, split_batch)
    timesteps = [950, 900, 850, 800, 750, 700, 650, 600, 550, 500]
    for generation, height in enumerate((32, 32, 48, 32)):
        latents = _latents(2, height, generation, "cuda")
        conditioning = _cuda_conditioning(2)
        expected = _steps(eager, latents, conditioning, timesteps)
        got = _steps(graphed, latents, conditioning, timesteps)
        for step, (a, b) in enumerate(zip(expected, got)):
            torch.testing.assert_close(
                b,
                a,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, g=generation, s=step: f"generation {g} step {s}: {m}",
            )
        distripy.reset(eager)
        distripy.reset(graphed)
    graphs = require_installed_forward(graphed).graphs
    # A key (shape, exchanges, whether the step computes the conditioning's cross-attention keys
    # and values, step parity) is captured the second time it is met. A generation's first step
    # computes them (its own key, met once per generation: captured when the 32-row shape comes
    # back in generation 1, never for the 48-row shape met once). Synchronous modes: then 2 keys
    # (parity) per shape, each met twice in a generation -> 32 rows: 3, 48 rows: 2. With a warm-up
    # (2 of 10 steps), both warm-up keys are met once per generation (32 rows only); the
    # asynchronous keys are captured in their first generation -> 32 rows: 4, 48 rows: 2.
    expected = 3 + 2 if mode in ("full_sync", "exact", "naive_patch") else 4 + 2
    assert graphs.captures == expected
    assert graphs.replays > graphs.captures


@pytest.mark.cuda
def test_graphs_take_a_number_timestep_and_refuse_a_cpu_input():
    import distripy

    _, graphed = _graphed_and_eager("corrected_async_gn", 0, 2, False)
    latents = _latents(1, 32, 0, "cuda")
    conditioning = _cuda_conditioning(1)
    outputs = _steps(graphed, latents, conditioning, [999, 900, 800, 700, 600, 500, 400])
    assert all(torch.isfinite(o).all() for o in outputs)
    distripy.reset(graphed)
    with pytest.raises(ValueError, match="on a CUDA device"):
        graphed.cpu()(latents.cpu(), 999, **sdxl_conditioning(1, 7))
