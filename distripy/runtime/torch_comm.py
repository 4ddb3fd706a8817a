"""``TorchComm``: the ``Comm`` protocol over torch.distributed.

On CPU it runs on gloo, which is how every multi-rank test runs; on GPUs on torch's NCCL process
group, the baseline the C++ runtime (``NcclComm``) is measured against.

gloo runs every operation as a collective of its own, a few round trips each, and an asynchronous
step issues dozens of small ones together (``group()``, at each checkpoint). So on CPU the
all-reduces of one ``group()`` scope with one dtype leave as one all-reduce of their concatenation,
and so do its all-gathers; each operation's ``Work`` copies its part back when waited for. (NCCL
fuses a group's operations itself: on GPUs each leaves as it is.)
"""

import contextlib
import pickle
import time
from datetime import timedelta
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from distripy.config import DEFAULT_TIMEOUT_S
from distripy.errors import CommError, CommTimeoutError, ConfigError, InputError
from distripy.runtime.comm import (
    CompletedWork,
    check_all_gather,
    check_all_reduce,
    check_halo_exchange,
    check_partition,
    check_shift,
)
from distripy.runtime.health import CommHealth

__all__ = ["TorchComm", "TorchWork", "all_gather_object_within", "new_process_subgroup"]
# gloo matches point-to-point messages by (peer, tag); a fresh tag per exchange keeps exchanges of
# different layers apart even when they are in flight together.
_TAG_SPACE = 1 << 24

# torch renamed all_gather_into_tensor to all_gather_single; accept either.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchWork:
    """Handle of one protocol operation: the torch.distributed works it was issued as. A failure
    is recorded in the comm family's ``CommHealth``."""

    def __init__(
        self,
        works: List,
        op: str,
        on_cuda: bool,
        timeout_s: float,
        health: CommHealth,
        finish: Optional[Callable[[], None]] = None,
    ) -> None:
        """``finish``: run once, on the host, when the works are complete (a coalesced operation's
        copy of each part back into its own buffers); only for works on CPU tensors."""
        self._works = works
        self._op = op
        self._on_cuda = on_cuda
        self._timeout_s = timeout_s
        self._health = health
        self._finish = finish
        # Waited for on the host once: gloo's point-to-point works wait for one more completion
        # at each wait, so a second wait on a completed one would block until the timeout.
        self._complete = False

    def wait(self) -> None:
        if self._on_cuda:
            # Stream-ordered: the current stream waits on the GPU; NCCL's watchdog enforces the
            # process group's timeout.
            for work in self._works:
                work.wait()
        else:
            self.synchronize(self._timeout_s)

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        if self._complete:
            self._health.check(f"waiting for {self._op}")
            return
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        _wait_until(self._works, self._op, time.monotonic() + timeout_s, timeout_s, self._health)
        if self._finish is not None:
            self._finish()
        self._complete = True

    def done(self) -> bool:
        if self._complete:
            return True
        if not all(work.is_completed() for work in self._works):
            return False
        if self._finish is not None:
            self.synchronize()  # complete: this copies the parts back, without waiting
        return True


def _wait_until(works: List, op: str, deadline: float, timeout_s: float, health: CommHealth) -> None:
    """Wait for torch.distributed ``works`` until ``deadline`` (``time.monotonic()``); a failure
    or the deadline raises the ``CommError`` (``timeout_s`` names the whole allowance)."""
    health.check(f"waiting for {op}")
    for work in works:
        remaining = max(deadline - time.monotonic(), 1e-3)
        try:
            completed = work.wait(timeout=timedelta(seconds=remaining))
        except RuntimeError as error:
            raise health.record(_comm_error(op, timeout_s, error)) from error
        if completed is False:
            raise health.record(CommTimeoutError(f"{op} did not complete within {timeout_s:g} s"))


def _comm_error(op: str, timeout_s: float, error: RuntimeError) -> CommError:
    """torch.distributed's ``RuntimeError`` as the ``CommError`` it is."""
    text = str(error)
    if "timeout" in text.lower() or "timed out" in text.lower():
        return CommTimeoutError(f"{op} did not complete within {timeout_s:g} s: {text}")
    return CommError(f"{op} failed: {text}")


class _GroupedWork:
    """Handle of an operation called inside ``group()``: it exists once the scope closes."""

    def __init__(self, op: str) -> None:
        self._op = op
        self.issued: Optional[object] = None

    def _inner(self):
        if self.issued is None:
            raise CommError(
                f"{self._op} was waited on inside the group() scope that holds it; "
                "it is issued when the scope closes"
            )
        return self.issued

    def wait(self) -> None:
        self._inner().wait()

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        self._inner().synchronize(timeout_s)

    def done(self) -> bool:
        return self.issued is not None and self.issued.done()


