"""The ``distripy`` command: ``generate`` an image on N GPUs (or N CPU processes), ``serve`` a
pipeline over HTTP on N ranks (``serving.http``), run the ``demo``, ``plan`` the configuration
for a machine (``distripy.plan``: predicted, nothing runs).

``--nproc N`` starts N processes through torch.distributed's elastic launcher (``torchrun``); a
command already started by torchrun runs as one of its ranks. Everything that can be checked
before launching is (the model folder, the scheduler, the size for N ranks, N against the GPUs
present): a bad value exits with status 2 and one line saying what is wrong, before any process
starts or any file is written. Any error of distripy's (a ``DistripyError``: a refused backend, an
absent native runtime, a size the model cannot split, ...) met later, on a rank, is also one line
and status 2. Images are written by rank 0, to a temporary name first, then renamed, so a failed
run leaves no partial file.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from distripy.config import AUTO_MODE, DEFAULT_MODE, DEFAULT_TIMEOUT_S, DEFAULT_WARMUP_STEPS, MODE_CHOICES
from distripy.errors import DistripyError
from distripy.pipelines.schedulers import SCHEDULERS
from distripy.serving.scheduling import POLICIES

__all__ = ["CommandError", "check_demo", "check_generate", "check_serve", "main"]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DEMO_STEPS = 20
DTYPES = ("float16", "bfloat16", "float32")
REFINER_START = 0.8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class CommandError(DistripyError):
    """A bad command line or environment: printed as one line, exit status 2."""


# -- the command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distripy", description="One diffusion image from N GPUs.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate an image with a local diffusers pipeline")
    generate.add_argument("--model", required=True, type=Path, help="a local diffusers pipeline folder")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    generate.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    generate.add_argument("--steps", type=int, default=50)
    generate.add_argument("--guidance", type=float, default=5.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--scheduler", default="default", help=f"one of {', '.join(SCHEDULERS)}")
    generate.add_argument(
        "--timestep-spacing",
        choices=TIMESTEP_SPACINGS,
        default=None,
        help="the scheduler's timesteps (default: its own); trailing: what few-step models such as "
        "SDXL-Lightning sample with (--steps 4 --scheduler euler --timestep-spacing trailing)",
    )
    _add_parallel_arguments(generate)
    _add_pipeline_arguments(generate)
    generate.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: float16 on GPUs, else float32"
    )
    generate.add_argument("--output", type=Path, default=Path("distripy.png"))

    serve = commands.add_parser("serve", help="serve a local diffusers pipeline over HTTP on N ranks")
    serve.add_argument("--model", required=True, type=Path, help="a local diffusers pipeline folder")
    serve.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks to start (one GPU each when present; default 1). Under torchrun, leave it out: "
        "torchrun's processes are the ranks (on several nodes too) and rank 0 serves HTTP",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--queue-size", type=int, default=16, help="requests waiting or running; more get 429")
    serve.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds a request may take, queueing included"
    )
    serve.add_argument("--mode", choices=MODE_CHOICES, default=DEFAULT_MODE, help="the default mode")
    serve.add_argument(
        "--policy",
        choices=POLICIES,
        default="latency",
        help="latency: each request on every rank; throughput: one request per rank at once; "
        "adaptive: the first while the queue is short, the second when it is deep",
    )
    serve.add_argument("--no-split-batch", action="store_true", help="keep CFG's two halves on every rank")
    serve.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPUs, else float32")
    _add_timeout_argument(serve)

    demo = commands.add_parser(
        "demo",
        help="the project's trained model: single device | auto | corrected_async_gn | naive_patch at 2 and 4 bands",
    )
    demo.add_argument("--height", type=int, default=128)
    demo.add_argument("--width", type=int, default=128)
    demo.add_argument("--steps", type=int, default=DEMO_STEPS)
    demo.add_argument(
        "--warmup-steps", type=int, default=1, help="the warm-up of the modes other than auto (default 1)"
    )
    demo.add_argument("--seed", type=int, default=None, help="default: the demo's own (see distripy.demo)")
    demo.add_argument("--all-modes", action="store_true", help="every mode, not only the grid's and exact")
    demo.add_argument(
        "--bands",
        type=int,
        nargs="+",
        default=[2, 4],
        help="band counts, one world of ranks each (default 2 4)",
    )
    demo.add_argument("--nproc", type=int, default=None, help="one world of this many ranks (--bands N)")
    demo.add_argument("--output-dir", type=Path, default=Path("distripy-demo"))
    demo.add_argument("--no-compose", action="store_true", help=argparse.SUPPRESS)  # set for its worlds
    _add_timeout_argument(demo)

    plan = commands.add_parser(
        "plan", help="rank the configurations of N GPUs for one image size by predicted latency"
    )
    plan.add_argument("--gpus", type=int, required=True, help="GPUs available (candidates: 1 to this)")
    plan.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels (default 1024x1024)")
    plan.add_argument("--steps", type=int, default=50)
    plan.add_argument(
        "--fabric",
        default="nvlink4",
        help="nvlink4 (default), nvlink3, pcie5, pcie4, or a bench/comm.py JSON file",
    )
    plan.add_argument("--gpu", default="h100", help="h100 (default), a100, l40, or a bench/e2e.py JSON file")
    plan.add_argument(
        "--no-guidance", action="store_true", help="no classifier-free guidance (batch 1, no CFG split)"
    )
    plan.add_argument("--top", type=int, default=15, help="table rows (default 15; all with --json)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=MODE_CHOICES,
        default=DEFAULT_MODE,
        help=f"{AUTO_MODE} (default): the mode and warm-up measured best for --steps (printed); "
        "exact: every step equals one GPU's, exchanges overlapped (few-step models); "
        "corrected_async_gn: DistriFusion's asynchronous mode",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"synchronous steps at the start, for a --mode other than {AUTO_MODE} (default "
        f"{DEFAULT_WARMUP_STEPS}; the reference's W is W + 1 here)",
    )
    parser.add_argument("--no-split-batch", action="store_true", help="keep CFG's two halves on every rank")
    parser.add_argument("--nproc", type=int, default=None, help="ranks to launch (one GPU each when present)")
    _add_timeout_argument(parser)


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """ControlNet, img2img, inpainting, LoRA and the SDXL refiner."""
    parser.add_argument(
        "--controlnet",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a ControlNetModel folder; repeat for several, with one --control-image each",
    )
    parser.add_argument(
        "--control-image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a ControlNet's condition",
    )
    parser.add_argument(
        "--init-image", type=Path, default=None, metavar="FILE", help="img2img / inpainting start"
    )
    parser.add_argument(
        "--mask-image",
        type=Path,
        default=None,
        metavar="FILE",
        help="inpaint where white (needs --init-image)",
    )
    parser.add_argument(
        "--strength", type=float, default=None, help="how much of --init-image to repaint, in (0, 1]"
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors or its folder), scale 1 unless given; repeat for several",
    )
    parser.add_argument(
        "--refiner", type=Path, default=None, metavar="PATH", help="an SDXL refiner pipeline folder"
    )
    parser.add_argument(
        "--refiner-start",
        type=float,
        default=REFINER_START,
        help=f"the fraction of the steps after which the refiner takes over (default {REFINER_START})",
    )


def _add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds any wait for another rank may take before the command fails (default {DEFAULT_TIMEOUT_S:g})",
    )


# -- checks before launching -----------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as error:
        raise CommandError(f"{what}: {path} is not valid JSON ({error})") from None


def _model_geometry(model: Path, flag: str = "--model") -> dict:
    """What the size check needs from a diffusers pipeline folder: pixels per latent row, the
    UNet's downsamplings, its default latent size (and the pipeline's class name)."""
    if not model.is_dir():
        raise CommandError(f"{flag} {model}: no such folder (a local diffusers pipeline folder is needed)")
    index = _read_json(model / "model_index.json", f"{flag} {model}")
    if "unet" not in index:
        raise CommandError(f"{flag} {model}: model_index.json names no 'unet' (a UNet pipeline is needed)")
    _check_weights(model, index, flag=flag)
    unet = _read_json(model / "unet" / "config.json", f"{flag} {model}")
    vae = _read_json(model / "vae" / "config.json", f"{flag} {model}") if "vae" in index else {}
    try:
        levels = len(unet["down_block_types"]) - 1
        vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        sample_size = unet.get("sample_size", 64)
        sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    except (KeyError, TypeError) as error:
        raise CommandError(f"{flag} {model}: unet/config.json is malformed ({error!r})") from None
    return {
        "levels": levels,
        "vae_scale": vae_scale,
        "default_size": sample_size * vae_scale,
        "class_name": str(index.get("_class_name", "")),
    }


def _check_weights(model: Path, index: dict, flag: str = "--model") -> None:
    """Every model of the pipeline folder (a component folder with a ``config.json``; tokenizers
    and schedulers have none) has weights, and its safetensors files open (their headers are read,
    which also finds a truncated file): a missing or broken download fails here, before launch."""
    from safetensors import SafetensorError, safe_open

    for name in index:
        folder = model / name
        if name.startswith("_") or not (folder / "config.json").is_file():
            continue
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not weights:
            raise CommandError(
                f"{flag} {model}: {name}/ has a config.json but no weights (.safetensors or .bin)"
            )
        for path in weights:
            if path.suffix != ".safetensors":
                continue
            try:
                with safe_open(str(path), "pt"):
                    pass
            except (SafetensorError, OSError) as error:
                raise CommandError(f"{flag} {model}: {name}/{path.name} is unreadable ({error})") from None


def _bands(args, world: int) -> int:
    """Bands per image: half the ranks with a CFG split (even N, guidance > 1), else all."""
    split = not args.no_split_batch and world % 2 == 0 and args.guidance > 1.0
    return world // 2 if split else world


def _check_size(name: str, pixels: int, geometry: dict, bands: int, world: int) -> None:
    """A side in pixels: whole rows at the UNet's deepest level, and for the height (``bands`` > 1)
    at least one of them per band. Bands may differ by one such row, so any count up to the
    deepest level's rows works."""
    unit = geometry["vae_scale"] * 2 ** geometry["levels"]
    if pixels <= 0 or pixels % unit != 0:
        raise CommandError(
            f"--{name} {pixels} is not supported: it must be a multiple of {unit} "
            f"({geometry['vae_scale']} pixels per latent row x {2 ** geometry['levels']} latent rows per "
            "row of the UNet's deepest level)"
        )
    if pixels < unit * bands:
        raise CommandError(
            f"--{name} {pixels} is too small for {bands} bands on {world} ranks: each band needs at "
            f"least one row of the UNet's deepest level ({unit} pixels), so at least {unit * bands}"
        )


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_world(world: int) -> None:
    if world < 1:
        raise CommandError(f"--nproc {world}: needs at least 1")
    gpus = _gpu_count()
    if gpus and world > gpus:
        raise CommandError(f"--nproc {world}: only {gpus} GPUs are present")


