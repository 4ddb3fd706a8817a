"""The pipelines people run, patch-parallel on 2 and 4 gloo ranks against the same pipelines on
one device (``tests/pipeline_variants.py``): ControlNet (SDXL; SD 1.x with two ControlNets; their
img2img and inpainting variants; guess mode), inpainting (SDXL's 9-channel UNet, SD's 4-channel
one), the SDXL base-to-refiner hand-over, an IP-Adapter loaded after ``parallelize`` and unloaded,
LoRA adapters loaded before and after, combined, fused, unfused, hot-swapped and unloaded, and
``AutoPipelineFor*``. Every add-on is random, saved to disk and loaded by diffusers' and PEFT's
own code.

Two worlds, run once each: 2 ranks without the CFG split (2 bands of the whole batch) and 4 ranks
with it (2 bands per CFG half); and 3 ranks (bands of unequal height: the deepest level's 5 rows
as 2/2/1) for the SDXL ControlNet's variants, whose residuals are each rank's band. In ``full_sync`` every image and latent equals the single
device's (<= 1e-5 relative, fp32), and each rank's ControlNet saw its band's rows only. The 2-rank
world then runs the ControlNet and LoRA scenarios in ``corrected_async_gn`` (one synchronous step,
then stale activations): the ranks agree, and its error against one device is reported."""

import functools

import numpy as np
import pytest
from multirank import run_on_ranks

import pipeline_variants

EXACT = 1e-5
ASYNC_SCENARIOS = ("controlnet_sdxl", "lora")
LATENT_ROWS = pipeline_variants.HEIGHT // 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return pipeline_variants.make_folders(str(tmp_path_factory.mktemp("addons")))


def _relative_error(value, reference):
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _body(rank, world_size, folders, split_batch, only_controlnet=False):
    import distripy

    def parallel(**settings):
        config = distripy.DistriConfig(split_batch=split_batch, **settings)
        return lambda pipe: distripy.parallelize(pipe, config)

    rows = []  # the latent rows each ControlNet call of this rank saw
    exact = parallel(mode="full_sync")
    results = {"controlnet_sdxl": pipeline_variants.controlnet_sdxl(folders, exact, rows)}
    if only_controlnet:
        return results, rows, None
    others = [name for name in pipeline_variants.SCENARIOS if name != "controlnet_sdxl"]
    results.update(pipeline_variants.run_scenarios(folders, exact, others))
    asynchronous = None
    if world_size == 2:
        stale = parallel(mode="corrected_async_gn", warmup_steps=1)
        asynchronous = pipeline_variants.run_scenarios(folders, stale, ASYNC_SCENARIOS)
        compressed = parallel(mode="corrected_async_gn", warmup_steps=1, compress="fp8")
        asynchronous["controlnet_sdxl_fp8"] = pipeline_variants.controlnet_sdxl(folders, compressed)
    return results, rows, asynchronous


@functools.lru_cache(maxsize=None)
def _world(world_size, folder_items):
    """2 and 4 ranks: every scenario; 3 ranks: the SDXL ControlNet's, on uneven bands."""
    return run_on_ranks(_body, world_size, dict(folder_items), world_size == 4, world_size == 3, timeout=900)


@functools.lru_cache(maxsize=None)
def _reference(folder_items):
    return pipeline_variants.run_scenarios(dict(folder_items), None)


