"""``full_sync`` and ``exact`` with ``DistriConfig(compress=...)``: their fresh exchanges of the
self-attention's keys and values sent compressed after the warm-up (``parallel.compression``), on
real gloo ranks with the tiny SDXL-architecture UNet.

Each rank runs one warm-up step and three compressed steps on given inputs (teacher forcing), and
records what every module sent and decoded at the last step. Checked across ranks, against the
codecs' references and against the other mode:

* ``fp8``: what every receiver decoded of band ``p`` is, exactly, the fp8 reference's round trip of
  the keys and values band ``p`` sent;
* ``residual2`` / ``residual1``: every rank holds the same baselines of every band, byte for byte
  (sender and receivers apply the same change), and a band's baseline moved towards the keys and
  values it was sent for (error feedback);
* ``exact`` (blockwise attention merged by log-sum-exp, packed blocks by ring shifts) computes what
  ``full_sync`` (one attention over the gathered image, one all-gather of packed bytes) does under
  the same codec: two algorithms over the same decoded keys and values, apart by far less than
  the codec moves a step (a rounding difference may cross a quantisation boundary);
* the warm-up step equals the uncompressed one bit for bit; the compressed steps are close to it,
  not equal.

Equal bands on 2 ranks, unequal on 3 (8 rows of the deepest level: 3, 3, 2).
"""

import functools

import pytest
import torch

from multirank import run_on_ranks
from test_compressed_exchange import fp8_round_trip
from unet_models import relative_error, sdxl_conditioning, tiny_sdxl_unet

WIDTH = 16
HEIGHT = 32
TIMESTEPS = (900.0, 850.0, 800.0, 750.0)
CODECS = ("fp8", "residual2", "residual1")
MODES = ("full_sync", "exact")


def _run(mode, compress):
    """One generation of ``TIMESTEPS`` on this rank: its outputs and, per self-attention module,
    what the last step sent and decoded (and a residual's baselines before and after it)."""
    import distripy
    from distripy.kernels.fp8_codec import fp8_decode_
    from distripy.parallel.compression import CompressedKeysValues

    config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=False, compress=compress)
    unet = distripy.parallelize(tiny_sdxl_unet(0), config)
    latents = torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(11))
    conditioning = sdxl_conditioning(1, 12)
    send, receive = CompressedKeysValues._send, CompressedKeysValues._receive
    last = {}

    def own_baseline(exchange, store, rows):
        values = torch.empty(rows, exchange.width)
        fp8_decode_(exchange._store_slot(store, exchange.ctx.band_index, 0, rows), values, "torch")
        return values

    def sending(self, values, store, packed):
        record = last.setdefault(id(self.state), {"path": self.state.patch_path, "received": {}})
        record.update(sent=values[0].clone(), lengths=self.lengths)
        if store is not None:
            record["before"] = own_baseline(self, store, values.shape[1])
        send(self, values, store, packed)
        if store is not None:
            record["after"] = own_baseline(self, store, values.shape[1])
            record["store"] = store

    def receiving(self, packed, band, values, store):
        receive(self, packed, band, values, store)
        last[id(self.state)]["received"][band] = values[0].clone()

    CompressedKeysValues._send, CompressedKeysValues._receive = sending, receiving
    outputs = []
    try:
        with torch.no_grad():
            distripy.reset(unet, steps=len(TIMESTEPS))
            for step, t in enumerate(TIMESTEPS):
                outputs.append(unet(latents + 0.05 * step, torch.tensor(t), **conditioning).sample)
    finally:
        CompressedKeysValues._send, CompressedKeysValues._receive = send, receive
    modules = sorted(last.values(), key=lambda record: record["path"])
    for record in modules:  # a residual's baselines as the last step left them, every band's slot
        store = record.pop("store", None)
        if store is not None:
            from distripy.kernels.fp8_codec import fp8_layout

            width = record["sent"].shape[-1]
            record["baselines"] = [
                store[band, 0, : fp8_layout(rows, width).nbytes].clone() for band, rows in enumerate(record["lengths"])
            ]
    return {"outputs": outputs, "modules": modules}