def _check_output(path: Path) -> None:
    folder = path.resolve().parent
    if not folder.is_dir():
        raise CommandError(f"--output {path}: folder {folder} does not exist")
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise CommandError(f"--output {path}: name an image file (.png, .jpg, .webp)")


def _check_timeout(args) -> None:
    if not args.timeout > 0:
        raise CommandError(f"--timeout {args.timeout:g}: must be a positive number of seconds")


def _image_size(flag: str, path: Path):
    """(width, height) of an image file, read from its header."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CommandError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"{flag} {path}: not an image ({error})") from None


def _check_component(flag: str, folder: Path) -> None:
    """A model folder (``config.json`` and readable weights), as ``ControlNetModel`` saves one."""
    if not folder.is_dir():
        raise CommandError(f"{flag} {folder}: no such folder")
    _read_json(folder / "config.json", f"{flag} {folder}")
    _check_weights(folder.parent, {folder.name: None}, flag=flag)


def parse_lora(value: str):
    """``PATH[:SCALE]`` -> (path, scale): the scale is what follows the last colon when it is a
    number (a path may hold colons), else 1."""
    path, _, scale = value.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(value), 1.0)
    except ValueError:
        return Path(value), 1.0


def _lora_file(path: Path) -> Path:
    """The ``.safetensors`` a ``--lora`` names: itself, or the one file in its folder."""
    if path.is_file() and path.suffix == ".safetensors":
        return path
    found = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if len(found) != 1:
        what = "no such file or folder" if not path.exists() else f"{len(found)} .safetensors files in it"
        raise CommandError(f"--lora {path}: {what} (a LoRA .safetensors, or a folder with one)")
    return found[0]


def _check_image_size(args, geometry: dict, world: int) -> None:
    """``--height`` and ``--width`` for a model of ``geometry`` on ``world`` ranks."""
    for name in ("height", "width"):
        # only the height is cut into bands; the width needs whole latent rows at every level
        _check_size(
            name, getattr(args, name), geometry, _bands(args, world) if name == "height" else 1, world
        )


def _check_pipeline_arguments(args, world: int) -> None:
    """ControlNets and their images, the init and mask images, strength, LoRAs, the refiner."""
    if len(args.controlnet) != len(args.control_image):
        raise CommandError(
            f"--controlnet given {len(args.controlnet)} times and --control-image {len(args.control_image)}: "
            "one condition image per ControlNet"
        )
    for folder in args.controlnet:
        _check_component("--controlnet", folder)
    if args.mask_image is not None and args.init_image is None:
        raise CommandError(f"--mask-image {args.mask_image}: inpainting needs --init-image too")
    if args.strength is not None:
        if args.init_image is None:
            raise CommandError(f"--strength {args.strength:g}: only with --init-image")
        if not 0 < args.strength <= 1:
            raise CommandError(f"--strength {args.strength:g}: must be in (0, 1]")
    images = [("--control-image", path) for path in args.control_image]
    images += [
        (flag, path)
        for flag, path in (("--init-image", args.init_image), ("--mask-image", args.mask_image))
        if path
    ]
    for flag, path in images:
        size = _image_size(flag, path)
        if size != (args.width, args.height):
            raise CommandError(
                f"{flag} {path}: {size[0]}x{size[1]} pixels, but the image is {args.width}x{args.height} "
                "(--width x --height); resize it or set those"
            )
    args.lora = [(str(_lora_file(path)), scale) for path, scale in map(parse_lora, args.lora)]
    if args.refiner is not None:
        if not args.model_class.startswith("StableDiffusionXL"):
            raise CommandError(
                f"--refiner {args.refiner}: refines an SDXL model; --model is a {args.model_class}"
            )
        if args.mask_image is not None or (args.controlnet and args.init_image is not None):
            raise CommandError(
                f"--refiner {args.refiner}: refines text-to-image, img2img or ControlNet text-to-image "
                "generations (not inpainting, not ControlNet img2img)"
            )
        if not 0 < args.refiner_start < 1:
            raise CommandError(f"--refiner-start {args.refiner_start:g}: must be in (0, 1)")
        _check_image_size(args, _model_geometry(args.refiner, flag="--refiner"), world)


def check_generate(args, world: int) -> None:
    """Every check ``generate`` can make before any process starts."""
    _check_timeout(args)
    if args.scheduler not in SCHEDULERS:
        raise CommandError(f"--scheduler {args.scheduler}: unknown; use one of {', '.join(SCHEDULERS)}")
    if args.mode == AUTO_MODE and args.warmup_steps is not None:
        raise CommandError(
            f"--warmup-steps {args.warmup_steps}: --mode {AUTO_MODE} picks the warm-up from --steps; "
            "name a mode to set it (--mode corrected_async_gn --warmup-steps N)"
        )
    if args.warmup_steps is None:
        args.warmup_steps = DEFAULT_WARMUP_STEPS
    for name in ("steps", "warmup_steps"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            raise CommandError(f"--{name.replace('_', '-')} {getattr(args, name)}: too small")
    _check_world(world)
    geometry = _model_geometry(args.model)
    args.model_class = geometry["class_name"]
    # img2img and inpainting keep the start image's size unless told otherwise
    start = _image_size("--init-image", args.init_image) if args.init_image is not None else None
    for index, name in enumerate(("width", "height")):
        pixels = getattr(args, name) or (start[index] if start else geometry["default_size"])
        setattr(args, name, pixels)
    _check_image_size(args, geometry, world)
    _check_pipeline_arguments(args, world)
    _check_output(args.output)


def check_serve(args) -> None:
    """Every check ``serve`` can make before starting the ranks."""
    _check_timeout(args)
    if _under_torchrun():
        if args.nproc is not None:
            raise CommandError(
                f"--nproc {args.nproc}: under torchrun the ranks are torchrun's processes (--nproc-per-node, --nnodes)"
            )
    else:
        args.nproc = 1 if args.nproc is None else args.nproc
        _check_world(args.nproc)
    _model_geometry(args.model)
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port}: not a port number")
    if args.queue_size < 1:
        raise CommandError(f"--queue-size {args.queue_size}: needs at least 1")
    if not args.request_timeout > 0:
        raise CommandError(
            f"--request-timeout {args.request_timeout:g}: must be a positive number of seconds"
        )
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as missing:
        raise CommandError(f"serve needs {missing.name}: pip install 'distripy[serve]'") from None


def run_serve(args) -> int:
    """Start the engine's ranks, then serve until SIGTERM or Ctrl-C (which close them)."""
    import logging
    import signal

    import torch
    import uvicorn

    import distripy
    from distripy.serving.http import make_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dtype = args.dtype or ("float16" if torch.cuda.is_available() else None)
    config = distripy.DistriConfig(
        mode=args.mode, split_batch=not args.no_split_batch, timeout_s=args.timeout
    )
    settings = dict(config=config, dtype=dtype, timeout_s=args.request_timeout, policy=args.policy)
    if _under_torchrun():
        # torchrun's processes are the ranks (this node's and other nodes'): rank 0 serves HTTP,
        # the others run requests until rank 0 closes them.
        rank, world = distripy.init(timeout_s=args.timeout)
        if rank != 0:
            from distripy.serving.worker import serve

            serve(None, rank)
            return 0
        engine = distripy.Engine.of_torchrun_group(str(args.model), **settings)
    else:
        engine = distripy.Engine(str(args.model), nproc=args.nproc, **settings)
    ranks = engine.nproc
    print(
        f"distripy: {ranks} rank{'s' * (ranks > 1)} ready; serving on http://{args.host}:{args.port}",
        flush=True,
    )
    app = make_app(engine, queue_size=args.queue_size, request_timeout_s=args.request_timeout)
    # uvicorn shuts down gracefully on SIGTERM / Ctrl-C (the app's shutdown closes the engine, after
    # the request in progress), then raises the signal again under the handler found before it
    # started: these make that a normal end (exit status 0) instead of death by the signal.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    if not engine.restartable and engine.failures:
        # the torchrun group's ranks failed: a non-zero exit lets torchrun restart the group
        print("distripy: the ranks failed; the service has stopped", file=sys.stderr, flush=True)
        return 1
    print("distripy: the service has stopped", flush=True)
    return 0


