"""One rank of a 2-rank run in which rank 1 fails on purpose; run by ``tests/test_failures.py`` as a
process of its own (torchrun's environment variables), so the test can see when it exits: forked
from the suite's preloaded fork server (``run_forked``), or as a plain process
(``python tests/failure_peer.py``), which runs the same ``main`` and leaves the same way.

Environment: ``PATH_KIND`` (``unet``: a bare UNet loop; ``pipeline``: pipeline calls),
``FAILURE`` (``stop``: SIGSTOP; ``kill``: SIGKILL), ``FAIL_AT`` (the step of the second generation
at which rank 1 fails; -1: before that generation starts), ``T`` (seconds: the process group's and
``DistriConfig``'s timeout). Rank 0 prints one JSON line: when the failing generation began
(``time.monotonic()``, system-wide on Linux), how long until it raised, the error, and how long
``distripy.reset`` then took.
"""

import json
import os
import signal
import sys
import time
from typing import Dict, Optional

import torch

import distripy
from distripy.errors import CommError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_models import sdxl_conditioning, tiny_sdxl_unet  # noqa: E402

STEPS = (900, 800, 700)


def fail(rank: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP if os.environ["FAILURE"] == "stop" else signal.SIGKILL)


class UNetRun:
    """Two generations of a bare UNet loop."""

    def __init__(self, config) -> None:
        self.unet = distripy.parallelize(tiny_sdxl_unet(90), config)
        self.latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(91))
        self.conditioning = sdxl_conditioning(1, seed=92)

    def generation(self, rank: int, fail_at: Optional[int]) -> None:
        with torch.no_grad():
            for step, timestep in enumerate(STEPS):
                if step == fail_at:
                    fail(rank)
                self.unet(self.latent, timestep, **self.conditioning)
        distripy.reset(self.unet)


class PipelineRun:
    """Two pipeline calls; rank 1 fails from the step-end callback."""

    def __init__(self, config) -> None:
        from distripy.pipelines.tiny import tiny_sdxl_pipeline

        self.pipe = tiny_sdxl_pipeline(0)
        self.pipe.set_progress_bar_config(disable=True)
        distripy.parallelize(self.pipe, config)
        self.unet = self.pipe.unet

    def generation(self, rank: int, fail_at: Optional[int]) -> None:
        def on_step_end(pipe, step, timestep, callback_kwargs):
            if step + 1 == fail_at:
                fail(rank)
            return callback_kwargs

        self.pipe(
            "a lighthouse",
            height=64,
            width=64,
            num_inference_steps=len(STEPS),
            generator=torch.Generator().manual_seed(5),
            output_type="np",
            callback_on_step_end=on_step_end,
        )


def run_forked(environment: Dict[str, str], log_path: str) -> None:
    """A rank started by ``tests/multirank.py``'s ``process_context`` (forked from a server that
    has imported torch and diffusers, so it starts in a fraction of a second): the environment a
    plain process would have been given, its output into ``log_path``, then what a plain process
    runs, and the same exit."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.update(environment)
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives a plain process
    main()
    _leave()


def _leave() -> None:
    # The report main() printed is what the test checks. Past it, the interpreter's teardown would
    # destroy a gloo process group whose peer was killed -- torch's teardown, not distripy's failure
    # path (the command destroys its group explicitly; tests/test_failures.py's command test):
    # leave without it. Once in many CI runs a survivor ended in std::terminate ("terminate called
    # without an active exception") with no Python error; should it recur, the test's message
    # shows whether the report came first (teardown) or not (the failure path).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    timeout_s = float(os.environ["T"])
    fail_at = int(os.environ["FAIL_AT"])
    rank, _ = distripy.init(timeout_s=timeout_s)
    config = distripy.DistriConfig(
        mode="corrected_async_gn", warmup_steps=1, split_batch=False, timeout_s=timeout_s
    )
    run = (UNetRun if os.environ["PATH_KIND"] == "unet" else PipelineRun)(config)
    run.generation(rank, None)  # a whole generation first: everything set up and working
    report = {"started": time.monotonic()}
    try:
        if fail_at < 0:
            fail(rank)
        run.generation(rank, fail_at)
    except distripy.DistripyError as error:
        report["raised_after_s"] = time.monotonic() - report["started"]
        report["error"] = f"{type(error).__name__}: {error}"
        report["comm_error"] = isinstance(error, CommError)
    began = time.monotonic()
    distripy.reset(run.unet)
    report["reset_s"] = time.monotonic() - began
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
    _leave()
