"""One rank's denoising step as measured: where each of its transfers is issued and waited for.

A ``StepProfile`` holds a step's compute time and, for every transfer the rank issues in it, its
kind (``halo``, ``kv``, ``gn_stats``, ``output``), its bytes, the ``group()`` launch it belongs
to, where in the step it is issued and where it is waited for (as fractions of the step;
``waited_next``: in the next step, at that fraction). ``bench/e2e.py`` builds them from a
``LoopbackComm``'s ``TrafficLog`` with CUDA events recorded at every issue and wait (its
``profiles``): a measurement of the overlap the planner's model (``distripy.planning.predict``)
assumes. Nothing here predicts: the one performance model is ``distripy.planning``.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from distripy.geometry import bands_per_image

KINDS = ("halo", "kv", "gn_stats", "output")

def kind_of(op: str, shape: Sequence[int]) -> str:
    """The UNet's transfers by operation: halos are exchanged only by convolutions, all-reduces
    only carry GroupNorm sums, shifts carry one band's attention keys/values (``exact``), and
    all-gathers carry attention keys/values (one batch item's band, (L, 2C)) or, once per step,
    the output bands (B, C, H, W)."""
    if op == "halo_exchange":
        return "halo"
    if op == "all_reduce":
        return "gn_stats"
    if op == "shift":
        return "kv"
    return "output" if len(shape) == 4 else "kv"


@dataclass
class ProfiledTransfer:
    kind: str
    op: str
    world_size: int
    sent: int
    received: int
    group: Optional[int]
    issued: float
    waited: Optional[float]
    waited_next: bool


@dataclass
class StepProfile:
    """One step of one rank: ``phase`` is ``sync`` (warm-up) or ``async``."""

    phase: str
    compute_s: float
    transfers: List[ProfiledTransfer] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def profiles_from_log(
    log, marks: Sequence[Tuple[Any, Any]], seconds: Callable[[Any, Any], float], phases: Sequence[str]
) -> List[StepProfile]:
    """A ``StepProfile`` per step from a ``TrafficLog`` whose ``step`` was set to each step's index
    and whose clock gave each transfer's marks. ``marks[i]``: the clock at step i's start and end;
    ``seconds(a, b)``: the time between two marks; the last step serves only to see where the
    previous step's transfers are waited for."""
    steps = []
    for index in range(len(marks) - 1):
        start, end = marks[index]
        compute = seconds(start, end)
        profile = StepProfile(phases[index], compute)
        for t in log.transfers:
            if t.step != index:
                continue
            waited, waited_next = None, False
            if t.waited_step == index:
                waited = seconds(start, t.waited_at) / compute
            elif t.waited_step == index + 1:
                next_start, next_end = marks[index + 1]
                waited, waited_next = seconds(next_start, t.waited_at) / seconds(next_start, next_end), True
            profile.transfers.append(
                ProfiledTransfer(
                    kind=kind_of(t.op, t.shape),
                    op=t.op,
                    world_size=t.world_size,
                    sent=t.sent,
                    received=t.received,
                    group=t.group,
                    issued=min(max(seconds(start, t.issued_at) / compute, 0.0), 1.0),
                    waited=None if waited is None else min(max(waited, 0.0), 1.0),
                    waited_next=waited_next,
                )
            )
        steps.append(profile)
    return steps


def middle_rank(world_size: int, split_batch: bool) -> int:
    """A rank holding a middle band (halos on both sides when there are three bands or more): the
    rank the benchmarks measure (``e2e.py``, ``kernel_count.py``, ``host_overhead.py``, ...)."""
    return bands_per_image(world_size, split_batch) // 2