def check_demo(args, world: int) -> None:
    """Every check ``demo`` can make before any process starts, for a world of ``world`` ranks."""
    from distripy.pipelines.tiny import TINY_DOWNSAMPLINGS, TINY_VAE_SCALE, TRAINED_MODEL

    if world < 1:
        raise CommandError(f"--bands {world}: needs at least 1")
    if not (TRAINED_MODEL / "model_index.json").is_file():
        raise CommandError(
            f"the trained model is missing from {TRAINED_MODEL}; `python bench/train_tiny.py` makes it"
        )
    _check_timeout(args)
    geometry = {"vae_scale": TINY_VAE_SCALE, "levels": TINY_DOWNSAMPLINGS}
    _check_size("height", args.height, geometry, world, world)  # one band per rank (no CFG split)
    _check_size("width", args.width, geometry, 1, world)
    if args.steps < 1 or args.warmup_steps < 0:
        raise CommandError(f"--steps {args.steps} / --warmup-steps {args.warmup_steps}: too small")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise CommandError(f"--output-dir {args.output_dir}: exists and is not a folder")


# -- launching -------------------------------------------------------------------------------------


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _launch(world: int, argv: List[str]) -> int:
    """Run this command on ``world`` local processes (``runtime.distributed.launch_local``)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from distripy.runtime.distributed import launch_local

    try:
        launch_local(world, ["-m", "distripy.cli", *argv])
    except ChildFailedError as error:
        codes = [f.exitcode for f in error.failures.values()]
        if all(code == 2 for code in codes):  # each said why, in one line
            return 2
        failures = "; ".join(f"rank {f.local_rank}: exit {f.exitcode}" for f in error.failures.values())
        print(f"distripy: {failures} (see the rank's message above)", file=sys.stderr)
        return 1
    return 0


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _save_image(image, path: Path) -> None:
    """Write to a temporary name beside ``path``, then rename: no partial file on failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        image.save(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# -- generate --------------------------------------------------------------------------------------


def _loaded(flag: str, path, load):
    """``load()``, any failure reported as one line naming ``flag`` and ``path``."""
    try:
        return load()
    except Exception as error:  # noqa: BLE001 - any loading failure is reported as one line
        raise CommandError(f"{flag} {path}: cannot load it ({type(error).__name__}: {error})") from None


def _task_pipeline(args, pipe, dtype):
    """``pipe`` as the pipeline of the task the arguments ask for: ControlNet (its models loaded
    here), img2img, inpainting, or as it is (``AutoPipelineFor*.from_pipe``: the same models)."""
    import diffusers

    extra = {}
    controlnets = getattr(args, "controlnet", None) or []
    if controlnets:
        nets = [
            _loaded("--controlnet", path, lambda p=path: diffusers.ControlNetModel.from_pretrained(p, torch_dtype=dtype, local_files_only=True))
            for path in controlnets
        ]  # fmt: skip
        extra["controlnet"] = nets[0] if len(nets) == 1 else nets
    if getattr(args, "mask_image", None) is not None:
        task = diffusers.AutoPipelineForInpainting
    elif getattr(args, "init_image", None) is not None:
        task = diffusers.AutoPipelineForImage2Image
    elif extra:
        task = diffusers.AutoPipelineForText2Image
    else:
        return pipe
    return _loaded("--model", args.model, lambda: task.from_pipe(pipe, **extra))


def _load_loras(args, pipe) -> None:
    """Each ``--lora`` as adapter ``lora<i>``, all active with their scales."""
    names = []
    loras = getattr(args, "lora", None) or []
    for index, (path, scale) in enumerate(loras):
        path = Path(path)
        name = f"lora{index}"
        _loaded(
            "--lora",
            path,
            lambda: pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name),
        )
        names.append(name)
    if names:
        pipe.set_adapters(names, [scale for _, scale in loras])