def _poisoned(mode, compress, rank):
    """A ``distripy.generation`` whose rank 0 sends non-finite keys and values at its last step:
    what each rank's block raised, or None."""
    import distripy
    from distripy.errors import StepError
    from distripy.parallel.compression import CompressedKeysValues

    send = CompressedKeysValues._send

    def poisoning(self, values, store, packed):
        if rank == 0 and self.ctx.step == len(TIMESTEPS) - 1:
            values[0, 0, 0] = float("nan")
        send(self, values, store, packed)

    config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=False, compress=compress)
    unet = distripy.parallelize(tiny_sdxl_unet(0), config)
    latents = torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(11))
    conditioning = sdxl_conditioning(1, 12)
    CompressedKeysValues._send = poisoning
    try:
        with torch.no_grad(), distripy.generation(unet, steps=len(TIMESTEPS)):
            for step, t in enumerate(TIMESTEPS):
                unet(latents + 0.05 * step, torch.tensor(t), **conditioning)
    except StepError as error:
        return str(error)
    finally:
        CompressedKeysValues._send = send
    return None


def _body(rank, world_size):
    runs = {(mode, compress): _run(mode, compress) for mode in MODES for compress in ("none",) + CODECS}
    runs["poisoned"] = {(mode, codec): _poisoned(mode, codec, rank) for mode, codec in zip(MODES, ("fp8", "residual2"))}
    return runs


@functools.lru_cache(maxsize=None)
def _world(world_size):
    """Every rank's runs (one launch per world size, shared by the tests)."""
    return run_on_ranks(_body, world_size, timeout=600)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_fresh_compressed_keys_values_arrive_as_the_codec_sends_them(world_size, mode):
    ranks = _world(world_size)
    for compress in CODECS:
        per_rank = [result[(mode, compress)]["modules"] for result in ranks]
        count = len(per_rank[0])
        assert count > 0 and all(len(modules) == count for modules in per_rank)
        for index in range(count):
            for sender in range(world_size):
                source = per_rank[sender][index]
                receivers = [r for r in range(world_size) if r != sender]
                if compress == "fp8":
                    expected = fp8_round_trip(source["sent"])
                    for receiver in receivers:
                        held = per_rank[receiver][index]["received"][sender]
                        assert torch.equal(held, expected), (compress, index, sender, receiver)
                    continue
                # the change brought the sender's baseline closer to what it sent
                error, error_before = (relative_error(source[b], source["sent"]) for b in ("after", "before"))
                assert 0 < error < 0.8 * error_before, (compress, index, sender, error, error_before)
                for receiver in receivers:  # every rank stores every band's baseline alike
                    for band, stored in enumerate(source["baselines"]):
                        other = per_rank[receiver][index]["baselines"][band]
                        assert torch.equal(stored, other), (compress, index, sender, receiver, band)


@pytest.mark.parametrize("world_size", [2, 3])
def test_fresh_compressed_steps_stay_close_and_exact_equals_full_sync(world_size, record_property):
    ranks = _world(world_size)
    errors = {}
    for compress in CODECS:
        for mode in MODES:
            outputs = ranks[0][(mode, compress)]["outputs"]
            plain = ranks[0][(mode, "none")]["outputs"]
            for rank in range(1, world_size):  # every rank holds the whole output
                for a, b in zip(outputs, ranks[rank][(mode, compress)]["outputs"]):
                    assert torch.equal(a, b), (mode, compress, rank)
            assert torch.equal(outputs[0], plain[0]), (mode, compress)  # the warm-up: full precision
            errors[(mode, compress)] = [relative_error(a, b) for a, b in zip(outputs[1:], plain[1:])]
        # the blockwise attention over the decoded blocks computes one attention over them gathered:
        # the two differ in rounding only, which may move a value across a quantisation boundary
        # (the compressed steps' keys and values are those of layers that rounded differently), so
        # by far less than the codec moves the step
        exact, full = (ranks[0][(mode, compress)]["outputs"] for mode in MODES)
        assert relative_error(exact[0], full[0]) < 1e-5, compress
        for step in range(1, len(TIMESTEPS)):
            apart = relative_error(exact[step], full[step])
            assert apart < 0.3 * errors[("exact", compress)][step - 1], (compress, step, apart)
    record_property("relative_error_vs_uncompressed", {f"{m} {c}": e for (m, c), e in errors.items()})
    for key, per_step in errors.items():
        assert all(0 < error < 0.02 for error in per_step), (key, per_step)


