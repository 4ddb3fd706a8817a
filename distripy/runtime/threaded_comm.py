"""``ThreadedComm``: the ``Comm`` protocol between threads of one process, one thread per rank.

An in-process executor (one worker thread per device, each with its own replica of a model) needs
its ranks to exchange without processes: ``ThreadedWorld(n)`` holds what ``n`` threads share, and
``world.comm(rank)`` is rank ``rank``'s communicator, to be used by that rank's thread only. It
keeps the protocol's contract as the process-based comms do: every operation is checked before
it is issued and returns a ``Work``; ``wait``/``synchronize`` block for at most the timeout and
raise ``CommTimeoutError`` when a peer does not come; the first failure poisons the world and its
subgroups (``runtime.health``), after which every operation raises at once; ``subgroup`` is
collective and must partition the ranks.

How an operation travels: the ranks of a group number their operations in the order they issue
them (as NCCL's ranks must issue theirs); each rank posts its buffers under that number, without
blocking, and the rank that posts last moves the data between every rank's buffers and completes
the operation for all of them. So a rank may wait for its operations in any order (no wait
depends on another rank's wait), and a rank's send buffer is read before its ``wait`` returns
(the protocol's rule: untouched until then). A ``group()`` scope posts its operations when it
closes, as the other comms issue theirs. Two ranks that issued different operations under one
number fail the operation, on every rank that waits for it, naming both.

The copies are plain ``Tensor.copy_`` calls on the posting thread: for CPU tensors (the executor's
tests) they are the transfer; on GPUs the executor's ranks use the C++ runtime's per-device
communicators instead (a device-to-device copy from a foreign thread would not order against the
receiver's stream).
"""

import contextlib
import threading
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

from distripy.config import DEFAULT_TIMEOUT_S
from distripy.errors import CommError, CommTimeoutError, ConfigError, InputError
from distripy.runtime.comm import (
    check_all_gather,
    check_all_reduce,
    check_halo_exchange,
    check_partition,
    check_shift,
)
from distripy.runtime.health import CommHealth

__all__ = ["ThreadedComm", "ThreadedWork", "ThreadedWorld"]


class _Operation:
    """One numbered operation of one group: what each rank posted, and its outcome."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.parts: Dict[int, Any] = {}
        self.size = size
        self.done = False
        self.error: Optional[BaseException] = None
        self.result: Any = None


class ThreadedWorld:
    """What the ``world_size`` threads of one process share: their operations in flight and the
    health of their communicators (one family: the world and every subgroup)."""

    def __init__(self, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise InputError(f"ThreadedWorld: world_size must be a positive integer, got {world_size!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ConfigError(f"ThreadedWorld: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.health = CommHealth()
        self._changed = threading.Condition()
        self._operations: Dict[Tuple[Hashable, int], _Operation] = {}

    def comm(self, rank: int) -> "ThreadedComm":
        """Rank ``rank``'s communicator of the whole world (for that rank's thread only)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise InputError(f"ThreadedWorld.comm: rank {rank!r} is outside [0, {self.world_size})")
        return ThreadedComm(self, tuple(range(self.world_size)), rank, ())

    def comms(self) -> List["ThreadedComm"]:
        """Every rank's communicator, in rank order."""
        return [self.comm(rank) for rank in range(self.world_size)]

    # -- operations --------------------------------------------------------------------------------

    def post(
        self, key: Tuple[Hashable, int], kind: str, size: int, rank: int, part: Any, perform: Callable
    ) -> _Operation:
        """Post this rank's ``part`` of operation ``key``; the last of the ``size`` ranks to post
        runs ``perform(parts)`` (its result is the operation's) and completes it for all."""
        with self._changed:
            operation = self._operations.setdefault(key, _Operation(kind, size))
            if operation.kind != kind and operation.error is None:
                operation.error = CommError(
                    f"operation {key[1]} of group {key[0] or 'world'}: rank {rank} issued {kind} where an "
                    f"earlier rank issued {operation.kind}; every rank of a group must issue the same "
                    "operations in the same order"
                )
            operation.parts[rank] = part
            last = len(operation.parts) == operation.size
            if last:
                del self._operations[key]  # complete below: no later post can find it
        if last:
            if operation.error is None:
                try:
                    operation.result = perform(operation.parts)
                except Exception as error:  # noqa: BLE001 - handed to every waiter
                    operation.error = error
            with self._changed:
                operation.done = True
                self._changed.notify_all()
        return operation

    def wait(self, operation: _Operation, what: str, timeout_s: float) -> Any:
        """Block until ``operation`` completed (at most ``timeout_s``); its result, or its error
        (recorded as the family's failure, and every waiter of the family woken to raise it)."""
        with self._changed:
            if not self._changed.wait_for(lambda: operation.done or self.health.broken, timeout=timeout_s):
                error = CommTimeoutError(
                    f"{what} did not complete within {timeout_s:g} s: a peer thread did not issue it "
                    f"(posted by ranks {sorted(operation.parts)} of {operation.size})"
                )
                self.fail(error)
                raise error
            if not operation.done:  # another operation of the family failed meanwhile
                self.health.check(what)
            if operation.error is not None:
                error = operation.error
                if not isinstance(error, CommError):
                    error = CommError(f"{what} failed: {type(error).__name__}: {error}")
                    error.__cause__ = operation.error
                self.fail(error)
                raise error
        return operation.result

    def fail(self, error: CommError) -> None:
        """Record ``error`` as the family's failure and wake every waiter (re-entrant: the
        condition's lock is an ``RLock``)."""
        with self._changed:
            self.health.record(error)
            self._changed.notify_all()


