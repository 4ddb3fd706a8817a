"""Before a collective piece of work: every rank reports its input, and all of them raise together.

A rank that raised alone would leave the others waiting in their next collective until the
timeout. So each wrapper first gathers, from every rank, a description of its input and the
problem it found in it (if any), and then every rank raises the same error: the first rank's
problem, or a ``RankMismatchError`` naming how the ranks' inputs differ. A description that is a
dict (argument name -> digest, ``parallel.digest``) is compared per name, and the error names the
arguments that differ and which ranks hold which variant.
"""

from typing import Any, Hashable, List, Optional, Tuple

from distripy.errors import RankMismatchError

__all__ = ["agree"]

Problem = Optional[Tuple[type, str]]


def agree(comm, description: Hashable, problem: Problem, what: str = "input", shared: Any = None) -> List[Any]:
    """Raise on every rank of ``comm`` if any rank has a problem or describes its input differently.
    The error raised is marked ``collective = True``: every rank raised it (a command line reports
    it once). ``shared``: a value each rank contributes to the same round (rank 0's seed); returns
    every rank's, by rank."""
    reports: List[Any] = comm.all_gather_object((description, problem, shared))
    error = None
    rejected = [(rank, report[1]) for rank, report in enumerate(reports) if report[1] is not None]
    descriptions = [report[0] for report in reports]
    if problem is not None:
        kind, message = problem
        error = kind(message)
    elif rejected:
        rank, (_, message) = rejected[0]
        error = RankMismatchError(f"rank {rank} rejected its {what}: {message}")
    elif any(d != descriptions[0] for d in descriptions):
        error = RankMismatchError(
            f"the ranks were called with different {what}s: {_differences(descriptions)}"
        )
    if error is not None:
        error.collective = True
        raise error
    return [report[2] for report in reports]


def _differences(descriptions: List[Any]) -> str:
    if not all(isinstance(d, dict) for d in descriptions):
        return "; ".join(f"rank {rank}: {d}" for rank, d in enumerate(descriptions))
    names = list(dict.fromkeys(name for d in descriptions for name in d))
    return "; ".join(
        f"{name} ({_variants([d.get(name) for d in descriptions])})"
        for name in names
        if any(d.get(name) != descriptions[0].get(name) for d in descriptions)
    )


def _variants(values: List[Any]) -> str:
    """``ranks 0, 2: 5.0 | rank 1: 9.0``: short plain values as they are, tensors by shape and
    dtype (or ``values differ`` when those agree)."""
    groups: List[Tuple[Any, List[int]]] = []
    for rank, value in enumerate(values):
        for known, ranks in groups:
            if known == value:
                ranks.append(rank)
                break
        else:
            groups.append((value, [rank]))
    shapes = {value[1:3] for value, _ in groups if _is_tensor_digest(value)}
    shown = []
    for value, ranks in groups:
        text = f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}"
        if _is_tensor_digest(value):
            text += f": {value[2]} {value[1]}" if len(shapes) > 1 else ": values differ"
        elif isinstance(value, (int, float, str, type(None))) and len(repr(value)) <= 40:
            text += f": {value!r}"
        shown.append(text)
    return " | ".join(shown)


def _is_tensor_digest(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) >= 3 and value[0] == "tensor"
