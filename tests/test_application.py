"""The application layer (``distripy.application``) that ``distripy generate`` and the serving ranks
share: its spec and request name every bad value; a job crosses to the ranks whole and checked; a
LoRA is the same adapter whether the command or the Engine named it; and an ``Engine`` of 2 gloo
ranks runs what the command runs: img2img and a ControlNet (images equal to the single-device
pipeline's in ``full_sync``). That ``generate --nproc 2`` checks once, in one process, is
``tests/test_cli.py``'s two-process test (it counts the safetensors headers opened)."""

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline_variants
from distripy.application import (
    CheckError,
    GenerateJob,
    GenerationRequest,
    PipelineSpec,
    RequestRunner,
    adapter_names,
    check_request,
    read_job,
    write_job,
)
from distripy.config import DistriConfig
from distripy.errors import InputError, InputTypeError
from distripy.pipelines.tiny import tiny_sdxl_pipeline

SEED = 3
HEIGHT, WIDTH = 64, 32


@pytest.fixture(scope="module")
def addons(tmp_path_factory) -> dict:
    """A ControlNet and a LoRA of the tiny SDXL model, a saved copy of it, and two images."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("application")
    paths = {name: folder / name for name in ("model", "controlnet", "lora")}
    tiny_sdxl_pipeline(SEED).save_pretrained(paths["model"])
    pipeline_variants.make_controlnet(str(paths["controlnet"]), pipeline_variants.sdxl(SEED).unet, 1)
    pipeline_variants.make_lora(str(paths["lora"]), ["to_q", "conv1"], 2)
    rng = np.random.default_rng(0)
    for name in ("init", "control"):
        paths[name] = folder / f"{name}.png"
        Image.fromarray((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)).save(paths[name])
    return paths


def test_a_spec_names_its_bad_values():
    with pytest.raises(InputTypeError, match="model=3 must be a folder path"):
        PipelineSpec(3)
    with pytest.raises(InputError, match="dtype='half' is not one of float16"):
        PipelineSpec("m", dtype="half")
    with pytest.raises(InputTypeError, match="controlnets='a' must be a list of paths"):
        PipelineSpec("m", controlnets="a")
    with pytest.raises(InputTypeError, match="config must be a DistriConfig, got dict"):
        PipelineSpec("m", config={})
    spec = PipelineSpec(Path("m"), controlnets=[Path("c")], loras=["l.safetensors"])
    assert spec.model == "m" and spec.controlnets == ("c",) and not spec.checked


def test_a_request_names_its_bad_values(addons, tmp_path):
    """Under the Engine's argument names, or the command's flags (``labels``)."""
    from PIL import Image

    spec = PipelineSpec("m", controlnets=[str(addons["controlnet"])])
    image = Image.new("RGB", (WIDTH, HEIGHT))
    cases = [
        (dict(steps=0), "steps 0: too small"),
        (dict(guidance="high"), "guidance 'high': must be a number"),
        (dict(scheduler="warp"), "scheduler warp: unknown; use one of default, ddim"),
        (dict(timestep_spacing="odd"), "timestep_spacing odd: use one of leading, trailing"),
        (dict(mode="fast"), "mode 'fast': not one of auto"),
        (dict(strength=0.5), "strength 0.5: only with init_image"),
        (dict(init_image=image, strength=1.5), "strength 1.5: must be in (0, 1]"),
        (dict(mask_image=image), "mask_image <Image>: inpainting needs init_image too"),
        (dict(control_images=(image, image)), "controlnets given 1 times and control_images 2"),
        (dict(init_image=image, height=32, width=32), "init_image <Image>: 32x64 pixels, but the image is 32x32"),
        (dict(control_images=(str(tmp_path / "x.png"),)), "x.png: no such file"),
        (dict(loras=((str(tmp_path / "none"), 1.0),)), "none: no such file or folder"),
        (dict(loras=((str(addons["lora"]), "strong"),)), "scale 'strong' must be a number"),
        (dict(refiner_start=0.5), "refiner_start 0.5: there is no refiner"),
        (dict(extra={"generator": None}), "generator: set by the request's own fields"),
        (dict(prompt=3), "prompt 3: must be a string or a list of strings"),
    ]  # fmt: skip
    for fields, message in cases:
        with pytest.raises(CheckError, match=None) as refused:
            check_request(GenerationRequest(**fields), spec)
        assert message in str(refused.value), (fields, str(refused.value))
        assert isinstance(refused.value, InputError)
    with pytest.raises(CheckError, match=r"--strength 0.5: only with --init-image"):
        check_request(GenerationRequest(strength=0.5), spec, {"strength": "--strength", "init_image": "--init-image"})
    # an Engine call's arguments, by diffusers' names, become the request's fields
    request = GenerationRequest.of_call(
        {"prompt": "p", "num_inference_steps": 4, "guidance_scale": 2.0, "num_images_per_prompt": 2},
        control_images=image,
    )
    assert (request.steps, request.guidance, request.control_images) == (4, 2.0, (image,))
    assert request.extra == {"num_images_per_prompt": 2} and request.speed_key() == (None, None, 4, 2)
    with pytest.raises(InputError, match="image: give a start image as init_image"):
        GenerationRequest.of_call({"image": image})


def test_a_job_reaches_the_ranks_whole_and_checked(addons, tmp_path):
    spec = PipelineSpec(
        str(addons["model"]), dtype="float32", controlnets=[str(addons["controlnet"])],
        config=DistriConfig(mode="exact", split_batch=False, timeout_s=30),
    )  # fmt: skip
    request = GenerationRequest(
        prompt="p", steps=2, seed=1, height=HEIGHT, width=WIDTH, control_images=(str(addons["control"]),),
        loras=((str(addons["lora"]), 0.5),), scheduler="ddim",
    )  # fmt: skip
    job = GenerateJob(spec, request, str(tmp_path / "out.png"))
    path = write_job(job, str(tmp_path))
    assert os.listdir(tmp_path) == ["job.json"]  # no temporary file left
    again = read_job(path)
    assert again == job and again.spec.checked and again.spec.config == spec.config


def test_a_lora_is_the_same_adapter_from_the_command_and_from_the_engine(addons, tmp_path, monkeypatch):
    """The command (``--lora FOLDER:0.7``, relative) and an Engine call (the file, absolute) name
    the LoRA alike; the runner loads it under that name, twice when a request names it twice."""
    from distripy import cli

    monkeypatch.chdir(addons["lora"].parent)
    file = addons["lora"] / "pytorch_lora_weights.safetensors"
    argv = ["generate", "--model", str(addons["model"]), "--prompt", "p", "--height", "64", "--width", "64",
            "--lora", "lora:0.7", "--output", str(tmp_path / "o.png")]  # fmt: skip
    command = cli.check_generate(cli._parser().parse_args(argv), 1).request
    engine = check_request(GenerationRequest.of_call({}, loras=[(str(file), 0.7)]), PipelineSpec("m"))
    assert command.loras == engine.loras == ((str(file.resolve()), 0.7),)
    names = adapter_names(engine.loras)
    assert names == adapter_names(command.loras) and names[0][0].startswith("lora_")

    runner = RequestRunner.start(PipelineSpec(functools.partial(tiny_sdxl_pipeline, SEED), device="cpu"))
    twice = engine.loras + ((str(file.resolve()), -0.2),)
    runner.run(GenerationRequest(prompt="p", steps=1, height=32, width=32, seed=0, loras=twice))
    loaded = [name for name, _ in adapter_names(twice)]
    assert list(runner.loaded.adapters) == loaded == [names[0][0], names[0][0] + "_2"]
    assert runner.pipe.get_active_adapters() == loaded


def test_an_engine_refuses_a_bad_spec_before_starting(addons, tmp_path):
    import distripy

    factory = functools.partial(tiny_sdxl_pipeline, SEED)
    with pytest.raises(CheckError, match="controlnets .*none: no such folder"):
        distripy.Engine(factory, nproc=2, controlnets=[str(tmp_path / "none")])
    with pytest.raises(CheckError, match="loras .*none: no such file or folder"):
        distripy.Engine(factory, nproc=2, loras=[str(tmp_path / "none")])
    with pytest.raises(InputError, match="model is a PipelineSpec: give config, loras in it"):
        distripy.Engine(PipelineSpec(factory), config=DistriConfig(), loras=["x"])


def _pixels(image):
    return np.asarray(image, dtype=np.float64)


def _assert_same_image(image, expected):
    """Equal up to the rounding to 8 bits of values that agree to ~1e-6 (full_sync vs one device)."""
    assert image.size == expected.size
    difference = np.abs(_pixels(image) - _pixels(expected))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (difference.max(), (difference > 0).mean())


def test_an_engine_runs_img2img_and_controlnet_as_one_device(addons):
    """Two gloo ranks, a ControlNet in the spec: an img2img request (start image, strength) and a
    ControlNet text-to-image request give the single-device pipeline's images; a request's bad
    value is refused here, naming it, and the ranks serve on."""
    import diffusers
    from PIL import Image

    import distripy

    config = DistriConfig(mode="full_sync", split_batch=False, timeout_s=60)
    init, control = Image.open(addons["init"]).convert("RGB"), Image.open(addons["control"]).convert("RGB")
    common = dict(num_inference_steps=2, guidance_scale=5.0)
    with distripy.Engine(
        functools.partial(tiny_sdxl_pipeline, SEED), nproc=2, config=config, timeout_s=180,
        controlnets=[str(addons["controlnet"])],
    ) as engine:  # fmt: skip
        img2img = engine("a red boat", seed=5, init_image=init, strength=0.6, **common)[0]
        controlled = engine("a red boat", seed=6, control_images=control, height=HEIGHT, width=WIDTH, **common)[0]
        with pytest.raises(InputError, match="strength 0.5: only with init_image"):
            engine("a red boat", strength=0.5)
        with pytest.raises(InputError, match="refiner_start 0.5: there is no refiner"):
            engine("a red boat", refiner_start=0.5)
        pids = list(engine.pids)
        assert engine.restarts == 0 and engine.healthy and len(pids) == 2

    base = tiny_sdxl_pipeline(SEED)
    base.set_progress_bar_config(disable=True)
    one = diffusers.AutoPipelineForImage2Image.from_pipe(base)
    expected = one("a red boat", image=init, strength=0.6, generator=torch.Generator().manual_seed(5), **common)
    _assert_same_image(img2img, expected.images[0])
    net = diffusers.ControlNetModel.from_pretrained(addons["controlnet"])
    one = diffusers.AutoPipelineForText2Image.from_pipe(base, controlnet=net)
    expected = one(
        "a red boat", image=control, height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(6),
        **common,
    )  # fmt: skip
    _assert_same_image(controlled, expected.images[0])
