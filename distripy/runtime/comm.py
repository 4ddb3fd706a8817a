"""The communication protocol the patch-parallel modules use.

A ``Comm`` is bound to one group of ranks (a patch group: the ranks that share one image's
bands, in band order). Every operation is asynchronous and returns a ``Work``:

* ``all_gather(send, recv)``: ``recv[i]`` receives rank ``i``'s ``send``; ``recv`` has shape
  ``(world_size, *send.shape)``;
* ``all_reduce(buf)``: sums ``buf`` over the ranks, in place;
* ``halo_exchange(top_send, bottom_send, top_recv, bottom_recv)``: ``top_send`` goes to the rank
  above (``rank - 1``), which receives it into its ``bottom_recv``; ``bottom_send`` goes to the rank
  below, into its ``top_recv``. The first rank passes ``None`` for both ``top_*``, the last rank for
  both ``bottom_*``; a rank may also pass ``None`` for a side with nothing to send (zero rows);
* ``shift(send, recv, distance)``: the ring shift: ``send`` goes to rank ``(rank + distance) %
  world_size``, and ``recv`` receives the send of rank ``(rank - distance) % world_size``; every
  rank calls it with the same ``distance`` (``0 < distance < world_size``) and the same shapes.
  ``world_size - 1`` shifts, issued one after the other and each waited for on its own, bring a
  rank every other rank's block in turn (the ``exact`` mode's self-attention);
* ``group()``: a scope; the operations called inside it are issued together when it closes (one
  NCCL group launch in the C++ runtime), each straight between its own buffers;
* ``all_gather_object(obj)``: a host-side exchange of small picklable objects (the input checks
  every rank makes together before a generation, a shared seed); returns one object per rank,
  blocking for at most the comm's timeout;
* ``subgroup(ranks)``: the ``Comm`` of the ranks ``ranks`` (numbered as in this comm, this rank
  among them), its ranks numbered in ascending order. Collective: every rank of this comm calls it,
  each with the group it belongs to, and the groups partition the comm (CFG split's two halves).

``Work.wait()`` orders what the caller does next after the transfer: on CUDA the caller's current
stream waits on the GPU (no host block); on CPU the caller blocks, for at most the comm's timeout.
``Work.synchronize(timeout_s)`` blocks the host and raises ``CommTimeoutError`` at the timeout.
Buffers must not be touched between issue and ``wait``. A ``Work`` may be waited for (or
synchronised) again after it completed; that returns at once (a synchronous step keeps its handles
for the next step, which waits on them as on an asynchronous step's).

``broken``: true once a transfer of this comm or of the comm it is a subgroup of failed (see
``runtime.health``); from then on every operation and wait raises ``CommError`` at once, and
cleanup does not wait. Every failure of a transfer is a ``CommError`` (``CommTimeoutError`` for a
timeout).

A ``CapturableComm`` is a ``Comm`` whose transfers a CUDA graph can capture (``StepGraphs``):
``supports_cuda_graphs`` is true, and it has

* ``join()``: the caller's current stream waits for everything issued so far (before a capture
  ends, every stream it pulled in must be joined back);
* ``watch(what)``: a mark on the caller's current stream, bounded by the timeout, after a replay
  whose transfers are graph nodes and not watched one by one;
* ``track_graphs(holder)``: ``holder.release()`` is called before the comm is closed (a graph that
  holds a comm's work keeps it from being destroyed).

Implementations: ``TorchComm`` (torch.distributed; gloo on CPU, nccl on GPU), ``NcclComm`` (the
C++ runtime ``distripy._C``) and ``LoopbackComm`` (one process standing in for one rank of N, for
measuring one rank's compute on one device).
"""

from typing import Any, ContextManager, List, Optional, Protocol, Sequence, runtime_checkable

from distripy.errors import InputError

__all__ = [
    "CapturableComm",
    "Comm",
    "CompletedWork",
    "Work",
    "check_all_gather",
    "check_all_reduce",
    "check_halo_exchange",
    "check_partition",
    "capturable",
    "check_shift",
]


@runtime_checkable
class Work(Protocol):
    def wait(self) -> None: ...

    def synchronize(self, timeout_s: Optional[float] = None) -> None: ...

    def done(self) -> bool: ...


