"""``Engine``: one object in one process that drives N patch-parallel ranks.

A web UI, a node graph or a job queue runs in one process; patch parallelism needs N processes
that each hold a share of the model. ``Engine(model, nproc=N)`` starts the N ranks with torch's
elastic launcher (``python -m torch.distributed.run --standalone``, as ``distripy generate
--nproc`` does), each loading the pipeline and parallelising it once (``serving.worker``), and
then turns each call into a request that every rank runs, returning the images to the caller.

The engine sends rank 0 typed messages (``serving.messages``) over a local authenticated
connection; rank 0 passes each request on to the other ranks over the world ``Comm``. Starting,
watching and stopping the processes is ``serving.ranks``'s job; this module keeps the queue, the
policy and the flow of each request. Every wait is bounded: the start (``start_timeout_s``) and
each request (its ``timeout_s``, by default ``DistriConfig.timeout_s``). A request whose ranks
fail (one died: the connection closes) raises ``EngineError``; one past its deadline (a rank is
stuck) raises ``EngineTimeoutError``; a transfer between the ranks that failed, the
``CommError`` the ranks raised. Each time the rank processes are stopped (every one of them) and
started again before the next request. An error the ranks raised alike (an argument the pipeline
refused) arrives whole, of its own class (``raised_by_ranks``), and the ranks serve on.
``close()`` (or leaving a ``with`` block, or the interpreter's exit) ends them; no process is
left behind.

Calls may come from many threads at once: they wait in one queue, in arrival order, and the
``policy`` (``serving.scheduling``) decides how the ranks take them: each on all ranks
(``latency``), up to N at once, one per rank (``throughput``), or the first while the queue is
shorter than the patch-parallel speedup and the second beyond it (``adaptive``). The thread whose
request waits runs the next run for whoever is first; a request whose deadline passes while it
waits fails with ``EngineTimeoutError`` (``in_queue`` true) without touching the ranks.
"""

import atexit
import math
import pickle
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from distripy.application import GenerationRequest, PipelineSpec, check_request, check_spec
from distripy.config import DistriConfig
from distripy.errors import (
    ConfigError,
    DistripyError,
    EngineError,
    EngineTimeoutError,
    InputError,
    InputTypeError,
)
from distripy.geometry import BandGeometry, bands_per_image
from distripy.serving.messages import Batch, BatchReplies, Failure, Generate, Images, Setup
from distripy.serving.ranks import STOP_GRACE_S, GroupRanks, LaunchedRanks
from distripy.serving.scheduling import SpeedupEstimate, check_policy, plan_run

__all__ = ["Engine", "raised_by_ranks"]


def raised_by_ranks(error: BaseException) -> BaseException:
    """What a call raises for an exception the ranks raised (whole, ``serving.messages``):
    distripy's own errors as they are (a ``BandGeometryError`` stays one); the pipeline's refusal
    of an argument (a plain ``ValueError`` / ``TypeError``) as ``InputError`` / ``InputTypeError``;
    anything else as ``EngineError``. The original is the new error's ``__cause__``."""
    if isinstance(error, DistripyError):
        return error
    if isinstance(error, ValueError):
        kind = InputError
    elif isinstance(error, TypeError):
        kind = InputTypeError
    else:
        kind = EngineError
    converted = kind(f"the pipeline raised {type(error).__name__}: {error}")
    converted.__cause__ = error
    return converted


class _Waiting:
    """One call in the queue: its request, deadline and progress callback, then its outcome."""

    def __init__(self, request: Generate, deadline: float, progress: Optional[Callable]) -> None:
        self.request = request
        self.deadline = deadline
        self.progress = progress
        self.images: Optional[list] = None
        self.error: Optional[BaseException] = None
        self.done = False

    @property
    def kind(self) -> Tuple:
        """What its speed depends on: size, steps, images."""
        return self.request.kind

    def finish(self, images: Optional[list] = None, error: Optional[BaseException] = None) -> None:
        self.images, self.error, self.done = images, error, True


def _check_model(model) -> Union[str, Callable]:
    if callable(model):
        try:
            pickle.dumps(model)
        except Exception as error:  # noqa: BLE001 - any pickling failure means the same
            raise InputTypeError(
                f"Engine: the model factory {model!r} cannot be pickled to the rank processes ({error}); "
                "use a module-level function"
            ) from None
        return model
    if not isinstance(model, (str, Path)):
        raise InputTypeError(
            "Engine: model must be a diffusers folder, a factory or a PipelineSpec, got "
            f"{type(model).__name__}"
        )
    return str(model)


