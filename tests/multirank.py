"""Run a test function on N ranks as real processes joined by a torch.distributed process group.

This is how every multi-rank behaviour is tested without GPUs: each rank is a fresh process
(forked from a clean fork server, never from the test process) with a gloo process group, exactly
as under torchrun. The parent holds the rendezvous store on a port the operating system picks, so
concurrent runs never collide.

Failure handling is the point of this module:
  * an exception on any rank fails the run with one ``RankFailure`` that names the root cause
    first. When one rank raises, its peers blocked in a collective with it raise too ("Connection
    closed by peer"): those are consequences, not the cause. So every rank stamps its failure with
    the monotonic clock (system-wide on Linux, so comparable across processes) before it tears
    down its process group, the parent collects the other ranks' reports for a short grace period
    after the first one, and the failure that came first in time leads the message, the others
    follow as consequences. A rank that died without reporting (segfault, ``os._exit``: it could
    stamp nothing) leads before every stamped failure: a crash is a cause, not a consequence;
  * a run that has not finished at its timeout is killed (SIGTERM, then SIGKILL) and fails,
    naming the ranks that had not finished -- a hung rank never hangs the test suite;
  * whatever happens, every rank process is gone when ``run_on_ranks`` returns or raises.
"""

import multiprocessing
import os
import pickle
import time
import traceback
from datetime import timedelta
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Dict, List, Optional

DEFAULT_TIMEOUT_S = 120.0
_KILL_GRACE_S = 5.0
# After the first failure, how long the other ranks' reports are awaited (their consequences).
_FAILURE_GRACE_S = 5.0
_HOST = "127.0.0.1"
_PRELOAD = [
    "torch",
    "torch.distributed",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.schedulers.scheduling_ddim",
    "distripy.api",
]


@dataclass
class Failure:
    """How one rank failed: ``raised`` (with the monotonic time it did, and its traceback) or
    ``died`` without reporting (with its exit code)."""

    rank: int
    kind: str
    detail: str
    at: Optional[float] = None

    def order(self):
        return (self.kind != "died", self.at if self.at is not None else 0.0, self.rank)


class RankFailure(AssertionError):
    """One or more ranks raised or died. ``failures`` lists them root cause first; the message
    says the same, with each rank's traceback or exit code."""

    def __init__(self, message: str, failures: List[Failure]) -> None:
        super().__init__(message)
        self.failures = failures


class RankTimeout(AssertionError):
    """The run did not finish in time; the unfinished ranks were killed."""


