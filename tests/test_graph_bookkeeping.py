"""CUDA-graph step bookkeeping (``parallel.graphs.StepGraphs``), on CPU.

A real capture needs a GPU; what goes wrong around one is bookkeeping: which Work handles the
context still holds after a capture, what a failed capture leaves behind, which comms are asked to
join, watch and release. Here ``torch.cuda``'s stream and graph entry points are replaced by fakes
that record whether a capture is running, and the comm's Works refuse what CUDA refuses: a Work
recorded inside a capture cannot be waited for, or synchronised, outside it. And what a replay
does on the host besides: which graph a step replays, which inputs it copies, when it waits.
"""

import contextlib

import pytest
import torch

import distripy
from distripy.parallel.context import PatchContext, PatchState
from distripy.parallel.bands import flatten_tensors
from distripy.parallel.graphs import StepGraphs


class FakeCuda:
    """The parts of ``torch.cuda`` that StepGraphs touches; ``capturing`` says whether a capture runs."""

    def __init__(self) -> None:
        self.capturing = False
        self.replays = 0
        self.graphs = []
        fake = self

        class Stream:
            def wait_stream(self, other) -> None:
                pass

        class CUDAGraph:
            def __init__(self) -> None:
                self.released = False
                fake.graphs.append(self)

            def replay(self) -> None:
                assert not self.released
                fake.replays += 1

            def pool(self):
                return "pool"

            def reset(self) -> None:
                self.released = True

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode=None):
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False

        self.Stream = Stream
        self.CUDAGraph = CUDAGraph
        self.graph = graph
        self.current_stream = lambda device=None: Stream()
        self.stream = lambda s: contextlib.nullcontext()


class FakeWork:
    def __init__(self, cuda: FakeCuda, log: list) -> None:
        self.cuda = cuda
        self.captured = cuda.capturing
        self.log = log

    def wait(self) -> None:
        if self.captured and not self.cuda.capturing:
            raise AssertionError("a Work recorded inside a capture was waited for outside it")
        self.log.append("wait")

    def synchronize(self, timeout_s=None) -> None:
        if self.captured:
            raise AssertionError("a Work recorded inside a capture was synchronised")
        self.log.append("synchronize")


class FakeComm:
    supports_cuda_graphs = True
    broken = False  # the Comm protocol's health flag

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.joins, self.watches, self.holders = [], [], []

    def join(self) -> None:
        self.joins.append(self.cuda.capturing)

    def watch(self, what: str) -> None:
        self.watches.append(what)

    def track_graphs(self, holder) -> None:
        self.holders.append(holder)

    @contextlib.contextmanager
    def group(self):
        yield


class Module(PatchState):
    """Keeps one transfer's Work for the next step and, in an asynchronous step, reads the
    previous step's (what a patch-parallel layer does)."""

    def __init__(self, context: PatchContext, cuda: FakeCuda, fail_in_capture: bool = False) -> None:
        self.attach(context, "module")
        self.cuda = cuda
        self.log: list = []
        self.fail_in_capture = fail_in_capture
        self.writes_input = False  # changes its "embeddings" argument in place

    def forward(self, arguments):
        ctx = self.patch_context
        if not ctx.synchronous_step:
            self.take_stale()
        if self.fail_in_capture and self.cuda.capturing:
            raise RuntimeError("capture failed")
        if self.writes_input:
            arguments["embeddings"].add_(0.0)
        buffer = torch.full((2,), float(ctx.step))
        self.keep_exchange([FakeWork(self.cuda, self.log)], buffer)
        return arguments["sample"] * 2


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("Stream", "CUDAGraph", "graph", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def _setup(cuda, fail_in_capture=False):
    config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1)
    context = PatchContext(config)
    comm = FakeComm(cuda)
    module = Module(context, cuda, fail_in_capture)
    context.start_generation(comm, 0, 2, shape_key="shape")
    graphs = StepGraphs(context, [comm, comm])
    return context, comm, module, graphs


def _step(context, graphs, module, sample, refresh_conditioning=True, **arguments):
    context.begin_step(refresh_conditioning=refresh_conditioning)
    arguments = dict({"sample": sample, "timestep": torch.tensor(1.0)}, **arguments)
    try:
        return graphs.run(module.forward, arguments)
    finally:
        context.end_step(issue_pending=True)


