"""The model the project trains (``bench/train_tiny.py``, shipped under
``distripy/pipelines/models/tiny-shapes``): without it the loader says which command makes it;
with it, the asynchronous modes keep DistriFusion's ordering on a real denoising trajectory (a
random-weight UNet's activations change too much between steps to show it)."""

import contextlib

import pytest


def test_a_missing_model_names_the_command_that_makes_it(monkeypatch, tmp_path):
    import distripy.pipelines.tiny as tiny
    from distripy.errors import InputError

    monkeypatch.setattr(tiny, "TRAINED_MODEL", tmp_path / "nothing-here")
    with pytest.raises(InputError, match="bench/train_tiny.py"):
        tiny.trained_sdxl_pipeline()


def _trajectory_body(rank, world_size, modes, steps, warmup):
    """The trained model's final latents on one device (rank 0's copy) and, for each mode (a name,
    or ``(mode, compress)``), on ``world_size`` bands; one prompt, Euler, CFG 5."""
    import torch

    import distripy
    from distripy import QualityWarning
    from distripy.pipelines.tiny import trained_sdxl_pipeline

    def generate(pipe):
        return (
            pipe(
                "a yellow circle on a blue and red background",
                num_inference_steps=steps,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(7),
                output_type="latent",
            )
            .images[0]
            .numpy()
        )

    results = {"single_device": generate(trained_sdxl_pipeline())}
    for setting in modes:
        mode, compress = (setting, "none") if isinstance(setting, str) else setting
        config = distripy.DistriConfig(mode=mode, warmup_steps=warmup, split_batch=False, compress=compress)
        with pytest.warns(QualityWarning) if mode == "naive_patch" else contextlib.nullcontext():
            pipe = distripy.parallelize(trained_sdxl_pipeline(), config)
        results[setting] = generate(pipe)
    return results


def test_on_a_real_trajectory_corrected_beats_stale_beats_naive(run_ranks):
    """DistriFusion's ordering where it means something: the trained model's activations change
    smoothly between steps, so the corrected GroupNorm statistics are closer to the whole image's
    than stale ones, and both far closer than no exchange at all."""
    import numpy as np

    modes = ("corrected_async_gn", "stale_gn", "naive_patch")
    results = run_ranks(_trajectory_body, 2, modes, 20, 2, timeout=300)[0]
    reference = results["single_device"]

    def error(mode):
        return float(np.sqrt(np.mean((results[mode] - reference) ** 2) / np.mean(reference**2)))

    errors = {mode: error(mode) for mode in modes}
    assert 0 < errors["corrected_async_gn"] < errors["stale_gn"] < errors["naive_patch"], errors


def test_on_a_real_trajectory_compressed_keys_and_values_cost_less_than_a_decibel(run_ranks, record_property):
    """The exchange codecs on the trained model (2 bands, 20 steps, a quarter of them warm-up, as
    ``mode="auto"`` runs them): each codec's final latents are within 1 dB (PSNR against one device)
    of the uncompressed ``corrected_async_gn``'s, and not the same (the receivers attended over
    decoded keys and values); the 1-bit residual no closer than the 2-bit one by more than noise."""
    import numpy as np

    settings = [("corrected_async_gn", codec) for codec in ("none", "fp8", "residual2", "residual1")]
    results = run_ranks(_trajectory_body, 2, settings, 20, 5, timeout=300)[0]
    reference = results["single_device"]

    def psnr(value):
        return float(10 * np.log10(np.ptp(reference) ** 2 / np.mean((value - reference) ** 2)))

    plain = psnr(results[settings[0]])
    scores = {codec: psnr(results[mode, codec]) for mode, codec in settings}
    record_property("latent_psnr_db", scores)
    print("final latents' PSNR against one device, per codec:", scores)
    for mode, codec in settings[1:]:
        assert not np.array_equal(results[mode, codec], results[settings[0]]), codec
        assert scores[codec] > plain - 1.0, scores
    assert scores["residual1"] < scores["residual2"] + 0.5, scores



def test_on_a_real_trajectory_exact_with_a_codec_stays_above_40_decibels(run_ranks, record_property):
    """``exact`` with each codec on the trained model, as a few-step generation runs it (2 bands, 4
    steps, only the first at full precision: every later step's fresh keys and values compressed):
    the final latents stay >= 40 dB (PSNR against one device), where uncompressed ``exact`` equals
    one device up to rounding; fewer bits cost more."""
    import numpy as np

    settings = [("exact", codec) for codec in ("none", "fp8", "residual2", "residual1")]
    results = run_ranks(_trajectory_body, 2, settings, 4, 1, timeout=300)[0]
    reference = results["single_device"]

    def psnr(value):
        return float(10 * np.log10(np.ptp(reference) ** 2 / np.mean((value - reference) ** 2)))

    scores = {codec: psnr(results[mode, codec]) for mode, codec in settings}
    record_property("latent_psnr_db", scores)
    print("exact: final latents' PSNR against one device, per codec:", scores)
    assert scores["none"] > 100, scores
    assert all(scores[codec] >= 40 for codec in ("fp8", "residual2", "residual1")), scores
    assert scores["fp8"] > scores["residual2"] > scores["residual1"], scores
