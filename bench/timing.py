"""CUDA-event timing shared by the benchmarks: the median over repetitions of back-to-back calls."""

import statistics
from typing import Callable, Optional

import torch


def cuda_time_ms(
    fn: Callable[[], object], iters: int, repeats: int, before: Optional[Callable] = None
) -> float:
    """Median over ``repeats`` of the CUDA-event time of ``iters`` back-to-back ``fn()`` calls, per
    call, in milliseconds. ``before`` runs ahead of each repetition (e.g. a barrier across ranks)."""
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