def test_after_a_capture_the_context_holds_no_captured_work_and_replays_are_watched(cuda):
    context, comm, module, graphs = _setup(cuda)
    assert comm.holders == [graphs]  # registered once although listed twice
    sample = torch.randn(2)
    # step 0 synchronous (eager); asynchronous steps 1 and 2 eager (new keys, one per parity),
    # 3 and 4 captured and replayed, 5 and 6 replayed
    for step in range(7):
        out = _step(context, graphs, module, sample)
        torch.testing.assert_close(out, sample * 2)
        assert not any(getattr(w, "captured", False) for w in context.in_flight()), step
    assert graphs.captures == 2 and graphs.replays == 4 and cuda.replays == 4
    # every join was made inside a capture, once per comm and capture
    assert comm.joins == [True, True]
    assert len(comm.watches) == 4 and "replay" in comm.watches[0]
    # the exchange a replay leaves: the captured step's buffers, no handles
    exchange = module.exchange
    assert exchange is not None and exchange.works == () and exchange.buffers[0] is not None
    context.drain()  # nothing captured to synchronise


def test_a_failed_capture_forgets_its_key_and_every_exchange(cuda):
    context, comm, module, graphs = _setup(cuda, fail_in_capture=True)
    sample = torch.randn(2)
    for _ in range(3):
        _step(context, graphs, module, sample)
    with pytest.raises(RuntimeError, match="capture failed"):
        _step(context, graphs, module, sample)  # step 3: the first capture
    assert graphs.captures == 0 and not graphs._entries.get(graphs._key(None))
    assert all(state.exchange is None for state in context.states)
    assert context.in_flight() == []
    context.drain()  # nothing recorded in the failed capture is waited for
    # A new generation: keys met before are captured at once; the failed key (asynchronous, odd
    # steps) starts over: eager at step 1, captured at step 3.
    module.fail_in_capture = False
    context.start_generation(comm, 0, 2, shape_key="shape")
    captured = []
    for _ in range(4):
        before = graphs.captures
        _step(context, graphs, module, sample)
        captured.append(graphs.captures > before)
    assert captured == [True, False, True, True] and cuda.replays == 3


def test_release_drops_every_graph_and_the_next_step_runs_eagerly(cuda):
    context, comm, module, graphs = _setup(cuda)
    sample = torch.randn(2)
    for _ in range(5):
        _step(context, graphs, module, sample)
    assert graphs.captures == 2
    graphs.release()
    assert all(g.released for g in cuda.graphs) and not graphs._entries
    replays = cuda.replays
    _step(context, graphs, module, sample)
    assert cuda.replays == replays  # eager, not a replay of a released graph


def test_a_replay_waits_for_transfers_only_after_an_eager_step(cuda, monkeypatch):
    context, comm, module, graphs = _setup(cuda)
    sample = torch.randn(2)
    for _ in range(5):  # eager steps 0-2, captures at 3 and 4
        _step(context, graphs, module, sample)
    walked = []
    in_flight = context.in_flight
    monkeypatch.setattr(context, "in_flight", lambda: walked.append(context.step) or in_flight())
    for _ in range(3):
        _step(context, graphs, module, sample)
    assert walked == [] and cuda.replays == 5  # nothing can be in flight after a replay
    # A step of a new key (a float64 timestep) runs eagerly and leaves its transfers in flight:
    # the next replay has its stream wait for them.
    _step(context, graphs, module, sample, timestep=torch.tensor(1.0, dtype=torch.float64))
    assert context.in_flight() and cuda.replays == 5
    walked.clear()
    module.log.clear()
    _step(context, graphs, module, sample)
    assert cuda.replays == 6 and walked == [context.step] and module.log == ["wait"]
    assert context.in_flight() == []


def test_a_step_that_refreshes_the_conditioning_is_a_graph_of_its_own(cuda):
    context, comm, module, graphs = _setup(cuda)
    sample = torch.randn(2)
    replayed = []
    for step in range(10):
        before = cuda.replays
        # the first step always refreshes (PatchContext.begin_step); then step 5 and step 9
        _step(context, graphs, module, sample, refresh_conditioning=step in (5, 9))
        replayed.append(cuda.replays > before)
        assert context.refresh_conditioning == (step in (0, 5, 9))
    # step 5 (odd, asynchronous, refreshing) is a key of its own: eager the first time it is met,
    # captured the second (step 9)
    assert replayed == [False, False, False, True, True, False, True, True, True, True]
    assert graphs.captures == 3


