"""``NcclComm``: the ``Comm`` protocol over the C++ runtime ``distripy._C.Communicator``.

What it adds over torch.distributed's NCCL backend, for many small per-layer transfers per step:
its own high-priority comm stream ordered after the caller's stream by an event (no host
round-trip), one NCCL group launch for a ``group()`` scope with every transfer straight between its
own buffers (no packing copies), GPU-side ``Work.wait``, and legality inside CUDA-graph capture
(``join()`` brings the comm stream back into the capturing stream before the capture ends).

Buffers: torch tensors, or anything with ``__cuda_array_interface__`` (CuPy) or ``__dlpack__``,
viewed as torch tensors without a copy. The NCCL unique id is made by the group's first rank and
shared through torch.distributed, so multi-node torchrun works unchanged; or, for ranks that are
threads of one process (``application.ThreadedExecutor``), through their ``ThreadedComm``
(``host=``).
"""

import atexit
import contextlib
import os
import weakref
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from distripy.config import DEFAULT_TIMEOUT_S
from distripy.errors import CommError, CommTimeoutError, InputError, InputTypeError, StepError
from distripy.runtime.comm import (
    CompletedWork,
    check_all_gather,
    check_all_reduce,
    check_halo_exchange,
    check_shift,
)
from distripy.runtime.health import CommHealth
from distripy.runtime.loader import native
from distripy.runtime.torch_comm import all_gather_object_within, new_process_subgroup

__all__ = ["NcclComm", "NcclWork", "as_cuda_tensor", "choose_device", "close_all", "nccl_dtype"]

# torch dtype -> ncclDataType_t
_NCCL_DTYPES = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
    torch.float8_e4m3fn: 10,
    torch.float8_e5m2: 11,
}


def nccl_dtype(dtype: torch.dtype) -> int:
    try:
        return _NCCL_DTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in _NCCL_DTYPES)
        raise InputError(f"NCCL has no data type for {dtype}; supported: {supported}") from None


def as_cuda_tensor(buffer, name: str) -> torch.Tensor:
    """A torch view of ``buffer`` (tensor, ``__cuda_array_interface__`` or ``__dlpack__``), no copy."""
    if isinstance(buffer, torch.Tensor):
        tensor = buffer
    elif hasattr(buffer, "__cuda_array_interface__"):
        tensor = torch.as_tensor(buffer, device="cuda")
    elif hasattr(buffer, "__dlpack__"):
        tensor = torch.from_dlpack(buffer)
    else:
        raise InputTypeError(
            f"{name}: expected a CUDA tensor or an object with __cuda_array_interface__ or __dlpack__, "
            f"got {type(buffer).__name__}"
        )
    if not tensor.is_cuda:
        raise InputError(f"{name} is on {tensor.device}; NcclComm moves CUDA buffers only")
    return tensor


def choose_device(device: Optional[int] = None) -> int:
    """The GPU a rank's communicator uses: ``device`` when given, else the current device, which
    must be the rank's ``LOCAL_RANK`` when several GPUs are visible (without ``distripy.init()`` or
    ``torch.cuda.set_device`` every rank would pick GPU 0 and NCCL would fail or serialise)."""
    if device is not None:
        return int(device)
    current = torch.cuda.current_device()
    local_rank = os.environ.get("LOCAL_RANK")
    visible = torch.cuda.device_count()
    if local_rank is not None and local_rank.isdigit() and visible > 1 and int(local_rank) != current:
        raise CommError(
            f"NcclComm: this rank has LOCAL_RANK={local_rank} but its current CUDA device is {current} "
            f"of {visible} visible: call distripy.init() (which sets the device) or "
            f"torch.cuda.set_device({local_rank}) first, or pass device="
        )
    return current


