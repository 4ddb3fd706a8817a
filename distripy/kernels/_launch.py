"""A Triton launch held as data: the kernel, its grid and its arguments.

Each kernel module builds its launches in one function that the op calls, so that what runs on a
GPU and what ``bench/compile_report.py`` (and its CI test) compiles for a GPU target on a CPU are
the same arguments, specialised the same way by Triton.
"""

from typing import Any, Callable, Dict, NamedTuple, Tuple, Union

__all__ = ["Launch"]


class Launch(NamedTuple):
    """``kernel[grid](*args, **kwargs)``. ``grid`` is a tuple, or a function of the chosen
    configuration's meta-parameters when ``kernel`` is autotuned."""

    kernel: Any
    grid: Union[Tuple[int, ...], Callable[[Dict[str, Any]], Tuple[int, ...]]]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)
