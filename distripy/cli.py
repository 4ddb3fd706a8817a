"""The ``distripy`` command: ``generate`` an image on N GPUs (or N CPU processes), ``serve`` a
pipeline over HTTP on N ranks (``serving.http``), run the ``demo``, ``plan`` the configuration
for a machine (``distripy.plan``: predicted, nothing runs). This module is the command line and
what it prints; the work is the application layer's (``distripy.application``), the demo's and
the server's.

``--nproc N`` starts N processes (``runtime.distributed.launch_local``); a command started by
torchrun runs as one of its ranks. Everything that can be checked before launching is, once, in
the launching process (the model folder and its weights, the scheduler, the images, the LoRAs, the
size for N ranks, N against the GPUs present): a bad value exits with status 2 and one line
saying what is wrong, before any process starts or any file is written; the ranks get the checked
job as a file. Any error of distripy's (a ``DistripyError``) met later, on a rank, is also one
line and status 2. Rank 0 writes the image whole or not at all.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from distripy.application import DTYPES, REFINER_START, TIMESTEP_SPACINGS, CheckError, GenerateJob
from distripy.application import GenerationRequest, PipelineSpec, parse_lora
from distripy.application.checks import gpu_count
from distripy.config import AUTO_MODE, COMPRESS_CHOICES, DEFAULT_MODE, DEFAULT_TIMEOUT_S, DEFAULT_WARMUP_STEPS
from distripy.config import EXCHANGE_CODECS, MODE_CHOICES, DistriConfig
from distripy.demo import check_demo
from distripy.errors import ConfigError, DistripyError
from distripy.geometry import bands_per_image
from distripy.parallel.step_policy import ALWAYS_SYNCHRONOUS, keeps_activations
from distripy.pipelines.schedulers import SCHEDULERS
from distripy.serving.pipeline_fields import ServedPipeline
from distripy.serving.scheduling import POLICIES

__all__ = ["CommandError", "check_demo", "check_generate", "check_serve", "main"]

DEMO_STEPS = 20
CommandError = CheckError
"""A bad command line or environment: printed as one line, exit status 2."""

FLAGS = {
    "model": "--model", "controlnets": "--controlnet", "control_images": "--control-image",
    "init_image": "--init-image", "mask_image": "--mask-image", "strength": "--strength", "loras": "--lora",
    "refiner": "--refiner", "refiner_start": "--refiner-start", "height": "--height", "width": "--width",
    "steps": "--steps", "warmup_steps": "--warmup-steps", "scheduler": "--scheduler", "mode": "--mode",
    "timestep_spacing": "--timestep-spacing", "seed": "--seed", "guidance": "--guidance", "nproc": "--nproc",
    "output": "--output", "prompt": "--prompt", "negative_prompt": "--negative-prompt",
}  # fmt: skip
"""The application layer's names of the values, as this command's flags (its messages use them)."""


# -- the command line ------------------------------------------------------------------------------


# fmt: off
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distripy", description="One diffusion image from N GPUs.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate an image with a local diffusers pipeline")
    _add_model_arguments(generate, serving=False)
    add = generate.add_argument
    add("--prompt", required=True)
    add("--negative-prompt", default=None)
    add("--height", type=int, default=None, help="pixels (default: the model's)")
    add("--width", type=int, default=None, help="pixels (default: the model's)")
    add("--steps", type=int, default=50)
    add("--guidance", type=float, default=5.0)
    add("--seed", type=int, default=0)
    _add_parallel_arguments(generate)
    # ControlNet, img2img, inpainting and the SDXL refiner
    add("--control-image", type=Path, action="append", default=[], metavar="FILE", help="a ControlNet's condition")
    add("--init-image", type=Path, default=None, metavar="FILE", help="img2img / inpainting start")
    add("--mask-image", type=Path, default=None, metavar="FILE", help="inpaint where white (needs --init-image)")
    add("--strength", type=float, default=None, help="how much of --init-image to repaint, in (0, 1]")
    add("--refiner-start", type=float, default=REFINER_START,
        help=f"the fraction of the steps after which the refiner takes over (default {REFINER_START})")
    add("--output", type=Path, default=Path("distripy.png"))
    add("--checked", default=None, help=argparse.SUPPRESS)  # the launch's checked job, for its ranks

    serve = commands.add_parser("serve", help="serve a local diffusers pipeline over HTTP on N ranks")
    _add_model_arguments(serve, serving=True)
    add = serve.add_argument
    add("--nproc", type=int, default=None,
        help="ranks to start (one GPU each when present; default 1). Under torchrun, leave it out: "
        "torchrun's processes are the ranks (on several nodes too) and rank 0 serves HTTP")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--queue-size", type=int, default=16, help="requests waiting or running; more get 429")
    add("--request-timeout", type=float, default=300.0, help="seconds a request may take, queueing included")
    add("--mode", choices=MODE_CHOICES, default=DEFAULT_MODE, help="the default mode")
    add("--policy", choices=POLICIES, default="latency",
        help="latency: each request on every rank; throughput: one request per rank at once; "
        "adaptive: the first while the queue is short, the second when it is deep")
    add("--no-split-batch", action="store_true", help="keep CFG's two halves on every rank")
    _add_compress_argument(serve)
    _add_timeout_argument(serve)

    demo = commands.add_parser(
        "demo",
        help="the project's trained model: single device | auto | corrected_async_gn | naive_patch at 2 and 4 bands",
    )
    add = demo.add_argument
    add("--height", type=int, default=128)
    add("--width", type=int, default=128)
    add("--steps", type=int, default=DEMO_STEPS)
    add("--warmup-steps", type=int, default=1, help="the warm-up of the modes other than auto (default 1)")
    add("--seed", type=int, default=None, help="default: the demo's own (see distripy.demo)")
    add("--all-modes", action="store_true", help="every mode, not only the grid's and exact")
    add("--bands", type=int, nargs="+", default=[2, 4], help="band counts, one world of ranks each (default 2 4)")
    add("--nproc", type=int, default=None, help="one world of this many ranks (--bands N)")
    add("--output-dir", type=Path, default=Path("distripy-demo"))
    add("--no-compose", action="store_true", help=argparse.SUPPRESS)  # set for its worlds
    _add_timeout_argument(demo)

    plan = commands.add_parser("plan", help="rank the configurations of N GPUs for one image size by predicted latency")
    add = plan.add_argument
    add("--gpus", type=int, required=True, help="GPUs available (candidates: 1 to this)")
    add("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels (default 1024x1024)")
    add("--steps", type=int, default=50)
    add("--fabric", default="nvlink4", help="nvlink4 (default), nvlink3, pcie5, pcie4, or a bench/comm.py JSON file")
    add("--gpu", default="h100", help="h100 (default), a100, l40, or a bench/e2e.py JSON file")
    add("--no-guidance", action="store_true", help="no classifier-free guidance (batch 1, no CFG split)")
    add("--compress", default="none", metavar="CODECS",
        help=f"the asynchronous mode's key/value compression to compare: comma-separated, of "
        f"{', '.join(EXCHANGE_CODECS)}, or all (default none)")
    add("--memory", type=float, metavar="GIB",
        help="each GPU's memory in GiB (a 24 GB card: 24): leave out what would not fit, and say why")
    add("--top", type=int, default=15, help="table rows (default 15; all with --json)")
    add("--json", action="store_true", help="print the plan as JSON")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser, serving: bool) -> None:
    """The pipeline and what is loaded beside it, alike for ``generate`` and ``serve``."""
    add = parser.add_argument
    default = "the default of requests that name none: " if serving else ""
    add("--model", required=True, type=Path, help="a local diffusers pipeline folder")
    add("--scheduler", default="default", help=f"{default}one of {', '.join(SCHEDULERS)}")
    add("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
        help=f"{default}the scheduler's timesteps (default: its own); trailing: what few-step models such as "
        "SDXL-Lightning sample with (--steps 4 --scheduler euler --timestep-spacing trailing)")
    add("--controlnet", type=Path, action="append", default=[], metavar="PATH",
        help="a ControlNetModel folder; repeat for several, with one "
        + ("control image each in a request (control_images)" if serving else "--control-image each"))
    add("--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors or its folder), scale 1 unless given; repeat for several"
        + ("; loaded at start, active for requests that name no loras, which may name these only" * serving))
    add("--refiner", type=Path, default=None, metavar="PATH", help="an SDXL refiner pipeline folder")
    add("--dtype", choices=DTYPES, default=None, help="default: float16 on GPUs, else float32")


def _add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--mode", choices=MODE_CHOICES, default=DEFAULT_MODE,
        help=f"{AUTO_MODE} (default): the mode and warm-up measured best for --steps (printed); "
        "exact: every step equals one GPU's, exchanges overlapped (few-step models); "
        "corrected_async_gn: DistriFusion's asynchronous mode")
    add("--warmup-steps", type=int, default=None,
        help=f"synchronous steps at the start, for a --mode other than {AUTO_MODE} (default "
        f"{DEFAULT_WARMUP_STEPS}; the reference's W is W + 1 here)")
    add("--no-split-batch", action="store_true", help="keep CFG's two halves on every rank")
    _add_compress_argument(parser)
    add("--nproc", type=int, default=None, help="ranks to launch (one GPU each when present)")
    _add_timeout_argument(parser)


def _add_compress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compress", choices=COMPRESS_CHOICES, default="none",
        help="send the attention keys/values compressed after the warm-up (default none): fp8, or "
        "residual2 / residual1 (the 2- or 1-bit change since the last step; baselines kept in fp8); "
        "auto: for the asynchronous modes, the faster of fp8 and residual2 where the planner predicts "
        "the link cannot hide them (distripy plan --compress all); full_sync and exact then no longer "
        "equal one device",
    )


def _add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S,
        help=f"seconds any wait for another rank may take before the command fails (default {DEFAULT_TIMEOUT_S:g})",
    )
# fmt: on


# -- generate --------------------------------------------------------------------------------------


def _check_timeout(args) -> None:
    if not args.timeout > 0:
        raise CommandError(f"--timeout {args.timeout:g}: must be a positive number of seconds")


def check_generate(args, world: int) -> GenerateJob:
    """The job the arguments ask for, with every check ``generate`` can make before any process
    starts (``application.check_job``) for ``world`` ranks."""
    _check_timeout(args)
    if args.mode == AUTO_MODE and args.warmup_steps is not None:
        raise CommandError(
            f"--warmup-steps {args.warmup_steps}: --mode {AUTO_MODE} picks the warm-up from --steps; "
            "name a mode to set it (--mode corrected_async_gn --warmup-steps N)"
        )
    warmup = DEFAULT_WARMUP_STEPS if args.warmup_steps is None else args.warmup_steps
    if warmup < 0:
        raise CommandError(f"--warmup-steps {warmup}: too small")
    from distripy.application import check_job

    loras = [parse_lora(value) for value in args.lora]
    try:
        config = DistriConfig(
            mode=args.mode, warmup_steps=warmup, split_batch=not args.no_split_batch, timeout_s=args.timeout,
            compress=args.compress,
        )
    except ConfigError as error:
        raise CommandError(str(error)) from None
    spec = PipelineSpec(
        str(args.model), dtype=args.dtype or ("float16" if gpu_count() else "float32"),
        controlnets=[str(path) for path in args.controlnet], refiner=args.refiner,
        loras=[str(path) for path, _ in loras], config=config,
    )  # fmt: skip
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        seed=args.seed, height=args.height, width=args.width, scheduler=args.scheduler,
        timestep_spacing=args.timestep_spacing, loras=tuple((str(p), s) for p, s in loras),
        control_images=tuple(str(path) for path in args.control_image),
        init_image=None if args.init_image is None else str(args.init_image),
        mask_image=None if args.mask_image is None else str(args.mask_image), strength=args.strength,
        refiner_start=args.refiner_start if args.refiner is not None else None,
    )  # fmt: skip
    return check_job(GenerateJob(spec, request, str(args.output)), world, FLAGS)


def _print_layout(
    world: int,
    bands: int,
    mode: str,
    choice,
    deepest_rows: Optional[int] = None,
    compress: str = "none",
    steps: Optional[int] = None,
) -> None:
    """How the ranks share the image (``bands`` per image; with ``deepest_rows``, the rows each
    band gets at the UNet's deepest level), the mode and warm-up the generation runs (``choice``,
    a ``ModeChoice``; ``mode``: the one asked for), how its keys and values travel after the
    warm-up (``compress``; ``steps``: the generation's, when known), and a warning when the mode
    cannot matter."""
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
    synchronous = f"warm-up {choice.warmup_steps} synchronous step{'s' * (choice.warmup_steps != 1)}"
    if choice.mode in ("exact", "full_sync", "naive_patch"):
        synchronous = "no exchange" if choice.mode == "naive_patch" else "every step synchronous"
    codec = ""
    if keeps_activations(choice.mode) and bands > 1 and compress != "none":  # stale keys/values travel
        how = "compressed where the planner says it pays" if compress == "auto" else compress
        codec = f", stale keys/values sent {how}"
    elif choice.mode in ALWAYS_SYNCHRONOUS and bands > 1 and compress not in ("none", "auto"):
        full = max(1, choice.warmup_steps)  # fresh keys/values compressed after the full-precision steps
        if steps is None or steps > full:
            codec = f", keys/values sent {compress} after {full} full-precision step{'s' * (full > 1)}"
    print(f"distripy: mode {choice.mode}, {synchronous} ({choice.reason}){codec}")
    if bands == 1 and world > 1 and choice.mode not in ("full_sync", "exact"):
        print(
            f"distripy: warning: with one band per image nothing is exchanged between bands, so "
            f"--mode {mode} makes no difference; use --no-split-batch or more ranks for several bands",
            file=sys.stderr,
        )


def run_generate(job: GenerateJob) -> int:
    """This rank's share of the job (``application.run_job``), and rank 0's lines about it."""
    from distripy.application import run_job

    config, request = job.spec.config, job.request

    def announce(world: int, choice, deepest_rows: Optional[int]) -> None:
        split = bool(config.split_batch) and (request.guidance or 0) > 1.0
        _print_layout(
            world, bands_per_image(world, split), config.mode, choice, deepest_rows, config.compress, request.steps
        )

    result = run_job(job, announce, FLAGS)
    if result.rank == 0:
        many = result.world > 1
        kind = f"GPU{'s' * many}" if result.device_type == "cuda" else f"CPU process{'es' * many}"
        ranks = f"{result.world} {kind}"
        print(
            f"distripy: {request.width}x{request.height}, {request.steps} steps on {ranks}: {result.seconds:.2f} s "
            f"(per step: median {result.median_step:.3f} s); wrote {job.output}"
        )
    return 0


# -- serve -----------------------------------------------------------------------------------------


def check_serve(args) -> Tuple[PipelineSpec, ServedPipeline]:
    """Every check ``serve`` can make before starting the ranks (the pipeline's as ``generate``
    makes them, with its messages); the checked spec to serve, and what its requests may ask."""
    from distripy.application import check_request, check_spec, check_world

    _check_timeout(args)
    if _under_torchrun():
        if args.nproc is not None:
            raise CommandError(
                f"--nproc {args.nproc}: under torchrun the ranks are torchrun's processes (--nproc-per-node, --nnodes)"
            )
    else:
        args.nproc = 1 if args.nproc is None else args.nproc
        check_world(args.nproc, "--nproc")
    config = DistriConfig(
        mode=args.mode, split_batch=not args.no_split_batch, timeout_s=args.timeout, compress=args.compress
    )
    loras = [(str(path), scale) for path, scale in map(parse_lora, args.lora)]
    spec = PipelineSpec(
        str(args.model), dtype=args.dtype or ("float16" if gpu_count() else "float32"), config=config,
        controlnets=[str(path) for path in args.controlnet], refiner=args.refiner, loras=[p for p, _ in loras]
    )  # fmt: skip
    spec, _ = check_spec(spec, FLAGS)
    defaults = GenerationRequest(scheduler=args.scheduler, timestep_spacing=args.timestep_spacing)
    check_request(defaults, spec, FLAGS)
    served = ServedPipeline.of(spec, loras, args.scheduler, args.timestep_spacing)
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port}: not a port number")
    if args.queue_size < 1:
        raise CommandError(f"--queue-size {args.queue_size}: needs at least 1")
    if not args.request_timeout > 0:
        raise CommandError(
            f"--request-timeout {args.request_timeout:g}: must be a positive number of seconds"
        )
    for name in ("fastapi", "prometheus_client", "uvicorn"):
        if importlib.util.find_spec(name) is None:
            raise CommandError(f"serve needs {name}: pip install 'distripy[serve]'")
    return spec, served


def run_serve(args, spec: PipelineSpec, served: ServedPipeline) -> int:
    """Start the engine's ranks, then serve until SIGTERM or Ctrl-C (which close them)."""
    import logging

    import distripy
    from distripy.serving.http import serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = {"timeout_s": args.request_timeout, "policy": args.policy}
    if _under_torchrun():
        # torchrun's processes are the ranks (this node's and other nodes'): rank 0 serves HTTP,
        # the others run requests until rank 0 closes them.
        rank, _ = distripy.init(timeout_s=args.timeout)
        if rank != 0:
            from distripy.serving.worker import serve

            serve(None, rank)
            return 0
        engine = distripy.Engine.of_torchrun_group(spec, **settings)
    else:
        engine = distripy.Engine(spec, nproc=args.nproc, **settings)
    ranks = engine.nproc
    print(
        f"distripy: {ranks} rank{'s' * (ranks > 1)} ready; serving on http://{args.host}:{args.port}",
        flush=True,
    )
    settings = dict(queue_size=args.queue_size, request_timeout_s=args.request_timeout, served=served)
    serve_forever(engine, args.host, args.port, **settings)  # until SIGTERM or Ctrl-C: exit status 0
    if not engine.restartable and engine.failures:
        # the torchrun group's ranks failed: a non-zero exit lets torchrun restart the group
        print("distripy: the ranks failed; the service has stopped", file=sys.stderr, flush=True)
        return 1
    print("distripy: the service has stopped", flush=True)
    return 0


# -- plan ------------------------------------------------------------------------------------------


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
    if args.memory is not None and not 0 < args.memory < float("inf"):
        raise CommandError(f"--memory {args.memory:g}: must be a positive number of GiB")
    try:
        planned = plan(
            args.gpus, (int(height), int(width)), args.steps, fabric=args.fabric, gpu=args.gpu,
            guidance=not args.no_guidance, compress=args.compress, memory=args.memory,
        )  # fmt: skip
    except DistripyError as error:
        raise CommandError(str(error).removeprefix("plan: ")) from None
    print(json.dumps(planned.as_dict(), indent=2) if args.json else planned.report(args.top))
    return 0


# -- entry point and launching ---------------------------------------------------------------------


def _error_line(error: DistripyError) -> str:
    text = str(error) if isinstance(error, CommandError) else f"{type(error).__name__}: {error}"
    return f"distripy: error: {text}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "plan":
        try:
            return run_plan(args)
        except CommandError as error:
            print(_error_line(error), file=sys.stderr)
            return 2
    if args.command == "serve":
        try:
            return run_serve(args, *check_serve(args))
        except DistripyError as error:  # a bad argument, or the engine could not start
            print(_error_line(error), file=sys.stderr)
            return 2
    if args.command == "demo" and args.nproc is not None:
        args.bands = [args.nproc]
    job = None
    try:
        if _under_torchrun():
            worlds = [int(os.environ["WORLD_SIZE"])]
        elif args.command == "demo":
            worlds = list(args.bands)
        else:
            worlds = [1 if args.nproc is None else args.nproc]
        if args.command == "generate":
            from distripy.application import read_job

            job = read_job(args.checked) if args.checked else check_generate(args, worlds[0])
        else:
            for world in worlds:
                check_demo(args, world)
    except CommandError as error:
        print(_error_line(error), file=sys.stderr)
        return 2
    if _under_torchrun() or (args.command == "generate" and worlds[0] == 1):
        return _run_rank(args, job)
    if args.command == "generate":
        from distripy.application import write_job

        with tempfile.TemporaryDirectory(prefix="distripy-job-") as folder:
            return _launch(worlds[0], argv + ["--checked", write_job(job, folder)])
    return _demo(args, argv, worlds)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _launch(world: int, argv: List[str]) -> int:
    """Run this command on ``world`` local processes (``runtime.distributed.launch_local``)."""
    from distripy.application import RANK_MODULES
    from distripy.errors import RanksFailedError
    from distripy.runtime.distributed import launch_local

    try:
        launch_local(world, ["-m", "distripy.cli", *argv], preload=RANK_MODULES + ("distripy.demo",))
    except RanksFailedError as error:
        if all(code == 2 for code in error.exit_codes.values()):  # each said why, in one line
            return 2
        print(f"distripy: {error} (see the rank's message above)", file=sys.stderr)
        return 1
    return 0


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


def _run_rank(args, job: Optional[GenerateJob] = None) -> int:
    """This process's share; distripy's own errors (which name what is wrong) become one line,
    printed by rank 0 alone when every rank raised it together (``parallel.agreement``). The
    process group is destroyed on every path (after a failure it waits at most ``--timeout``)."""
    try:
        if args.command == "generate":
            return run_generate(job)
        from distripy.demo import run_demo

        return run_demo(args)
    except DistripyError as error:
        if os.environ.get("RANK", "0") == "0" or not getattr(error, "collective", False):
            print(_error_line(error), file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