@runtime_checkable
class Comm(Protocol):
    rank: int
    world_size: int
    timeout_s: float
    broken: bool

    def all_gather(self, send, recv) -> Work: ...

    def all_reduce(self, buf) -> Work: ...

    def halo_exchange(self, top_send, bottom_send, top_recv, bottom_recv) -> Work: ...

    def shift(self, send, recv, distance: int) -> Work: ...

    def group(self) -> ContextManager[None]: ...

    def all_gather_object(self, obj: Any) -> List[Any]: ...

    def subgroup(self, ranks: Sequence[int]) -> "Comm": ...


@runtime_checkable
class CapturableComm(Comm, Protocol):
    supports_cuda_graphs: bool

    def join(self) -> None: ...

    def watch(self, what: str) -> Work: ...

    def track_graphs(self, holder) -> None: ...


def capturable(comm) -> bool:
    """Whether ``comm``'s transfers can be captured into a CUDA graph."""
    return isinstance(comm, CapturableComm) and bool(comm.supports_cuda_graphs)


class CompletedWork:
    """The handle of an operation with nothing to transfer."""

    def wait(self) -> None:
        pass

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        pass

    def done(self) -> bool:
        return True


def _describe(tensor) -> str:
    return f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"


def _check_same_kind(op: str, named: Sequence) -> None:
    """All given tensors share dtype and device and are contiguous."""
    present = [(name, t) for name, t in named if t is not None]
    for name, tensor in present:
        if not tensor.is_contiguous():
            raise InputError(f"{op}: {name} ({_describe(tensor)}) must be contiguous")
    if present:
        first_name, first = present[0]
        for name, tensor in present[1:]:
            if tensor.dtype != first.dtype or tensor.device != first.device:
                raise InputError(
                    f"{op}: {name} is {_describe(tensor)} but {first_name} is {_describe(first)}; "
                    "dtype and device must agree"
                )


def check_all_gather(send, recv, world_size: int) -> None:
    """Validate an all_gather before anything is issued."""
    if send.dim() == 0:
        raise InputError("all_gather: send must have at least one dimension")
    expected = (world_size,) + tuple(send.shape)
    if tuple(recv.shape) != expected:
        raise InputError(
            f"all_gather: recv has shape {tuple(recv.shape)}, expected {expected} (world_size x send.shape)"
        )
    _check_same_kind("all_gather", (("send", send), ("recv", recv)))


def check_all_reduce(buf) -> None:
    _check_same_kind("all_reduce", (("buf", buf),))


def check_halo_exchange(rank: int, world_size: int, top_send, bottom_send, top_recv, bottom_recv) -> None:
    """Validate a halo exchange: no transfer past the first or last rank, consistent buffers."""
    if rank == 0 and (top_send is not None or top_recv is not None):
        raise InputError("halo_exchange: rank 0 has no rank above it; top_send and top_recv must be None")
    if rank == world_size - 1 and (bottom_send is not None or bottom_recv is not None):
        raise InputError(
            f"halo_exchange: rank {rank} is the last of {world_size}; "
            "bottom_send and bottom_recv must be None"
        )
    _check_same_kind(
        "halo_exchange",
        (
            ("top_send", top_send),
            ("bottom_send", bottom_send),
            ("top_recv", top_recv),
            ("bottom_recv", bottom_recv),
        ),
    )


def check_shift(send, recv, distance, world_size: int) -> None:
    """Validate a ring shift: a distance to another rank, buffers of one shape and kind."""
    if isinstance(distance, bool) or not isinstance(distance, int) or not 0 < distance < world_size:
        raise InputError(f"shift: distance={distance!r} must be an integer in [1, {world_size - 1}]")
    if tuple(send.shape) != tuple(recv.shape):
        raise InputError(
            f"shift: send is {tuple(send.shape)} but recv is {tuple(recv.shape)}; they must agree"
        )
    _check_same_kind("shift", (("send", send), ("recv", recv)))


def check_partition(groups: Sequence[Sequence[int]], world_size: int) -> None:
    """Validate the groups every rank asked ``subgroup`` for: each rank of the comm in exactly one."""
    members = sorted(rank for group in groups for rank in group)
    if members != list(range(world_size)):
        raise InputError(
            f"subgroup: the ranks asked for groups {[list(g) for g in groups]}, which do not partition "
            f"the {world_size} ranks of the comm (each rank must be in exactly one group)"
        )
