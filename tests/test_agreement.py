"""Never a silent wrong image: ranks given different inputs raise ``RankMismatchError`` on every
rank, naming what differs, before any image is made -- per pipeline call (prompts, guidance, steps,
seed, scheduler, ...) and per bare-UNet generation (every tensor argument), and, when asked, every
step. Real gloo ranks; each run is bounded by its timeout."""

import pytest
import torch

from unet_models import sdxl_conditioning, tiny_sdxl_unet

# -- pipeline calls -----------------------------------------------------------------------------------

BASE_CALL = dict(
    prompt="a lighthouse on a cliff",
    negative_prompt="blurry",
    height=64,
    width=64,
    num_inference_steps=3,
    guidance_scale=5.0,
    seed=3,
)
# What rank 1 changes, and the argument name the error must give.
PIPELINE_MISMATCHES = {
    "prompt": ({"prompt": "a cat"}, "prompt"),
    "negative_prompt": ({"negative_prompt": "sharp"}, "negative_prompt"),
    "guidance": ({"guidance_scale": 9.0}, "guidance_scale (rank 0: 5.0 | rank 1: 9.0)"),
    "steps": ({"num_inference_steps": 4}, "num_inference_steps (rank 0: 3 | rank 1: 4)"),
    "seed": ({"seed": 4}, "generator"),
    "size": ({"width": 128}, "width (rank 0: 64 | rank 1: 128)"),
}


def _pipeline_mismatch_body(rank, world_size, change):
    import distripy
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    distripy.parallelize(pipe, distripy.DistriConfig(mode="full_sync", timeout_s=60))
    call = dict(BASE_CALL, **(change if rank == 1 else {}))
    seed = call.pop("seed")
    outcomes = []
    for kwargs in (call, BASE_CALL):  # the mismatch, then the same call everywhere: it works
        kwargs = {k: v for k, v in kwargs.items() if k != "seed"}
        try:
            pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np")
            outcomes.append(("ok",))
        except Exception as error:  # noqa: BLE001 - the test compares what each rank raised
            outcomes.append((type(error).__name__, str(error)))
        seed = BASE_CALL["seed"]
    return outcomes


@pytest.mark.parametrize("case", sorted(PIPELINE_MISMATCHES))
def test_a_pipeline_call_that_differs_on_one_rank_raises_on_every_rank(run_ranks, case):
    change, named = PIPELINE_MISMATCHES[case]
    for mismatch, after in run_ranks(_pipeline_mismatch_body, 2, change, timeout=300):
        assert mismatch[0] == "RankMismatchError", mismatch
        assert "the ranks were called with different pipeline calls" in mismatch[1], mismatch
        assert named in mismatch[1], mismatch
        assert after == ("ok",)


# -- bare UNet generations ----------------------------------------------------------------------------

UNET_MISMATCHES = {
    "encoder_hidden_states": "encoder_hidden_states (rank 0: values differ | rank 1: values differ)",
    "added_cond_kwargs": "added_cond_kwargs",
    "timestep": "timestep (rank 0: 900 | rank 1: 800)",
    "cross_attention_kwargs": "cross_attention_kwargs",
}


def _unet_mismatch_body(rank, world_size, argument):
    import distripy

    unet = tiny_sdxl_unet(80)
    distripy.parallelize(unet, distripy.DistriConfig(mode="full_sync", split_batch=False, timeout_s=60))
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(81))
    conditioning = sdxl_conditioning(1, seed=82)
    kwargs = dict(conditioning, timestep=900)
    if rank == 1:
        if argument == "encoder_hidden_states":
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"] * 1.01
        elif argument == "added_cond_kwargs":
            added = dict(kwargs["added_cond_kwargs"])
            added["time_ids"] = added["time_ids"] + 8
            kwargs["added_cond_kwargs"] = added
        elif argument == "timestep":
            kwargs["timestep"] = 800
        else:  # a LoRA scale
            kwargs["cross_attention_kwargs"] = {"scale": 0.5}
    try:
        with torch.no_grad():
            unet(latent, **kwargs)
    except Exception as error:  # noqa: BLE001
        return type(error).__name__, str(error)
    return ("ok",)


@pytest.mark.parametrize("argument", sorted(UNET_MISMATCHES))
def test_a_unet_argument_that_differs_on_one_rank_raises_on_every_rank(run_ranks, argument):
    for outcome in run_ranks(_unet_mismatch_body, 2, argument, timeout=120):
        assert outcome[0] == "RankMismatchError", outcome
        assert UNET_MISMATCHES[argument] in outcome[1], outcome


