"""``distripy.init()``: torch.distributed from torchrun's environment, once; ``launch_local``:
start that environment's processes on this machine (what ``torchrun --standalone`` does), the one
launcher of distripy's ranks: ``distripy generate --nproc N`` calls it in its own process, an
``Engine`` runs it in a process of its own (``launcher_command``: ``python -m
distripy.runtime.distributed N ARGUMENTS...``), which it can stop with every rank."""

import os
import re
import sys
import warnings
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

from distripy.config import DEFAULT_TIMEOUT_S
from distripy.errors import LaunchError, RanksFailedError

__all__ = ["init", "launch_local", "launcher_command", "run_python"]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tuple[int, int]:
    """Initialise torch.distributed from the environment torchrun sets, unless already done.

    ``backend`` defaults to ``nccl`` when CUDA is available (and then each process takes the GPU
    ``LOCAL_RANK``), else ``gloo``. Without torchrun's variables this is a single process and
    nothing is initialised. Returns ``(rank, world_size)``.

    ``timeout_s`` is the process group's own timeout: after a transfer failed (a peer died or
    stopped), tearing the group down at exit waits for the transfers still pending in it for up to
    this long. Give it ``DistriConfig.timeout_s`` (both default to ``DEFAULT_TIMEOUT_S``), so a
    process that raised ``CommTimeoutError`` also exits within about that time.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if len(missing) == len(_TORCHRUN_VARIABLES):
        return 0, 1
    if missing:
        raise LaunchError(
            f"distripy.init: the environment has some of torchrun's variables but not {', '.join(missing)}; "
            "launch with torchrun (or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    use_cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    device_id = None
    if use_cuda and backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"distripy.init: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs "
                "are visible"
            )
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)
    return dist.get_rank(), dist.get_world_size()


def launch_local(world: int, arguments: Sequence[str], preload: Sequence[str] = ()) -> None:
    """Run ``python *arguments`` as ``world`` local ranks, as ``torchrun --standalone
    --nproc-per-node world`` would, and wait for them. Each process gets an equal share of the CPU
    cores for its threads unless ``OMP_NUM_THREADS`` says otherwise; this process's environment is
    left as it was. Ranks that fail raise ``RanksFailedError`` with every failed rank's exit status.

    Where torch sees no GPU, ranks of ``-m MODULE ...`` or ``SCRIPT ...`` fork from a server
    process (multiprocessing's ``forkserver``, one per launching process, kept for its later
    launches) that has imported the modules named in ``preload`` once: each rank then starts in a
    fraction of a second instead of importing torch, diffusers and transformers again, which on a
    small CPU machine costs seconds of every core per rank. The server never touches a GPU and is
    single-threaded, so forking it is safe; the ranks meet at a store this process holds (as at
    torchrun's agent store), and once one has failed the others get ``FAILURE_GRACE_S`` to end on
    their own (after a collective error they all do, each with its status) before they are
    stopped. A forked rank names itself ``distripy-rank<RANK>`` (what ``ps`` and ``top`` show)
    where it can. With GPUs each rank is a fresh interpreter started by torch's elastic launcher,
    as ``torchrun`` starts it (a process forked after CUDA was initialised cannot use CUDA)."""
    import torch

    before = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    try:
        if not torch.cuda.is_available() and _runs_python_code(arguments):
            _launch_forked(world, arguments, preload)
        else:
            _launch_interpreters(world, arguments)
    finally:
        os.environ.clear()
        os.environ.update(before)


FAILURE_GRACE_S = 5.0
"""How long the other forked ranks may take to end on their own once one has failed."""


def _launch_forked(world: int, arguments: Sequence[str], preload: Sequence[str]) -> None:
    import multiprocessing
    from multiprocessing import forkserver

    import torch.distributed as dist
    import torch.multiprocessing as torch_mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    forkserver.ensure_running()  # it imports while this process starts the store
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    environment = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store.port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # every rank a client of this store, as under torchrun
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
    )
    ranks = torch_mp.start_processes(
        _forked_rank, args=(environment, tuple(arguments)), nprocs=world, join=False, start_method="forkserver"
    )
    try:
        while not ranks.join(grace_period=FAILURE_GRACE_S):
            pass
    except (torch_mp.ProcessExitedException, torch_mp.ProcessRaisedException):
        failed = {rank: process.exitcode for rank, process in enumerate(ranks.processes) if process.exitcode}
        raise RanksFailedError(failed) from None
    finally:
        for process in ranks.processes:  # left running only when this process was interrupted
            if process.is_alive():
                process.kill()
                process.join()
        del store


def _forked_rank(local_rank: int, environment: Dict[str, str], arguments: Tuple[str, ...]) -> None:
    """A forked rank: torchrun's variables for ``local_rank``, then ``run_python``; an exception
    is printed with its traceback and exits 1, as the interpreter would."""
    os.environ.clear()
    os.environ.update(environment, RANK=str(local_rank), LOCAL_RANK=str(local_rank))
    try:
        run_python(*arguments)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)


def _launch_interpreters(world: int, arguments: Sequence[str]) -> None:
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)(*arguments)
    except ChildFailedError as error:
        raise RanksFailedError({f.local_rank: f.exitcode for f in error.failures.values()}) from None


def _runs_python_code(arguments: Sequence[str]) -> bool:
    """Whether ``python *arguments`` runs a module (``-m MODULE``) or a script (no option first):
    what ``run_python`` does in a forked process."""
    if not arguments:
        return False
    return (arguments[0] == "-m" and len(arguments) > 1) or not arguments[0].startswith("-")


def run_python(*arguments: str) -> None:
    """``python *arguments`` in this (forked) rank process: ``-m MODULE ARGS`` or ``SCRIPT ARGS``
    run as ``__main__`` with that ``sys.argv``; torch's thread pool sized by ``OMP_NUM_THREADS``
    (which a forked process's OpenMP runtime read before the launcher set it). A ``SystemExit`` is
    the rank's exit status, as it would be for the interpreter."""
    import multiprocessing
    import runpy

    _name_this_rank()
    # As in a fresh interpreter: the platform's default start method, not the server's (a lock
    # made under ``forkserver`` -- tqdm makes one -- is tracked by name, and a rank killed
    # mid-run would leave it to the tracker with a warning).
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    if arguments[0] == "-m":
        sys.argv = [arguments[1], *arguments[2:]]
        # The server preloaded the module; running it again as ``__main__`` is what ``python -m``
        # does, and runpy's warning about it would be printed by every rank of every launch.
        warnings.filterwarnings(
            "ignore", message=f"'{re.escape(arguments[1])}' found in sys.modules", category=RuntimeWarning
        )
        runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(arguments)
        runpy.run_path(arguments[0], run_name="__main__")


def _name_this_rank() -> None:
    """Linux: ``distripy-rank<RANK>`` as this process's name (``/proc/PID/comm``, at most 15
    bytes): a forked rank's command line and initial environment are its server's, so this is
    what tells the ranks apart in ``ps`` and ``top``. Elsewhere, or without ``prctl``, nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        name = f"distripy-rank{os.environ.get('RANK', '')}".encode()[:15]
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def launcher_command(world: int, arguments: Sequence[str], preload: Sequence[str] = ()) -> List[str]:
    """The command line of a process that runs ``launch_local(world, arguments, preload)`` and
    exits with 0 when every rank did, else 1 (the ranks' exit statuses printed)."""
    modules = ["--preload", ",".join(preload)] if preload else []
    return [sys.executable, "-m", "distripy.runtime.distributed", *modules, str(world), *arguments]


def _main(argv: Sequence[str]) -> int:
    preload: List[str] = []
    if argv and argv[0] == "--preload":
        preload, argv = argv[1].split(","), argv[2:]
    try:
        launch_local(int(argv[0]), list(argv[1:]), preload)
    except RanksFailedError as error:
        print(f"distripy launcher: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