@pytest.mark.parametrize("world_size", [2, 3])
def test_non_finite_fresh_keys_and_values_on_one_rank_raise_on_every_rank(world_size):
    """Only rank 0 sent non-finite keys and values (marked where encoded); the generation's end
    raises on every rank, naming the codec."""
    for (mode, codec), _ in _world(world_size)[0]["poisoned"].items():
        raised = [result["poisoned"][(mode, codec)] for result in _world(world_size)]
        assert all(m is not None and "non-finite" in m and codec in m for m in raised), (mode, raised)


@pytest.mark.parametrize("mode, compress", [("exact", "residual2"), ("full_sync", "fp8"), ("exact", "fp8")])
def test_fresh_compressed_steps_under_cuda_graphs(monkeypatch, mode, compress):
    """With persistent buffers (CUDA graphs; ``torch.cuda``'s graph entry points faked as in
    ``test_graph_bookkeeping``): the warm-up and the compressed steps are graphs of their own, every
    buffer a compressed step keeps exists before its capture (a residual's baselines, made by the
    warm-up), and a second and third generation replay them."""
    import distripy
    from test_compile import ONE_LEVEL_UNET
    from test_graph_bookkeeping import FakeCuda

    from distripy.parallel.graphs import StepGraphs
    from distripy.pipelines.unet import installed_forward
    from distripy.runtime import LoopbackComm

    fake = FakeCuda()
    for name in ("Stream", "CUDAGraph", "graph", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    config = distripy.DistriConfig(
        mode=mode, warmup_steps=2, split_batch=False, compress=compress, use_cuda_graph=False
    )
    unet = distripy.parallelize(tiny_sdxl_unet(0, **ONE_LEVEL_UNET), config, comm=LoopbackComm(1, 2))
    forward = installed_forward(unet)
    forward.context.static_buffers = True
    forward.graphs = StepGraphs(forward.context, [forward.context.comm or forward.world_comm], eager_runs=1)
    monkeypatch.setattr(forward, "_input_problem", lambda *args: None)  # it wants a CUDA sample
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)
    with torch.no_grad():
        for generation in range(3):
            distripy.reset(unet)
            for step, t in enumerate((900.0, 850.0, 800.0, 750.0, 700.0)):
                unet(latents + 0.01 * step, torch.tensor(t), **conditioning)
    # warm-up (refreshing its conditioning, then not), compressed of each parity: four graphs
    assert forward.graphs.captures == 4 and forward.graphs.replays > 0, forward.graphs.captures
    names = {key[1] for buffers in forward.context.buffers._buffers.values() for key in buffers}
    assert ("baselines_fp8" in names) == compress.startswith("residual"), names


@pytest.mark.parametrize("mode, compress", [("exact", "residual2"), ("full_sync", "fp8")])
def test_a_fresh_compressed_step_compiles_and_equals_eager(monkeypatch, mode, compress):
    """Under ``compile=True`` (dynamo's ``eager`` backend: what decides recompiles is its guards)
    the warm-up step and the compressed steps are traced once each, a second generation traces
    nothing new, and the compiled steps equal the eager ones (run with the kernels' references,
    which a traced step calls)."""
    import distripy
    from test_compile import ONE_LEVEL_UNET
    from torch._dynamo.utils import counters

    from distripy.runtime import LoopbackComm

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **dict(kw, backend="eager")))
    torch._dynamo.reset()
    counters.clear()

    def unet(**settings):
        config = distripy.DistriConfig(
            mode=mode, warmup_steps=1, split_batch=False, compress=compress, use_cuda_graph=False, **settings
        )
        return distripy.parallelize(tiny_sdxl_unet(0, **ONE_LEVEL_UNET), config, comm=LoopbackComm(1, 2))

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)

    def generations(model, check):
        with torch.no_grad():
            for generation in range(2):
                distripy.reset(model)
                for step, t in enumerate(TIMESTEPS):
                    check(generation, step, model(latents + 0.01 * step, torch.tensor(t), **conditioning).sample)

    expected = {}  # eagerly, with the kernels' references: what a compiled step traces
    generations(unet(kernel_backend="torch"), lambda generation, step, out: expected.setdefault((generation, step), out))
    graphs = []

    def check(generation, step, out):
        assert torch.equal(out, expected[generation, step]), (generation, step)
        graphs.append(counters["stats"]["unique_graphs"])

    generations(unet(compile=True), check)
    assert graphs[1] > graphs[0] and len(set(graphs[2:])) == 1, graphs  # nothing after the first compressed step