class NcclWork:
    """Handle of one operation: ``wait`` makes the caller's current stream wait on the GPU.

    A Work issued inside a CUDA-graph capture is a node of that graph: it completes when the graph
    is replayed, so it can be waited for only inside the same capture, never synchronised.

    It holds the operation's tensors until it is waited for (then the waiting stream is ordered
    after the transfer, and the caching allocator may hand their memory out again on it), instead
    of ``record_stream`` on each: no dispatcher call per transfer. A Work dropped before that
    records its tensors on the comm stream as it goes, so their memory waits for the transfer."""

    def __init__(self, work, device: int, health: CommHealth, tensors=(), comm_stream=None) -> None:
        self._work = work
        self._device = device
        self._health = health
        self._tensors = tuple(tensors)
        self._comm_stream = comm_stream

    def __del__(self) -> None:
        tensors, self._tensors = getattr(self, "_tensors", ()), ()
        if not tensors or self._comm_stream is None:
            return
        try:
            if not self._work.done():
                for tensor in tensors:
                    tensor.record_stream(self._comm_stream)
        except Exception:  # noqa: BLE001 - at interpreter exit torch may be half gone
            pass

    @property
    def captured(self) -> bool:
        return bool(self._work.captured)

    def _refuse_outside_capture(self, what: str, capturing: bool) -> None:
        if self.captured and not capturing:
            raise StepError(
                f"{what}: {self._work.op} was issued inside a CUDA-graph capture; it completes when the "
                "graph is replayed and cannot be waited for outside that capture"
            )

    def wait(self) -> None:
        stream = torch.cuda.current_stream(self._device)
        if self.captured:
            self._refuse_outside_capture("NcclWork.wait", torch.cuda.is_current_stream_capturing())
        self._work.wait(stream.cuda_stream)
        self._tensors = ()

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        C = native()
        self._refuse_outside_capture("NcclWork.synchronize", capturing=False)
        self._health.check("waiting for an NCCL transfer")
        try:
            self._work.synchronize(-1.0 if timeout_s is None else float(timeout_s))
        except C.CommTimeout as error:
            raise self._health.record(CommTimeoutError(str(error))) from error
        except C.NcclError as error:
            raise self._health.record(CommError(str(error))) from error
        self._tensors = ()

    def done(self) -> bool:
        finished = self._work.done()
        if finished:
            self._tensors = ()
        return finished


_LIVE: "weakref.WeakSet[NcclComm]" = weakref.WeakSet()


