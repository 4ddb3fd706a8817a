"""``mode="auto"`` (the default): per generation, the mode and warm-up from the number of steps.

``choose_mode`` is the policy; these tests check what it returns against the policy's own
statement (``exact`` below ``EXACT_BELOW_STEPS``, else ``corrected_async_gn`` with a warm-up of
``WARMUP_FRACTION`` of the steps), that a generation runs what was chosen (the context's exchanges
step by step, on a bare UNet told with ``distripy.reset(unet, steps=n)`` and on a pipeline that
knows its ``num_inference_steps``), and that a mode the study saw drifting warns.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import distripy
from distripy import DistriConfig
from distripy import QualityWarning
from distripy.errors import InputError
from distripy.parallel import ActivationExchange, PatchContext, StatisticsExchange
from distripy.parallel.policy import ERROR_GROWS, EXACT_BELOW_STEPS, WARMUP_FRACTION
from unet_models import sdxl_conditioning, tiny_sdxl_unet


def test_auto_is_the_default_and_picks_by_the_number_of_steps():
    config = DistriConfig()
    assert config.mode == "auto"
    unknown = distripy.choose_mode(config, None)
    assert (unknown.mode, unknown.warmup_steps) == ("corrected_async_gn", config.warmup_steps)
    assert distripy.choose_mode(DistriConfig(warmup_steps=3)).warmup_steps == 3
    for steps in range(1, 101):
        choice = distripy.choose_mode(config, steps)
        if steps < EXACT_BELOW_STEPS:
            assert (choice.mode, choice.warmup_steps) == ("exact", steps), steps
        else:
            assert choice.mode == "corrected_async_gn", steps
            # the smallest whole number of steps that is at least the share
            assert choice.warmup_steps >= WARMUP_FRACTION * steps - 1e-9
            assert choice.warmup_steps - 1 < max(1, WARMUP_FRACTION * steps), steps
            assert 1 <= choice.warmup_steps < steps
        assert choice.reason.startswith("auto")


def test_a_named_mode_is_kept_whatever_the_steps():
    for mode in ("corrected_async_gn", "exact", "stale_gn"):
        config = DistriConfig(mode=mode, warmup_steps=2)
        for steps in (None, 2, 50):
            choice = distripy.choose_mode(config, steps)
            assert (choice.mode, choice.warmup_steps) == (mode, 2)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_a_bad_number_of_steps_is_named(steps):
    with pytest.raises(InputError, match=f"steps={steps!r}"):
        distripy.choose_mode(DistriConfig(), steps)
    unet = tiny_sdxl_unet(80)
    with pytest.raises(InputError, match=f"steps={steps!r}"):
        distripy.reset(unet, steps=steps)


def _step_kinds(context: PatchContext, steps: int):
    kinds = []
    for _ in range(steps):
        context.begin_step()
        kinds.append((context.activation_exchange, context.statistics_exchange))
        context.end_step(issue_pending=False)
    return kinds


def test_each_generation_runs_what_auto_chose_for_it():
    context = PatchContext(DistriConfig())
    few = EXACT_BELOW_STEPS - 1
    context.start_generation(None, 0, 2, steps=few)
    assert context.mode == "exact"
    assert _step_kinds(context, few) == [(ActivationExchange.OVERLAPPED, StatisticsExchange.SYNC)] * few

    many = 40
    context.start_generation(None, 1, 2, steps=many)
    warmup = math.ceil(WARMUP_FRACTION * many)
    assert (context.mode, context.warmup_steps) == ("corrected_async_gn", warmup)
    sync = (ActivationExchange.SYNC, StatisticsExchange.SYNC)
    stale = (ActivationExchange.STALE, StatisticsExchange.CORRECTED)
    assert _step_kinds(context, many) == [sync] * warmup + [stale] * (many - warmup)

    context.start_generation(None, 0, 2)  # unknown again: the configured warm-up
    assert (context.mode, context.warmup_steps) == ("corrected_async_gn", DistriConfig().warmup_steps)


def test_a_bare_unet_is_told_its_steps_by_reset():
    """``reset(unet, steps=n)`` holds for the next generations until the next reset; with a
    ``LoopbackComm`` this process runs one rank's share of a 2-way split."""
    from distripy.runtime import LoopbackComm

    unet = distripy.parallelize(tiny_sdxl_unet(81), DistriConfig(split_batch=False), comm=LoopbackComm(0, 2))
    conditioning = sdxl_conditioning(1, seed=82)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(83))
    context = distripy.patch_context(unet)

    def generation(steps):
        with torch.no_grad():
            for step in range(steps):
                unet(latent, 900 - 100 * step, **conditioning)

    distripy.reset(unet, steps=4)
    generation(2)
    assert context.mode == "exact"
    generation(2)  # recognised as a new generation by itself: still 4 steps
    assert context.mode == "exact" and context.generation == 2
    distripy.reset(unet, steps=EXACT_BELOW_STEPS + 10)
    generation(2)
    assert context.mode == "corrected_async_gn"
    assert context.warmup_steps == math.ceil(WARMUP_FRACTION * (EXACT_BELOW_STEPS + 10))
    distripy.reset(unet)
    generation(1)
    assert (context.mode, context.warmup_steps) == ("corrected_async_gn", DistriConfig().warmup_steps)


