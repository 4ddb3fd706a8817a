"""``distripy.init()``: torch.distributed from torchrun's environment, once; ``launch_local``:
start that environment's processes on this machine (what ``torchrun --standalone`` does), the one
launcher of distripy's ranks: ``distripy generate --nproc N`` calls it in its own process, an
``Engine`` runs it in a process of its own (``launcher_command``: ``python -m
distripy.runtime.distributed N ARGUMENTS...``), which it can stop with every rank."""

import os
import sys
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple

from distripy.config import DEFAULT_TIMEOUT_S
from distripy.errors import LaunchError

__all__ = ["init", "launch_local", "launcher_command"]

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


def launch_local(world: int, arguments: Sequence[str]) -> None:
    """Run ``python *arguments`` as ``world`` local ranks with torch's elastic launcher (what
    ``torchrun --standalone --nproc-per-node world`` does) and wait for them. Each process gets an
    equal share of the CPU cores for its threads unless ``OMP_NUM_THREADS`` says otherwise; this
    process's environment is left as it was. A failed rank raises torch's ``ChildFailedError``."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    before = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
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
    finally:
        os.environ.clear()
        os.environ.update(before)


def launcher_command(world: int, arguments: Sequence[str]) -> List[str]:
    """The command line of a process that runs ``launch_local(world, arguments)`` and exits with
    0 when every rank did, else 1 (the ranks' exit statuses printed)."""
    return [sys.executable, "-m", "distripy.runtime.distributed", str(world), *arguments]


def _main(argv: Sequence[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_local(int(argv[0]), list(argv[1:]))
    except ChildFailedError as error:
        failures = "; ".join(f"rank {f.local_rank}: exit {f.exitcode}" for f in error.failures.values())
        print(f"distripy launcher: {failures}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