def _load_pipeline(args, device, dtype):
    import diffusers

    pipe = _loaded(
        "--model",
        args.model,
        lambda: diffusers.DiffusionPipeline.from_pretrained(
            args.model, torch_dtype=dtype, local_files_only=True
        ),
    )
    pipe = _task_pipeline(args, pipe, dtype)
    _load_loras(args, pipe)
    scheduler_class = (
        type(pipe.scheduler)
        if SCHEDULERS[args.scheduler] is None
        else getattr(diffusers, SCHEDULERS[args.scheduler])
    )
    spacing = getattr(args, "timestep_spacing", None)
    overrides = {} if spacing is None else {"timestep_spacing": spacing}
    if SCHEDULERS[args.scheduler] is not None or overrides:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
    return pipe.to(device)


def _step_timer(device):
    """A ``callback_on_step_end`` that records when each step ended (after the GPU finished it)."""
    import torch

    ends: List[float] = []

    def callback(pipe, step, timestep, callback_kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())
        return callback_kwargs

    return callback, ends


def _print_layout(args, world: int, choice, deepest_rows: Optional[int] = None) -> None:
    """How the ranks share the image (with ``deepest_rows``, the rows each band gets at the UNet's
    deepest level), the mode and warm-up the generation runs (``choice``, a ``ModeChoice``), and a
    warning when the mode cannot matter."""
    bands = _bands(args, world)
    groups = world // bands
    split = f"CFG split into {groups} groups of {bands}" if groups > 1 else "no CFG split"
    rows = ""
    if deepest_rows is not None and 1 < bands <= deepest_rows:
        from distripy.parallel.bands import BandLayout

        units = BandLayout.split(deepest_rows, bands).units
        rows = f" ({'/'.join(map(str, units))} rows of the UNet's deepest level)"
    print(
        f"distripy: {world} rank{'s' * (world > 1)}, {split}: {bands} band{'s' * (bands > 1)} per image{rows}"
    )
    synchronous = (
        "every step synchronous"
        if choice.mode in ("exact", "full_sync")
        else "no exchange"
        if choice.mode == "naive_patch"
        else f"warm-up {choice.warmup_steps} synchronous step{'s' * (choice.warmup_steps != 1)}"
    )
    print(f"distripy: mode {choice.mode}, {synchronous} ({choice.reason})")
    if bands == 1 and world > 1 and choice.mode not in ("full_sync", "exact"):
        print(
            f"distripy: warning: with one band per image nothing is exchanged between bands, so "
            f"--mode {args.mode} makes no difference; use --no-split-batch or more ranks for several bands",
            file=sys.stderr,
        )


