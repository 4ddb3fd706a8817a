"""``CommHealth``: the first failure of a family of communicators, so that nothing waits twice.

When a transfer fails (a peer died, stopped, or took longer than the timeout), the peers it needed
are likely gone for every other transfer too. A world comm and its subgroups (CFG split) share one
``CommHealth``: after the first failure every later transfer, wait and object exchange on any of
them raises at once, naming that first failure, instead of waiting out another timeout; and
cleanup (``PatchContext.drain``, ``distripy.reset``) skips its waits, so the error that surfaces
is the first one.
"""

from typing import Optional

from distripy.errors import CommError

__all__ = ["CommHealth"]


class CommHealth:
    def __init__(self) -> None:
        self.failure: Optional[CommError] = None

    @property
    def broken(self) -> bool:
        return self.failure is not None

    def record(self, error: CommError) -> CommError:
        """Remember ``error`` if it is the first failure; return it (to be raised)."""
        if self.failure is None:
            self.failure = error
        return error

    def check(self, what: str) -> None:
        """Raise at once if a transfer of this family failed before: ``what`` is not attempted."""
        if self.failure is not None:
            raise CommError(
                f"{what}: not attempted: an earlier transfer failed "
                f"({type(self.failure).__name__}: {self.failure})"
            ) from self.failure
