"""One rank of an ``Engine``: ``python -m distripy.serving.worker``, started by torch's elastic
launcher (``torch.distributed.run``) with the engine's address and key in its environment.

Rank 0 connects to the engine and receives the setup (the model: a folder or a factory; the
``DistriConfig``; the dtype), which it broadcasts to the other ranks; every rank loads the
pipeline on its device and ``parallelize``s it once, then reports ready (with every rank's process
id, so that the engine can stop them). Then, until told to close: rank 0 receives a request and
broadcasts it, every rank runs it (``RequestRunner``), rank 0 sends back the images, or the error.
A request that raised alike on every rank (a bad argument the pipeline refused) is answered with
the error and serving goes on; a failure of some ranks only (a lost peer, a timeout) ends the
process, and the engine restarts the ranks. A *batch* (the engine's ``throughput`` and
``adaptive`` policies) is up to N requests: rank r runs the r-th by itself (``distripy.alone``),
and rank 0 sends back every rank's images or error, each request's own.
"""

import hashlib
import os
import queue
import sys
from multiprocessing.connection import Client
from typing import Any, Callable, Dict, List, Optional, Tuple

from distripy.errors import EngineError

ADDRESS_VARIABLE = "DISTRIPY_ENGINE_ADDRESS"
AUTHKEY_VARIABLE = "DISTRIPY_ENGINE_AUTHKEY"


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> List[Any]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def load_pipeline(setup: Dict[str, Any]):
    """The pipeline the setup names, on this rank's device, in its dtype."""
    import diffusers
    import torch

    dtype = getattr(torch, setup["dtype"]) if setup.get("dtype") else None
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
    )
    model = setup["model"]
    if callable(model):
        pipe = model()
        if dtype is not None:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def geometry(pipe) -> Dict[str, Any]:
    """What a size check needs: pixels per latent row, the UNet's downsamplings, the default size."""
    from distripy.pipelines.unet import count_downsamplings

    vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
    sample_size = pipe.unet.config.sample_size
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    return {
        "vae_scale": vae_scale,
        "levels": count_downsamplings(pipe.unet),
        "default_size": sample_size * vae_scale,
    }


class RequestRunner:
    """What changes between requests without a restart: the scheduler, the mode, the LoRA adapters
    (each path loaded once, as adapter ``lora<n>``; the request's set active with its scales)."""

    def __init__(self, pipe, config) -> None:
        self.pipe = pipe
        self.scheduler_config = pipe.scheduler.config
        self.scheduler_class = type(pipe.scheduler)
        self.scheduler = "default"
        self.default_mode = (config.mode, config.warmup_steps)
        self.mode = self.default_mode
        self.adapters: Dict[str, str] = {}  # LoRA path -> adapter name

    def _set_scheduler(self, name: str) -> None:
        import diffusers

        from distripy.pipelines.schedulers import scheduler_class_name

        if name == self.scheduler:
            return
        class_name = scheduler_class_name(name)
        cls = self.scheduler_class if class_name is None else getattr(diffusers, class_name)
        self.pipe.scheduler = cls.from_config(self.scheduler_config)
        self.scheduler = name

    def _set_mode(self, mode: Optional[str], warmup_steps: Optional[int]) -> None:
        """The request's mode and warm-up; the engine's configuration's where it names none."""
        import distripy

        wanted = (
            mode or self.default_mode[0],
            self.default_mode[1] if warmup_steps is None else warmup_steps,
        )
        if wanted != self.mode:
            distripy.reconfigure(self.pipe, mode=wanted[0], warmup_steps=wanted[1])
            self.mode = wanted

    def load_loras(self, paths: List[str]) -> None:
        """Load the LoRAs not loaded yet. Before a batch every rank loads every request's, so that
        the ranks keep the same adapters whatever each ran alone."""
        from pathlib import Path

        for path in paths:
            if path not in self.adapters:
                # named by its path, not by the order of loading: ranks that ran different
                # requests alone must still name the same adapter alike (the ranks compare them)
                name = "lora_" + hashlib.sha256(path.encode()).hexdigest()[:12]
                file = Path(path)
                self.pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
                self.adapters[path] = name

    def _set_loras(self, loras: List[Tuple[str, float]]) -> None:
        self.load_loras([path for path, _ in loras])
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([self.adapters[path] for path, _ in loras], [scale for _, scale in loras])
        elif self.adapters:
            self.pipe.disable_lora()

    def run(self, request: Dict[str, Any], progress: Optional[Callable[[int, int], None]]) -> list:
        import torch

        self._set_scheduler(request.get("scheduler") or "default")
        self._set_mode(request.get("mode"), request.get("warmup_steps"))
        self._set_loras(request.get("loras") or [])
        arguments = dict(request["arguments"])
        seed = request.get("seed")
        if seed is not None:
            arguments["generator"] = torch.Generator().manual_seed(int(seed))
        # Every rank passes a callback of the same kind (the ranks compare their calls); rank 0's
        # reports each step.
        arguments["callback_on_step_end"] = StepProgress(progress, arguments.get("num_inference_steps"))
        return list(self.pipe(**arguments, output_type="pil").images)


