"""CUDA-graph step bookkeeping (``parallel.graphs.StepGraphs``), on CPU.

A real capture needs a GPU; what goes wrong around one is bookkeeping: which Work handles the
context still holds after a capture, what a failed capture leaves behind, which comms are asked to
join, watch and release. Here ``torch.cuda``'s stream and graph entry points are replaced by fakes
that record whether a capture is running, and the comm's Works refuse what CUDA refuses: a Work
recorded inside a capture cannot be waited for, or synchronised, outside it.
"""

import contextlib

import pytest
import torch

import distripy
from distripy.parallel.context import PatchContext, PatchState
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

    def forward(self, arguments):
        ctx = self.patch_context
        if not ctx.synchronous_step:
            self.take_stale()
        if self.fail_in_capture and self.cuda.capturing:
            raise RuntimeError("capture failed")
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


def _step(context, graphs, module, sample):
    context.begin_step()
    try:
        return graphs.run(module.forward, {"sample": sample, "timestep": torch.tensor(1.0)})
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
