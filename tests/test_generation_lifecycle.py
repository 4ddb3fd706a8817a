"""A generation declared from the top, and a model given back as it was.

* A parallelised pipeline's call is one generation with **one** agreement round (counted on the
  comm): the call, the seed, the models and the plan, where the wrappers used to add one each.
* What was loaded into a model since is taken in when the adapters PEFT records on it, or its
  attention processors, changed: not by walking the model at every image.
* ``distripy.generation`` / ``distripy.reset(unet, steps=)`` declare a bare UNet's generations.
* ``distripy.unparallelize`` restores a UNet or a pipeline exactly: its outputs and ``state_dict``
  equal a never-parallelised copy's, no hook or forward of distripy is left, and it can be
  parallelised again.
"""

import numpy as np
import pytest
import torch
from unet_models import sdxl_conditioning, tiny_sdxl_unet

import distripy
from distripy.runtime import LoopbackComm

PROMPT = "a lighthouse on a cliff at dawn"


def _tiny_pipeline(seed=0):
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, seed=None, steps=3):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return pipe(
        PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=5.0, generator=generator,
        output_type="np",
    ).images  # fmt: skip


class _Counted:
    """Counts a comm's host rounds (``all_gather_object``) by patching the instance."""

    def __init__(self, comm) -> None:
        self.rounds = 0
        original = comm.all_gather_object

        def counted(obj):
            self.rounds += 1
            return original(obj)

        comm.all_gather_object = counted


def _one_round_body(rank, world_size):
    from distripy.pipelines.pipeline import pipeline_record

    pipe = distripy.parallelize(_tiny_pipeline(), distripy.DistriConfig(mode="corrected_async_gn"))
    counter = _Counted(pipeline_record(pipe).comm)
    rounds, images = [], []
    for seed in (None, 5, None):  # without a generator the seed rides on the same round
        before = counter.rounds
        images.append(_images(pipe, seed))
        rounds.append(counter.rounds - before)
    before = counter.rounds
    with distripy.alone(pipe):  # each rank its own request: no round at all, one device's image
        alone = _images(pipe, 20 + rank)
    rounds.append(counter.rounds - before)
    np.testing.assert_allclose(alone, _images(_tiny_pipeline(), 20 + rank), atol=1e-5)
    rounds.append(None if _images(pipe, 5) is None else counter.rounds - before)  # all ranks again
    distripy.reset(pipe)
    return rounds, images


def test_a_pipeline_call_is_one_agreement_round(run_ranks):
    results = run_ranks(_one_round_body, 2, timeout=300)
    for rounds, _ in results:
        assert rounds == [1, 1, 1, 0, 1]
    # every rank got the same images, rank 0's seed included
    for first, second in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(first, second)
    assert not np.array_equal(results[0][1][0], results[0][1][2])  # two draws of the shared seed


def _rank_mismatch_body(rank, world_size):
    pipe = distripy.parallelize(_tiny_pipeline(), distripy.DistriConfig(mode="corrected_async_gn"))
    try:
        pipe(PROMPT, height=64, width=64, num_inference_steps=3 + rank, output_type="np")
    except distripy.errors.RankMismatchError as error:
        return str(error)
    return None


def test_a_call_that_differs_between_ranks_raises_on_every_rank_in_that_round(run_ranks):
    messages = run_ranks(_rank_mismatch_body, 2, timeout=300)
    assert all(message and "num_inference_steps" in message for message in messages)


def test_adapters_are_taken_in_only_when_what_is_loaded_changes(monkeypatch):
    """The swap walk runs when PEFT's record of loaded adapters (or a processor) changed."""
    from peft import LoraConfig

    import distripy.pipelines.registry as registry

    unet = tiny_sdxl_unet(0)
    distripy.parallelize(unet, distripy.DistriConfig(use_cuda_graph=False), comm=LoopbackComm(0, 2))
    walks = []
    original = registry.swap_modules
    monkeypatch.setattr(registry, "swap_modules", lambda *a, **k: walks.append(1) or original(*a, **k))
    for _ in range(3):
        distripy.reset(unet, 4)
    assert walks == []
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "conv1"], init_lora_weights=False))
    distripy.reset(unet, 4)
    distripy.reset(unet, 4)
    assert walks == [1]
    from distripy.parallel.conv import PatchConv2d

    lora_a = unet.down_blocks[0].resnets[0].conv1.lora_A["default"]
    assert isinstance(lora_a, PatchConv2d) and lora_a.attached  # the LoCon's 3x3 gets halos
    record = registry.record_of(unet)
    state = registry.refresh(record)
    unet.set_adapter("default")
    for layer in (module for _, module in record.layers):
        layer.scaling["default"] = 0.5  # a scale changed: no walk, another digest
    assert registry.refresh(record) != state and walks == [1]
    unet.set_attn_processor(distripy.parallel.attention.PatchSelfAttnProcessor())  # a loader's unbound ones
    distripy.reset(unet, 4)
    assert walks == [1, 1]