def test_a_mode_whose_error_grows_warns_when_chosen():
    from distripy.runtime import LoopbackComm

    assert ERROR_GROWS and "naive_patch" in ERROR_GROWS
    for mode in sorted(ERROR_GROWS):
        with pytest.warns(QualityWarning, match=mode):
            distripy.parallelize(tiny_sdxl_unet(84), DistriConfig(mode=mode), comm=LoopbackComm(0, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", QualityWarning)
        for mode in ("auto", "corrected_async_gn", "exact"):
            distripy.parallelize(tiny_sdxl_unet(84), DistriConfig(mode=mode), comm=LoopbackComm(0, 2))


def test_the_pipeline_counts_its_steps_from_the_call():
    from diffusers import StableDiffusionXLPipeline

    from distripy.pipelines.pipeline import denoising_steps

    import inspect

    signature = inspect.signature(StableDiffusionXLPipeline.__call__)
    assert denoising_steps(signature, {"num_inference_steps": 4}) == 4
    assert denoising_steps(signature, {}) == signature.parameters["num_inference_steps"].default
    assert denoising_steps(signature, {"num_inference_steps": 30, "timesteps": [999, 499, 1]}) == 3
    assert denoising_steps(signature, {"sigmas": [14.6, 3.0, 0.5, 0.1]}) == 4


def _pipeline_body(rank, world_size, steps_list):
    """Each ``steps`` on one device (rank 0's copy) and on both ranks with the default config:
    the final latents and what the UNet's context ran."""
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    single = tiny_sdxl_pipeline(5)
    single.set_progress_bar_config(disable=True)
    pipe = distripy.parallelize(tiny_sdxl_pipeline(5), DistriConfig(split_batch=False))
    context = distripy.patch_context(pipe.unet)
    results = []
    for steps in steps_list:
        latents = []
        for model in (single, pipe):
            latents.append(
                model(
                    "a red circle on a blue and yellow background",
                    height=64,
                    width=64,
                    num_inference_steps=steps,
                    guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(6),
                    output_type="latent",
                )
                .images[0]
                .numpy()
            )
        results.append((steps, context.mode, context.warmup_steps, latents[0], latents[1]))
    return results


def test_a_pipeline_runs_exact_for_few_steps_and_corrected_for_many(run_ranks):
    few, many = EXACT_BELOW_STEPS - 1, EXACT_BELOW_STEPS + 2
    for steps, mode, warmup, single, parallel in run_ranks(_pipeline_body, 2, [few, many], timeout=240)[0]:
        error = float(np.abs(parallel - single).max() / np.abs(single).max())
        if steps == few:
            assert (mode, warmup) == ("exact", few)
            assert error < 1e-4, error  # one device's image, to float rounding
        else:
            assert (mode, warmup) == ("corrected_async_gn", math.ceil(WARMUP_FRACTION * many))
            assert error > 1e-5, error  # stale activations were used


def test_the_policy_is_the_one_the_committed_study_derived():
    """``parallel.policy``'s numbers are what ``bench/quality.py`` derived from its measurements
    (the newest ``bench/results/quality-study-*.json``), not chosen by hand."""
    import json
    from pathlib import Path

    studies = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("quality-study-*.json"))
    assert studies, "no quality study is committed under bench/results/"
    policy = json.loads(studies[-1].read_text())["policy"]
    assert policy["exact_below_steps"] == EXACT_BELOW_STEPS
    assert policy["warmup_fraction"] == pytest.approx(WARMUP_FRACTION)
    assert set(policy["error_grows"]) == set(ERROR_GROWS)
