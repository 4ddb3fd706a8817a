"""Run a test function on N ranks as real processes joined by a torch.distributed process group.

This is how every multi-rank behaviour is tested without GPUs: each rank is a fresh process
(forked from a clean fork server, never from the test process) with a gloo process group, exactly
as under torchrun. The parent holds the rendezvous store on a port the operating system picks, so
concurrent runs never collide.

Failure handling is the point of this module:
  * an exception on any rank fails the run at once, with that rank's traceback, and the other
    ranks (possibly blocked in a collective waiting for it) are killed;
  * a rank that dies without reporting (segfault, os._exit) fails the run with its exit code;
  * a run that has not finished at its timeout is killed (SIGTERM, then SIGKILL) and fails,
    naming the ranks that had not finished -- a hung rank never hangs the test suite.
"""

import multiprocessing
import os
import pickle
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable, Dict, List

DEFAULT_TIMEOUT_S = 120.0
_KILL_GRACE_S = 5.0
_HOST = "127.0.0.1"
_PRELOAD = [
    "torch",
    "torch.distributed",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.schedulers.scheduling_ddim",
    "distripy.api",
]


class RankFailure(AssertionError):
    """A rank raised or died; the message holds the rank's traceback or exit code."""


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
        finally:
            dist.destroy_process_group()
        # Plain pickle (not multiprocessing's): tensors travel by value, not as shared-memory handles
        # that would die with this process.
        connection.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:
        connection.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        connection.close()


def _process_context():
    """Processes start from a fork server that has imported torch once, so each rank starts in
    well under a second instead of re-importing torch (seconds per rank on a small machine), and
    diffusers' UNet and schedulers (about ten seconds more). The server never touches CUDA, so
    ranks may use it, and it is single-threaded, so forking it is safe. A preload that fails to
    import is skipped by multiprocessing; the rank then imports it itself."""
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
    context = _process_context()
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
    deadline = time.monotonic() + timeout  # from now: the fork server's first start is not counted
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            pending = [c for rank, c in enumerate(connections) if rank not in results]
            ready = wait(pending, timeout=max(0.0, remaining)) if remaining > 0 else []
            if not ready:
                unfinished = sorted(set(range(world_size)) - set(results))
                raise RankTimeout(
                    f"{fn.__qualname__} on {world_size} ranks did not finish within {timeout:g} s; "
                    f"rank(s) {unfinished} still running were killed"
                )
            for connection in ready:
                rank = connections.index(connection)
                try:
                    status, payload = pickle.loads(connection.recv_bytes())
                except EOFError:
                    processes[rank].join(_KILL_GRACE_S)
                    raise RankFailure(
                        f"rank {rank} of {world_size} died without reporting "
                        f"(exit code {processes[rank].exitcode}) in {fn.__qualname__}"
                    ) from None
                if status == "error":
                    raise RankFailure(f"rank {rank} of {world_size} raised in {fn.__qualname__}:\n{payload}")
                results[rank] = payload
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()) + _KILL_GRACE_S)
        return [results[rank] for rank in range(world_size)]
    finally:
        _kill(processes)
        for connection in connections:
            connection.close()
        del store
