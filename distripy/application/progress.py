"""``StepProgress``: the one step callback of a generation (``callback_on_step_end``)."""

import time
from typing import Callable, List, Optional

__all__ = ["StepProgress"]


class StepProgress:
    """Reports ``(step, total)`` after each denoising step (or nothing) and records when each
    ended. ``sync_device``: a CUDA device to wait for first, so that the times are the GPU's
    (the command's per-step timings); a server's progress does not wait.

    Every rank passes one of these: the ranks compare their calls, a callback by its type."""

    def __init__(
        self,
        report: Optional[Callable[[int, Optional[int]], None]] = None,
        total: Optional[int] = None,
        sync_device=None,
    ) -> None:
        self.report = report
        self.total = total
        self.sync_device = sync_device
        self.ends: List[float] = []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        if self.sync_device is not None and self.sync_device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.sync_device)
        self.ends.append(time.perf_counter())
        if self.report is not None:
            self.report(step + 1, self.total)
        return callback_kwargs
