"""``LoopbackComm``: one process plays rank ``rank`` of ``world_size``; no link, no peers.

It measures exactly one rank's compute for an N-way split on one device -- the DistriFusion
paper's "no communication" column: the patch-parallel modules run with a band of the right size,
issue the same transfers with the same buffers at the same points of the step, and the transfers
complete at once, on the caller's stream, as if every other rank held a copy of this rank's data:

* ``all_gather``: every slot of ``recv`` receives ``send``;
* ``all_reduce``: ``buf`` times ``world_size`` (the sum over identical ranks);
* ``halo_exchange``: the rank above holds this band too, so its last rows (this rank's
  ``bottom_send``) arrive in ``top_recv``, and the rank below's first rows (``top_send``) in
  ``bottom_recv``; a first or last rank, which has no copy of that side to send, receives zeros;
* ``shift``: ``recv`` receives ``send``.

The copies are local memory traffic, as a real transfer's receive would be, and are legal inside
CUDA-graph capture. A ``TrafficLog`` passed as ``log`` records every transfer (operation, shapes,
bytes this rank sends and receives, and where in the step it was issued and first waited for).
"""

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence

from distripy.config import DEFAULT_TIMEOUT_S
from distripy.errors import ConfigError, InputError
from distripy.runtime.comm import (
    CompletedWork,
    check_all_gather,
    check_all_reduce,
    check_halo_exchange,
    check_shift,
)

__all__ = ["LoopbackComm", "LoopbackWork", "TrafficLog", "Transfer"]


@dataclass
class Transfer:
    """One transfer a rank issued. ``op``: ``all_gather``, ``all_reduce``, ``halo_exchange`` or
    ``shift``;
    ``sent`` / ``received``: bytes this rank puts on / takes off the link (an all-reduce is counted
    as its payload both ways; the algorithm's factor is the fabric model's business);
    ``issued_at`` / ``waited_at``: the log's clock when it was issued and first waited for
    (``None``: never waited for); ``step``: the log's step when it was issued."""

    op: str
    shape: tuple
    dtype: str
    world_size: int
    sent: int
    received: int
    step: int
    issued_at: Any
    waited_at: Any = None
    waited_step: Optional[int] = None
    group: Optional[int] = None


@dataclass
class TrafficLog:
    """The transfers of one or more ``LoopbackComm`` (a world and its subgroups share one log).

    ``clock``: called at each issue and first wait (default: none, positions are ``None``); e.g.
    ``time.perf_counter``, a FLOP counter's total, or a function recording a CUDA event. Set
    ``step`` before each UNet call to group the transfers by step."""

    clock: Optional[Callable[[], Any]] = None
    step: int = 0
    transfers: List[Transfer] = field(default_factory=list)
    groups: int = 0
    open_group: Optional[int] = None

    def now(self) -> Any:
        return None if self.clock is None else self.clock()

    def clear(self) -> None:
        self.transfers.clear()


class LoopbackWork:
    """Complete when issued; the first ``wait`` is recorded in the log."""

    def __init__(self, log: Optional[TrafficLog], transfer: Optional[Transfer]) -> None:
        self._log = log
        self._transfer = transfer

    def _record_wait(self) -> None:
        if self._transfer is not None and self._transfer.waited_at is None:
            self._transfer.waited_at = self._log.now()
            self._transfer.waited_step = self._log.step

    def wait(self) -> None:
        self._record_wait()

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        self._record_wait()

    def done(self) -> bool:
        return True


def _nbytes(tensor) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class LoopbackComm:
    """The ``Comm`` protocol for one process standing in for rank ``rank`` of ``world_size``."""

    supports_cuda_graphs = True
    broken = False  # no peer, nothing to fail

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        log: Optional[TrafficLog] = None,
    ) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise InputError(f"LoopbackComm: world_size must be a positive integer, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise InputError(f"LoopbackComm: rank {rank!r} is outside [0, {world_size})")
        if not timeout_s > 0:
            raise ConfigError(f"LoopbackComm: timeout_s must be positive, got {timeout_s!r}")
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.log = log

    def subgroup(self, ranks: Sequence[int]) -> "LoopbackComm":
        """The comm of the ranks ``ranks`` (which must include this one), sharing this log. With no
        peers there is nothing collective to do: the other ranks' groups are theirs."""
        ranks = sorted(int(r) for r in ranks)
        if self.rank not in ranks:
            raise InputError(f"LoopbackComm.subgroup: rank {self.rank} is not in {ranks}")
        return LoopbackComm(ranks.index(self.rank), len(ranks), self.timeout_s, self.log)

    def _record(self, op: str, shape, dtype, sent: int, received: int) -> LoopbackWork:
        if self.log is None:
            return LoopbackWork(None, None)
        transfer = Transfer(
            op=op,
            shape=tuple(shape),
            dtype=str(dtype),
            world_size=self.world_size,
            sent=sent,
            received=received,
            step=self.log.step,
            issued_at=self.log.now(),
            group=self.log.open_group,
        )
        self.log.transfers.append(transfer)
        return LoopbackWork(self.log, transfer)

    # -- the protocol ----------------------------------------------------------------------------

    def all_gather(self, send, recv) -> LoopbackWork:
        check_all_gather(send, recv, self.world_size)
        recv.copy_(send.unsqueeze(0).expand_as(recv))
        return self._record(
            "all_gather", send.shape, send.dtype, _nbytes(send), _nbytes(send) * (self.world_size - 1)
        )

    def all_reduce(self, buf) -> LoopbackWork:
        check_all_reduce(buf)
        buf.mul_(self.world_size)
        return self._record("all_reduce", buf.shape, buf.dtype, _nbytes(buf), _nbytes(buf))

    def halo_exchange(self, top_send, bottom_send, top_recv, bottom_recv) -> LoopbackWork:
        check_halo_exchange(self.rank, self.world_size, top_send, bottom_send, top_recv, bottom_recv)
        for recv, source in ((top_recv, bottom_send), (bottom_recv, top_send)):
            if recv is None or recv.numel() == 0:
                continue
            if source is not None and source.shape == recv.shape:
                recv.copy_(source)
            else:
                recv.zero_()
        present = [t for t in (top_send, bottom_send, top_recv, bottom_recv) if t is not None]
        return self._record(
            "halo_exchange",
            present[0].shape if present else (),
            present[0].dtype if present else None,
            _nbytes(top_send) + _nbytes(bottom_send),
            _nbytes(top_recv) + _nbytes(bottom_recv),
        )

    def shift(self, send, recv, distance: int) -> LoopbackWork:
        check_shift(send, recv, distance, self.world_size)
        recv.copy_(send)
        return self._record("shift", send.shape, send.dtype, _nbytes(send), _nbytes(recv))

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        log = self.log
        if log is None or log.open_group is not None:  # nested: the outermost scope counts
            yield
            return
        log.open_group = log.groups
        log.groups += 1
        try:
            yield
        finally:
            log.open_group = None

    def join(self) -> None:
        """Nothing to join: every transfer ran on the caller's stream."""

    def watch(self, what: str) -> CompletedWork:
        """Nothing to watch: no peer can stall a replay."""
        return CompletedWork()

    def track_graphs(self, holder) -> None:
        """Nothing to track: closing a loopback destroys nothing a graph holds."""

    def all_gather_object(self, obj: Any) -> List[Any]:
        return [obj] * self.world_size
