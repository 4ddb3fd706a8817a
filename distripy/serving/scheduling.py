"""How an ``Engine`` spends its N ranks on the requests waiting: its ``policy``.

* ``latency``: each request on all N ranks, patch-parallel: the one request finishes ~S times
  sooner than on one GPU (S, the patch-parallel speedup, below N).
* ``throughput``: up to N waiting requests at once, each whole on one rank (``distripy.alone``):
  no communication, N images per single-GPU time.
* ``adaptive``: patch-parallel while fewer than S requests wait, one request per rank when S or
  more do. With q requests waiting (q <= N), patch-parallel finishes them all after q T1 / S,
  one per rank after T1: the second is no later once q >= S. A short queue gets each image S
  times sooner; a deep one is drained at N images per T1 instead of S.

S is given (a fixed ``speedup=``, e.g. from ``distripy plan`` for the machine), or measured by the
engine as it serves: the seconds per image of the requests it ran one per rank over those it ran
patch-parallel, per image size and steps. Until both are measured for a size it takes what
``distripy.plan`` predicts for N GPUs at that size and step count (its built-in H100 NVLink
machine), or ``PRIOR_EFFICIENCY`` x N where the planner has no answer (a size it cannot cut).
"""

import threading
from typing import Callable, Dict, Hashable, Optional, Tuple

from distripy.errors import ConfigError, DistripyError

__all__ = ["POLICIES", "PRIOR_EFFICIENCY", "SpeedupEstimate", "plan_run"]

POLICIES = ("latency", "throughput", "adaptive")
PRIOR_EFFICIENCY = 0.75


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(f"Engine: policy={policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def plan_run(policy: str, waiting: int, nproc: int, speedup: float) -> Tuple[bool, int]:
    """``(alone, count)``: the next run takes the first ``count`` waiting requests, each on one
    rank by itself (``alone``), or the first one on all ranks, patch-parallel."""
    check_policy(policy)
    if waiting < 1:
        return False, 0
    if nproc == 1 or policy == "latency":
        return False, 1
    if policy == "throughput" or waiting >= speedup:
        return True, min(waiting, nproc)
    return False, 1


def planned_speedup(kind: Hashable, nproc: int) -> Optional[float]:
    """What ``distripy.plan`` predicts for the fastest configuration of exactly ``nproc`` GPUs for
    a request ``kind`` of (height, width, steps, ...); None where it cannot say."""
    from distripy.api import plan

    try:
        height, width, steps = kind[0], kind[1], kind[2] or 50
        planned = plan(nproc, (int(height), int(width)), int(steps))
    except (DistripyError, TypeError, ValueError, IndexError):
        return None
    ours = [c.speedup for c in planned.candidates if c.gpus == nproc]
    return max(ours) if ours else None


class SpeedupEstimate:
    """The patch-parallel speedup S per request kind (image size and steps): measured seconds per
    image one per rank over patch-parallel, or the prior (``speedup`` if given, else the planner's
    prediction for the kind, else ``PRIOR_EFFICIENCY`` x ``nproc``). Thread-safe."""

    def __init__(
        self,
        nproc: int,
        speedup: Optional[float] = None,
        predict: Callable[[Hashable, int], Optional[float]] = planned_speedup,
    ) -> None:
        if speedup is not None and not speedup > 0:
            raise ConfigError(f"Engine: speedup={speedup!r} must be a positive number")
        self.nproc = nproc
        self.fixed = speedup
        self.prior = speedup if speedup is not None else PRIOR_EFFICIENCY * nproc
        self._predict = predict
        self._predicted: Dict[Hashable, float] = {}
        self._seconds: Dict[Tuple[Hashable, bool], float] = {}
        self._lock = threading.Lock()

    def _prior_of(self, kind: Hashable) -> float:
        """The planner's prediction for ``kind`` (computed once), or the flat prior."""
        if self.nproc < 2:
            return self.prior
        predicted = self._predicted.get(kind)
        if predicted is None:
            predicted = self._predict(kind, self.nproc) or self.prior
            with self._lock:
                self._predicted[kind] = predicted
        return predicted

    def record(self, kind: Hashable, alone: bool, seconds_per_image: float) -> None:
        """One run's seconds per image (a moving average per kind and way of running)."""
        with self._lock:
            key = (kind, alone)
            previous = self._seconds.get(key)
            self._seconds[key] = (
                seconds_per_image if previous is None else 0.7 * previous + 0.3 * seconds_per_image
            )

    def speedup(self, kind: Hashable) -> float:
        if self.fixed is not None:
            return self.fixed
        with self._lock:
            alone, parallel = self._seconds.get((kind, True)), self._seconds.get((kind, False))
        if alone is None or parallel is None or parallel <= 0:
            return self._prior_of(kind)
        return alone / parallel