class ThreadedWork:
    """The handle of one operation: complete once every rank of its group posted its part. One
    issued inside a ``group()`` scope is posted when the scope closes (``post``)."""

    def __init__(self, world: ThreadedWorld, what: str) -> None:
        self._world = world
        self._what = what
        self._operation: Optional[_Operation] = None

    def post(self, key, kind: str, size: int, rank: int, part: Any, perform: Callable) -> None:
        self._operation = self._world.post(key, kind, size, rank, part, perform)

    def _posted(self) -> _Operation:
        if self._operation is None:
            raise CommError(
                f"{self._what} was waited on inside the group() scope that holds it; "
                "it is issued when the scope closes"
            )
        return self._operation

    def wait(self) -> None:
        self._world.wait(self._posted(), self._what, self._world.timeout_s)

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        self._world.wait(self._posted(), self._what, self._world.timeout_s if timeout_s is None else timeout_s)

    def result(self) -> Any:
        """What the operation returned (an object exchange's list), once complete."""
        return self._world.wait(self._posted(), self._what, self._world.timeout_s)

    def done(self) -> bool:
        return self._operation is not None and self._operation.done


class ThreadedComm:
    """Rank ``rank`` of the group ``members`` (world ranks, ascending) of a ``ThreadedWorld``; the
    ``Comm`` protocol (module docstring)."""

    supports_cuda_graphs = False

    def __init__(self, world: ThreadedWorld, members: Tuple[int, ...], rank: int, name: Hashable) -> None:
        self._world = world
        self.members = members
        self.rank = rank
        self.world_size = len(members)
        self._name = name  # the group's key among the world's operations
        self._issued = 0
        self._pending: Optional[List[Callable[[], None]]] = None  # an open group() scope's posts

    @property
    def timeout_s(self) -> float:
        return self._world.timeout_s

    @property
    def broken(self) -> bool:
        return self._world.health.broken

    def _issue(self, kind: str, part: Any, perform: Callable) -> ThreadedWork:
        what = f"{kind} (rank {self.rank} of {self.world_size})"
        self._world.health.check(what)
        key = (self._name, self._issued)
        self._issued += 1
        work = ThreadedWork(self._world, what)

        def post() -> None:
            work.post(key, kind, self.world_size, self.rank, part, perform)

        if self._pending is None:
            post()
        else:
            self._pending.append(post)
        return work

    # -- the protocol ------------------------------------------------------------------------------

    def all_gather(self, send, recv) -> ThreadedWork:
        check_all_gather(send, recv, self.world_size)

        def perform(parts):
            for _, target in parts.values():
                for source_rank, (source, _) in parts.items():
                    target[source_rank].copy_(source)

        return self._issue("all_gather", (send, recv), perform)

    def all_reduce(self, buf) -> ThreadedWork:
        check_all_reduce(buf)

        def perform(parts):
            first = parts[0]
            if any(tuple(b.shape) != tuple(first.shape) or b.dtype != first.dtype for b in parts.values()):
                shapes = {rank: (tuple(b.shape), str(b.dtype)) for rank, b in sorted(parts.items())}
                raise InputError(f"all_reduce: the ranks' buffers differ: {shapes}")
            total = first.clone()
            for rank in range(1, len(parts)):  # in rank order: every rank gets the same sum
                total += parts[rank].to(total.device)
            for b in parts.values():
                b.copy_(total)

        return self._issue("all_reduce", buf, perform)

    def halo_exchange(self, top_send, bottom_send, top_recv, bottom_recv) -> ThreadedWork:
        check_halo_exchange(self.rank, self.world_size, top_send, bottom_send, top_recv, bottom_recv)

        def perform(parts):
            for rank, (_, _, top, bottom) in parts.items():
                for recv, neighbour, index, side in ((top, rank - 1, 1, "bottom"), (bottom, rank + 1, 0, "top")):
                    if recv is None:
                        continue
                    source = parts[neighbour][index]
                    if source is None or tuple(source.shape) != tuple(recv.shape):
                        raise InputError(
                            f"halo_exchange: rank {rank} receives {tuple(recv.shape)} from rank {neighbour}, "
                            f"whose {side}_send is {None if source is None else tuple(source.shape)}"
                        )
                    recv.copy_(source)

        return self._issue("halo_exchange", (top_send, bottom_send, top_recv, bottom_recv), perform)

    def shift(self, send, recv, distance: int) -> ThreadedWork:
        check_shift(send, recv, distance, self.world_size)

        def perform(parts):
            distances = {rank: d for rank, (_, _, d) in parts.items()}
            if len(set(distances.values())) > 1:
                raise InputError(f"shift: the ranks asked for different distances: {dict(sorted(distances.items()))}")
            size = len(parts)
            for rank, (_, target, d) in parts.items():
                source = parts[(rank - d) % size][0]
                if tuple(source.shape) != tuple(target.shape):
                    raise InputError(
                        f"shift: rank {rank} receives {tuple(target.shape)} from rank {(rank - d) % size}, "
                        f"which sends {tuple(source.shape)}"
                    )
                target.copy_(source)

        return self._issue("shift", (send, recv, distance), perform)

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """The operations issued inside are posted together when the scope closes (in their
        order; a nested scope belongs to the outermost)."""
        if self._pending is not None:
            yield
            return
        self._pending = []
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            for post in pending:
                post()

    def all_gather_object(self, obj: Any) -> List[Any]:
        work = self._issue("all_gather_object", obj, lambda parts: [parts[rank] for rank in range(len(parts))])
        return list(work.result())

    def subgroup(self, ranks: Sequence[int]) -> "ThreadedComm":
        """This rank's comm among ``ranks`` (numbered as in this comm, this rank among them).
        Collective: every rank calls it with its own group, and the groups partition the ranks."""
        ranks = tuple(sorted(int(r) for r in ranks))
        if self.rank not in ranks:
            raise InputError(f"subgroup: rank {self.rank} asked for the group {list(ranks)}, which excludes it")

        def perform(parts):
            groups = {group for group in parts.values()}
            check_partition(sorted(groups), len(parts))

        self._issue("subgroup", ranks, perform).result()
        members = tuple(self.members[r] for r in ranks)
        name = (self._name, self._issued, members)  # the same on every member: issued in step
        return ThreadedComm(self._world, members, ranks.index(self.rank), name)

    def abort(self, reason: str) -> None:
        """Fail the family at once (a worker thread that raised): its peers' waits raise
        ``CommError`` naming ``reason`` instead of waiting out the timeout."""
        self._world.fail(CommError(f"rank {self.rank} of {self.world_size} aborted: {reason}"))

    # -- what a step's graphs would need (no CUDA graphs here) ------------------------------------

    def join(self) -> None:
        """Nothing to join: every transfer completed on a host thread."""

    def track_graphs(self, holder) -> None:
        """No graph can hold this comm's work."""