@dataclass
class _Pending:
    """An operation called inside ``group()``, issued when the scope closes. ``batch``: for an
    operation on CPU tensors that may leave coalesced with others of its kind, ``(kind, dtype)``;
    ``tensors``: what the coalesced operation reads and fills (see ``TorchComm._coalesced``)."""

    op: str
    start: Callable[[], List]
    on_cuda: bool
    grouped: _GroupedWork
    batch: Optional[Tuple[str, torch.dtype]] = None
    tensors: Tuple[torch.Tensor, ...] = ()


class TorchComm:
    """The ``Comm`` protocol for the ranks of a torch.distributed process group, in group-rank order."""

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        health: Optional[CommHealth] = None,
    ) -> None:
        """``health``: shared with the comm this one is a subgroup of (see ``runtime.health``)."""
        if not dist.is_initialized():
            raise CommError(
                "TorchComm needs torch.distributed to be initialised (call distripy.init() first)"
            )
        if timeout_s <= 0:
            raise ConfigError(f"TorchComm: timeout_s must be positive, got {timeout_s}")
        self.process_group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        if self.rank < 0:
            raise CommError(
                f"TorchComm: global rank {dist.get_rank()} is not a member of the given process group"
            )
        self.timeout_s = float(timeout_s)
        self.health = health if health is not None else CommHealth()
        self._global_ranks = [dist.get_global_rank(self.process_group, r) for r in range(self.world_size)]
        self._tag = 0
        self._pending: Optional[List[_Pending]] = None

    # -- issue, immediately or at the end of a group() scope --------------------------------------

    @property
    def broken(self) -> bool:
        """Whether a transfer of this comm or of its family failed (``runtime.health``)."""
        return self.health.broken

    def _start(
        self, op: str, start: Callable[[], List], on_cuda: bool, finish: Optional[Callable[[], None]] = None
    ) -> TorchWork:
        self.health.check(op)
        try:
            works = start()
        except RuntimeError as error:  # e.g. a peer whose connection is gone
            raise self.health.record(_comm_error(op, self.timeout_s, error)) from error
        return TorchWork(works, op, on_cuda, self.timeout_s, self.health, finish)

    def _issue(self, op: str, start: Callable[[], List], on_cuda: bool, batch=None, tensors=()):
        """Issue now, or (inside ``group()``) when the scope closes; ``batch`` and ``tensors`` as in
        ``_Pending``."""
        if self._pending is None:
            return self._start(op, start, on_cuda)
        grouped = _GroupedWork(op)
        self._pending.append(_Pending(op, start, on_cuda, grouped, None if on_cuda else batch, tensors))
        return grouped

    def _issue_group(self, pending: List[_Pending]) -> None:
        """Issue a closed scope's operations in the order they were called; those of one batch
        (two or more) as one coalesced operation, where its first one was called. Every rank makes
        the same calls, so every rank issues the same operations in the same order."""
        batches: Dict[Tuple[str, torch.dtype], List[_Pending]] = {}
        for entry in pending:
            if entry.batch is not None:
                batches.setdefault(entry.batch, []).append(entry)
        issued = set()
        for entry in pending:
            members = batches.get(entry.batch) if entry.batch is not None else None
            if not members or len(members) == 1:
                entry.grouped.issued = self._start(entry.op, entry.start, entry.on_cuda)
            elif entry.batch not in issued:
                issued.add(entry.batch)
                work = self._coalesced(entry.batch[0], [member.tensors for member in members])
                for member in members:
                    member.grouped.issued = work

    def _coalesced(self, kind: str, parts: List[Tuple[torch.Tensor, ...]]) -> TorchWork:
        """One operation for several of ``kind`` on CPU tensors: ``all_reduce`` parts are
        ``(buf,)``, ``all_gather`` parts ``(send, recv)``, ``halo_exchange`` parts its four
        arguments. The sends are read now (concatenated), the receiving buffers written when the
        work completes."""
        if kind == "halo_exchange":
            return self._coalesced_halos(parts)
        group = self.process_group
        flat_send = torch.cat([part[0].reshape(-1) for part in parts])
        sizes = [part[0].numel() for part in parts]
        if kind == "all_reduce":

            def finish() -> None:
                for (buf,), piece in zip(parts, torch.split(flat_send, sizes)):
                    buf.copy_(piece.view(buf.shape))

            op = f"all_reduce of {len(parts)} tensors coalesced ({flat_send.numel()} {flat_send.dtype})"
            start = lambda: [dist.all_reduce(flat_send, group=group, async_op=True)]  # noqa: E731
        else:
            flat_recv = flat_send.new_empty((self.world_size * flat_send.numel(),))

            def finish() -> None:
                by_rank = flat_recv.view(self.world_size, -1)
                for (_, recv), piece in zip(parts, torch.split(by_rank, sizes, dim=1)):
                    recv.copy_(piece.view(recv.shape))  # splits the part's columns only: a view

            op = f"all_gather of {len(parts)} tensors coalesced ({flat_send.numel()} {flat_send.dtype})"
            start = lambda: [_all_gather_flat(flat_recv, flat_send, group=group, async_op=True)]  # noqa: E731
        return self._start(f"{op} over {self.world_size} ranks", start, False, finish)

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        if self._pending is not None:  # nested scope: the outermost one issues
            yield
            return
        self._pending = []
        try:
            yield
        except BaseException:
            self._pending = None
            raise
        pending, self._pending = self._pending, None
        self._issue_group(pending)

    def _coalesced_halos(self, parts: List[Tuple[Optional[torch.Tensor], ...]]) -> TorchWork:
        """Halo exchanges as one message each way per neighbour: what this rank sends up is the
        concatenation of the parts' ``top_send`` in call order, which the rank above receives as
        the concatenation of its ``bottom_recv`` (the same calls, the same sizes), and so down."""
        tag = self._tag
        self._tag = (self._tag + 1) % _TAG_SPACE
        ops, unpack = [], []
        for side, peer in ((0, self.rank - 1), (1, self.rank + 1)):
            if not 0 <= peer < self.world_size:
                continue
            sends = [p[side] for p in parts if p[side] is not None and p[side].numel() > 0]
            recvs = [p[2 + side] for p in parts if p[2 + side] is not None and p[2 + side].numel() > 0]
            source = self._global_ranks[peer]
            if sends:
                flat = torch.cat([t.reshape(-1) for t in sends])
                ops.append(dist.P2POp(dist.isend, flat, source, self.process_group, tag))
            if recvs:
                flat = recvs[0].new_empty((sum(t.numel() for t in recvs),))
                ops.append(dist.P2POp(dist.irecv, flat, source, self.process_group, tag))
                unpack.append((recvs, flat))

        def finish() -> None:
            for recvs, flat in unpack:
                for recv, piece in zip(recvs, torch.split(flat, [t.numel() for t in recvs])):
                    recv.copy_(piece.view(recv.shape))

        op = f"{len(parts)} halo_exchanges coalesced on rank {self.rank} of {self.world_size}"
        return self._start(op, lambda: dist.batch_isend_irecv(ops), False, finish)

    # -- operations ------------------------------------------------------------------------------

    def all_gather(self, send: torch.Tensor, recv: torch.Tensor):
        check_all_gather(send, recv, self.world_size)
        flat_recv = recv.view((self.world_size * send.shape[0],) + tuple(send.shape[1:]))
        return self._issue(
            f"all_gather of {tuple(send.shape)} {send.dtype} over {self.world_size} ranks",
            lambda: [_all_gather_flat(flat_recv, send, group=self.process_group, async_op=True)],
            send.is_cuda,
            ("all_gather", send.dtype),
            (send, recv),
        )

    def all_reduce(self, buf: torch.Tensor):
        check_all_reduce(buf)
        return self._issue(
            f"all_reduce of {tuple(buf.shape)} {buf.dtype} over {self.world_size} ranks",
            lambda: [dist.all_reduce(buf, group=self.process_group, async_op=True)],
            buf.is_cuda,
            ("all_reduce", buf.dtype),
            (buf,),
        )

    def halo_exchange(self, top_send, bottom_send, top_recv, bottom_recv):
        check_halo_exchange(self.rank, self.world_size, top_send, bottom_send, top_recv, bottom_recv)
        tag = self._tag
        self._tag = (self._tag + 1) % _TAG_SPACE
        transfers = []
        if self.rank > 0:
            above = self._global_ranks[self.rank - 1]
            transfers += [(dist.isend, top_send, above), (dist.irecv, top_recv, above)]
        if self.rank < self.world_size - 1:
            below = self._global_ranks[self.rank + 1]
            transfers += [(dist.isend, bottom_send, below), (dist.irecv, bottom_recv, below)]
        ops = [
            dist.P2POp(fn, tensor, peer, self.process_group, tag)
            for fn, tensor, peer in transfers
            if tensor is not None and tensor.numel() > 0
        ]
        if not ops:
            return CompletedWork()
        on_cuda = ops[0].tensor.is_cuda
        return self._issue(
            f"halo_exchange on rank {self.rank} of {self.world_size}",
            lambda: dist.batch_isend_irecv(ops),
            on_cuda,
            ("halo_exchange", ops[0].tensor.dtype),
            (top_send, bottom_send, top_recv, bottom_recv),
        )

    def shift(self, send: torch.Tensor, recv: torch.Tensor, distance: int):
        check_shift(send, recv, distance, self.world_size)
        tag = self._tag
        self._tag = (self._tag + 1) % _TAG_SPACE
        if send.numel() == 0:
            return CompletedWork()
        to = self._global_ranks[(self.rank + distance) % self.world_size]
        source = self._global_ranks[(self.rank - distance) % self.world_size]
        ops = [
            dist.P2POp(dist.isend, send, to, self.process_group, tag),
            dist.P2POp(dist.irecv, recv, source, self.process_group, tag),
        ]
        return self._issue(
            f"shift by {distance} on rank {self.rank} of {self.world_size}",
            lambda: dist.batch_isend_irecv(ops),
            send.is_cuda,
        )

    def all_gather_object(self, obj):
        """Every rank's ``obj``, in rank order (host side, blocking, at most ``timeout_s``; small
        picklable objects)."""
        return all_gather_object_within(self.process_group, obj, self.timeout_s, self.health)

    def subgroup(self, ranks: Sequence[int]) -> "TorchComm":
        """The comm of ``ranks`` (see ``Comm.subgroup``), on a new torch.distributed group; it
        shares this comm's health."""
        group, _ = new_process_subgroup(self, ranks)
        return TorchComm(group, self.timeout_s, self.health)


