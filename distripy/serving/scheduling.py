"""How an ``Engine`` spends its N ranks on the requests waiting: its ``policy``.

* ``latency``: each request on all N ranks, patch-parallel: the one request finishes ~S times
  sooner than on one GPU (S, the patch-parallel speedup, below N).
* ``throughput``: up to N waiting requests at once, each whole on one rank (``distripy.alone``):
  no communication, N images per single-GPU time.
* ``adaptive``: patch-parallel while fewer than S requests wait, one request per rank when S or
  more do. With q requests waiting (q <= N), patch-parallel finishes them all after q T1 / S,
  one per rank after T1: the second is no later once q >= S. A short queue gets each image S
  times sooner; a deep one is drained at N images per T1 instead of S.

S is what ``bench/scaling.py`` predicts for the machine (a fixed ``speedup=``), or measured by
the engine as it serves: the seconds per image of the requests it ran one per rank over those it
ran patch-parallel, per image size and steps. Until both are measured for a size it assumes
``PRIOR_EFFICIENCY`` x N: the scaling model's 8-GPU NVLink prediction for SDXL with CFG split is
5.7x at 1024² and 6.6x at 2048² (0.72 and 0.83 of N).
"""

import threading
from typing import Dict, Hashable, Optional, Tuple

from distripy.errors import ConfigError

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


class SpeedupEstimate:
    """The patch-parallel speedup S per request kind (image size and steps): measured seconds per
    image one per rank over patch-parallel, or the prior (``speedup`` if given, else
    ``PRIOR_EFFICIENCY`` x ``nproc``). Thread-safe."""

    def __init__(self, nproc: int, speedup: Optional[float] = None) -> None:
        if speedup is not None and not speedup > 0:
            raise ConfigError(f"Engine: speedup={speedup!r} must be a positive number")
        self.fixed = speedup
        self.prior = speedup if speedup is not None else PRIOR_EFFICIENCY * nproc
        self._seconds: Dict[Tuple[Hashable, bool], float] = {}
        self._lock = threading.Lock()

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
            return self.prior
        return alone / parallel
