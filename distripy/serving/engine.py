"""``Engine``: one object in one process that drives N patch-parallel ranks.

A web UI, a node graph or a job queue runs in one process; patch parallelism needs N processes
that each hold a share of the model. ``Engine(model, nproc=N)`` starts the N ranks with torch's
elastic launcher (``python -m torch.distributed.run --standalone``, as ``distripy generate
--nproc`` does), each loading the pipeline and parallelising it once (``serving.worker``), and
then turns each call into a request that every rank runs, returning the images to the caller.

The engine talks to rank 0 over a local authenticated connection; rank 0 broadcasts each request
to the other ranks. Every wait is bounded: the start (``start_timeout_s``) and each request (its
``timeout_s``, by default ``DistriConfig.timeout_s``). A request whose ranks fail (one died: the
connection closes) raises ``EngineError``; one past its deadline (a rank is stuck) raises
``EngineTimeoutError``. Either way the rank processes are stopped (every one of them: their
process ids are known from the start, and the launcher's children are found besides) and started
again before the next request. ``close()`` (or leaving a ``with`` block, or the interpreter's exit)
ends them; no process is left behind.

Calls may come from many threads at once: they wait in one queue, in arrival order, and the
``policy`` (``serving.scheduling``) decides how the ranks take them: each on all ranks
(``latency``), up to N at once, one per rank (``throughput``), or the first while the queue is
shorter than the patch-parallel speedup and the second beyond it (``adaptive``). The thread whose
request waits runs the next run for whoever is first; a request whose deadline passes while it
waits fails with ``EngineTimeoutError`` (``in_queue`` true) without touching the ranks.
"""

import atexit
import os
import pickle
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from distripy.config import DistriConfig
from distripy.errors import ConfigError, EngineError, EngineTimeoutError, InputError, InputTypeError
from distripy.pipelines.schedulers import scheduler_class_name
from distripy.serving.scheduling import SpeedupEstimate, check_policy, plan_run
from distripy.serving.worker import ADDRESS_VARIABLE, AUTHKEY_VARIABLE

__all__ = ["Engine"]

_POLL_S = 0.05
_STOP_GRACE_S = 5.0
# A call's errors the ranks raised alike, by the name of their type: raised again as these.
_REQUEST_ERRORS = {
    "ValueError": InputError,
    "TypeError": InputTypeError,
    "InputError": InputError,
    "InputTypeError": InputTypeError,
    "BandGeometryError": InputError,
    "ConfigError": InputError,
}


def _descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (Linux: read from /proc)."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill(pids: Sequence[int], wait_s: float = _STOP_GRACE_S) -> None:
    """SIGKILL each process (and its process group) and wait, bounded, until they have ended."""
    for pid in pids:
        for kill in (os.killpg, os.kill):  # a rank leads its own session (torch's launcher)
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + wait_s
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


