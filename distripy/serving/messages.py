"""The messages between an ``Engine`` and its ranks, and the errors they carry.

The engine talks to rank 0 over a local authenticated connection (``multiprocessing``'s, which
pickles what it sends), and rank 0 passes the engine's messages on to the other ranks over the
world ``Comm``. Each message is a small dataclass, so that both sides name what they send and a
message of the wrong kind is an error, not a tuple read by position:

* engine -> ranks: ``Setup`` (once), then ``Generate`` (one request on every rank, patch-parallel)
  or ``Batch`` (up to N requests, one per rank, each alone), and finally ``Close``. Rank 0 passes
  ``Idle`` to the other ranks while the engine sends nothing, so that their waits stay bounded;
* ranks -> engine: ``Ready`` (every rank's process id and the model's ``BandGeometry``), then,
  per run, any number of ``Progress`` and one reply: ``Images``, ``Failure`` or ``BatchReplies``.

An exception crosses the link whole (``RaisedError``): the exception object itself, pickled, so
that a ``BandGeometryError`` raised on a rank is a ``BandGeometryError`` in the engine, with its
attributes. One that cannot be pickled, or rebuilt in the engine's process, arrives as a
``RemoteError`` naming its class and message.
"""

import dataclasses
import pickle
from typing import Optional, Tuple, Union

from distripy.application import GenerationRequest, PipelineSpec
from distripy.config import DistriConfig
from distripy.errors import EngineError
from distripy.geometry import BandGeometry

__all__ = [
    "ADDRESS_VARIABLE",
    "AUTHKEY_VARIABLE",
    "START_TIMEOUT_VARIABLE",
    "Batch",
    "BatchReplies",
    "Close",
    "Failure",
    "Generate",
    "Idle",
    "Images",
    "Progress",
    "RaisedError",
    "Ready",
    "RemoteError",
    "Setup",
]

ADDRESS_VARIABLE = "DISTRIPY_ENGINE_ADDRESS"
"""Where rank 0 connects to its engine (``host:port``), in the ranks' environment."""
AUTHKEY_VARIABLE = "DISTRIPY_ENGINE_AUTHKEY"
"""The connection's key (hex), in the ranks' environment."""
START_TIMEOUT_VARIABLE = "DISTRIPY_ENGINE_START_TIMEOUT_S"
"""The engine's ``start_timeout_s``: how long the ranks wait for each other while they start."""


# -- errors -------------------------------------------------------------------------------------


class RemoteError(EngineError):
    """An exception the ranks raised that cannot be rebuilt in this process (it cannot be pickled,
    or its class cannot be imported here): ``class_name`` names its class, the message is its
    own."""

    def __init__(self, class_name: str, message: str) -> None:
        super().__init__(f"the ranks raised {class_name}: {message}")
        self.class_name = class_name
        self.remote_message = message

    def __reduce__(self):
        return type(self), (self.class_name, self.remote_message)


def _class_name(error: BaseException) -> str:
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


@dataclasses.dataclass(frozen=True)
class RaisedError:
    """An exception as it crosses the link: itself, pickled (None when it cannot be: then only
    ``class_name`` and ``message`` cross)."""

    class_name: str
    message: str
    pickled: Optional[bytes] = None

    @classmethod
    def of(cls, error: BaseException) -> "RaisedError":
        """``error`` packed; pickled only if it comes back as itself (its class and message), which
        an exception whose ``__init__`` takes other arguments than it passes on does not."""
        pickled: Optional[bytes] = None
        try:
            data = pickle.dumps(error)
            copy = pickle.loads(data)
            if type(copy) is type(error) and str(copy) == str(error):
                pickled = data
        except Exception:  # noqa: BLE001 - whatever fails, the fallback below crosses instead
            pickled = None
        return cls(_class_name(error), str(error), pickled)

    def exception(self) -> BaseException:
        """The exception, rebuilt whole; a ``RemoteError`` naming it where that is not possible."""
        if self.pickled is not None:
            try:
                error = pickle.loads(self.pickled)
            except Exception:  # noqa: BLE001 - e.g. its class cannot be imported in this process
                error = None
            if isinstance(error, BaseException):
                return error
        return RemoteError(self.class_name, self.message)

    def same_as(self, other: "RaisedError") -> bool:
        """Whether ``other`` is the same failure (the ranks raised alike): its class and message."""
        return (self.class_name, self.message) == (other.class_name, other.message)


# -- engine -> ranks ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every rank loads and how it parallelises it, once at the start: the checked
    ``PipelineSpec`` (the model, a folder or a picklable factory; its dtype; the ControlNets, the
    refiner and the LoRAs loaded beside it; the ``DistriConfig``)."""

    spec: PipelineSpec

    @property
    def config(self) -> DistriConfig:
        return self.spec.config


@dataclasses.dataclass(frozen=True)
class Generate:
    """One request (``application.GenerationRequest``: the prompt, size, steps, images, LoRAs,
    scheduler, mode, ...), run by the ranks' ``RequestRunner``."""

    request: GenerationRequest

    @property
    def kind(self) -> Tuple:
        """What its speed depends on: size, steps, images per prompt."""
        return self.request.speed_key()

    def as_request(self) -> GenerationRequest:
        """The request as the rank's request runner takes it."""
        return self.request


@dataclasses.dataclass(frozen=True)
class Batch:
    """Up to N requests: rank r runs the r-th by itself (``distripy.alone``). ``timeout_s``: how
    long a rank that finished may wait for the others (the latest of the requests' deadlines)."""

    requests: Tuple[Generate, ...]
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class Close:
    """The ranks finish and exit."""


@dataclasses.dataclass(frozen=True)
class Idle:
    """Rank 0 to the other ranks: the engine has sent nothing yet (a heartbeat: every wait for the
    next message stays within the comm's timeout, and a rank that is gone is noticed)."""


# -- ranks -> engine ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ready:
    """The ranks have loaded and parallelised the pipeline."""

    pids: Tuple[int, ...]
    """Every rank's process id, by rank (so that the engine can stop them)."""
    geometry: BandGeometry
    """Where the model's images may be cut into bands (``BandGeometry.of_pipeline``)."""


@dataclasses.dataclass(frozen=True)
class Progress:
    """Rank 0 finished denoising step ``step`` of ``total`` (None: unknown)."""

    step: int
    total: Optional[int]


@dataclasses.dataclass(frozen=True)
class Images:
    """A request's images (PIL)."""

    images: list
    ranks_failed: bool = False
    """Some other rank failed after all: the ranks are ending, and the engine restarts them."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """A request's (or the ranks') failure. ``ranks_failed``: the ranks are out of step (they
    failed differently, or a transfer failed) and are ending; the engine restarts them. Otherwise
    every rank raised alike (an argument the pipeline refused) and they serve on."""

    error: RaisedError
    ranks_failed: bool = False

    @classmethod
    def of(cls, error: BaseException, ranks_failed: bool = False) -> "Failure":
        return cls(RaisedError.of(error), ranks_failed)

    def exception(self) -> BaseException:
        return self.error.exception()


@dataclasses.dataclass(frozen=True)
class BatchReplies:
    """A ``Batch``'s replies, one per request, in order."""

    replies: Tuple[Union[Images, Failure], ...]