def _key(folders):
    return tuple(sorted(folders.items()))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_full_sync_pipeline_variants_equal_the_single_device(folders, world_size):
    reference = _reference(_key(folders))
    for rank, (results, _, _) in enumerate(_world(world_size, _key(folders))):
        for name, values in results.items():
            expected = reference[name]
            assert len(values) == len(expected), name
            for call, (value, wanted) in enumerate(zip(values, expected)):
                assert value.shape == wanted.shape, (name, call)
                error = _relative_error(value, wanted)
                assert error <= EXACT, (rank, name, call, error)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_rank_ran_the_controlnet_on_its_band_only(folders, world_size):
    # 2 ranks: 2 bands of the whole batch; 3 ranks: 3 bands of 8, 8 and 4 latent rows; 4 ranks:
    # 2 bands per CFG half. Every ControlNet call (text-to-image twice, guess mode: 2 steps each;
    # img2img and inpainting at strengths 0.7 and 0.9 of 2 steps: 1 step each) saw its band's rows.
    from distripy.parallel.bands import BandLayout

    bands = 3 if world_size == 3 else 2
    layout = BandLayout.split(LATENT_ROWS // 4, bands)
    for rank, (_, rows, _) in enumerate(_world(world_size, _key(folders))):
        start, stop = layout.rows(rank % bands, LATENT_ROWS)
        assert len(rows) == 2 + 2 + 2 + 1 + 1
        assert set(rows) == {stop - start}, (rank, rows)


def test_addons_change_the_images(folders):
    """The comparisons are not vacuous: each add-on moves the image away from the plain one."""
    reference = _reference(_key(folders))
    lora, ip = reference["lora"], reference["ip_adapter"]
    for call in range(len(lora) - 1):
        assert _relative_error(lora[call], lora[-1]) > 1e-3, call  # the last is unloaded
    assert _relative_error(ip[0], ip[2]) > 1e-3 and _relative_error(ip[0], ip[1]) > 1e-3
    controlnet = reference["controlnet_sdxl"]
    assert _relative_error(controlnet[0], controlnet[2]) > 1e-3  # guess mode differs


def test_corrected_async_gn_runs_the_variants_and_reports_its_error(folders, record_property):
    reference = _reference(_key(folders))
    per_rank = _world(2, _key(folders))
    errors = {}
    for name in ASYNC_SCENARIOS:
        values = [asynchronous[name] for _, _, asynchronous in per_rank]
        for call, wanted in enumerate(reference[name]):
            np.testing.assert_array_equal(values[0][call], values[1][call])  # the ranks agree
            errors[f"{name}[{call}]"] = _relative_error(values[0][call], wanted)
    assert all(np.isfinite(error) for error in errors.values())
    assert max(errors.values()) > EXACT  # stale activations were used: not the exact result
    record_property("corrected_async_gn_relative_error", errors)
    print("corrected_async_gn relative error per call:", errors)


def test_a_compressed_controlnet_pipeline_runs_its_first_stale_step_as_the_uncompressed_one(folders):
    """``compress="fp8"`` through the SDXL ControlNet's pipelines (the ControlNet's own
    self-attention compressed too): each call's 2 steps are the warm-up and the first stale step,
    which attends over the warm-up's full-precision keys and values (fp8 keeps them), so every call
    equals the uncompressed asynchronous one, bit for bit, on every rank."""
    per_rank = _world(2, _key(folders))
    for _, _, asynchronous in per_rank:
        plain, compressed = asynchronous["controlnet_sdxl"], asynchronous["controlnet_sdxl_fp8"]
        assert len(plain) == len(compressed) == 5
        for call, (value, wanted) in enumerate(zip(compressed, plain)):
            np.testing.assert_array_equal(value, wanted, err_msg=str(call))


def test_an_unsupported_pipeline_is_refused_with_the_supported_list():
    from diffusers import DiffusionPipeline

    import distripy
    from distripy.pipelines.pipeline import SUPPORTED_PIPELINES

    class OtherPipeline(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

    pipe = OtherPipeline(pipeline_variants.sdxl().unet)
    with pytest.raises(TypeError, match="OtherPipeline is not supported") as raised:
        distripy.parallelize(pipe, distripy.DistriConfig())
    assert all(name in str(raised.value) for name in SUPPORTED_PIPELINES)
    assert isinstance(raised.value, distripy.DistripyError)
    assert "forward" not in pipe.unet.__dict__  # refused before anything was changed


def test_a_controlnet_with_pooled_conditions_is_refused():
    from diffusers import ControlNetModel

    import distripy

    controlnet = ControlNetModel.from_unet(
        pipeline_variants.sd().unet, conditioning_embedding_out_channels=(8, 16, 16)
    )
    controlnet.register_to_config(global_pool_conditions=True)
    with pytest.raises(distripy.errors.UnsupportedModuleError, match="global_pool_conditions=True"):
        distripy.parallelize(controlnet, distripy.DistriConfig())


def test_cuda_graphs_captured_before_an_adapter_change_are_dropped(folders):
    """A CUDA graph bakes in a LoRA's scale and which adapters run: loading, switching or fusing
    adapters must drop the graphs captured before (here a stand-in records the drops; the call
    itself is refused on a CPU)."""
    import torch

    import distripy
    from distripy.runtime import LoopbackComm

    class Graphs:
        released = 0

        def release(self):
            self.released += 1

    pipe = pipeline_variants.sdxl()
    unet = distripy.parallelize(pipe.unet, distripy.DistriConfig(split_batch=False), comm=LoopbackComm(0, 2))
    graphs = unet.forward.graphs = Graphs()
    config = unet.config
    inputs = dict(
        sample=torch.randn(1, 4, 16, 8),
        timestep=torch.tensor(999),
        encoder_hidden_states=torch.randn(1, 77, config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)},
    )

    def new_generation():
        distripy.reset(unet)
        with pytest.raises(
            distripy.errors.InputError, match="runs its steps as CUDA graphs .* needs a CUDA device"
        ):
            unet(**inputs)
        return graphs.released

    assert new_generation() == 1  # the first generation
    assert new_generation() == 1  # nothing changed
    pipe.load_lora_weights(folders["lora_conv"], adapter_name="conv")
    assert new_generation() == 2
    pipe.set_adapters(["conv"], [0.5])
    assert new_generation() == 3
    pipe.fuse_lora()
    assert new_generation() == 4
    assert new_generation() == 4