def test_an_undeclared_generation_refuses_adapters_it_cannot_take_in():
    """A bare UNet loop that never declares its generations, with a LoRA loaded since: its next
    generation cannot take the LoRA in, so it raises, naming the remedy, instead of running the
    LoRA's 3x3 convolutions without halos; declared, it runs."""
    from peft import LoraConfig

    unet = tiny_sdxl_unet(0)
    config = distripy.DistriConfig(mode="corrected_async_gn", use_cuda_graph=False, split_batch=False)
    distripy.parallelize(unet, config, comm=LoopbackComm(0, 2))
    conditioning = sdxl_conditioning(2, 1)
    sample = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unet(sample, 500, **conditioning)
        unet.add_adapter(LoraConfig(r=2, target_modules=["conv1"], init_lora_weights=False))
        with pytest.raises(distripy.errors.StepError, match=r"distripy.reset\(model"):
            unet(sample, 999, **conditioning)  # the timestep went up: a generation nobody declared
        distripy.reset(unet, 2)
        assert unet(sample, 999, **conditioning).sample.shape == sample.shape


def test_a_bare_unet_generation_is_declared_by_the_context_manager():
    unet = tiny_sdxl_unet(0)
    config = distripy.DistriConfig(mode="auto", use_cuda_graph=False, split_batch=False)
    distripy.parallelize(unet, config, comm=LoopbackComm(0, 2))
    forward = distripy.pipelines.unet.require_installed_forward(unet)
    conditioning = sdxl_conditioning(2, 1)
    sample = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(1))
    generations = []
    for image in range(2):
        with distripy.generation(unet, steps=12):
            assert forward.generation.declared and forward.steps == 12
            for t in (999, 500, 1):  # the same timesteps: only the declaration tells images apart
                with torch.no_grad():
                    unet(sample, 500, **conditioning)
                generations.append(forward.context.generation)
        assert forward.steps is None  # ended on leaving
    assert generations == [1, 1, 1, 2, 2, 2]
    assert forward.context.choice.mode == "corrected_async_gn" and forward.context.choice.warmup_steps == 3


# -- unparallelize --------------------------------------------------------------------------------


def _structure(model):
    """What of a model parallelize may change: each module's class and own forward, the hooks, the
    attention processors' classes."""
    return [
        (
            path,
            type(module),
            "forward" in module.__dict__,
            len(module._forward_hooks),
            type(getattr(module, "processor", None)),
        )
        for path, module in model.named_modules()
    ]


def _same_state(model, reference):
    got, expected = model.state_dict(), reference.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
        # a weight of its own again (not a view of a stacked projection): saved as it was
        assert got[name].untyped_storage().nbytes() == expected[name].untyped_storage().nbytes(), name


def test_unparallelize_restores_a_unet_exactly():
    reference = tiny_sdxl_unet(3)
    unet = tiny_sdxl_unet(3)
    structure = _structure(unet)
    conditioning = sdxl_conditioning(2, 1)
    sample = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(4))
    config = distripy.DistriConfig(mode="full_sync", use_cuda_graph=False, split_batch=False)
    with torch.no_grad():
        expected = reference(sample, 999, **conditioning).sample
        for round_ in range(2):  # parallelise again after unparallelize
            distripy.parallelize(unet, config, comm=LoopbackComm(0, 2))
            distripy.reset(unet, 2)
            band = unet(sample, 999, **conditioning).sample  # fuses q/k/v, fills buffers
            assert band.shape == expected.shape
            assert distripy.unparallelize(unet) is unet
            assert _structure(unet) == structure
            _same_state(unet, reference)
            torch.testing.assert_close(unet(sample, 999, **conditioning).sample, expected, rtol=0, atol=0)
    assert distripy.unparallelize(unet) is unet  # nothing to undo: no error


def _unparallelize_pipeline_body(rank, world_size):
    pipe = _tiny_pipeline(2)
    cls = type(pipe)
    # the models distripy changes (transformers' text encoders hook themselves at their first call)
    structures = {name: _structure(getattr(pipe, name)) for name in ("unet", "vae")}
    distripy.parallelize(pipe, distripy.DistriConfig(mode="full_sync"))
    parallel = _images(pipe, 7)
    distripy.unparallelize(pipe)
    assert type(pipe) is cls and "_distripy_pipeline" not in pipe.__dict__
    for name, structure in structures.items():
        assert _structure(getattr(pipe, name)) == structure, name
    restored = _images(pipe, 7)
    distripy.parallelize(pipe, distripy.DistriConfig(mode="full_sync"))
    again = _images(pipe, 7)
    distripy.reset(pipe)
    distripy.unparallelize(pipe)
    reference = _tiny_pipeline(2)  # never parallelised, in this process (its threads' sum order)
    expected = _images(reference, 7)
    _same_state(pipe.unet, reference.unet)
    _same_state(pipe.vae, reference.vae)
    return parallel, restored, again, expected


def test_unparallelize_restores_a_pipeline_exactly(run_ranks):
    results = run_ranks(_unparallelize_pipeline_body, 2, timeout=300)
    for parallel, restored, again, expected in results:
        np.testing.assert_array_equal(restored, expected)  # the single-device pipeline, bit for bit
        np.testing.assert_allclose(parallel, expected, atol=1e-5)  # full_sync: one device's image
        np.testing.assert_array_equal(again, parallel)