def _every_step_body(rank, world_size, check_every_step):
    """Rank 1's latent drifts at step 2 of 3 (the generation's start agreed)."""
    import distripy

    unet = tiny_sdxl_unet(83)
    config = distripy.DistriConfig(
        mode="full_sync", split_batch=False, timeout_s=60, check_every_step=check_every_step
    )
    distripy.parallelize(unet, config)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(84))
    conditioning = sdxl_conditioning(1, seed=85)
    try:
        with torch.no_grad():
            for step, timestep in enumerate((900, 800, 700)):
                drift = 1e-3 if rank == 1 and step == 2 else 0.0
                unet(latent + drift, timestep, **conditioning)
    except Exception as error:  # noqa: BLE001
        return step, type(error).__name__, str(error)
    return ("ok",)


def test_the_every_step_check_catches_a_latent_that_drifts_mid_generation(run_ranks):
    for outcome in run_ranks(_every_step_body, 2, True, timeout=120):
        assert outcome[:2] == (2, "RankMismatchError"), outcome
        assert "different step inputs: sample (rank 0: values differ | rank 1: values differ)" in outcome[2]
    # off by default (one host copy per step is a debugging cost): the drift goes unseen
    assert run_ranks(_every_step_body, 2, False, timeout=120) == [("ok",), ("ok",)]


def test_the_every_step_check_follows_the_environment(monkeypatch):
    from distripy import DistriConfig
    from distripy.config import CHECK_EVERY_STEP_VARIABLE

    monkeypatch.setenv(CHECK_EVERY_STEP_VARIABLE, "1")
    assert DistriConfig().check_every_step is True
    monkeypatch.setenv(CHECK_EVERY_STEP_VARIABLE, "0")
    assert DistriConfig().check_every_step is False
    with pytest.raises(ValueError, match="check_every_step='yes' must be True or False"):
        DistriConfig(check_every_step="yes")


# -- digests ------------------------------------------------------------------------------------------


def test_digests_tell_apart_what_a_sum_alone_would_not():
    from distripy.parallel.digest import digest_arguments

    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(86))
    flipped = x.flip(-1)  # same sum, same absolute sum
    negated_pair = x.clone()
    negated_pair.view(-1)[:2] = negated_pair.view(-1)[:2].flip(0)
    digests = [digest_arguments({"x": t})["x"] for t in (x, flipped, negated_pair, x.clone())]
    assert digests[0] != digests[1] and digests[0] != digests[2]
    assert digests[0] == digests[3]
    generators = [torch.Generator().manual_seed(s) for s in (1, 1, 2)]
    states = [digest_arguments({"g": g})["g"] for g in generators]
    assert states[0] == states[1] != states[2]
    plain = digest_arguments({"prompt": ["a", "b"], "scale": 5.0, "callback": print, "kwargs": {"scale": 1}})
    assert plain["prompt"] == ("list", ("a", "b")) and plain["scale"] == 5.0
    assert plain["callback"] == ("object", "builtin_function_or_method")
    assert plain["kwargs"] == ("dict", (("scale", 1),))


def test_images_are_digested_by_their_pixels_without_a_warning():
    """A PIL image (a control or init image) and an array: the same pixels, the same digest; one
    pixel changed, another. A PIL image's array is read-only, which torch would warn about."""
    import warnings

    import numpy as np
    from PIL import Image

    from distripy.parallel.digest import digest_arguments

    pixels = np.random.default_rng(87).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    changed = pixels.copy()
    changed[3, 2, 1] ^= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        digests = [
            digest_arguments({"image": image})["image"]
            for image in (Image.fromarray(pixels), Image.fromarray(pixels.copy()), Image.fromarray(changed), pixels)
        ]
    assert digests[0] == digests[1] == digests[3] != digests[2]


class _LoraLike(torch.nn.Module):
    """What the agreement reads of a PEFT LoRA layer: its active adapters and their scales."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.active_adapters = ["style"]
        self.scaling = {"style": scale}


def _lora_body(rank, world_size):
    import distripy
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_module("lora_probe", _LoraLike(0.8 if rank == 1 else 1.0))
    distripy.parallelize(pipe, distripy.DistriConfig(mode="full_sync", timeout_s=60))
    try:
        pipe("a boat", height=64, width=64, num_inference_steps=2, output_type="np")
    except Exception as error:  # noqa: BLE001
        return type(error).__name__, str(error)
    return ("ok",)


def test_different_lora_scales_on_one_rank_raise_on_every_rank(run_ranks):
    for outcome in run_ranks(_lora_body, 2, timeout=300):
        assert outcome[0] == "RankMismatchError" and "lora (rank 0 | rank 1)" in outcome[1], outcome
