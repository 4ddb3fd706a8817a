"""The ``distripy`` command end to end on CPU processes: ``demo`` and ``generate`` (a small SDXL
pipeline saved to a temporary folder) write their files; every bad input exits non-zero with a
one-line reason, before any process starts, and leaves no output file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distripy
from distripy import cli


def _command(*args, timeout=600, env=None):
    environment = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "distripy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline(seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def addons(tmp_path_factory) -> dict:
    """A ControlNet and a LoRA of the tiny model, an SDXL refiner, and images of two sizes."""
    import numpy as np
    from PIL import Image

    import pipeline_variants

    folder = tmp_path_factory.mktemp("addons")
    paths = {name: str(folder / name) for name in ("controlnet", "lora", "refiner", "64x64", "mask", "32x64")}
    pipeline_variants.make_controlnet(paths["controlnet"], pipeline_variants.sdxl(3).unet, 1)
    pipeline_variants.make_lora(paths["lora"], ["to_q", "conv1"], 2)
    pipeline_variants.refiner_pipeline(pipeline_variants.sdxl(3)).save_pretrained(paths["refiner"])
    rng = np.random.default_rng(0)
    for name, size in (("64x64", (64, 64)), ("mask", (64, 64)), ("32x64", (64, 32))):
        paths[name] += ".png"
        Image.fromarray((rng.random(size + (3,)) * 255).astype(np.uint8)).save(paths[name])
    return paths


def _bad_pipeline_arguments(addons, tmp_path):
    (tmp_path / "empty").mkdir()
    return {
        "controlnet without image": (["--controlnet", addons["controlnet"]],
                                     "--controlnet given 1 times and --control-image 0"),
        "missing controlnet": (["--controlnet", str(tmp_path / "none"), "--control-image", addons["64x64"]],
                               "no such folder"),
        "control image size": (["--controlnet", addons["controlnet"], "--control-image", addons["32x64"]],
                               "32x64 pixels, but the image is 64x64"),
        "missing control image": (["--controlnet", addons["controlnet"], "--control-image", str(tmp_path / "x.png")],
                                  "x.png: no such file"),
        "mask without init": (["--mask-image", addons["mask"]], "inpainting needs --init-image too"),
        "mask size": (["--init-image", addons["64x64"], "--mask-image", addons["32x64"]],
                      "--mask-image " + addons["32x64"] + ": 32x64 pixels"),
        "strength range": (["--init-image", addons["64x64"], "--strength", "1.5"], "must be in (0, 1]"),
        "strength without init": (["--strength", "0.5"], "--strength 0.5: only with --init-image"),
        "missing lora": (["--lora", str(tmp_path / "none") + ":0.5"], "no such file or folder"),
        "empty lora folder": (["--lora", str(tmp_path / "empty")], "0 .safetensors files in it"),
        "refiner of inpainting": (["--refiner", addons["refiner"], "--init-image", addons["64x64"], "--mask-image",
                                   addons["mask"]], "not inpainting"),
        "refiner start": (["--refiner", addons["refiner"], "--refiner-start", "1"], "must be in (0, 1)"),
        "missing refiner": (["--refiner", str(tmp_path / "none")], "--refiner " + str(tmp_path / "none")),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "controlnet without image",
        "missing controlnet",
        "control image size",
        "missing control image",
        "mask without init",
        "mask size",
        "strength range",
        "strength without init",
        "missing lora",
        "empty lora folder",
        "refiner of inpainting",
        "refiner start",
        "missing refiner",
    ],
)
def test_bad_pipeline_arguments_exit_with_one_line_and_no_file(tiny_model, addons, tmp_path, capsys, case):
    args, message = _bad_pipeline_arguments(addons, tmp_path)[case]
    output = tmp_path / "out.png"
    command = ["generate", "--model", str(tiny_model), "--prompt", "x", "--height", "64", "--width", "64"]
    status = cli.main(command + ["--nproc", "2", "--output", str(output), *args])
    error = capsys.readouterr().err
    assert status == 2 and message in error, error
    assert error.count("\n") == 1 and error.startswith("distripy: error: ")
    assert not output.exists()


def test_a_lora_scale_follows_the_last_colon():
    assert cli.parse_lora("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert cli.parse_lora("a/b.safetensors:0.6") == (Path("a/b.safetensors"), 0.6)
    assert cli.parse_lora("C:/x/y:-1") == (Path("C:/x/y"), -1.0)
    assert cli.parse_lora("dir:name") == (Path("dir:name"), 1.0)


def test_demo_writes_the_labelled_grid_and_the_report(tmp_path):
    """One world of 3 bands of the trained model (4 rows at the deepest level: bands of 2, 1, 1): the
    modes that must equal one device do, naive_patch's seams show where corrected_async_gn's do
    not, and auto ran what it chose. (The demo's default worlds, 2 and 4 bands, run the same code
    once per world.)"""
    from distripy.demo import DEMO_MODES

    out = tmp_path / "demo"
    result = _command(
        "demo",
        "--steps",
        "8",
        "--height",
        "64",
        "--width",
        "64",
        "--bands",
        "3",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    worlds = {world["bands"]: world for world in report["worlds"]}
    assert set(worlds) == {3}
    choice = distripy.choose_mode(distripy.DistriConfig(), 8)
    for bands, world in worlds.items():
        modes = world["modes"]
        assert set(modes) == {"single_device", *DEMO_MODES}
        assert modes["single_device"]["psnr_db"] is None  # strict JSON: no Infinity
        # exact equals the single device (null: identical)
        assert modes["exact"]["psnr_db"] is None or modes["exact"]["psnr_db"] > 60, bands
        assert modes["auto"]["runs"] == {"mode": choice.mode, "warmup_steps": choice.warmup_steps}
        corrected, naive = modes["corrected_async_gn"], modes["naive_patch"]
        assert naive["psnr_db"] < corrected["psnr_db"], bands
        assert naive["seam_visibility"] > 5 * corrected["seam_visibility"], bands
    from PIL import Image

    width, height = Image.open(out / "grid.png").size
    assert width > 4 * 2 * 64 and height > 2 * 64  # a row of four panels at twice the size
    assert "not GPU speedups" in result.stdout.replace("\n", " ") or "nothing of GPU" in result.stdout
    assert "corrected_async_gn" in result.stdout and "seam" in result.stdout


def _counting_header_opens(folder: Path) -> dict:
    """An environment whose Python processes (the launcher and its ranks) log each safetensors
    header that ``distripy.application.checks`` opens, with the opening process: a
    ``sitecustomize`` first on the path wraps ``safetensors.safe_open``."""
    (folder / "sitecustomize.py").write_text(
        "import os, sys\n"
        "import safetensors\n"
        "_open = safetensors.safe_open\n"
        "def safe_open(path, *args, **kwargs):\n"
        "    if sys._getframe(1).f_globals.get('__name__') == 'distripy.application.checks':\n"
        "        with open(os.environ['DISTRIPY_TEST_OPENS'], 'a') as log:\n"
        "            log.write(f'{os.getpid()} {path}\\n')\n"
        "    return _open(path, *args, **kwargs)\n"
        "safetensors.safe_open = safe_open\n"
    )
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "DISTRIPY_TEST_OPENS": str(folder / "opens.log")}


def test_generate_writes_the_image_on_two_processes_checking_once(tiny_model, tmp_path, tmp_path_factory):
    """Two ranks write the image; the checks ran once, in the launching process: each safetensors
    header of the model opened once there, none on the ranks (they get the checked job)."""
    hook = tmp_path_factory.mktemp("hook")
    output = tmp_path / "image.png"
    result = _command(
        "generate", "--model", str(tiny_model), "--prompt", "a red boat", "--height", "64", "--width", "96",
        "--steps", "3", "--nproc", "2", "--scheduler", "ddim", "--mode", "corrected_async_gn",
        "--output", str(output), env=_counting_header_opens(hook),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    assert Image.open(output).size == (96, 64)
    assert "per step" in result.stdout and "2 CPU processes" in result.stdout
    assert list(tmp_path.iterdir()) == [output]  # no temporary file left behind
    opens = [line.split(" ", 1) for line in (hook / "opens.log").read_text().splitlines()]
    headers = sorted(str(path) for path in tiny_model.rglob("*.safetensors"))
    assert headers and sorted(path for _, path in opens) == headers, opens
    assert len({pid for pid, _ in opens}) == 1  # one process: the launcher
    # the layout, and a warning that the mode cannot matter with one band per image
    assert "distripy: 2 ranks, CFG split into 2 groups of 1: 1 band per image" in result.stdout
    assert "distripy: warning: with one band per image" in result.stderr
    assert "distripy: mode corrected_async_gn, warm-up 5 synchronous steps (set by DistriConfig.mode)" in (
        result.stdout
    )


def test_generate_prints_what_auto_chose(capsys):
    cli._print_layout(2, 2, "auto", distripy.choose_mode(distripy.DistriConfig(), 4))
    assert "distripy: mode exact, every step synchronous (auto: 4 steps" in capsys.readouterr().out
    cli._print_layout(2, 2, "auto", distripy.choose_mode(distripy.DistriConfig(), 40))
    out = capsys.readouterr().out
    assert "distripy: mode corrected_async_gn, warm-up" in out and "(auto: 40 steps" in out
    assert "sent" not in out
    # a codec is said where stale keys and values travel between bands
    cli._print_layout(2, 2, "auto", distripy.choose_mode(distripy.DistriConfig(), 40), compress="residual2")
    assert capsys.readouterr().out.rstrip().endswith("steps), stale keys/values sent residual2")
    for bands, steps in ((1, 40), (2, 4)):  # one band per image; auto's exact: every step its warm-up
        choice = distripy.choose_mode(distripy.DistriConfig(), steps)
        cli._print_layout(2, bands, "auto", choice, compress="fp8", steps=steps)
        assert "fp8" not in capsys.readouterr().out
    # exact with a codec and a 1-step warm-up: its fresh keys and values compressed after it
    exact = distripy.choose_mode(distripy.DistriConfig(mode="exact", warmup_steps=1), 4)
    cli._print_layout(2, 2, "exact", exact, compress="residual2", steps=4)
    assert capsys.readouterr().out.rstrip().endswith("keys/values sent residual2 after 1 full-precision step")


@pytest.fixture(scope="module")
def runner(tiny_model):
    """The tiny model loaded as ``generate`` loads it (one process, the CPU)."""
    from distripy.application import PipelineSpec, RequestRunner

    return RequestRunner.start(PipelineSpec(str(tiny_model), dtype="float32", device="cpu"))


def _run(runner, **fields):
    from distripy.application import GenerationRequest

    request = GenerationRequest(prompt="a red boat", height=64, width=64, seed=0, **fields)
    return runner.run(request)[0]


def test_generate_takes_lightnings_scheduler_setting(runner):
    """``--scheduler euler --timestep-spacing trailing``: the model's scheduler configuration as an
    Euler scheduler with trailing timesteps (4 steps start at the last training timestep)."""
    _run(runner, steps=4, scheduler="euler", timestep_spacing="trailing")
    scheduler = runner.pipe.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]
    _run(runner, steps=1, timestep_spacing="leading")
    assert runner.pipe.scheduler.config.timestep_spacing == "leading"


def _broken_copy(tiny_model, tmp_path, name, damage):
    """A copy of the tiny model folder whose UNet weights are ``damage``d (``missing``/``truncated``)."""
    import shutil

    copy = tmp_path / name
    shutil.copytree(tiny_model, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-1000])
    return copy


def _bad(tiny_model, tmp_path):
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "model_index.json").write_text("{ not json")
    missing = _broken_copy(tiny_model, tmp_path, "no-weights", "missing")
    truncated = _broken_copy(tiny_model, tmp_path, "truncated", "truncated")
    return {
        "missing weights": (["--model", str(missing), "--nproc", "2"],
                            "unet/ has a config.json but no weights (.safetensors or .bin)"),
        "truncated weights": (["--model", str(truncated), "--nproc", "2"],
                              "unet/diffusion_pytorch_model.safetensors is unreadable"),
        "no ranks": (["--nproc", "0"], "--nproc 0: needs at least 1"),
        "timeout": (["--timeout", "0"], "--timeout 0: must be a positive number of seconds"),
        "compressed naive_patch": (["--mode", "naive_patch", "--compress", "fp8"],
                                   "compress='fp8' with mode='naive_patch'"),
        "missing model": (["--model", str(tmp_path / "nowhere")], "no such folder"),
        "malformed model": (["--model", str(malformed)], "model_index.json is not valid JSON"),
        "height rows": (["--model", str(tiny_model), "--height", "72", "--nproc", "2", "--no-split-batch"],
                        "--height 72 is not supported: it must be a multiple of 16"),
        "height for N": (["--model", str(tiny_model), "--height", "16", "--nproc", "2", "--no-split-batch"],
                         "--height 16 is too small for 2 bands on 2 ranks"),
        "unknown scheduler": (["--model", str(tiny_model), "--scheduler", "warp"],
                              "--scheduler warp: unknown"),
        "warm-up with auto": (["--model", str(tiny_model), "--warmup-steps", "3"],
                              "--warmup-steps 3: --mode auto picks the warm-up from --steps"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "malformed model",
        "height for N",
        "unknown scheduler",
        "warm-up with auto",
        "missing weights",
        "truncated weights",
        "no ranks",
        "timeout",
        "compressed naive_patch",
    ],
)
def test_bad_generate_input_exits_with_one_line_and_no_file(tiny_model, tmp_path, capsys, case):
    args, message = _bad(tiny_model, tmp_path)[case]
    output = tmp_path / "out.png"
    defaults = ["--model", str(tiny_model)] if "--model" not in args else []
    status = cli.main(["generate", "--prompt", "x", "--output", str(output), *defaults, *args])
    error = capsys.readouterr().err
    assert status == 2 and message in error, error
    assert error.count("\n") == 1 and error.startswith("distripy: error: ")
    assert not output.exists()


def test_more_ranks_than_gpus_is_refused(tiny_model, tmp_path, capsys, monkeypatch):
    from distripy.application import checks

    monkeypatch.setattr(checks, "gpu_count", lambda: 2)
    output = tmp_path / "out.png"
    status = cli.main(
        ["generate", "--model", str(tiny_model), "--prompt", "x", "--nproc", "4", "--output", str(output)]
    )
    assert status == 2 and "--nproc 4: only 2 GPUs are present" in capsys.readouterr().err
    assert not output.exists()


def test_the_installed_command_exits_non_zero_on_a_bad_model(tmp_path):
    """The console script ``pip install`` puts beside the interpreter."""
    executable = Path(sys.executable).parent / "distripy"
    assert executable.exists(), f"{executable} was not installed"
    result = subprocess.run(
        [str(executable), "generate", "--model", str(tmp_path / "absent"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("distripy: error: --model")


def test_demo_refuses_a_height_that_does_not_split_into_bands(tmp_path, capsys):
    status = cli.main(["demo", "--height", "72", "--output-dir", str(tmp_path / "demo")])
    error = capsys.readouterr().err
    assert status == 2 and "--height 72 is not supported: it must be a multiple of 16" in error, error
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "kind, text",
    [
        ("ConfigError", "DistriConfig.comm_backend='nccl' needs CUDA GPUs; torch sees none"),
        ("NativeRuntimeUnavailable", "distripy._C is not part of this installation"),
        ("RankMismatchError", "the ranks were called with different inputs"),
    ],
)
def test_a_distripy_error_on_a_rank_is_one_line_and_status_2(
    tiny_model, tmp_path, capsys, monkeypatch, kind, text
):
    """Whatever distripy refuses once the ranks run (a backend, the native runtime, a mismatch)
    reaches the user as one line, not a traceback."""
    from distripy import errors

    def refuse(job):
        raise getattr(errors, kind)(text)

    monkeypatch.setattr(cli, "run_generate", refuse)
    output = tmp_path / "out.png"
    status = cli.main(["generate", "--model", str(tiny_model), "--prompt", "x", "--output", str(output)])
    message = capsys.readouterr().err
    assert status == 2, message
    assert message == f"distripy: error: {kind}: {text}\n"
    assert not output.exists()


@pytest.mark.parametrize("scheduler", sorted(cli.SCHEDULERS))
def test_every_documented_scheduler_runs(runner, scheduler):
    """Each ``--scheduler`` the README lists loads (its dependencies installed) and denoises."""
    import numpy as np

    image = _run(runner, steps=4, scheduler=scheduler, extra={"output_type": "np"})
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_consecutive_two_process_runs_all_exit_0(tiny_model, addons, tmp_path):
    """A short soak of the two-process command (bench/cli_soak.py runs the long one): each run
    exits 0 and writes its image -- no rank may abort at shutdown (a plain text-to-image run is
    ``test_generate_writes_the_image_on_two_processes``). The runs: a ControlNet with a LoRA,
    refined by the SDXL refiner; ControlNet inpainting with two LoRAs."""
    runs = [
        ["--controlnet", addons["controlnet"], "--control-image", addons["64x64"],
         "--lora", f"{addons['lora']}:0.7", "--refiner", addons["refiner"]],
        ["--controlnet", addons["controlnet"], "--control-image", addons["64x64"], "--init-image",
         addons["64x64"], "--mask-image", addons["mask"], "--strength", "0.9", "--lora", addons["lora"],
         "--lora", f"{addons['lora']}/pytorch_lora_weights.safetensors:-0.5"],
    ]  # fmt: skip
    for run, extra in enumerate(runs):
        output = tmp_path / f"image-{run}.png"
        result = _command(
            "generate", "--model", str(tiny_model), "--prompt", "a red boat", "--height", "64", "--width", "64",
            "--steps", "2", "--nproc", "2", "--timeout", "60", "--output", str(output), *extra,
        )  # fmt: skip
        assert result.returncode == 0, (run, result.stderr[-3000:])
        assert output.exists(), run


def test_the_layout_line_names_each_bands_rows(capsys):
    """Bands of unequal height are announced as the ranks will cut them (the larger on top)."""
    cli._print_layout(3, 3, "full_sync", distripy.choose_mode(distripy.DistriConfig(mode="full_sync"), 20), 32)
    assert "3 ranks, no CFG split: 3 bands per image (11/11/10 rows of the UNet's deepest level)" in (
        capsys.readouterr().out
    )


# -- serve: what it loads, checked as generate checks it -------------------------------------------


def _bad_serve_flags(addons, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text("{}")
    return {
        "missing controlnet": ["--controlnet", str(tmp_path / "none")],
        "controlnet without weights": ["--controlnet", str(tmp_path / "weightless")],
        "missing lora": ["--lora", str(tmp_path / "none.safetensors") + ":0.5"],
        "empty lora folder": ["--lora", str(tmp_path / "empty")],
        "missing refiner": ["--refiner", str(tmp_path / "none")],
        "unknown scheduler": ["--scheduler", "warp"],
        "second lora missing": ["--lora", addons["lora"], "--lora", str(tmp_path / "none")],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing controlnet",
        "controlnet without weights",
        "missing lora",
        "empty lora folder",
        "missing refiner",
        "unknown scheduler",
        "second lora missing",
    ],
)
def test_bad_serve_flags_are_refused_before_launching_with_generates_message(
    tiny_model, addons, tmp_path, capsys, monkeypatch, case
):
    """``distripy serve``'s pipeline flags are checked in the launching process, before any rank
    starts, by the application layer's checks: the same one line as ``generate`` says."""
    flags = _bad_serve_flags(addons, tmp_path)[case]
    monkeypatch.setattr(cli, "run_serve", lambda *args: pytest.fail("serve launched after a bad flag"))
    output = tmp_path / "out.png"
    generate = ["generate", "--model", str(tiny_model), "--prompt", "x", "--output", str(output)]
    assert cli.main(generate + ["--nproc", "2", *flags]) == 2
    generated = capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tiny_model), "--nproc", "2", *flags]) == 2
    served = capsys.readouterr().err
    assert served == generated and served.count("\n") == 1 and served.startswith("distripy: error: --")
    assert flags[-1].split(":")[0] in served or flags[-1] in served
    assert not output.exists()