def _image_arguments(args) -> dict:
    """The call's images, size and strength, as the task's pipeline names them."""
    from PIL import Image

    def load(path: Path, mode: str = "RGB"):
        with Image.open(path) as image:
            return image.convert(mode)

    arguments = dict(height=args.height, width=args.width)
    controls = [load(path) for path in args.control_image]
    control = None if not controls else controls[0] if len(controls) == 1 else controls
    if args.init_image is not None:
        arguments["image"] = load(args.init_image)
        if args.mask_image is not None:
            arguments["mask_image"] = load(args.mask_image, "L")
        if control is not None:
            arguments["control_image"] = control
        if args.strength is not None:
            arguments["strength"] = args.strength
    elif control is not None:
        arguments["image"] = control
    if args.refiner is not None:
        arguments.update(denoising_end=args.refiner_start, output_type="latent")
    return arguments


def _call(pipe, arguments: dict):
    """Call ``pipe`` with the arguments its ``__call__`` takes (img2img pipelines have no height
    and width: the image's size is kept); its images."""
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    missing = [
        name for name in ("denoising_end", "denoising_start") if name in arguments and name not in accepted
    ]
    if missing:
        raise CommandError(f"{type(pipe).__name__} takes no {missing[0]} (--refiner cannot follow it)")
    return pipe(**{name: value for name, value in arguments.items() if name in accepted}).images