def all_gather_object_within(group, obj: Any, timeout_s: float, health: CommHealth) -> List[Any]:
    """Every rank's picklable ``obj`` over the torch.distributed ``group``, in rank order: the
    pickled sizes, then the padded bytes, each an asynchronous all-gather waited for at most until
    one deadline ``timeout_s`` away (``dist.all_gather_object`` would wait for the process group's
    own timeout). On an NCCL group the bytes travel through the current CUDA device."""
    world = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    deadline = time.monotonic() + timeout_s
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device or "cpu")
    op = f"all_gather_object over {world} ranks"

    def gather(send: torch.Tensor) -> torch.Tensor:
        health.check(op)
        recv = send.new_empty(world * send.numel())
        try:
            work = _all_gather_flat(recv, send, group=group, async_op=True)
        except RuntimeError as error:
            raise health.record(_comm_error(op, timeout_s, error)) from error
        _wait_until([work], op, deadline, timeout_s, health)
        return recv.cpu()  # on CUDA a copy ordered after the gather on the current stream

    sizes = gather(torch.tensor([payload.numel()], dtype=torch.int64, device=payload.device))
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=payload.device)
    padded[: payload.numel()] = payload
    data = gather(padded).view(world, longest)
    return [pickle.loads(data[rank, : int(sizes[rank])].numpy().tobytes()) for rank in range(world)]


