"""``distripy.parallelize(pipe)`` on small SDXL and SD 1.x pipelines (seeded random weights) with
real gloo ranks, against the same pipelines on a single device: ``full_sync`` images equal the
single-device images, the patch-parallel VAE decode equals the single-device decode, calls may
change size and batch, and every rank gets the same images."""

import functools

import numpy as np
import pytest
import torch

EXACT = 1e-5
PROMPT = ["a lighthouse on a cliff at dawn", "a bowl of ramen"]


def _pipeline(kind, seed=0):
    from distripy.pipelines.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

    pipe = (tiny_sdxl_pipeline if kind == "sdxl" else tiny_sd_pipeline)(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALLS = [
    # (prompt, height, width, steps, guidance, images per prompt, seed)
    (PROMPT[:1], 128, 96, 3, 5.0, 1, 11),
    (PROMPT, 64, 128, 2, 0.0, 2, 12),  # another size, batch 4, no CFG
]


def _call(pipe, call, generator=True):
    prompt, height, width, steps, guidance, per_prompt, seed = call
    return pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=per_prompt,
        generator=torch.Generator().manual_seed(seed) if generator else None,
        output_type="np",
    ).images


@functools.lru_cache(maxsize=None)
def _single_device(kind):
    pipe = _pipeline(kind)
    return [_call(pipe, call) for call in CALLS]


def _relative_error(value, reference):
    return float(np.linalg.norm(value.astype(np.float64) - reference) / np.linalg.norm(reference))


def _pipeline_body(rank, world_size, kind):
    import distripy

    pipe = distripy.parallelize(_pipeline(kind), distripy.DistriConfig(mode="full_sync"))
    assert type(pipe).__name__ == (
        "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    )
    images = [_call(pipe, call) for call in CALLS]
    unseeded = _call(pipe, CALLS[0], generator=False)  # rank 0's seed, shared
    return images, unseeded


@pytest.mark.parametrize("kind, world_size", [("sdxl", 2), ("sd", 2), ("sdxl", 4)])
def test_full_sync_pipeline_images_equal_the_single_device_images(run_ranks, kind, world_size):
    per_rank = run_ranks(_pipeline_body, world_size, kind, timeout=600)
    reference = _single_device(kind)
    for images, unseeded in per_rank:
        for call, image, expected in zip(CALLS, images, reference):
            assert image.shape == expected.shape, call
            assert _relative_error(image, expected) <= EXACT, call
        np.testing.assert_array_equal(unseeded, per_rank[0][1])  # every rank, the same image
    assert _relative_error(per_rank[0][1], reference[0]) > 1e-3  # a fresh seed, a different image


def _decode_body(rank, world_size):
    import distripy

    pipe = _pipeline("sdxl")
    vae = distripy.parallelize(pipe.vae, distripy.DistriConfig())
    generator = torch.Generator().manual_seed(5)
    decoded = []
    for shape in DECODE_SHAPES:
        latent = torch.randn(shape, generator=generator)
        with torch.no_grad():
            decoded.append(vae.decode(latent).sample)
    _enable_tiling(vae)
    with torch.no_grad():
        decoded.append(vae.decode(torch.randn(TILED_SHAPE, generator=generator)).sample)
    return decoded


# Bands of unequal rows: 32 and 16 rows on 3 ranks, 18 rows on 4 (5, 5, 4, 4).
DECODE_SHAPES = [(1, 4, 32, 24), (2, 4, 16, 32), (1, 4, 18, 16)]
TILED_SHAPE = (1, 4, 48, 40)


def _enable_tiling(vae):
    """Tiles of 32 latent rows, overlapping by 8, so that a 48-row latent is decoded in tiles."""
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size = 32, 128


@pytest.mark.parametrize("world_size", [3, 4])
def test_patch_parallel_vae_decode_equals_the_single_device_decode(run_ranks, world_size):
    per_rank = run_ranks(_decode_body, world_size, timeout=300)
    vae = _pipeline("sdxl").vae
    generator = torch.Generator().manual_seed(5)
    expected = []
    with torch.no_grad():
        for shape in DECODE_SHAPES:
            expected.append(vae.decode(torch.randn(shape, generator=generator)).sample)
        tiled_latent = torch.randn(TILED_SHAPE, generator=generator)
        untiled = vae.decode(tiled_latent).sample
        _enable_tiling(vae)  # the single-device tiled decode keeps working, and tiles are used
        expected.append(vae.decode(tiled_latent).sample)
    assert expected[-1].shape == untiled.shape and not torch.allclose(expected[-1], untiled, atol=1e-3)
    for index, reference in enumerate(expected):
        for decoded in per_rank:
            error = float((decoded[index].double() - reference.double()).norm() / reference.double().norm())
            assert decoded[index].shape == reference.shape and error <= EXACT, (index, error)


def _img2img(seed=0):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(_pipeline("sdxl", seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _img2img_call(pipe):
    image = torch.rand(1, 3, 128, 64, generator=torch.Generator().manual_seed(21))
    return pipe(
        PROMPT[0],
        image=image,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(22),
        output_type="np",
    ).images


def _img2img_body(rank, world_size):
    import distripy

    pipe = distripy.parallelize(_img2img(), distripy.DistriConfig(mode="full_sync"))
    return _img2img_call(pipe)


def test_full_sync_img2img_equals_the_single_device(run_ranks):
    """The img2img variant: the image is encoded on every rank, the UNet and the decode in bands."""
    per_rank = run_ranks(_img2img_body, 2, timeout=300)
    expected = _img2img_call(_img2img())
    for images in per_rank:
        assert images.shape == expected.shape and _relative_error(images, expected) <= EXACT