def run_generate(args) -> int:
    import statistics

    import diffusers
    import torch

    import distripy

    rank, world = distripy.init(timeout_s=args.timeout)
    device = _device()
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    pipe = _load_pipeline(args, device, dtype)
    config = distripy.DistriConfig(
        mode=args.mode,
        warmup_steps=args.warmup_steps,
        split_batch=not args.no_split_batch,
        timeout_s=args.timeout,
    )
    if rank == 0:
        from distripy.pipelines.unet import count_downsamplings

        per_row = int(getattr(pipe, "vae_scale_factor", 8)) * 2 ** count_downsamplings(pipe.unet)
        _print_layout(args, world, distripy.choose_mode(config, args.steps), args.height // per_row)
    pipe = distripy.parallelize(pipe, config)
    refiner = None
    if args.refiner is not None:
        refiner = _loaded(
            "--refiner",
            args.refiner,
            lambda: diffusers.AutoPipelineForImage2Image.from_pretrained(
                args.refiner, torch_dtype=dtype, local_files_only=True
            ),
        )
        refiner = distripy.parallelize(refiner.to(device), config)
    callback, ends = _step_timer(device)
    start = time.perf_counter()
    common = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
        callback_on_step_end=callback,
    )
    image = _call(pipe, dict(common, **_image_arguments(args)))
    if refiner is not None:
        image = _call(refiner, dict(common, image=image, denoising_start=args.refiner_start))
    image = image[0]
    total = time.perf_counter() - start
    if rank == 0:
        _save_image(image, args.output)
        steps = [b - a for a, b in zip([start] + ends[:-1], ends)]
        ranks = (
            f"{world} GPU{'s' * (world > 1)}"
            if device.type == "cuda"
            else f"{world} CPU process{'es' * (world > 1)}"
        )
        print(
            f"distripy: {args.width}x{args.height}, {args.steps} steps on {ranks}: {total:.2f} s "
            f"(per step: median {statistics.median(steps):.3f} s); wrote {args.output}"
        )
    return 0


