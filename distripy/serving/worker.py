"""One rank of an ``Engine``: ``python -m distripy.serving.worker``, started by torch's elastic
launcher (``torch.distributed.run``) with the engine's address and key in its environment.

Rank 0 connects to the engine and receives the ``Setup`` (the checked ``PipelineSpec``), which it
passes on to the other ranks; every rank loads the pipeline on its device and parallelises it
once (``application.RequestRunner.start``), then rank 0 reports ``Ready`` (every rank's process
id, so that the engine can stop them, and the model's ``BandGeometry``). Then, until told to
``Close``: rank 0 receives a request and passes it on, every rank runs it (the application's
``RequestRunner``: ControlNets, img2img / inpainting, the refiner, LoRAs, as the command does),
rank 0 sends back the ``Images``, or the ``Failure`` with the exception itself
(``serving.messages``). A request that raised alike on every rank (a bad argument the pipeline
refused) is answered with the error and serving goes on; a failure of some ranks only, or of a
transfer (a lost peer, a timeout: a ``CommError``), is answered too, marked ``ranks_failed``, and
ends the process; the engine restarts the ranks. A ``Batch`` (the engine's ``throughput`` and
``adaptive`` policies) is up to N requests: rank r runs the r-th by itself (``runner.alone()``),
and rank 0 sends back every rank's images or error, each request's own.

The ranks pass messages over the world ``Comm`` (``all_gather_object``: every wait bounded by
its timeout, a failure recorded in its health): the engine's ``start_timeout_s`` while they start,
``DistriConfig.timeout_s`` from then on. While the engine sends nothing, rank 0 passes ``Idle``
to the others a few times per timeout, so that their wait for the next message is bounded too
and a rank that is gone is noticed.
"""

import os
import sys
from multiprocessing.connection import Client
from typing import Any, Callable, List, Optional

from distripy.application import RequestRunner
from distripy.config import DistriConfig
from distripy.errors import CommError, EngineError
from distripy.serving.messages import (
    ADDRESS_VARIABLE,
    AUTHKEY_VARIABLE,
    START_TIMEOUT_VARIABLE,
    Batch,
    BatchReplies,
    Close,
    Failure,
    Generate,
    Idle,
    Images,
    Progress,
    RaisedError,
    Ready,
    Setup,
)

__all__ = ["ADDRESS_VARIABLE", "AUTHKEY_VARIABLE", "RankChannel", "main", "serve"]

DEFAULT_START_TIMEOUT_S = 300.0
"""How long the ranks wait for each other while they start when the engine does not say (the
ranks of a torchrun group): ``Engine``'s default ``start_timeout_s``."""
HEARTBEATS_PER_TIMEOUT = 4


class RankChannel:
    """The engine's messages on every rank: rank 0 receives them from the engine (``connection``)
    and passes them on over the world ``Comm``; rank 0 alone sends the replies. On one rank there is
    no comm and nothing to pass on."""

    def __init__(self, connection, rank: int, timeout_s: float) -> None:
        self.connection = connection
        self.rank = rank
        self.timeout_s = timeout_s
        self.comm = self.world_comm(timeout_s)

    @staticmethod
    def world_comm(timeout_s: float):
        """A comm of every rank (torch.distributed's world) whose waits last at most ``timeout_s``;
        None on one rank. Host-side objects only, so torch.distributed's, whatever the pipeline's
        transfers use."""
        import torch.distributed as dist

        from distripy.runtime.factory import make_world_comm

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return make_world_comm(DistriConfig(comm_backend="torch", timeout_s=timeout_s))

    def retime(self, timeout_s: float) -> None:
        """From now on, wait at most ``timeout_s`` for the other ranks."""
        self.timeout_s = timeout_s
        self.comm = self.world_comm(timeout_s)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.comm is None:
            return value
        return self.comm.all_gather_object(value if self.rank == 0 else None)[0]

    def gather(self, value: Any, timeout_s: Optional[float] = None) -> List[Any]:
        """Every rank's ``value``, in rank order (waiting at most ``timeout_s``, by default the
        channel's)."""
        if self.comm is None:
            return [value]
        comm = self.comm if timeout_s is None or timeout_s <= self.timeout_s else self.world_comm(timeout_s)
        return comm.all_gather_object(value)

    def next_message(self) -> Any:
        """The engine's next message, on every rank. While none comes, rank 0 passes ``Idle`` on
        a few times per timeout: no rank waits longer than the timeout for the others."""
        heartbeat_s = self.timeout_s / HEARTBEATS_PER_TIMEOUT
        while True:
            message = None
            if self.rank == 0:
                message = self.connection.recv() if self.connection.poll(heartbeat_s) else Idle()
            message = self.broadcast(message)
            if not isinstance(message, Idle):
                return message

    def send(self, message: Any) -> None:
        """To the engine (rank 0; the other ranks send nothing)."""
        if self.rank == 0:
            self.connection.send(message)

    def progress(self) -> Optional[Callable[[int, Optional[int]], None]]:
        """Rank 0's report of each finished step to the engine; the other ranks report nothing."""
        if self.rank != 0:
            return None
        return lambda step, total: self.connection.send(Progress(step, total))


