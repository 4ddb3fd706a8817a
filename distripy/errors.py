"""The exceptions distripy raises, so that callers can tell its failures apart.

Each one's message names the offending value (module path, shape, rank) and, where there is one,
the remedy.
"""

__all__ = [
    "BandGeometryError",
    "CommError",
    "CommTimeoutError",
    "RankMismatchError",
    "UnsupportedModuleError",
]


class BandGeometryError(ValueError):
    """The image cannot be cut into whole-row bands for this many ranks."""


class UnsupportedModuleError(TypeError):
    """The model holds a spatial module that patch parallelism cannot run exactly."""


class RankMismatchError(RuntimeError):
    """The ranks were called with inputs that disagree (or one of them rejected its input)."""


class CommError(RuntimeError):
    """A communication operation failed."""


class CommTimeoutError(CommError, TimeoutError):
    """A communication operation did not complete within its timeout (a peer is dead or stuck)."""