class StepProgress:
    """A pipeline's ``callback_on_step_end`` that reports ``(step, total)`` (or nothing)."""

    def __init__(self, report: Optional[Callable[[int, Optional[int]], None]], total: Optional[int]) -> None:
        self.report = report
        self.total = total

    def __call__(self, pipe, step, timestep, callback_kwargs):
        if self.report is not None:
            self.report(step + 1, self.total)
        return callback_kwargs


def serve(connection, rank: int) -> None:
    import distripy

    setup = _broadcast(connection.recv() if rank == 0 else None)
    pipe = distripy.parallelize(load_pipeline(setup), setup["config"])
    runner = RequestRunner(pipe, setup["config"])
    pids = _gather(os.getpid())
    if rank == 0:
        connection.send(("ready", pids, geometry(pipe)))
    while True:
        request = _broadcast(connection.recv() if rank == 0 else None)
        if request.get("kind") == "close":
            return
        if request.get("kind") == "batch":
            _run_alone(pipe, runner, request["requests"], rank, connection)
            continue
        progress = _progress_reporter(connection, rank)
        try:
            reply, failure = ("result", runner.run(request, progress)), None
        except Exception as error:  # noqa: BLE001 - reported to the caller, then judged below
            reply, failure = ("error", type(error).__name__, str(error)), (type(error).__name__, str(error))
        failures = _gather(failure)
        if rank == 0:
            connection.send(reply)
        if failure is not None and any(other != failure for other in failures):
            # some ranks failed, or failed otherwise: they are out of step; the engine restarts them
            raise EngineError(f"engine rank {rank}: the ranks failed differently: {failures}")


def _progress_reporter(connection, rank: int) -> Optional[Callable[[int, Optional[int]], None]]:
    """Rank 0's report of each finished step to the engine; the other ranks report nothing."""
    if rank != 0:
        return None
    return lambda step, total: connection.send(("progress", step, total))


def _run_alone(pipe, runner: "RequestRunner", requests: List[Dict[str, Any]], rank: int, connection) -> None:
    """Rank r runs ``requests[r]`` (if there is one) by itself; rank 0 sends every reply, in order."""
    import distripy

    reply = None
    runner.load_loras([path for request in requests for path, _ in request.get("loras") or []])
    if rank < len(requests):
        try:
            with distripy.alone(pipe):
                reply = ("result", runner.run(requests[rank], _progress_reporter(connection, rank)))
        except Exception as error:  # noqa: BLE001 - this request's own failure, reported
            reply = ("error", type(error).__name__, str(error))
    replies = _gather(reply)
    if rank == 0:
        connection.send(("results", replies[: len(requests)]))


class LocalLink:
    """One end of an in-process connection (``send``, ``recv``, ``poll``, ``close``, as
    ``multiprocessing.connection``'s): between an engine and rank 0's loop when rank 0 is this
    very process (``Engine.of_torchrun_group``)."""

    def __init__(self, inbox: "queue.Queue", outbox: "queue.Queue") -> None:
        self._inbox, self._outbox = inbox, outbox
        self._held: List[Any] = []
        self.closed = False

    @classmethod
    def pair(cls) -> Tuple["LocalLink", "LocalLink"]:
        one, two = queue.Queue(), queue.Queue()
        return cls(one, two), cls(two, one)

    def send(self, message: Any) -> None:
        if self.closed:
            raise EngineError("the link to rank 0 is closed")
        self._outbox.put(message)

    def poll(self, timeout: float = 0.0) -> bool:
        if not self._held:
            try:
                self._held.append(self._inbox.get(timeout=max(0.0, timeout)))
            except queue.Empty:
                return False
        return True

    def recv(self) -> Any:
        if self._held:
            return self._held.pop()
        return self._inbox.get()

    def close(self) -> None:
        self.closed = True


def main() -> int:
    import distripy

    rank, _ = distripy.init()
    connection = None
    if rank == 0:
        host, _, port = os.environ[ADDRESS_VARIABLE].rpartition(":")
        connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_VARIABLE]))
    try:
        serve(connection, rank)
    finally:
        if connection is not None:
            connection.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
