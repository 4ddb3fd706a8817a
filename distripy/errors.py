"""The exceptions distripy raises, so that callers can tell its failures apart.

Every one derives from ``DistripyError``: ``except distripy.errors.DistripyError`` catches
whatever the library refuses or fails at, and nothing else. Each also keeps the built-in base a
caller would catch without knowing distripy (``BandGeometryError`` is a ``ValueError``,
``CommTimeoutError`` a ``TimeoutError``, ...). Each message names the offending value (module
path, shape, rank, setting) and, where there is one, the remedy.
"""

__all__ = [
    "BandGeometryError",
    "CommError",
    "CommTimeoutError",
    "ConfigError",
    "DistripyError",
    "EngineError",
    "EngineTimeoutError",
    "InputError",
    "InputTypeError",
    "LaunchError",
    "NativeRuntimeUnavailable",
    "RankMismatchError",
    "RanksFailedError",
    "StepError",
    "UnsupportedModuleError",
]


class DistripyError(Exception):
    """The root of every error distripy raises."""


class ConfigError(DistripyError, ValueError):
    """A ``DistriConfig`` setting is invalid, or names a backend this machine or build cannot run."""


class InputError(DistripyError, ValueError):
    """An argument has a value distripy cannot use: a shape, dtype, device, rank or count that does
    not fit, or a model in the wrong state (already, or not, patch-parallel)."""


class InputTypeError(DistripyError, TypeError):
    """An argument is of a type distripy does not accept."""


class BandGeometryError(InputError):
    """The image cannot be cut into whole-row bands for this many ranks."""


class UnsupportedModuleError(DistripyError, TypeError):
    """The model holds a spatial module that patch parallelism cannot run exactly."""


class StepError(DistripyError, RuntimeError):
    """A patch-parallel step was driven in a way it cannot run (a module called twice in one step,
    a stale exchange that was never made, a buffer first made inside a CUDA-graph capture)."""


class RankMismatchError(DistripyError, RuntimeError):
    """The ranks were called with inputs that disagree (or one of them rejected its input)."""


class LaunchError(DistripyError, RuntimeError):
    """The process cannot join its ranks: a partial torchrun environment, a missing GPU."""


class RanksFailedError(LaunchError):
    """Ranks that ``launch_local`` started did not all exit with 0. ``exit_codes`` maps each rank
    that failed to its exit status (negative: the signal that ended it), every failed rank, not
    only the first."""

    def __init__(self, exit_codes):
        self.exit_codes = dict(sorted(exit_codes.items()))
        described = "; ".join(f"rank {rank}: exit {code}" for rank, code in self.exit_codes.items())
        super().__init__(described or "no rank failed")


class NativeRuntimeUnavailable(DistripyError, ImportError):
    """``distripy._C`` cannot be used in this installation; the message says why and what to do."""


class CommError(DistripyError, RuntimeError):
    """A communication operation failed."""


class CommTimeoutError(CommError, TimeoutError):
    """A communication operation did not complete within its timeout (a peer is dead or stuck)."""


class EngineError(DistripyError, RuntimeError):
    """A request to an ``Engine`` failed because its rank processes did (one died, or could not
    start); the engine restarts them for the next request."""


class EngineTimeoutError(EngineError, TimeoutError):
    """A request to an ``Engine`` did not finish by its deadline (a rank is stuck or too slow); its
    rank processes were stopped and are restarted for the next request."""
