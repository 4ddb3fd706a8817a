"""``StepGraphs``: the parallel UNet's steps as replayed CUDA graphs (``use_cuda_graph=True``).

A step of SDXL launches about a thousand kernels; on a small band (1024², 8 GPUs) launching them
costs about as much as running them. So each kind of step is captured once into a CUDA graph and
replayed with new inputs. What a step does depends on

* the input signature (shapes, dtypes, the non-tensor arguments),
* the exchange the step makes: synchronous (warm-up; every transfer waited for in the step) or
  asynchronous (the previous step's transfers read, this step's issued), per mode,
* the step's parity: the buffers a step keeps for the next one alternate between two persistent
  sets (``PatchContext.static_buffers``), so an even and an odd step are two graphs that replay
  each other's results without copies. The first asynchronous step replays the asynchronous graph
  of its parity: a synchronous step leaves its exchange in the same buffers.

A step of a new key runs eagerly (that also tunes the Triton kernels and allocates the persistent
buffers); the second time the key is met it is captured and replayed; after that it is replayed.
Graphs are kept for the last ``max_shapes`` input signatures. Inside a graph the transfers are
joined back into the step's stream before the capture ends, so a replayed step's transfers are
complete when the next step starts; transfers of an eager step are waited for before a replay, and
synchronised before a capture. The Works a capture records are nodes of its graph: right after the
capture the exchanges are kept without them (nothing outside the graph may wait on them), and a
failed capture forgets its key and every exchange (the UNet then starts a new generation). A
replay is bounded by the comm's watchdog (a mark after it), and ``release()`` drops the graphs
before the comm is destroyed (``NcclComm.close``).
"""

from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from distripy.errors import ConfigError
from distripy.parallel.bands import flatten_tensors, unflatten_tensors
from distripy.parallel.context import Exchange, PatchContext, PatchState

__all__ = ["StepGraphs"]


class _Entry:
    def __init__(self) -> None:
        self.seen = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: List[torch.Tensor] = []
        self.output: Optional[torch.Tensor] = None
        self.after: List[Tuple[PatchState, Optional[Exchange]]] = []  # the exchanges the step leaves


class StepGraphs:
    """Runs one UNet step (``forward(arguments) -> band``) eagerly, by capture, or by replay."""

    def __init__(self, context: PatchContext, comms: Sequence, max_shapes: int = 4) -> None:
        if max_shapes < 1:
            raise ConfigError(f"StepGraphs: max_shapes must be >= 1, got {max_shapes}")
        self.context = context
        self.comms = list({id(c): c for c in comms}.values())
        self.max_shapes = max_shapes
        self._entries: Dict[Hashable, _Entry] = {}
        self._shapes: "OrderedDict[Hashable, None]" = OrderedDict()
        self._pool = None
        self._stream: Optional[torch.cuda.Stream] = None
        self.captures = 0
        self.replays = 0
        for comm in self.comms:
            track = getattr(comm, "track_graphs", None)  # NcclComm: closing it drops the graphs first
            if track is not None:
                track(self)

    def release(self) -> None:
        """Drop every captured graph: a comm whose work a graph holds cannot be destroyed while the
        graph exists. The next step of each key runs eagerly again."""
        for entry in self._entries.values():
            if entry.graph is not None:
                entry.graph.reset()
        self._entries.clear()
        self._shapes.clear()

    # -- bookkeeping -----------------------------------------------------------------------------

    def _key(self, structure: Hashable) -> Hashable:
        ctx = self.context
        return (ctx.shape_key, structure, ctx.activation_exchange, ctx.statistics_exchange, ctx.step % 2)

    def _touch_shape(self) -> None:
        """Keep the graphs of the last ``max_shapes`` input signatures; drop the oldest's."""
        shape = self.context.shape_key
        self._shapes[shape] = None
        self._shapes.move_to_end(shape)
        while len(self._shapes) > self.max_shapes:
            old, _ = self._shapes.popitem(last=False)
            for key in [k for k in self._entries if k[0] == old]:
                del self._entries[key]
            self.context.release_static(old)

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    # -- running a step --------------------------------------------------------------------------

    def run(
        self, forward: Callable[[Dict[str, Any]], torch.Tensor], arguments: Dict[str, Any]
    ) -> torch.Tensor:
        arguments = dict(arguments)
        timestep = arguments.get("timestep")
        if not isinstance(timestep, torch.Tensor):  # a number would be baked into the graph
            arguments["timestep"] = torch.tensor(timestep, device=arguments["sample"].device)
        tensors, structure = flatten_tensors(arguments)
        self._touch_shape()
        key = self._key(structure)
        entry = self._entries.setdefault(key, _Entry())
        entry.seen += 1
        if entry.seen == 1:
            return self._eager(forward, arguments)
        if entry.graph is None:
            try:
                self._capture(entry, forward, structure, tensors)
            except BaseException:
                # The capture failed: nothing of it ran, its Works belong to no graph, and modules
                # may have consumed their stale buffers. Forget the key and every exchange; the step
                # fails and the UNet starts a new generation on its next call.
                del self._entries[key]
                for state in self.context.states:
                    state.reset_state()
                raise
            self.captures += 1
        self._replay(entry, tensors)
        return entry.output

    def _eager(self, forward, arguments) -> torch.Tensor:
        """On the side stream the captures use (the recommended warm-up before a capture)."""
        current, side = torch.cuda.current_stream(), self._side_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            output = forward(arguments)
            self.context.checkpoint()
        current.wait_stream(side)
        return output

    def _capture(self, entry: _Entry, forward, structure, tensors) -> None:
        ctx = self.context
        # A Work of a transfer issued outside the graph cannot be waited for inside it.
        ctx.complete_in_flight()
        entry.inputs = [t.detach().clone() for t in tensors]
        static_arguments = unflatten_tensors(structure, entry.inputs)
        graph = torch.cuda.CUDAGraph()
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        ctx.capturing = True
        try:
            # thread_local: the C++ runtime's watchdog thread polls events while this thread captures.
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                entry.output = forward(static_arguments)
                ctx.checkpoint()
                for comm in self.comms:
                    comm.join()  # a comm that did no work in this capture joins nothing
        finally:
            ctx.capturing = False
        if self._pool is None:
            self._pool = graph.pool()
        # The Works of the capture are events inside the graph: outside it they cannot be waited
        # for. After each replay the transfers are complete (joined before the capture ended), so
        # the exchanges the step leaves are kept without handles, from now on.
        entry.after = ctx.exchanges()
        ctx.restore_exchanges(entry.after)
        entry.graph = graph

    def _replay(self, entry: _Entry, tensors: Sequence[torch.Tensor]) -> None:
        ctx = self.context
        for work in ctx.in_flight():  # an eager step's transfers: the stream waits on the GPU
            work.wait()
        for static, fresh in zip(entry.inputs, tensors):
            if static.data_ptr() != fresh.data_ptr():
                static.copy_(fresh)
        entry.graph.replay()
        self.replays += 1
        ctx.restore_exchanges(entry.after)
        # The replay's transfers are graph nodes, not watched one by one: one mark after the
        # replay lets the comm's watchdog bound it (a dead peer would block the stream forever).
        for comm in self.comms:
            watch = getattr(comm, "watch", None)
            if watch is not None:
                watch(f"the CUDA-graph replay of step {ctx.step}")
                break