def _pipeline_spec(model, config, dtype, controlnets, refiner, loras) -> PipelineSpec:
    """The spec the ranks load, checked here, once (``application.check_spec``: the folders, the
    weights' headers, the LoRA files), unless it was already (``distripy serve`` checks it)."""
    if isinstance(model, PipelineSpec):
        given = [name for name, value in (("config", config), ("dtype", dtype), ("refiner", refiner))
                 if value is not None] + [name for name, value in (("controlnets", controlnets),
                 ("loras", loras)) if value]  # fmt: skip
        if given:
            raise InputError(f"Engine: model is a PipelineSpec: give {', '.join(given)} in it")
        spec = model
        _check_model(spec.model)
    else:
        spec = PipelineSpec(
            _check_model(model), dtype, controlnets=list(controlnets), refiner=refiner, loras=list(loras),
            config=DistriConfig() if config is None else config,
        )  # fmt: skip
    return check_spec(spec)[0]


class Engine:
    """N rank processes serving one parallelised pipeline to this process (module docstring).

    ``model``: a local diffusers pipeline folder, or a picklable factory (a module-level function)
    that returns the pipeline, or a whole ``application.PipelineSpec``. ``controlnets``:
    ``ControlNetModel`` folders (a call then gives ``control_images``, one each); ``refiner``: an
    SDXL refiner pipeline folder (each image is refined from the call's ``refiner_start``);
    ``loras``: LoRA files loaded at the start (a call may name others). ``nproc``: ranks (one GPU
    each where there are GPUs: ``devices`` lists which, default all; gloo processes on a CPU).
    ``config``: the ``DistriConfig`` every rank parallelises with. ``dtype``: ``"float16"``,
    ``"bfloat16"`` or ``"float32"`` (default: the model's own). ``timeout_s``: a request's
    deadline unless the call gives one (default the config's ``timeout_s``); ``start_timeout_s``:
    the ranks' start, loading included.
    ``policy``: ``latency`` (default), ``throughput`` or ``adaptive`` (``serving.scheduling``;
    may be changed between calls); ``speedup``: the patch-parallel speedup ``adaptive`` switches
    at (default: measured as it serves, from a prior of 0.75 N).
    """

    def __init__(
        self,
        model,
        nproc: int = 1,
        config: Optional[DistriConfig] = None,
        devices: Optional[Sequence[int]] = None,
        dtype: Optional[str] = None,
        timeout_s: Optional[float] = None,
        start_timeout_s: float = 300.0,
        policy: str = "latency",
        speedup: Optional[float] = None,
        controlnets: Sequence[str] = (),
        refiner: Optional[str] = None,
        loras: Sequence[str] = (),
    ) -> None:
        pipeline = {"controlnets": controlnets, "refiner": refiner, "loras": loras}
        self._configure(
            model, nproc, config, devices, dtype, timeout_s, start_timeout_s, policy, speedup, pipeline
        )
        self._start()
        _LIVE.add(self)

    def _configure(
        self, model, nproc, config, devices, dtype, timeout_s, start_timeout_s, policy, speedup, pipeline
    ) -> None:
        """Check every setting, before any process starts."""
        if config is not None and not isinstance(config, DistriConfig):
            raise InputTypeError(f"Engine: config must be a DistriConfig, got {type(config).__name__}")
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ConfigError(f"Engine: nproc={nproc!r} must be an integer >= 1")
        if devices is not None and len(devices) < nproc:
            raise ConfigError(f"Engine: {nproc} ranks need {nproc} devices, got devices={list(devices)}")
        if dtype not in (None, "float16", "bfloat16", "float32"):
            raise ConfigError(f"Engine: dtype={dtype!r} is not float16, bfloat16 or float32")
        self.spec = _pipeline_spec(model, config, dtype, **pipeline)
        config = self.spec.config
        self.nproc = nproc
        self.config = config
        self.policy = check_policy(policy)
        self.speedups = SpeedupEstimate(nproc, speedup)
        self._queue: List[_Waiting] = []
        self._queue_lock = threading.Lock()
        self.timeout_s = float(config.timeout_s if timeout_s is None else timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._setup = Setup(self.spec)
        self._devices = None if devices is None else list(devices)[:nproc]
        self._lock = threading.Lock()
        self._ranks: Optional[LaunchedRanks] = None
        self._closed = False
        self.restarts = 0
        self.failures = 0
        self.start_seconds = 0.0
        """How long the last start of the ranks took (what a restart is expected to take)."""
        self._ranks_class = LaunchedRanks

    @classmethod
    def of_torchrun_group(
        cls,
        model,
        config: Optional[DistriConfig] = None,
        dtype: Optional[str] = None,
        timeout_s: Optional[float] = None,
        start_timeout_s: float = 300.0,
        policy: str = "latency",
        speedup: Optional[float] = None,
        controlnets: Sequence[str] = (),
        refiner: Optional[str] = None,
        loras: Sequence[str] = (),
    ) -> "Engine":
        """An engine over the ranks torchrun started, on this node and others, called on rank 0
        (``torch.distributed`` initialised, e.g. by ``distripy.init()``); every other rank runs
        ``distripy.serving.worker.serve(None, rank)``. ``distripy serve`` under torchrun does both.
        These ranks cannot be restarted from here: after a failure ``restartable`` is false and
        the process should exit non-zero (torchrun's ``--max-restarts`` then restarts the group)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() != 0:
            raise EngineError(
                "Engine.of_torchrun_group: call it on rank 0 of an initialised torch.distributed group"
            )
        engine = cls.__new__(cls)
        pipeline = {"controlnets": controlnets, "refiner": refiner, "loras": loras}
        world = dist.get_world_size()
        engine._configure(
            model, world, config, None, dtype, timeout_s, start_timeout_s, policy, speedup, pipeline
        )
        engine._ranks_class = GroupRanks
        engine._start()
        _LIVE.add(engine)
        return engine

    @property
    def restartable(self) -> bool:
        """Whether the ranks can be started again after a failure (not those of a torchrun group)."""
        return self._ranks_class.restartable

    # -- the rank processes ----------------------------------------------------------------------

    def _start(self) -> None:
        started = time.monotonic()
        self._ranks = self._ranks_class(self.nproc, self._setup, self._devices, self.start_timeout_s)
        self._geometry = self._ranks.geometry
        self.start_seconds = time.monotonic() - started

    def restart(self) -> None:
        """Start the rank processes if they are stopped (after a failure); a no-op while they run.
        Raises ``EngineError`` if they cannot start."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> LaunchedRanks:
        if self._closed:
            raise EngineError("the engine is closed")
        if self._ranks is None and not self.restartable:
            raise EngineError("the ranks of this torchrun group failed and cannot be restarted from here")
        if self._ranks is None:
            self.restarts += 1
            self._start()
        return self._ranks

    def _discard(self) -> None:
        """Stop the ranks after a failure; the next request starts new ones."""
        if self._ranks is not None:
            self.failures += 1
            self._ranks.stop()
            self._ranks = None

    @property
    def pids(self) -> List[int]:
        """The rank processes' ids, by rank (empty while they are stopped)."""
        return [] if self._ranks is None else list(self._ranks.pids)

    @property
    def geometry(self) -> BandGeometry:
        """Where the model's images may be cut into bands (the ranks report it when they start)."""
        return self._geometry

    def bands(self, guidance_scale: Optional[float] = None) -> int:
        """Bands one image is cut into on these ranks: half the ranks each with the CFG split
        (``guidance_scale > 1``), all of them otherwise; 1 under ``throughput``, where every image
        is whole on one rank."""
        if self.policy == "throughput":
            return 1
        split = bool(self.config.split_batch) and (guidance_scale or 0) > 1
        return bands_per_image(self.nproc, split)

    def size_multiples(self, guidance_scale: Optional[float] = None) -> Tuple[int, int]:
        """The pixels an image's height and width must be multiples of: whole rows at the UNet's
        deepest level (the bands are cut in them, and may differ by one)."""
        return self._geometry.pixel_unit, self._geometry.pixel_unit

    def min_height(self, guidance_scale: Optional[float] = None) -> int:
        """The shortest image these ranks can cut into bands: one deepest-level row per band
        (``bands``)."""
        return self._geometry.min_height(self.bands(guidance_scale))

    @property
    def default_size(self) -> int:
        """The model's default image side in pixels (1024, SDXL's, when its UNet names none)."""
        return self._geometry.default_size or 128 * self._geometry.vae_scale

    @property
    def healthy(self) -> bool:
        """Whether the ranks are running (after a failure they are started at the next request)."""
        return self._ranks is not None and self._ranks.alive

    # -- requests --------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        *,
        seed: Optional[int] = None,
        scheduler: Optional[str] = None,
        timestep_spacing: Optional[str] = None,
        mode: Optional[str] = None,
        warmup_steps: Optional[int] = None,
        loras: Sequence[Tuple[str, float]] = (),
        control_images=(),
        init_image=None,
        strength: Optional[float] = None,
        refiner_start: Optional[float] = None,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
        timeout_s: Optional[float] = None,
        **arguments,
    ) -> list:
        """Generate on every rank and return the images (PIL): what ``distripy generate`` runs
        (``application.RequestRunner``). ``arguments``: the pipeline's own (``height``,
        ``width``, ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``,
        ``mask_image``, ``num_images_per_prompt``, ...). ``seed``: the generator's seed (default:
        drawn by rank 0). ``scheduler``: one of ``distripy.pipelines.schedulers.SCHEDULERS``,
        ``timestep_spacing``: ``leading``, ``trailing`` or ``linspace`` (default: its own);
        ``mode`` / ``warmup_steps``: for this request (default: the engine's config); ``loras``:
        ``(path, scale)`` pairs (a ``.safetensors`` or its folder) active for this request (each
        loaded once, named by its path as the command names it). ``control_images``: one
        condition per ControlNet of the engine (PIL images or files; none: the plain pipeline);
        ``init_image`` (and ``mask_image``, white repainted; ``strength``): img2img or inpainting,
        at the image's size unless ``height`` / ``width`` say; ``refiner_start``: where the
        engine's refiner takes over (default 0.8). Each value is checked here, and a bad one
        raises ``InputError`` / ``InputTypeError`` naming it before anything runs.
        ``progress(step, total)`` is called here as the ranks finish each step. Raises
        ``EngineError`` / ``EngineTimeoutError`` when the ranks fail or miss the deadline, the
        ``CommError`` of a failed transfer between them (the ranks are restarted for the next
        request), distripy's own errors the ranks raised alike as themselves
        (``BandGeometryError`` for a size that cannot be cut into bands), and the pipeline's own
        refusal of a bad argument as ``InputError`` / ``InputTypeError`` (``raised_by_ranks``)."""
        if prompt is not None:
            arguments["prompt"] = prompt
        call = GenerationRequest.of_call(
            arguments, seed=seed, scheduler=scheduler, timestep_spacing=timestep_spacing, mode=mode,
            warmup_steps=warmup_steps, loras=loras, control_images=control_images, init_image=init_image,
            strength=strength, refiner_start=refiner_start,
        )  # fmt: skip
        request = Generate(check_request(call, self.spec))
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else float(timeout_s))
        waiting = _Waiting(request, deadline, progress)
        with self._queue_lock:
            self._queue.append(waiting)
        while not waiting.done:
            with self._lock:  # one run at a time; whoever holds it runs the queue's next
                if not waiting.done:
                    self._run_next()
        if waiting.error is not None:
            raise waiting.error
        return waiting.images

    def _take(self) -> Tuple[bool, List[_Waiting]]:
        """The next run's requests, by the policy; those past their deadline fail here."""
        now = time.monotonic()
        with self._queue_lock:
            for late in [w for w in self._queue if w.deadline <= now]:
                error = EngineTimeoutError("the request's deadline passed while it waited in the queue")
                error.in_queue = True
                late.finish(error=error)
                self._queue.remove(late)
            if not self._queue:
                return False, []
            speedup = self.speedups.speedup(self._queue[0].kind)
            alone, count = plan_run(self.policy, len(self._queue), self.nproc, speedup)
            taken, self._queue[:count] = self._queue[:count], []
        return alone, taken

    def _run_next(self) -> None:
        """Run the queue's next requests on the ranks (the caller holds ``_lock``)."""
        alone, taken = self._take()
        if not taken:
            return
        started = time.monotonic()
        deadline = max(w.deadline for w in taken)
        try:
            ranks = self._ensure_started()
            if alone:
                timeout_s = math.ceil(max(0.0, deadline - started))
                ranks.send(Batch(tuple(w.request for w in taken), float(timeout_s)))
            else:
                ranks.send(taken[0].request)
            reply = ranks.receive(deadline, "request", taken[0].progress)
        except BaseException as error:  # failed or interrupted: the ranks cannot be trusted now
            self._discard()
            for other in taken:
                other.finish(
                    error=error if isinstance(error, EngineError) else EngineError(f"interrupted: {error!r}")
                )
            if not isinstance(error, Exception):
                raise
            return
        if isinstance(reply, BatchReplies) and alone:
            replies = list(reply.replies)
        elif isinstance(reply, (Images, Failure)):
            replies = [reply] * len(taken) if isinstance(reply, Failure) else [reply]
        else:
            replies = []
        for waiting, answer in zip(taken, replies):
            if isinstance(answer, Images):
                waiting.finish(images=answer.images)
                self.speedups.record(waiting.kind, alone, time.monotonic() - started)
            else:
                waiting.finish(error=raised_by_ranks(answer.exception()))
        for waiting in taken[len(replies) :]:  # never left waiting for a reply that will not come
            waiting.finish(error=EngineError(f"the ranks answered {reply!r} to {len(taken)} requests"))
        if not replies or any(answer.ranks_failed for answer in replies):
            self._discard()  # the ranks are out of step and ending: restarted for the next request

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """End every rank process (waiting for a request in progress to finish first)."""
        with self._lock:
            self._closed = True
            if self._ranks is not None:
                self._ranks.close(STOP_GRACE_S)
                self._ranks = None
        _LIVE.discard(self)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """No rank process outlives the interpreter that started it."""
    for engine in list(_LIVE):
        engine.close()
