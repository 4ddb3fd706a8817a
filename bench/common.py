"""What every benchmark shares: the environment record, where results go, timing, writing JSON.

The benchmarks are scripts run from the repository root (``python bench/e2e.py``,
``torchrun --nproc-per-node 8 bench/comm.py``); Python then puts ``bench/`` on the import path, so
they import this module and each other by plain name (``from common import ...``). That is the
one way: no script edits ``sys.path``. The test suite puts ``bench/`` on the path the same way
(``tests/test_bench.py``).

* ``environment(**extra)``: the record every result file carries -- host, device, library
  versions (torch, diffusers, triton, CUDA, cuDNN, and the native runtime's NCCL / CUDA runtime /
  driver and build info when it loads), the git commit of the sources, and the exact command;
* ``results_path(name, *tags)``: ``bench/results/<name>-<tags>-<UTC time>.json``;
* ``write_json(path, data)``: written whole or not at all (a temporary file, then a rename);
* ``cuda_time_ms(fn, ...)``: the median CUDA-event time of back-to-back calls.
"""

import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
RESULTS = HERE / "results"

__all__ = ["RESULTS", "cuda_time_ms", "environment", "results_path", "timestamp", "write_json"]


def timestamp() -> str:
    """Now, in UTC, as it appears in result file names (``20261124T120000Z``)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _git_commit() -> Optional[str]:
    """The commit the benchmarked sources are at, with ``+dirty`` when they differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _versions() -> Dict[str, Any]:
    versions: Dict[str, Any] = {"python": platform.python_version()}
    for name in ("distripy", "torch", "diffusers", "triton"):
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    return versions


def _cuda() -> Dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": platform.processor() or "cpu"}
    info: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "devices": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    with contextlib.suppress(Exception):
        from distripy.runtime import native

        C = native()
        info.update(
            nccl=".".join(map(str, C.nccl_version())),
            cuda_runtime=".".join(map(str, C.cuda_runtime_version())),
            cuda_driver=".".join(map(str, C.cuda_driver_version())),
            build_info=C.build_info(),
        )
    return info


def environment(**extra: Any) -> Dict[str, Any]:
    """The record of where and how a result was made; ``extra`` adds the benchmark's own settings."""
    return {
        "host": socket.gethostname(),
        **_cuda(),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "command": " ".join([sys.executable] + sys.argv),
        "time": timestamp(),
        **extra,
    }


def results_path(name: str, *tags: str) -> Path:
    """``bench/results/<name>-<tag>...-<UTC time>.json``; tags are made file-name safe."""
    safe = [str(t).replace(" ", "-").replace("/", "-") for t in tags if t]
    return RESULTS / ("-".join([name, *safe, timestamp()]) + ".json")


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path``, whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2, default=str))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def cuda_time_ms(
    fn: Callable[[], object], iters: int, repeats: int, before: Optional[Callable] = None
) -> float:
    """Median over ``repeats`` of the CUDA-event time of ``iters`` back-to-back ``fn()`` calls, per
    call, in milliseconds. ``before`` runs ahead of each repetition (e.g. a barrier across ranks)."""
    import torch

    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / iters)
    return statistics.median(samples)
