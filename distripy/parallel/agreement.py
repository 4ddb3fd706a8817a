"""Before a collective piece of work: every rank reports its input, and all of them raise together.

A rank that raised alone would leave the others waiting in their next collective until the
timeout. So each wrapper first gathers, from every rank, a description of its input and the
problem it found in it (if any), and then every rank raises the same error: the first rank's
problem, or a ``RankMismatchError`` naming how the ranks' inputs differ.
"""

from typing import Any, Hashable, List, Optional, Tuple

from distripy.errors import RankMismatchError

__all__ = ["agree"]

Problem = Optional[Tuple[type, str]]


def agree(comm, description: Hashable, problem: Problem, what: str = "input") -> None:
    """Raise on every rank of ``comm`` if any rank has a problem or describes its input differently."""
    reports: List[Any] = comm.all_gather_object((description, problem))
    if problem is not None:
        kind, message = problem
        raise kind(message)
    rejected = [(rank, report[1]) for rank, report in enumerate(reports) if report[1] is not None]
    if rejected:
        rank, (_, message) = rejected[0]
        raise RankMismatchError(f"rank {rank} rejected its {what}: {message}")
    if any(report[0] != reports[0][0] for report in reports):
        table = "; ".join(f"rank {rank}: {report[0]}" for rank, report in enumerate(reports))
        raise RankMismatchError(f"the ranks were called with different {what}s: {table}")