def test_serve_loads_what_its_flags_name(tiny_model, addons, monkeypatch, capsys):
    """The pipeline flags reach the engine's spec (checked, the LoRA file resolved) and what the
    server's requests may ask (``ServedPipeline``): the ControlNet's images, the refiner's start,
    the LoRAs by the path given (active at its scale unless a request names its own), the default
    scheduler and spacing."""
    import distripy.serving.http as http

    started = {}

    class Engine:
        nproc, restartable, failures = 2, True, 0

        def __init__(self, spec, nproc, **settings):
            started.update(spec=spec, nproc=nproc, settings=settings)

        def close(self):
            started["closed"] = True

    def serve_forever(engine, host, port, **settings):
        started.update(host=host, port=port, served=settings["served"])

    monkeypatch.setattr(distripy, "Engine", Engine)
    monkeypatch.setattr(http, "serve_forever", serve_forever)
    status = cli.main([
        "serve", "--model", str(tiny_model), "--nproc", "2", "--port", "8123",
        "--controlnet", addons["controlnet"], "--lora", f"{addons['lora']}:0.7", "--refiner", addons["refiner"], "--scheduler", "euler",
        "--timestep-spacing", "trailing", "--dtype", "float32", "--mode", "exact", "--policy", "throughput",
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    spec, served = started["spec"], started["served"]
    lora_file = str(Path(addons["lora"], "pytorch_lora_weights.safetensors").resolve())
    assert spec.checked and spec.folder == tiny_model and spec.dtype == "float32"
    assert spec.controlnets == (addons["controlnet"],) and spec.refiner == addons["refiner"]
    assert spec.loras == (lora_file,) and spec.config.mode == "exact" and started["nproc"] == 2
    assert started["settings"]["policy"] == "throughput" and started["port"] == 8123
    assert (served.controlnets, served.refiner, served.image_fields) == (1, True, 3)
    assert served.default_loras == ((lora_file, 0.7),) and served.lora_names == (addons["lora"],)
    assert served.loras == {addons["lora"]: lora_file, lora_file: lora_file}
    assert (served.scheduler, served.timestep_spacing) == ("euler", "trailing")
    assert "2 ranks ready; serving on http://127.0.0.1:8123" in capsys.readouterr().out
