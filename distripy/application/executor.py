"""``ThreadedExecutor``: the ranks of one image as worker threads of this process, one per device.

A program that keeps its models in its own process (a node graph, a web UI) cannot hand distripy a
launcher of rank processes; it can give it devices. The executor keeps one worker thread per
device for its whole life (a device's streams, CUDA graphs and current device stay with one
thread), and the ranks' communicators between them (``runtime.ThreadedComm``). What runs on the
workers is the caller's: ``run(fn)`` calls ``fn(rank)`` on every worker at once and returns their
results in rank order, typically each rank's own replica of a model, parallelised with
``executor.comm(rank)``, making one step of its band.

The caller's grad mode and inference mode (thread-local in torch) hold on the workers for the
call. A worker that raises aborts the communicators (the others' waits raise at once, instead of
waiting out the timeout) and its error is raised by ``run`` once every worker has returned; the
executor is then ``broken`` (its communicators failed) and is to be closed and made anew. A
worker that does not return within ``timeout_s`` is a ``CommTimeoutError``.

Devices: all CPU (one process's ranks on the CPU, the communicators the threads' own: the tests'
executor), or all CUDA, one GPU each: each worker makes its rank's NCCL communicator on its GPU
(the C++ runtime, ``runtime.NcclComm`` with the threads' comm for its host-side exchanges), all at
once, as NCCL's initialisation requires.
"""

import concurrent.futures
import contextlib
from typing import Any, Callable, List, Sequence

import torch

from distripy.config import DEFAULT_TIMEOUT_S
from distripy.errors import CommError, CommTimeoutError, ConfigError, StepError
from distripy.runtime.factory import thread_rank_comm
from distripy.runtime.threaded_comm import ThreadedWorld

__all__ = ["ThreadedExecutor"]


def _devices(devices: Sequence) -> List[torch.device]:
    """``devices`` as torch devices, checked: at least one; all CPU, or distinct GPUs that exist."""
    if isinstance(devices, (str, torch.device)) or not len(devices):
        raise ConfigError(f"ThreadedExecutor: devices={devices!r} must be a non-empty list of devices")
    parsed = []
    for device in devices:
        try:
            parsed.append(torch.device(device))
        except (RuntimeError, TypeError) as error:
            raise ConfigError(f"ThreadedExecutor: device {device!r} is not a device ({error})") from None
    kinds = {device.type for device in parsed}
    if kinds == {"cpu"}:
        return parsed
    if kinds != {"cuda"}:
        raise ConfigError(
            f"ThreadedExecutor: devices {[str(d) for d in parsed]} must be all CPU or all CUDA devices"
        )
    parsed = [torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index) for d in parsed]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in parsed:
        if device.index >= visible:
            raise ConfigError(f"ThreadedExecutor: device {device} asked for, but this machine has {visible} GPUs")
    if len(set(parsed)) < len(parsed):
        raise ConfigError(f"ThreadedExecutor: devices {[str(d) for d in parsed]} name a GPU twice: one rank per GPU")
    return parsed


class ThreadedExecutor:
    """``len(devices)`` ranks, one worker thread each (module docstring). ``timeout_s``: the
    longest a transfer, and a ``run`` call's wait for a worker, may take."""

    def __init__(self, devices: Sequence, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.devices = _devices(devices)
        self.world = ThreadedWorld(len(self.devices), timeout_s)
        self._hosts = self.world.comms()  # the threads' own: host-side exchanges, and aborts
        self._comms: List = list(self._hosts)
        self._workers = [
            concurrent.futures.ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"distripy-rank-{rank}",
                initializer=torch.cuda.set_device if device.type == "cuda" else None,
                initargs=(device,) if device.type == "cuda" else (),
            )
            for rank, device in enumerate(self.devices)
        ]
        self._closed = False
        if self.devices[0].type == "cuda":  # made on the workers, all at once
            self._comms = self.run(lambda rank: thread_rank_comm(self._hosts[rank], self.devices[rank], timeout_s))

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def timeout_s(self) -> float:
        return self.world.timeout_s

    @property
    def broken(self) -> bool:
        """Whether a worker or a transfer failed: the communicators refuse every operation since."""
        return self.world.health.broken or any(comm.broken for comm in self._comms)

    def comm(self, rank: int):
        """Rank ``rank``'s communicator (for that rank's worker only): its ``ThreadedComm`` on CPU,
        its ``NcclComm`` on a GPU."""
        return self._comms[rank]

    def run(self, fn: Callable[[int], Any]) -> List[Any]:
        """``fn(rank)`` on every worker at once, under the caller's grad and inference modes; the
        results in rank order (module docstring for failures)."""
        if self._closed:
            raise StepError("ThreadedExecutor.run: the executor was closed")
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def call(rank: int) -> Any:
            modes = torch.inference_mode() if inference else contextlib.nullcontext()
            with modes, torch.set_grad_enabled(grad):
                try:
                    return fn(rank)
                except BaseException as error:
                    self._hosts[rank].abort(f"{type(error).__name__}: {error}")
                    raise

        futures = [worker.submit(call, rank) for rank, worker in enumerate(self._workers)]
        done, pending = concurrent.futures.wait(futures, timeout=self.timeout_s)
        if pending:
            self.world.fail(CommTimeoutError(f"ThreadedExecutor.run: a worker did not return within {self.timeout_s:g} s"))
            raise CommTimeoutError(
                f"ThreadedExecutor.run: ranks {[futures.index(f) for f in pending]} did not return within "
                f"{self.timeout_s:g} s"
            )
        errors = [future.exception() for future in futures if future.exception() is not None]
        if errors:  # the cause first: the others' errors are the aborted transfers it left
            raise min(errors, key=lambda error: isinstance(error, CommError))
        return [future.result() for future in futures]

    def close(self) -> None:
        """Close the GPUs' communicators (each on its worker; bounded by ``timeout_s``) and stop
        the workers."""
        if self._closed:
            return
        try:
            if any(comm is not host for comm, host in zip(self._comms, self._hosts)):
                self.run(lambda rank: self._comms[rank].close())
        finally:
            self._closed = True
            for worker in self._workers:
                worker.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ThreadedExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