# -- entry point -----------------------------------------------------------------------------------


def run_plan(args) -> int:
    """``distripy plan``: the table (or JSON) of ``distripy.plan``; nothing is launched."""
    from distripy.api import plan

    width, _, height = args.size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise CommandError(f"--size {args.size}: must be WIDTHxHEIGHT in pixels, e.g. 2048x2048")
    if args.gpus < 1:
        raise CommandError(f"--gpus {args.gpus}: needs at least 1")
    if args.steps < 1:
        raise CommandError(f"--steps {args.steps}: needs at least 1")
    try:
        planned = plan(
            args.gpus, (int(height), int(width)), args.steps, fabric=args.fabric, gpu=args.gpu,
            guidance=not args.no_guidance,
        )  # fmt: skip
    except DistripyError as error:
        raise CommandError(str(error).removeprefix("plan: ")) from None
    if args.json:
        print(json.dumps(planned.as_dict(), indent=2))
        return 0
    best = planned.recommended
    print(
        f"distripy plan: {width}x{height}, {args.steps} steps, up to {args.gpus} GPUs: "
        f"{planned.gpu.name} ({'measured' if planned.gpu.measured else 'built in'}), "
        f"{planned.fabric.name} ({'measured' if planned.fabric.measured else 'built in'})"
    )
    print(planned.table(args.top))
    split = "with" if best.split_batch else "without"
    how = "one GPU" if best.gpus == 1 else f"{best.gpus} GPUs, {split} the CFG split, mode {best.mode}"
    print(
        f"\nrecommended (*): {how}, CUDA graphs {'on' if best.graphs else 'off'}: "
        f"{best.seconds:.2f} s, {best.speedup:.2f}x one GPU"
    )
    for assumption in planned.assumptions:
        print(f"assumed: {assumption}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "plan":
        try:
            return run_plan(args)
        except CommandError as error:
            print(f"distripy: error: {error}", file=sys.stderr)
            return 2
    if args.command == "demo" and args.nproc is not None:
        args.bands = [args.nproc]
    if args.command == "serve":
        try:
            check_serve(args)
            return run_serve(args)
        except DistripyError as error:  # CommandError, or the engine could not start
            text = str(error) if isinstance(error, CommandError) else f"{type(error).__name__}: {error}"
            print(f"distripy: error: {text}", file=sys.stderr)
            return 2
    try:
        if _under_torchrun():
            worlds = [int(os.environ["WORLD_SIZE"])]
        elif args.command == "demo":
            worlds = list(args.bands)
        else:
            worlds = [1 if args.nproc is None else args.nproc]
        for world in worlds:
            (check_generate if args.command == "generate" else check_demo)(args, world)
    except CommandError as error:
        print(f"distripy: error: {error}", file=sys.stderr)
        return 2
    if _under_torchrun():
        return _run_rank(args)
    if args.command == "generate":
        return _launch(worlds[0], argv) if worlds[0] > 1 else _run_rank(args)
    return _demo(args, argv, worlds)


def _demo(args, argv: List[str], worlds: List[int]) -> int:
    """One world per band count, then the grid and the report of all of them."""
    for world in worlds:
        if world > 1:
            status = _launch(world, argv + ["--bands", str(world), "--nproc", str(world), "--no-compose"])
        else:
            args.bands, args.no_compose = [1], True
            status = _run_rank(args)
        if status != 0:
            return status
    from distripy.demo import compose_demo

    return compose_demo(args, worlds)


def _run_rank(args) -> int:
    """This process's share; distripy's own errors (which name what is wrong) become one line,
    printed by rank 0 alone when every rank raised it together (``parallel.agreement``). The
    process group is destroyed on every path (after a failure it waits at most ``--timeout``)."""
    try:
        if args.command == "generate":
            return run_generate(args)
        from distripy.demo import run_demo

        return run_demo(args)
    except DistripyError as error:
        if os.environ.get("RANK", "0") == "0" or not getattr(error, "collective", False):
            text = str(error) if isinstance(error, CommandError) else f"{type(error).__name__}: {error}"
            print(f"distripy: error: {text}", file=sys.stderr)
        return 2
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