class NcclComm:
    """The ``Comm`` protocol for the ranks of a torch.distributed process group, on the C++ runtime.

    Closing (``close()``, and at interpreter exit for every comm still open) goes in the one order
    that cannot hang: the CUDA graphs holding the comm's work are dropped, the comm's work is
    waited for (bounded), then the NCCL communicator is destroyed (bounded)."""

    supports_cuda_graphs = True

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        device: Optional[int] = None,
        *,
        split_from: Optional["NcclComm"] = None,
        color: int = 0,
        health: Optional[CommHealth] = None,
        host=None,
    ) -> None:
        """A communicator over ``group`` (default: the whole world). With ``split_from`` (used by
        ``subgroup``) it is split from that communicator (``ncclCommSplit``, no new bootstrap):
        every rank of it passes its group's index as ``color``. With ``host`` (the ranks are
        threads of one process: a ``ThreadedComm``, whose ``all_gather_object`` and ``subgroup``
        carry the host-side exchanges instead of torch.distributed; ``group`` is then not used)
        every rank's thread makes its comm at once, on its own ``device``: NCCL's initialisation
        waits for all of them."""
        C = native()  # raises NativeRuntimeUnavailable with the reason
        if host is None and not dist.is_initialized():
            raise CommError("NcclComm needs torch.distributed to be initialised (call distripy.init() first)")
        if not torch.cuda.is_available():
            raise CommError("NcclComm needs a CUDA GPU; torch sees none (use TorchComm on CPU)")
        self.host = host
        if host is not None:
            self.process_group = None
            self.rank, self.world_size = host.rank, host.world_size
        else:
            self.process_group = group if group is not None else dist.group.WORLD
            self.rank = dist.get_rank(self.process_group)
            self.world_size = dist.get_world_size(self.process_group)
        self.timeout_s = float(timeout_s)
        self.health = health if health is not None else CommHealth()
        self.device = split_from.device if split_from is not None else choose_device(device)
        # The comm stream is torch's (high priority): tensors may be recorded on it (a Work dropped
        # in flight), so it must outlive them; C++ never destroys it.
        self._comm_stream = torch.cuda.Stream(device=self.device, priority=-1)
        self._graph_holders: "weakref.WeakSet" = weakref.WeakSet()
        if split_from is not None:
            self._native = split_from._native.split(color, self.rank, self._comm_stream.cuda_stream)
        else:
            offered = C.Communicator.new_unique_id() if self.rank == 0 else None
            unique_id = self.all_gather_object(offered)[0]
            self._native = C.Communicator(
                unique_id,
                self.rank,
                self.world_size,
                self.device,
                self.timeout_s,
                self._comm_stream.cuda_stream,
            )
        if (self._native.rank, self._native.world_size) != (self.rank, self.world_size):
            raise CommError(
                f"NcclComm: the NCCL communicator is rank {self._native.rank} of {self._native.world_size} "
                f"but its process group rank {self.rank} of {self.world_size}"
            )
        _LIVE.add(self)

    @property
    def broken(self) -> bool:
        """Whether a transfer of this comm or of its family failed (``runtime.health``), or its
        watchdog aborted it."""
        return self.health.broken or self._native.aborted

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _check_usable(self, what: str) -> None:
        if self._native.closed:
            raise CommError(f"{what}: this NcclComm was closed")
        if self._native.aborted and not self.health.broken:
            # the watchdog aborted it (a deadline passed, or NCCL reported an error)
            self.health.record(CommError(f"the NCCL communicator was aborted: {self._native.abort_reason}"))
        self.health.check(what)

    def _tensors(self, **buffers) -> dict:
        self._check_usable(f"an NCCL transfer of {', '.join(buffers)}")
        tensors = {}
        for name, buffer in buffers.items():
            if buffer is None:
                tensors[name] = None
                continue
            tensor = as_cuda_tensor(buffer, name)
            if tensor.device.index != self.device:
                raise InputError(f"{name} is on {tensor.device}, this communicator on cuda:{self.device}")
            tensors[name] = tensor
        return tensors

    def _issued(self, work, *tensors: Optional[torch.Tensor]) -> NcclWork:
        # The Work holds the buffers until it is waited for: their memory is not handed out again
        # before the comm stream is done with them (NcclWork's docstring).
        kept = [tensor for tensor in tensors if tensor is not None and tensor.numel() > 0]
        return NcclWork(work, self.device, self.health, kept, self._comm_stream)

    def all_gather(self, send, recv) -> NcclWork:
        t = self._tensors(send=send, recv=recv)
        check_all_gather(t["send"], t["recv"], self.world_size)
        work = self._native.all_gather(
            t["send"].data_ptr(),
            t["recv"].data_ptr(),
            t["send"].numel(),
            nccl_dtype(t["send"].dtype),
            self._stream(),
        )
        return self._issued(work, t["send"], t["recv"])

    def all_reduce(self, buf, op: str = "sum") -> NcclWork:
        t = self._tensors(buf=buf)
        check_all_reduce(t["buf"])
        work = self._native.all_reduce(
            t["buf"].data_ptr(), t["buf"].numel(), nccl_dtype(t["buf"].dtype), op, self._stream()
        )
        return self._issued(work, t["buf"])

    def halo_exchange(self, top_send, bottom_send, top_recv, bottom_recv):
        t = self._tensors(
            top_send=top_send, bottom_send=bottom_send, top_recv=top_recv, bottom_recv=bottom_recv
        )
        check_halo_exchange(self.rank, self.world_size, *t.values())
        present = [tensor for tensor in t.values() if tensor is not None]
        if not any(tensor.numel() for tensor in present):
            return CompletedWork()

        def pointer_count(tensor):
            return (0, 0) if tensor is None else (tensor.data_ptr(), tensor.numel())

        work = self._native.halo_exchange(
            *pointer_count(t["top_send"]),
            *pointer_count(t["bottom_send"]),
            *pointer_count(t["top_recv"]),
            *pointer_count(t["bottom_recv"]),
            nccl_dtype(present[0].dtype),
            self._stream(),
        )
        return self._issued(work, *present)

    def shift(self, send, recv, distance: int) -> NcclWork:
        t = self._tensors(send=send, recv=recv)
        check_shift(t["send"], t["recv"], distance, self.world_size)
        if t["send"].numel() == 0:
            return CompletedWork()
        work = self._native.shift(
            t["send"].data_ptr(),
            t["recv"].data_ptr(),
            t["send"].numel(),
            distance,
            nccl_dtype(t["send"].dtype),
            self._stream(),
        )
        return self._issued(work, t["send"], t["recv"])

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        if self._native.in_group:  # nested scope: the outermost one issues
            yield
            return
        self._native.group_start(self._stream())
        try:
            yield
        finally:
            self._native.group_end()  # NCCL needs a balanced group even when the body raised

    def all_gather_object(self, obj):
        """Every rank's ``obj``, in rank order (host side, blocking, at most ``timeout_s``; small
        picklable objects), over the torch.distributed group (or the ``host`` comm)."""
        if self.host is not None:
            self.health.check("an object exchange")
            return self.host.all_gather_object(obj)
        return all_gather_object_within(self.process_group, obj, self.timeout_s, self.health)

    def subgroup(self, ranks: Sequence[int]) -> "NcclComm":
        """The comm of ``ranks`` (see ``Comm.subgroup``): its NCCL communicator split from this one,
        its host-side exchanges on a new torch.distributed group (or the ``host`` comm's subgroup;
        the color, the group's lowest rank, is the same for its ranks and differs between groups)."""
        if self.host is not None:
            host = self.host.subgroup(ranks)
            color = min(int(r) for r in ranks)
            return NcclComm(None, self.timeout_s, split_from=self, color=color, health=self.health, host=host)
        group, color = new_process_subgroup(self, ranks)
        return NcclComm(group, self.timeout_s, split_from=self, color=color, health=self.health)

    def join(self) -> None:
        """Make the caller's current stream wait for everything issued so far (before a CUDA-graph
        capture ends, every stream it pulled in must be joined back; a comm that did no work in the
        capture joins nothing)."""
        self._native.join(self._stream())

    def watch(self, what: str) -> NcclWork:
        """A mark on the caller's current stream that the watchdog bounds by the timeout: after a
        CUDA-graph replay, whose transfers are nodes of the graph and not watched one by one."""
        self._check_usable(what)
        return NcclWork(self._native.watch(self._stream(), what), self.device, self.health)

    def track_graphs(self, holder) -> None:
        """``holder.release()`` drops CUDA graphs that hold this comm's work; ``close`` calls it
        first (NCCL's destroy blocks while such a graph exists)."""
        self._graph_holders.add(holder)

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Drop the CUDA graphs holding this comm's work, wait for its work and destroy the NCCL
        communicator, all bounded by ``timeout_s`` (default: the comm's timeout). Idempotent."""
        if self._native.closed:
            return
        for holder in list(self._graph_holders):
            holder.release()
        self._graph_holders.clear()
        self._native.close(self.timeout_s if timeout_s is None else float(timeout_s))
        _LIVE.discard(self)


def close_all(timeout_s: float = 10.0) -> None:
    """Close every NcclComm still open (registered to run at interpreter exit, while torch and the
    CUDA context are still alive: a communicator destroyed later, by the garbage collector, could
    block on CUDA graphs the exit never frees)."""
    for comm in list(_LIVE):
        try:
            comm.close(timeout_s)
        except Exception:  # noqa: BLE001 - at exit, one comm's failure must not keep others open
            pass


atexit.register(close_all)
