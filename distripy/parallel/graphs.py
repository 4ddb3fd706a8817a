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
  of its parity: a synchronous step leaves its exchange in the same buffers,
* whether the step's conditioning may have changed (``PatchContext.refresh_conditioning``): a
  step that computes what depends on it alone (cross-attention keys and values) and one that
  reads it from persistent buffers are two graphs.

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

What runs on the host around a replay is kept short, since the GPU may idle meanwhile: the new
inputs are copied into the graph's own only when they are not what the last copy brought (the same
memory at the same version: a generation's prompt embeddings), the wait for an eager step's
transfers is skipped when no eager step ran since the last capture or replay, and the exchanges a
replay leaves are put back from flat lists.
"""

import inspect
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from distripy.errors import ConfigError
from distripy.parallel.bands import flatten_tensors, unflatten_tensors
from distripy.parallel.context import Exchange, PatchContext, PatchState

__all__ = ["StepGraphs"]


def _plain_attributes(state: PatchState) -> Optional[dict]:
    """The instance dict that ``state.exchange = value`` stores into when that is all it does (a
    plain attribute, set by ``object.__setattr__``, or by ``nn.Module.__setattr__``, which for a
    value that is no parameter, buffer or module and a name that is none of theirs ends there);
    None for anything else (a property, a ``__setattr__`` of its own, no ``__dict__``)."""
    kind = type(state)
    if kind.__setattr__ not in (object.__setattr__, torch.nn.Module.__setattr__):
        return None
    if hasattr(inspect.getattr_static(kind, "exchange", None), "__set__"):
        return None
    attributes = getattr(state, "__dict__", None)
    if not isinstance(attributes, dict):
        return None
    for registry in ("_parameters", "_buffers", "_modules"):
        if "exchange" in attributes.get(registry, ()):
            return None
    return attributes


def _version(tensor: torch.Tensor) -> Optional[int]:
    """The tensor's version counter (moved by every in-place change); None for an inference tensor,
    which has none."""
    return None if tensor.is_inference() else tensor._version


def _source(tensor: torch.Tensor) -> Optional[Tuple[torch.Tensor, int, int]]:
    """What identifies the contents a static input was given: the tensor (kept alive, so that no
    other tensor can take its memory), its memory and its version counter, which a view shares
    with what it views (a batch half cut anew each step from the same embeddings is the same
    contents); None when that cannot tell (an inference tensor). The layout is the graph's key's."""
    version = _version(tensor)
    return None if version is None else (tensor, tensor.data_ptr(), version)


class _Entry:
    def __init__(self) -> None:
        self.seen = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: List[torch.Tensor] = []
        # What each static input last received (``_source``), or None: copied again at the next
        # replay. An input the graph writes to itself is always copied.
        self.sources: List[Optional[Tuple[torch.Tensor, int, int]]] = []
        self.written: List[bool] = []
        self.output: Optional[torch.Tensor] = None
        # The exchanges the step leaves, put back after every replay: into the instance dict of a
        # state where ``state.exchange = ...`` does nothing else (``_plain_attributes``), else
        # by assignment.
        self.direct: List[Tuple[dict, Optional[Exchange]]] = []
        self.assigned: List[Tuple[PatchState, Optional[Exchange]]] = []


class StepGraphs:
    """Runs one UNet step (``forward(arguments) -> band``) eagerly, by capture, or by replay."""

    def __init__(
        self, context: PatchContext, comms: Sequence, max_shapes: int = 4, eager_runs: int = 1
    ) -> None:
        """``eager_runs``: how many times a key runs eagerly before it is captured. A compiled step
        (``DistriConfig.compile``) needs 2: its first run makes the persistent buffers, so the
        second compiles again for buffers that exist, and a capture must find that code compiled
        (compiling inside a capture would synchronise the capturing stream)."""
        if max_shapes < 1:
            raise ConfigError(f"StepGraphs: max_shapes must be >= 1, got {max_shapes}")
        if eager_runs < 1:
            raise ConfigError(f"StepGraphs: eager_runs must be >= 1, got {eager_runs}")
        self.eager_runs = eager_runs
        self.context = context
        self.comms = list({id(c): c for c in comms}.values())
        self.max_shapes = max_shapes
        self._entries: Dict[Hashable, _Entry] = {}
        self._shapes: "OrderedDict[Hashable, None]" = OrderedDict()
        self._pool = None
        self._stream: Optional[torch.cuda.Stream] = None
        self.captures = 0
        self.replays = 0
        # (generation, step) at whose end no transfer of this model was in flight: a capture or a
        # replay leaves exchanges without Works. The next step's replay then has nothing to wait
        # for. An eager step in between (here or elsewhere) advances the step and voids it.
        self._quiet_at: Optional[Tuple[int, int]] = None
        for comm in self.comms:
            comm.track_graphs(self)  # NcclComm: closing it drops the graphs first

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
        """What selects a step's graph. ``refresh_conditioning``: a step that computes the
        cross-attention keys and values anew (into persistent buffers) and one that reads them
        are different graphs; so are steps of generations whose keys and values travel under
        different codecs (``compress="auto"`` may choose per generation), and a ``full_sync`` or
        ``exact`` step that sends them compressed and one of the warm-up that does not."""
        ctx = self.context
        return (
            ctx.shape_key,
            structure,
            ctx.activation_exchange,
            ctx.statistics_exchange,
            ctx.parity,
            ctx.refresh_conditioning,
            ctx.compress,
            ctx.compressed_step,
        )

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
        if entry.seen <= self.eager_runs:
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
        versions = [_version(t) for t in entry.inputs]
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
        # An input changed in place by the step (its version counter moved while the capture ran
        # the step on the host) is not what it was given at the next replay: always copied.
        entry.written = [v is None or _version(t) != v for t, v in zip(entry.inputs, versions)]
        entry.sources = [None if w else _source(t) for t, w in zip(tensors, entry.written)]
        # The Works of the capture are events inside the graph: outside it they cannot be waited
        # for. After each replay the transfers are complete (joined before the capture ended), so
        # the exchanges the step leaves are kept without handles, from now on.
        exchanges = ctx.exchanges()
        ctx.restore_exchanges(exchanges)
        entry.direct, entry.assigned = [], []
        for state, exchange in exchanges:
            attributes = _plain_attributes(state)
            if attributes is not None:
                entry.direct.append((attributes, exchange))
            else:
                entry.assigned.append((state, exchange))
        self._quiet_at = (ctx.generation, ctx.step)
        entry.graph = graph

    def _replay(self, entry: _Entry, tensors: Sequence[torch.Tensor]) -> None:
        ctx = self.context
        generation, step = ctx.generation, ctx.step
        if self._quiet_at != (generation, step) and self._quiet_at != (generation, step - 1):
            for work in ctx.in_flight():  # an eager step's transfers: the stream waits on the GPU
                work.wait()
        # The new inputs into the graph's own: the latent and timestep each step, the conditioning
        # only when it is not what the last copy brought (a pipeline's prompt embeddings stay the
        # same tensors for the whole generation).
        sources = entry.sources
        for index, static in enumerate(entry.inputs):
            fresh = tensors[index]
            source = sources[index]
            if source is not None and source[1] == fresh.data_ptr() and source[2] == _version(fresh):
                continue
            if static.data_ptr() != fresh.data_ptr():
                static.copy_(fresh)
            sources[index] = None if entry.written[index] else _source(fresh)
        entry.graph.replay()
        self.replays += 1
        # The exchanges the replayed step leaves (``PatchContext.restore_exchanges``, without going
        # through ``nn.Module.__setattr__`` for each of the model's modules).
        for attributes, exchange in entry.direct:
            attributes["exchange"] = exchange
        for state, exchange in entry.assigned:
            state.exchange = exchange
        self._quiet_at = (generation, step)
        # The replay's transfers are graph nodes, not watched one by one: one mark after the
        # replay lets the comm's watchdog bound it (a dead peer would block the stream forever).
        if self.comms:
            self.comms[0].watch(f"the CUDA-graph replay of step {ctx.step}")