def _rank_main(fn, rank, world_size, port, backend, timeout_s, connection, args, kwargs):
    """Entry point of one rank's process: join the process group, run fn, report to the parent."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=_HOST,
        MASTER_PORT=str(port),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share the machine's cores
        store = dist.TCPStore(_HOST, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        try:
            result = fn(rank, world_size, *args, **kwargs)
        except BaseException:
            # Stamped and reported before the teardown below wakes the peers up with errors of
            # their own, whose stamps are therefore later.
            _report(connection, ("error", time.monotonic(), traceback.format_exc()))
            dist.destroy_process_group()
            return
        dist.destroy_process_group()
        # Plain pickle (not multiprocessing's): tensors travel by value, not as shared-memory handles
        # that would die with this process.
        _report(connection, ("ok", None, result))
    except BaseException:  # joining or leaving the process group failed
        _report(connection, ("error", time.monotonic(), traceback.format_exc()))
    finally:
        connection.close()


def _report(connection, report) -> None:
    if not connection.closed:
        connection.send_bytes(pickle.dumps(report))
        connection.close()


def process_context():
    """The multiprocessing context ranks start from (``tests/failure_peer.py``'s ranks too).

    Processes start from a fork server that has imported torch once, so each rank starts in
    well under a second instead of re-importing torch (seconds per rank on a small machine), and
    diffusers' UNet and schedulers (about ten seconds more). The server never touches CUDA, so
    ranks may use it, and it is single-threaded, so forking it is safe. A preload that fails to
    import is skipped by multiprocessing; the rank then imports it itself.

    On a machine with a GPU the ranks are spawned instead (fresh interpreters): there the preload
    itself may initialise CUDA (an import that asks the device what it can do), and a process
    forked after that cannot use CUDA at all ("Cannot re-initialize CUDA in forked subprocess")."""
    import torch

    if torch.cuda.is_available():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _kill(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _KILL_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT_S,
    backend: str = "gloo",
    **kwargs: Any,
) -> List[Any]:
    """Runs ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; returns the results
    in rank order.

    ``fn`` must be importable by the spawned processes (a module-level function) and its arguments
    and result picklable. ``timeout`` (seconds) bounds the run from the moment all ranks have started.
    Raises RankFailure or RankTimeout as described in the module docstring.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")

    import torch.distributed as dist

    store = dist.TCPStore(
        _HOST,
        0,
        world_size=None,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout),
    )
    context = process_context()
    processes, connections = [], []
    for rank in range(world_size):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_rank_main,
            args=(fn, rank, world_size, store.port, backend, timeout, sender, args, kwargs),
            name=f"rank{rank}",
            daemon=True,
        )
        process.start()
        sender.close()  # the child holds the only writer, so its death shows up as EOF
        processes.append(process)
        connections.append(receiver)

    results: Dict[int, Any] = {}
    failures: Dict[int, Failure] = {}
    deadline = time.monotonic() + timeout  # from now: the fork server's first start is not counted
    wait_until = deadline  # after the first failure: a little longer, for its consequences
    try:
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            pending = [
                c for rank, c in enumerate(connections) if rank not in results and rank not in failures
            ]
            ready = wait(pending, timeout=max(0.0, wait_until - now)) if wait_until > now else []
            if not ready:
                if failures:
                    break
                unfinished = sorted(set(range(world_size)) - set(results))
                raise RankTimeout(
                    f"{fn.__qualname__} on {world_size} ranks did not finish within {timeout:g} s; "
                    f"rank(s) {unfinished} still running were killed"
                )
            for connection in ready:
                rank = connections.index(connection)
                try:
                    status, at, payload = pickle.loads(connection.recv_bytes())
                except EOFError:
                    processes[rank].join(_KILL_GRACE_S)
                    failure = Failure(rank, "died", f"exit code {processes[rank].exitcode}")
                else:
                    if status == "ok":
                        results[rank] = payload
                        continue
                    failure = Failure(rank, "raised", payload, at)
                if not failures:
                    wait_until = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
                failures[rank] = failure
        if failures:
            raise _rank_failure(fn, world_size, list(failures.values()))
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()) + _KILL_GRACE_S)
        return [results[rank] for rank in range(world_size)]
    finally:
        _kill(processes)
        for connection in connections:
            connection.close()
        del store


def _rank_failure(fn, world_size: int, failures: List[Failure]) -> RankFailure:
    """One error for the run: the root cause first, then the ranks that failed after it."""
    failures = sorted(failures, key=Failure.order)
    first = failures[0]

    def describe(failure: Failure) -> str:
        if failure.kind == "died":
            return f"rank {failure.rank} of {world_size} died without reporting ({failure.detail}) in {fn.__qualname__}"
        when = ""
        if failure is not first and first.at is not None:
            when = f", {failure.at - first.at:.3f} s after rank {first.rank}"
        return f"rank {failure.rank} of {world_size} raised in {fn.__qualname__}{when}:\n{failure.detail}"

    message = describe(first)
    if len(failures) > 1:
        message += "\n-- then, as consequences --\n" + "\n".join(describe(f) for f in failures[1:])
    return RankFailure(message, failures)


THREADS_TIMEOUT_S = 600.0
"""How long ``run_on_threads`` lets its threads run in all (their waits are bounded by the comm's
timeout; their compute is the body's)."""


def run_on_threads(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> List[Any]:
    """Runs ``fn(comm, *args)`` on ``world_size`` threads of this process, each with its rank's
    ``ThreadedComm`` of one ``ThreadedWorld`` whose waits are bounded by ``timeout_s``; returns the
    results in rank order. A rank that raises aborts the others (``ThreadedComm.abort``: their waits
    raise at once); the first cause is then raised here (an aborted wait's ``CommError`` only when
    nothing else was raised), once every thread ended, bounded by ``THREADS_TIMEOUT_S``."""
    import threading

    from distripy.errors import CommError
    from distripy.runtime.threaded_comm import ThreadedWorld

    world = ThreadedWorld(world_size, timeout_s)
    results: List[Any] = [None] * world_size
    errors: List[BaseException] = []

    def run(comm) -> None:
        try:
            results[comm.rank] = fn(comm, *args)
        except BaseException as error:  # noqa: BLE001 - raised by the caller's thread
            errors.append(error)
            comm.abort(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=run, args=(comm,), name=f"rank-{comm.rank}") for comm in world.comms()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + THREADS_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise RankTimeout(f"run_on_threads: a rank's thread of {fn.__qualname__} still ran after {THREADS_TIMEOUT_S:g} s")
    if errors:
        raise min(errors, key=lambda error: isinstance(error, CommError))  # a cause before its echoes
    return results