def new_process_subgroup(comm, ranks: Sequence[int]) -> Tuple[dist.ProcessGroup, int]:
    """The torch.distributed group of ``ranks`` (numbered as in ``comm``, which spans
    torch.distributed's whole world) and its index among every rank's groups.

    ``dist.new_group`` must be entered by every process of the world for every group, in the same
    order, so the ranks first tell each other which group each asks for."""
    ranks = [int(r) for r in ranks]
    if comm.rank not in ranks:
        raise InputError(f"subgroup: rank {comm.rank} asked for the group {ranks}, which excludes it")
    if comm.world_size != dist.get_world_size():
        raise InputError(
            f"subgroup: the comm has {comm.world_size} of the world's {dist.get_world_size()} ranks; "
            "torch.distributed makes new groups only from a comm over the whole world"
        )
    groups: List[Tuple[int, ...]] = []
    for asked in comm.all_gather_object(tuple(ranks)):
        if asked not in groups:
            groups.append(asked)
    check_partition(groups, comm.world_size)
    global_ranks = [dist.get_global_rank(comm.process_group, r) for r in range(comm.world_size)]
    try:
        made = [dist.new_group([global_ranks[r] for r in group]) for group in groups]
    except RuntimeError as error:  # a peer gone while the groups were being made
        raise comm.health.record(
            CommError(f"subgroup: making the groups {groups} failed: {error}")
        ) from error
    index = groups.index(tuple(ranks))
    return made[index], index