def test_a_replay_copies_only_the_inputs_that_changed(cuda, monkeypatch):
    """The latent and timestep of every step are copied into the graph's inputs; conditioning that
    is the same memory at the same version as at the last copy is not (also a batch half cut anew
    each step from the same embeddings); an input the step changes in place is copied every time."""
    context, comm, module, graphs = _setup(cuda)
    embeddings, both_halves = torch.randn(3), torch.randn(4, 3)

    def arguments(step):
        return {
            "sample": torch.randn(2),
            "timestep": torch.tensor(float(step)),
            "embeddings": embeddings,
            "half": both_halves[2:],  # a new view of the same memory every step
        }

    for step in range(5):  # captured at 3 (odd) and 4 (even)
        _step(context, graphs, module, **arguments(step))
    copied = []
    copy = torch.Tensor.copy_

    def counting_copy(self, source, *args, **kwargs):
        copied.append(source)
        return copy(self, source, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)

    def step_and_check(step):
        """The step's copied arguments, by name; checks that the graph's inputs are the step's."""
        copied.clear()
        given = arguments(step)
        _step(context, graphs, module, **given)
        tensors, structure = flatten_tensors(given)
        for static, fresh in zip(graphs._entries[graphs._key(structure)].inputs, tensors):
            assert torch.equal(static, fresh), step
        return {name for name, value in given.items() if any(value is t for t in copied)}

    assert step_and_check(5) == {"sample", "timestep"}
    assert step_and_check(6) == {"sample", "timestep"}
    embeddings.mul_(2.0)  # changed in place: copied at each graph's next replay, once
    both_halves[3].add_(1.0)
    assert step_and_check(7) == step_and_check(8) == {"sample", "timestep", "embeddings", "half"}
    assert step_and_check(9) == {"sample", "timestep"}
    embeddings = torch.randn(3)  # a new tensor
    assert step_and_check(10) == {"sample", "timestep", "embeddings"}

    # A step that writes its own input: the captured graph would too, so it is copied every time.
    context, comm, module, graphs = _setup(cuda)
    module.writes_input = True
    for step in range(5):
        _step(context, graphs, module, **arguments(step))
    for step in range(5, 8):
        assert "embeddings" in step_and_check(step), step


def test_the_exchanges_a_replay_leaves_are_put_back_as_an_assignment_would(cuda):
    """Written into the instance dict where ``state.exchange = ...`` does nothing else (a plain
    object, an ``nn.Module``), assigned otherwise (here: a property that records it)."""
    from distripy.parallel.graphs import _plain_attributes

    class ModuleState(torch.nn.Module, PatchState):
        pass

    class Recorded(Module):
        assigned = []

        @property
        def exchange(self):
            return self.__dict__.get("_exchange")

        @exchange.setter
        def exchange(self, value):
            Recorded.assigned.append(value)
            self.__dict__["_exchange"] = value

    context = PatchContext(distripy.DistriConfig())
    plain, module = Module(context, cuda), ModuleState()
    module.attach(context, "module")
    recorded = Recorded(context, cuda)
    assert _plain_attributes(plain) is vars(plain) and _plain_attributes(module) is vars(module)
    assert _plain_attributes(recorded) is None

    context, comm, module, graphs = _setup(cuda)
    recorded = Recorded(context, cuda)
    sample = torch.randn(2)

    def forward(arguments):
        recorded.forward(arguments)
        return module.forward(arguments)

    for step in range(9):  # eager steps 0-2, captures at 3 and 4, then replays only
        if step == 5:
            Recorded.assigned.clear()
        context.begin_step()
        try:
            graphs.run(forward, {"sample": sample, "timestep": torch.tensor(1.0)})
        finally:
            context.end_step(issue_pending=True)
        if step >= 3:
            assert recorded.exchange is not None and recorded.exchange.works == ()
            assert module.exchange is not None and module.exchange.works == ()
            assert recorded.exchange.buffers[0] is not module.exchange.buffers[0]
    assert cuda.replays == 6
    # each replay (steps 5-8) assigned, once, the exchange its captured step left
    replayed = Recorded.assigned
    assert len(replayed) == 4 and replayed[0] is replayed[2] and replayed[1] is replayed[3]
    assert replayed[0].buffers[0] is not replayed[1].buffers[0]