class _Ranks:
    """One start of the rank processes: the launcher, the connection to rank 0, the ranks' ids."""

    restartable = True

    def __init__(self, nproc: int, setup: Dict[str, Any], devices, timeout_s: float) -> None:
        self.log = tempfile.TemporaryFile(mode="w+b")
        key = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self.listener.address
        env = dict(os.environ, **{ADDRESS_VARIABLE: f"{host}:{port}", AUTHKEY_VARIABLE: key.hex()})
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(device) for device in devices)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "--monitor-interval=0.1", "-m", "distripy.serving.worker",
        ]  # fmt: skip
        self.launcher = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pids: List[int] = []
        self.geometry: Dict[str, int] = {}
        self.connection = None
        deadline = time.monotonic() + timeout_s
        try:
            self.connection = self._accept(deadline)
            self.connection.send(setup)
            reply = self.receive(deadline, "start")
            if reply[0] != "ready":
                raise EngineError(f"the ranks did not start: {reply}")
            self.pids = list(reply[1])
            self.geometry = dict(reply[2])
        except BaseException:
            self.stop()
            raise

    def _accept(self, deadline: float):
        accepted: List[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(self.listener.accept()), daemon=True)
        thread.start()
        while thread.is_alive() and time.monotonic() < deadline and self.launcher.poll() is None:
            thread.join(_POLL_S)
        if not accepted:
            raise self.failure("start", timed_out=self.launcher.poll() is None)
        return accepted[0]

    def log_tail(self, lines: int = 12) -> str:
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def failure(self, what: str, timed_out: bool) -> EngineError:
        status = self.launcher.poll()
        state = "still running" if status is None else f"exit status {status}"
        kind = EngineTimeoutError if timed_out else EngineError
        reason = "did not finish in time" if timed_out else "failed"
        return kind(f"the engine's {what} {reason} (rank launcher {state}); its log ends:\n{self.log_tail()}")

    def receive(self, deadline: float, what: str, on_message: Optional[Callable] = None) -> Tuple:
        """The next reply from rank 0 that is not a progress message (which go to
        ``on_message``), by ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.failure(what, timed_out=True)
            try:
                ready = self.connection.poll(min(_POLL_S * 4, remaining))
                message = self.connection.recv() if ready else None
            except (EOFError, OSError):
                raise self.failure(what, timed_out=False) from None
            if message is None:
                if self.launcher.poll() is not None:
                    raise self.failure(what, timed_out=False)
                continue
            if message[0] == "progress":
                if on_message is not None:
                    on_message(*message[1:])
                continue
            return message

    def close(self, timeout_s: float) -> None:
        """Ask the ranks to finish, then stop whatever is left."""
        try:
            if self.connection is not None and self.launcher.poll() is None:
                self.connection.send({"kind": "close"})
                self.launcher.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.stop()

    def stop(self) -> None:
        """Kill every rank process and the launcher, and wait for the launcher."""
        if self.launcher.poll() is None:
            _kill(self.pids + _descendants(self.launcher.pid))
            _kill([self.launcher.pid])
        try:
            self.launcher.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        _kill(self.pids)  # ranks left by a launcher that had already exited
        for closable in (self.connection, self.listener, self.log):
            try:
                if closable is not None:
                    closable.close()
            except OSError:
                pass


class _Waiting:
    """One call in the queue: its request, deadline and progress callback, then its outcome."""

    def __init__(self, request: Dict[str, Any], deadline: float, progress: Optional[Callable]) -> None:
        self.request = request
        self.deadline = deadline
        self.progress = progress
        self.reply: Optional[Tuple] = None  # ("result", images) or ("error", kind, message)
        self.error: Optional[BaseException] = None
        self.done = False

    @property
    def kind(self) -> Tuple:
        """What its speed depends on: size, steps, images."""
        arguments = self.request["arguments"]
        return tuple(
            arguments.get(name)
            for name in ("height", "width", "num_inference_steps", "num_images_per_prompt")
        )

    def finish(self, reply: Optional[Tuple] = None, error: Optional[BaseException] = None) -> None:
        self.reply, self.error, self.done = reply, error, True


class _GroupRanks(_Ranks):
    """The ranks torchrun started, this process being rank 0 (``Engine.of_torchrun_group``): rank
    0's loop runs on a thread here, linked to the engine in-process; the others run
    ``serving.worker``'s loop in their own processes, on this node or others. They cannot be
    restarted from here: after a failure the engine is broken, and the process should exit
    non-zero so that torchrun (``--max-restarts``) restarts the whole group."""

    restartable = False

    def __init__(self, nproc: int, setup: Dict[str, Any], devices, timeout_s: float) -> None:
        from distripy.serving.worker import LocalLink, serve

        self.connection, rank_side = LocalLink.pair()
        self.error: Optional[BaseException] = None

        def run() -> None:
            try:
                serve(rank_side, 0)
            except BaseException as error:  # noqa: BLE001 - reported through failure()
                self.error = error

        self.thread = threading.Thread(target=run, name="distripy-rank-0", daemon=True)
        self.thread.start()
        self.launcher = self  # ``poll()``: None while rank 0's loop runs, as a launcher's
        self.connection.send(setup)
        reply = self.receive(time.monotonic() + timeout_s, "start")
        if reply[0] != "ready":
            raise EngineError(f"the ranks did not start: {reply}")
        self.pids = list(reply[1])
        self.geometry = dict(reply[2])

    def poll(self) -> Optional[int]:
        return None if self.thread.is_alive() else 1

    def log_tail(self, lines: int = 12) -> str:
        return repr(self.error) if self.error is not None else "(rank 0's loop ended)"

    def close(self, timeout_s: float) -> None:
        if self.thread.is_alive():
            self.connection.send({"kind": "close"})
            self.thread.join(timeout_s)

    def stop(self) -> None:
        """Nothing can be killed from here: the link closes, the thread is left to its fate."""
        self.connection.close()


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
            f"Engine: model must be a diffusers folder or a factory, got {type(model).__name__}"
        )
    if not (Path(model) / "model_index.json").is_file():
        raise InputError(f"Engine: {model} is not a diffusers pipeline folder (no model_index.json)")
    return str(model)


class Engine:
    """N rank processes serving one parallelised pipeline to this process (module docstring).

    ``model``: a local diffusers pipeline folder, or a picklable factory (a module-level function)
    that returns the pipeline. ``nproc``: ranks (one GPU each where there are GPUs: ``devices``
    lists which, default all; gloo processes on a CPU). ``config``: the ``DistriConfig`` every rank
    parallelises with. ``dtype``: ``"float16"``, ``"bfloat16"`` or ``"float32"`` (default: the
    model's own). ``timeout_s``: a request's deadline unless the call gives one (default the
    config's ``timeout_s``); ``start_timeout_s``: the ranks' start, loading included.
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
    ) -> None:
        self._configure(model, nproc, config, devices, dtype, timeout_s, start_timeout_s, policy, speedup)
        self._start()
        _LIVE.add(self)

    def _configure(
        self, model, nproc, config, devices, dtype, timeout_s, start_timeout_s, policy, speedup
    ) -> None:
        """Check every setting, before any process starts."""
        config = DistriConfig() if config is None else config
        if not isinstance(config, DistriConfig):
            raise InputTypeError(f"Engine: config must be a DistriConfig, got {type(config).__name__}")
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ConfigError(f"Engine: nproc={nproc!r} must be an integer >= 1")
        if devices is not None and len(devices) < nproc:
            raise ConfigError(f"Engine: {nproc} ranks need {nproc} devices, got devices={list(devices)}")
        if dtype not in (None, "float16", "bfloat16", "float32"):
            raise ConfigError(f"Engine: dtype={dtype!r} is not float16, bfloat16 or float32")
        self.nproc = nproc
        self.config = config
        self.policy = check_policy(policy)
        self.speedups = SpeedupEstimate(nproc, speedup)
        self._queue: List[_Waiting] = []
        self._queue_lock = threading.Lock()
        self.timeout_s = float(config.timeout_s if timeout_s is None else timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._setup = {"model": _check_model(model), "config": config, "dtype": dtype}
        self._devices = None if devices is None else list(devices)[:nproc]
        self._lock = threading.Lock()
        self._ranks: Optional[_Ranks] = None
        self._closed = False
        self.restarts = 0
        self.failures = 0
        self._ranks_class = _Ranks

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
        engine._configure(
            model, dist.get_world_size(), config, None, dtype, timeout_s, start_timeout_s, policy, speedup
        )
        engine._ranks_class = _GroupRanks
        engine._start()
        _LIVE.add(engine)
        return engine

    @property
    def restartable(self) -> bool:
        """Whether the ranks can be started again after a failure (not those of a torchrun group)."""
        return self._ranks_class.restartable

    # -- the rank processes ----------------------------------------------------------------------

    def _start(self) -> None:
        self._ranks = self._ranks_class(self.nproc, self._setup, self._devices, self.start_timeout_s)
        self._geometry = self._ranks.geometry

    def restart(self) -> None:
        """Start the rank processes if they are stopped (after a failure); a no-op while they run.
        Raises ``EngineError`` if they cannot start."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> _Ranks:
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

    def size_multiples(self, guidance_scale: Optional[float] = None) -> Tuple[int, int]:
        """The pixels an image's height and width must be multiples of: whole rows at the UNet's
        deepest level (the bands are cut in them, and may differ by one)."""
        per_row = self._geometry["vae_scale"] * 2 ** self._geometry["levels"]
        return per_row, per_row

    def min_height(self, guidance_scale: Optional[float] = None) -> int:
        """The shortest image these ranks can cut into bands: one deepest-level row per band (half
        the ranks each with the CFG split: ``guidance_scale > 1``). Under ``throughput`` every
        image is whole on one rank."""
        per_row = self.size_multiples(guidance_scale)[0]
        if self.policy == "throughput":
            return per_row
        split = self.config.split_batch and self.nproc % 2 == 0 and (guidance_scale or 0) > 1
        return per_row * (self.nproc // 2 if split else self.nproc)

    @property
    def default_size(self) -> int:
        """The model's default image side in pixels."""
        return self._geometry["default_size"]

    @property
    def healthy(self) -> bool:
        """Whether the ranks are running (after a failure they are started at the next request)."""
        return self._ranks is not None and self._ranks.launcher.poll() is None

    # -- requests --------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        *,
        seed: Optional[int] = None,
        scheduler: Optional[str] = None,
        mode: Optional[str] = None,
        warmup_steps: Optional[int] = None,
        loras: Sequence[Tuple[str, float]] = (),
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
        timeout_s: Optional[float] = None,
        **arguments,
    ) -> list:
        """Generate on every rank and return the images (PIL). ``arguments``: the pipeline's own
        (``height``, ``width``, ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``,
        images, ...). ``seed``: the generator's seed (default: drawn by rank 0). ``scheduler``:
        one of ``distripy.pipelines.schedulers.SCHEDULERS``; ``mode`` / ``warmup_steps``: for this
        request (default: the engine's config); ``loras``: ``(path to a .safetensors, scale)``
        pairs active for this request (each loaded once). ``progress(step, total)`` is called
        here as the ranks finish each step. Raises ``EngineError`` / ``EngineTimeoutError`` when
        the ranks fail or miss the deadline (they are restarted for the next request), and the
        pipeline's own refusal of a bad argument as ``InputError`` / ``InputTypeError``."""
        if scheduler is not None:
            scheduler_class_name(scheduler)
        if mode is not None or warmup_steps is not None:
            DistriConfig(mode=mode or self.config.mode, warmup_steps=warmup_steps or 0)  # checks them
        loras = [(str(Path(path)), float(scale)) for path, scale in loras]
        for path, _ in loras:
            if not Path(path).is_file():
                raise InputError(f"Engine: LoRA {path} is not a file (a .safetensors)")
        if prompt is not None:
            arguments["prompt"] = prompt
        request = {
            "kind": "generate",
            "arguments": arguments,
            "seed": seed,
            "scheduler": scheduler,
            "mode": mode,
            "warmup_steps": warmup_steps,
            "loras": loras,
        }
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
        reply = waiting.reply
        if reply[0] == "result":
            return reply[1]
        kind, message = reply[1], reply[2]
        raise _REQUEST_ERRORS.get(kind, EngineError)(f"the pipeline raised {kind}: {message}")

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
        try:
            ranks = self._ensure_started()
            if alone:
                ranks.connection.send({"kind": "batch", "requests": [w.request for w in taken]})
            else:
                ranks.connection.send(taken[0].request)
            reply = ranks.receive(max(w.deadline for w in taken), "request", taken[0].progress)
        except BaseException as error:  # failed or interrupted: the ranks cannot be trusted now
            self._discard()
            for other in taken:
                other.finish(
                    error=error if isinstance(error, EngineError) else EngineError(f"interrupted: {error!r}")
                )
            if not isinstance(error, Exception):
                raise
            return
        replies = list(reply[1]) if alone and reply[0] == "results" else [reply]
        for waiting, answer in zip(taken, replies):
            waiting.finish(reply=answer)
            if answer[0] == "result":
                self.speedups.record(waiting.kind, alone, time.monotonic() - started)
        for waiting in taken[len(replies) :]:  # never left waiting for a reply that will not come
            waiting.finish(error=EngineError(f"the ranks answered {len(replies)} of {len(taken)} requests"))

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """End every rank process (waiting for a request in progress to finish first)."""
        with self._lock:
            self._closed = True
            if self._ranks is not None:
                self._ranks.close(_STOP_GRACE_S)
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