def serve(connection, rank: int, start_timeout_s: Optional[float] = None) -> None:
    """Rank ``rank``'s loop (module docstring) until the engine says ``Close``. ``connection``:
    rank 0's link to the engine (None on the other ranks). ``start_timeout_s``: how long the ranks
    wait for each other while they start (default: what the engine set in the environment, else
    ``DEFAULT_START_TIMEOUT_S``)."""

    if start_timeout_s is None:
        start_timeout_s = float(os.environ.get(START_TIMEOUT_VARIABLE, DEFAULT_START_TIMEOUT_S))
    channel = RankChannel(connection, rank, start_timeout_s)
    setup = channel.next_message()
    if not isinstance(setup, Setup):
        raise EngineError(f"engine rank {rank}: expected the setup, got {setup!r}")
    try:
        runner = RequestRunner.start(setup.spec)
        geometry = runner.geometry
    except Exception as error:  # noqa: BLE001 - the engine learns why, then this rank ends
        channel.send(Failure.of(error, ranks_failed=True))
        raise
    pids = channel.gather(os.getpid())
    channel.send(Ready(tuple(pids), geometry))
    channel.retime(setup.config.timeout_s)
    while True:
        message = channel.next_message()
        if isinstance(message, Close):
            return
        if isinstance(message, Batch):
            _run_alone(runner, message, channel)
        elif isinstance(message, Generate):
            _run_together(runner, message, channel)
        else:
            raise EngineError(f"engine rank {rank}: unexpected message {message!r}")


def _run_together(runner: RequestRunner, request: Generate, channel: RankChannel) -> None:
    """Every rank runs ``request``, patch-parallel; rank 0 answers. When the ranks did not fail
    alike (some failed, or failed otherwise), or a transfer failed, they are out of step: the
    answer says so and this rank ends (raises)."""
    images, error = None, None
    try:
        images = runner.run(request.as_request(), channel.progress())
    except Exception as raised:  # noqa: BLE001 - reported to the caller, then judged below
        error = raised
    mine = None if error is None else RaisedError.of(error)
    try:
        everyone = channel.gather(mine)
        alike = all(_same_failure(other, mine) for other in everyone)
    except CommError as lost:  # a rank is gone: nothing more can be done together
        everyone, alike = None, False
        error = error if error is not None or images is not None else lost
        mine = None if error is None else RaisedError.of(error)
    ranks_failed = not alike or isinstance(error, CommError)
    channel.send(Images(images, ranks_failed) if mine is None else Failure(mine, ranks_failed))
    if ranks_failed:
        raise EngineError(
            f"engine rank {channel.rank}: the ranks are out of step (their failures: {everyone})"
        ) from error


def _same_failure(one: Optional[RaisedError], other: Optional[RaisedError]) -> bool:
    if one is None or other is None:
        return one is other
    return one.same_as(other)


def _run_alone(runner: RequestRunner, batch: Batch, channel: RankChannel) -> None:
    """Rank r runs ``batch.requests[r]`` (if there is one) by itself; rank 0 sends every reply, in
    order. A rank that finishes first waits for the others up to the batch's deadline."""
    requests = batch.requests
    reply = None
    runner.prepare([request.as_request() for request in requests])  # the same on every rank
    if channel.rank < len(requests):
        try:
            with runner.alone():
                images = runner.run(requests[channel.rank].as_request(), channel.progress())
            reply = Images(images)
        except Exception as error:  # noqa: BLE001 - this request's own failure, reported
            reply = Failure.of(error)
    try:
        replies = channel.gather(reply, timeout_s=max(batch.timeout_s, channel.timeout_s))
    except CommError as lost:
        channel.send(Failure.of(lost, ranks_failed=True))
        raise
    channel.send(BatchReplies(tuple(replies[: len(requests)])))


def main() -> int:
    import distripy

    rank, _ = distripy.init()
    connection = None
    if rank == 0:
        host, _, port = os.environ[ADDRESS_VARIABLE].rpartition(":")
        connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_VARIABLE]))
    try:
        serve(connection, rank)
    finally:
        if connection is not None:
            connection.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
