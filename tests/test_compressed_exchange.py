"""``DistriConfig(compress=...)``: the asynchronous steps' self-attention keys and values sent
compressed (``parallel.compression``), on real gloo ranks with the tiny SDXL-architecture UNet.

Each rank runs one warm-up step and stale steps on the same inputs (teacher forcing: the inputs are
given, not the loop's own), then reports, per self-attention module, what the last step left: its
own band's fresh keys and values, its own baseline (``residual``), and the other bands' slots with
the bytes they sent at the end of the last step decoded in (as the next step would). Checked
across ranks, and against the codecs' references run here on the senders' values:

* ``residual2`` / ``residual1``: what every receiver holds for band ``p`` is, bit for bit, band
  ``p``'s own baseline (sender and receivers apply the same change), and the baseline tracks the
  band's keys and values (error feedback);
* ``fp8``: what every receiver holds for band ``p`` is, exactly, the fp8 reference's round trip of
  band ``p``'s keys and values;
* the compressed steps' output is close to the uncompressed asynchronous steps', and differs from
  it (the decoded values are what the receivers attend over); the first stale step, which attends
  over the warm-up's full-precision keys and values, equals it.

Equal bands on 2 ranks, unequal on 3 (8 rows of the deepest level: 3, 3, 2).
"""

import dataclasses
import functools

import pytest
import torch

from multirank import run_on_ranks
from unet_models import relative_error, sdxl_conditioning, tiny_sdxl_unet

WIDTH = 16
HEIGHT = 32
TIMESTEPS = (900.0, 850.0, 800.0, 750.0, 700.0)
CODECS = ("fp8", "residual2", "residual1")


def _run(compress):
    """One generation of ``TIMESTEPS`` on this rank, and what its self-attention modules keep."""
    import distripy
    from distripy.kernels.fp8_codec import fp8_decode_
    from distripy.parallel.compression import CompressedKeysValues

    config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1, split_batch=False, compress=compress)
    unet = distripy.parallelize(tiny_sdxl_unet(0), config)
    latents = torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(11))
    conditioning = sdxl_conditioning(1, 12)
    outputs, last = [], {}
    stale_step = CompressedKeysValues.stale_step

    def recording(self, projected):  # each module's last stale step: its exchange and what it attended over
        gathered = stale_step(self, projected)
        last[id(self.state)] = (self, gathered.clone())
        return gathered

    CompressedKeysValues.stale_step = recording
    try:
        with torch.no_grad():
            distripy.reset(unet, steps=len(TIMESTEPS))
            for step, t in enumerate(TIMESTEPS):
                outputs.append(unet(latents + 0.05 * step, torch.tensor(t), **conditioning).sample)
    finally:
        CompressedKeysValues.stale_step = stale_step
    modules = []
    for exchange, attended in last.values():
        state, lengths, width, codec = exchange.state, exchange.lengths, exchange.width, exchange.codec
        gathered, store, received = state.exchange.buffers
        for work in state.exchange.works:
            work.wait()
        me = exchange.ctx.band_index

        def baseline(band):  # what this rank stores of a band (a residual codec), decoded
            values = torch.empty(lengths[band], width)
            fp8_decode_(exchange._store_slot(store, band, 0, lengths[band]), values, "torch")
            return values

        held, before = [], []
        for band, length in enumerate(lengths):
            if codec.residual:
                values = baseline(band)
                before.append(values.clone())
            else:
                values = gathered[0, band, :length].clone()
                before.append(attended[0, band, :length].clone())
            if band != me:  # what the next step will attend over
                codec.decode(received[band, 0, : codec.nbytes(length, width)], values, "torch")
            held.append(values)
        modules.append(
            {
                "fresh": attended[0, me, : lengths[me]].clone(),
                "own": baseline(me) if codec.residual else None,
                "held": held,
                "before": before,
            }
        )
    return {"outputs": outputs, "modules": modules}


def _poisoned_generation(rank):
    """One ``distripy.generation`` in which only rank 0's keys and values turn non-finite, at its
    last step (so that nothing non-finite reaches another rank's keys and values: what they
    receive of rank 0's band is from the step before): what each rank's block raised, or None."""
    import distripy
    from distripy.errors import StepError
    from distripy.parallel.compression import CompressedKeysValues

    stale_step = CompressedKeysValues.stale_step

    def poisoning(self, projected):
        gathered = stale_step(self, projected)
        if rank == 0 and self.ctx.step == 3:
            gathered[0, self.ctx.band_index, 0, 0] = float("nan")
        return gathered

    config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1, split_batch=False, compress="residual2")
    unet = distripy.parallelize(tiny_sdxl_unet(0), config)
    latents = torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(11))
    conditioning = sdxl_conditioning(1, 12)
    CompressedKeysValues.stale_step = poisoning
    try:
        with torch.no_grad(), distripy.generation(unet, steps=4):
            for step, t in enumerate(TIMESTEPS[:4]):
                unet(latents + 0.05 * step, torch.tensor(t), **conditioning)
    except StepError as error:
        return str(error)
    finally:
        CompressedKeysValues.stale_step = stale_step
    return None


def _body(rank, world_size):
    runs = {compress: _run(compress) for compress in ("none",) + CODECS}
    runs["poisoned"] = _poisoned_generation(rank)
    return runs


@functools.lru_cache(maxsize=None)
def _world(world_size):
    """Every rank's runs (one launch per world size, shared by the tests)."""
    return run_on_ranks(_body, world_size)


def fp8_round_trip(x):
    """``x`` through the fp8 codec's references, encoded and decoded (also for
    ``test_compressed_fresh_exchange``)."""
    from distripy.kernels.fp8_codec import fp8_decode_reference_, fp8_encode_reference_, fp8_layout

    packed = torch.empty(fp8_layout(*x.shape).nbytes, dtype=torch.uint8)
    fp8_encode_reference_(x, packed)
    out = torch.full_like(x, float("nan"))
    fp8_decode_reference_(packed, out)
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_compressed_keys_values_arrive_as_the_codec_sends_them(world_size):
    ranks = _world(world_size)
    for compress in CODECS:
        per_rank = [result[compress]["modules"] for result in ranks]
        assert len(per_rank[0]) > 0
        for index in range(len(per_rank[0])):
            for sender in range(world_size):
                source = per_rank[sender][index]
                if compress == "fp8":
                    expected = fp8_round_trip(source["fresh"])
                else:
                    expected = source["own"]  # the sender's new baseline, stored in fp8
                    # the step's change brought the baseline closer to the keys and values it was
                    # sent for (what a receiver held before the step's change: the baseline before)
                    before = per_rank[(sender + 1) % world_size][index]["before"][sender]
                    error, error_before = (relative_error(b, source["fresh"]) for b in (expected, before))
                    assert 0 < error < 0.8 * error_before, (compress, index, sender, error, error_before)
                for receiver in range(world_size):
                    if receiver != sender:
                        held = per_rank[receiver][index]["held"][sender]
                        if compress != "fp8":  # the receiver stores it in fp8 as the sender did
                            held = fp8_round_trip(held)
                        assert torch.equal(held, expected), (compress, index, sender, receiver)


@pytest.mark.parametrize("world_size", [2, 3])
def test_compressed_steps_stay_close_to_the_uncompressed_steps(world_size, record_property):
    ranks = _world(world_size)
    plain = ranks[0]["none"]["outputs"]
    errors = {}
    for compress in CODECS:
        outputs = ranks[0][compress]["outputs"]
        for rank in range(1, world_size):  # every rank holds the whole output
            for a, b in zip(outputs, ranks[rank][compress]["outputs"]):
                assert torch.equal(a, b), (compress, rank)
        # the warm-up step; fp8's first stale step too (over the warm-up's exact keys and values),
        # a residual's over them stored in fp8 (its baselines): close, not equal
        assert torch.equal(outputs[0], plain[0]), compress
        assert torch.equal(outputs[1], plain[1]) == (compress == "fp8"), compress
        first = 2 if compress == "fp8" else 1
        errors[compress] = [relative_error(outputs[step], plain[step]) for step in range(first, len(TIMESTEPS))]
    record_property("relative_error_vs_uncompressed", errors)
    for compress, per_step in errors.items():
        assert all(0 < error < 0.02 for error in per_step), (compress, per_step)
    assert max(errors["fp8"]) < max(errors["residual2"]) <= max(errors["residual1"]) * 1.5, errors


@pytest.mark.parametrize("world_size", [2, 3])
def test_non_finite_keys_and_values_on_one_rank_raise_on_every_rank(world_size):
    """Only rank 0 met non-finite keys and values; the generation's end raises on every rank."""
    raised = [result["poisoned"] for result in _world(world_size)]
    assert all(message is not None and "non-finite" in message and "residual2" in message for message in raised), raised


def _pipeline_body(rank, world_size):
    """A whole SDXL pipeline (text encoders, UNet, VAE decode) with the CFG split, uncompressed and
    compressed: each step's latents and the image."""
    import distripy
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    results = {}
    settings = [("corrected_async_gn", c) for c in ("none", "residual2", "fp8")] + [("exact", "none"), ("exact", "residual2")]
    for mode, compress in settings:
        config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=True, compress=compress)
        pipe = distripy.parallelize(tiny_sdxl_pipeline(0), config)
        pipe.set_progress_bar_config(disable=True)
        latents = []

        def keep(pipe, step, timestep, tensors):
            latents.append(tensors["latents"].clone())
            return tensors

        image = pipe(
            "a lighthouse on a cliff at dawn",
            height=128,
            width=64,
            num_inference_steps=5,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        results[compress if mode == "corrected_async_gn" else (mode, compress)] = (latents, torch.from_numpy(image))
    return results


def test_a_compressed_pipeline_with_the_cfg_split_matches_its_uncompressed_steps(run_ranks):
    """4 ranks, 2 bands per CFG half: the pipeline's VAE decode and text encoders are untouched by
    ``compress``; every rank ends with the same image; the warm-up step (and fp8's first stale
    step, over the warm-up's full-precision keys and values) equal the uncompressed ones, bit for
    bit; the later steps attend over decoded keys and values: close, not equal. The same for
    ``exact``, whose fresh exchanges are compressed after its first step."""
    per_rank = run_ranks(_pipeline_body, 4, timeout=600)
    for compress in ("residual2", "fp8"):
        for rank in range(1, 4):
            assert torch.equal(per_rank[rank][compress][1], per_rank[0][compress][1]), (compress, rank)
        plain, packed = per_rank[0]["none"][0], per_rank[0][compress][0]
        assert len(plain) == len(packed) == 5
        exact = 2 if compress == "fp8" else 1
        for step in range(exact):
            assert torch.equal(packed[step], plain[step]), (compress, step)
        errors = [relative_error(packed[step], plain[step]) for step in range(exact, 5)]
        assert all(0 < error < 0.05 for error in errors), (compress, errors)
    # exact's fresh exchanges compressed after its first step, with the split: the same image on
    # every rank; the first step exact, the later ones close
    fresh = ("exact", "residual2")
    for rank in range(1, 4):
        assert torch.equal(per_rank[rank][fresh][1], per_rank[0][fresh][1]), rank
    plain, packed = per_rank[0][("exact", "none")][0], per_rank[0][fresh][0]
    assert torch.equal(packed[0], plain[0])
    errors = [relative_error(packed[step], plain[step]) for step in range(1, 5)]
    assert all(0 < error < 0.05 for error in errors), errors


def _loopback_unet(compress, **settings):
    import distripy
    from test_compile import ONE_LEVEL_UNET

    from distripy.runtime import LoopbackComm

    config = distripy.DistriConfig(
        mode="corrected_async_gn", warmup_steps=1, split_batch=False, compress=compress, use_cuda_graph=False, **settings
    )
    return distripy.parallelize(tiny_sdxl_unet(0, **ONE_LEVEL_UNET), config, comm=LoopbackComm(1, 2))


def _generations(unet, count, check=None):
    import distripy

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)
    with torch.no_grad():
        for generation in range(count):
            distripy.reset(unet)
            for step, t in enumerate(TIMESTEPS[:4]):
                out = unet(latents + 0.01 * step, torch.tensor(t), **conditioning).sample
                if check is not None:
                    check(generation, step, out)


def test_a_compressed_step_compiles_once_and_equals_eager(monkeypatch):
    """Under ``compile=True`` (dynamo's ``eager`` backend: what decides recompiles is its guards)
    a compressed stale step is traced once: the first stale step (which decodes the warm-up's
    no-change bytes) and the later ones run the same code; the compiled steps equal the eager ones."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **dict(kw, backend="eager")))
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _loopback_unet("residual2"), _loopback_unet("residual2", compile=True)
    expected = []
    _generations(eager, 2, lambda generation, step, out: expected.append(out))
    graphs = []

    def check(generation, step, out):
        assert torch.equal(out, expected[4 * generation + step]), (generation, step)
        graphs.append(counters["stats"]["unique_graphs"])

    _generations(compiled, 2, check)
    assert graphs[1] > graphs[0] and len(set(graphs[1:])) == 1, graphs  # nothing after the first stale step


@pytest.mark.parametrize("compress", ["residual2", "fp8"])
def test_under_cuda_graphs_a_compressed_exchange_keeps_one_buffer_set(monkeypatch, compress):
    """With persistent buffers (CUDA graphs; ``torch.cuda``'s graph entry points faked as in
    ``test_graph_bookkeeping``): every buffer a compressed step uses exists before its capture;
    uncompressed, the self-attention modules keep one set of whole-image keys and values per step
    parity; ``fp8`` one set; a residual codec only its baselines, in fp8 (no whole-image keys and
    values at their own precision: a byte an element)."""
    from test_graph_bookkeeping import FakeCuda

    from distripy.parallel import PatchSelfAttnProcessor
    from distripy.parallel.graphs import StepGraphs
    from distripy.pipelines.unet import installed_forward

    fake = FakeCuda()
    for name in ("Stream", "CUDAGraph", "graph", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    kept = {}
    for codec in ("none", compress):
        unet = _loopback_unet(codec)
        forward = installed_forward(unet)
        forward.context.static_buffers = True
        forward.graphs = StepGraphs(forward.context, [forward.context.comm or forward.world_comm], eager_runs=1)
        monkeypatch.setattr(forward, "_input_problem", lambda *args: None)  # it wants a CUDA sample
        _generations(unet, 3)
        assert forward.graphs.captures == 3 and forward.graphs.replays > 0, (codec, forward.graphs.captures)
        attention = {state.patch_path for state in forward.context.states if isinstance(state, PatchSelfAttnProcessor)}
        pool = forward.context.buffers._buffers
        kept[codec] = {
            packed: sum(
                tensor.numel() * tensor.element_size()
                for buffers in pool.values()
                for key, tensor in buffers.items()
                if key[0] in attention and (tensor.dtype == torch.uint8) == packed
            )
            for packed in (False, True)
        }
        if codec != "none":
            (stores,) = [
                tensor for buffers in pool.values() for key, tensor in buffers.items() if key[1] == "baselines_fp8"
            ] or [None]
            # generations of another codec (compress="auto" chooses per generation) are other graphs
            other = "fp8" if codec != "fp8" else "residual1"
            context = forward.context
            context.config = dataclasses.replace(context.config, compress=other)
            _generations(unet, 2)
            assert forward.graphs.captures == 6 and context.compress == other, forward.graphs.captures
    # S: one whole-image set of keys and values, S / 2 one band's (2 bands). Uncompressed: a set
    # per step parity and the warm-up's send buffer; fp8: the warm-up's set, updated in place, and
    # its send buffer; a residual: none (its baselines are fp8 bytes)
    whole = kept["none"][False] / 2.5
    assert kept["none"][True] == 0
    if compress == "fp8":
        assert kept[compress][False] == whole * 1.5 and stores is None, kept
    else:
        assert kept[compress][False] == 0 and stores is not None, kept
        elements = whole / 4  # the UNet is fp32: a byte each in fp8, and a scale per row
        assert elements < stores.numel() < elements * 1.2, (stores.numel(), elements)


def test_auto_compresses_where_the_planner_says_the_link_cannot_hide_keys_and_values(monkeypatch):
    """``compress="auto"``: per generation, the codec of ``AUTO_CODECS`` the planner predicts
    fastest, where it is faster than uncompressed by more than ``AUTO_GAIN`` on the generation's
    machine (over PCIe Gen4 without the CFG split, 2048²: ``fp8`` on 4 H100s, whose half of the bytes
    is enough, ``residual2`` on 8, where only about an eighth hides), ``none`` where the link hides
    them (NVLink), on a machine without a profile, and for a generation that runs no stale step; a
    codec named is kept. Through a parallelised UNet (on ``meta``: a 2048²-sized latent without
    memory) the generation's context gets the choice."""
    import distripy
    from distripy.kernels import meta_as_gpu
    from distripy.parallel.compress_choice import AUTO_CODECS, AUTO_GAIN, chosen_codec
    from distripy.parallel.policy import ModeChoice
    from distripy.pipelines import generation as generations
    from distripy.pipelines.unet import installed_forward
    from distripy.runtime import LoopbackComm

    auto = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=5, compress="auto")
    stale, exact = ModeChoice("corrected_async_gn", 5, ""), ModeChoice("exact", 0, "")
    from distripy.planning import FABRICS, GPUS, predict

    pcie, nvlink = ("l40", "pcie4"), ("h100", "nvlink4")
    latent = (256, 256)
    seconds = {
        codec: predict(GPUS["l40"], FABRICS["pcie4"], latent, 50, 8, False, "corrected_async_gn", 5, True,
                       compress=codec).seconds  # fmt: skip
        for codec in ("none", *AUTO_CODECS)
    }
    fastest = min(AUTO_CODECS, key=seconds.get)
    assert seconds[fastest] < seconds["none"] * (1 - AUTO_GAIN), seconds
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, pcie, stale) == fastest
    assert chosen_codec(auto, latent, 4, False, 4, 50, True, ("h100", "pcie4"), stale) == "fp8"
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, ("h100", "pcie4"), stale) == "residual2"
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, nvlink, stale) == "none"
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, None, stale) == "none"
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, pcie, exact) == "none"
    assert chosen_codec(auto, latent, 2, True, 1, 50, True, pcie, stale) == "none"  # one band per image
    named = distripy.DistriConfig(compress="fp8")
    assert chosen_codec(named, latent, 8, False, 8, 50, True, None, exact) == "fp8"

    for machine, expected in ((pcie, fastest), (nvlink, "none")):
        monkeypatch.setattr(generations, "machine_for", lambda model: machine)
        config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=5, split_batch=False, compress="auto")
        unet = distripy.parallelize(tiny_sdxl_unet(0).to("meta"), config, comm=LoopbackComm(0, 8))
        conditioning = sdxl_conditioning(1, 1)
        conditioning = {
            "encoder_hidden_states": conditioning["encoder_hidden_states"].to("meta"),
            "added_cond_kwargs": {k: v.to("meta") for k, v in conditioning["added_cond_kwargs"].items()},
        }
        with torch.no_grad(), meta_as_gpu(), distripy.generation(unet, steps=50):
            unet(torch.empty(1, 4, *latent, device="meta"), torch.tensor(900.0), **conditioning)
            assert installed_forward(unet).context.compress == expected, machine


@pytest.mark.parametrize("compress", ["residual2", "fp8"])
def test_a_non_finite_row_never_reaches_what_the_receivers_keep(monkeypatch, compress):
    """A non-finite value in a band's keys and values (written into its slot in place of the
    projection's, at the second stale step of one module) is found where it is encoded: its row
    is sent marked, and neither the sender's own baseline nor what a receiver decodes takes it in;
    the other rows travel as usual."""
    from distripy.kernels.fp8_codec import fp8_decode_
    from distripy.kernels.residual_codec import nonfinite_rows
    from distripy.parallel import PatchSelfAttnProcessor
    from distripy.parallel.compression import CompressedKeysValues, ExchangeCodec
    from distripy.pipelines.unet import installed_forward

    stale_step, encode = CompressedKeysValues.stale_step, ExchangeCodec.encode
    poisoned, marked, exchanges = [], [], {}

    def counting(self, x, baseline, packed, backend):
        encode(self, x, baseline, packed, backend)
        marked.append(int(nonfinite_rows(packed, x.shape[0])))

    def poisoning(self, projected):
        gathered = stale_step(self, projected)
        exchanges[id(self.state)] = self
        if self.ctx.step == 2 and not poisoned:
            gathered[0, self.ctx.band_index, 0, 0] = float("nan")
            poisoned.append(self.state)
        return gathered

    monkeypatch.setattr(CompressedKeysValues, "stale_step", poisoning)
    monkeypatch.setattr(ExchangeCodec, "encode", counting)
    unet = _loopback_unet(compress)  # rank 1 of 2 on a loopback: the other band's slot decodes its own bytes
    _generations(unet, 1)
    assert len(poisoned) == 1 and sum(marked) == 1 and len(marked) > 1, marked  # the one row, marked
    context = installed_forward(unet).context
    me, other = context.band_index, 1 - context.band_index
    for module in context.states:
        if not isinstance(module, PatchSelfAttnProcessor):
            continue
        exchange = exchanges[id(module)]
        gathered, store, received = module.exchange.buffers
        codec, rows, width = exchange.codec, exchange.lengths[other], exchange.width

        def stored(band):  # a residual's baseline of ``band``, decoded
            values = torch.empty(rows, width)
            fp8_decode_(exchange._store_slot(store, band, 0, rows), values, "torch")
            return values

        peer = stored(other) if codec.residual else gathered[0, other, :rows].clone()
        codec.decode(received[other, 0, : codec.nbytes(rows, width)], peer, "torch")  # what the next step decodes
        assert torch.isfinite(peer).all(), module.patch_path
        if codec.residual:  # the sender's own baseline: the receiver's, stored in fp8 as it will be
            own = stored(me)
            assert torch.isfinite(own).all() and torch.equal(own, fp8_round_trip(peer)), module.patch_path


def test_a_generation_whose_keys_and_values_were_non_finite_raises_when_it_ends(monkeypatch):
    """The rows the encoders marked are counted on the device; a ``distripy.generation`` block that
    ends raises, naming the model and the codec, when any was (on a clean generation: nothing)."""
    import distripy
    from distripy.errors import StepError
    from distripy.parallel.compression import CompressedKeysValues

    stale_step = CompressedKeysValues.stale_step
    poison = {"on": False}

    def poisoning(self, projected):
        gathered = stale_step(self, projected)
        if poison["on"] and self.ctx.step == 2:
            gathered[0, self.ctx.band_index, 0, 0] = float("inf")
        return gathered

    monkeypatch.setattr(CompressedKeysValues, "stale_step", poisoning)
    unet = _loopback_unet("residual2")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)

    def generation():
        with torch.no_grad(), distripy.generation(unet, steps=4):
            for step, t in enumerate(TIMESTEPS[:4]):
                unet(latents + 0.01 * step, torch.tensor(t), **conditioning)

    generation()  # clean: nothing counted, nothing raised
    poison["on"] = True
    with pytest.raises(StepError, match=r"rows of self-attention keys and values were non-finite .*compress='residual2'"):
        generation()
    with torch.no_grad(), distripy.generation(unet, steps=4):
        pass  # a block without a step: the count was checked, it is not raised again
    poison["on"] = False
    generation()  # the count starts afresh with each generation


def test_a_non_finite_warm_up_value_is_counted_and_never_stored(monkeypatch):
    """A residual codec stores the warm-up's keys and values as its first baselines (fp8): a
    non-finite value among them is counted (the generation raises when it ends) and stored as 0,
    so that no baseline row is ever marked (a marked row would decode to whatever a step's buffer
    held, differently on each rank)."""
    import distripy
    from distripy.errors import StepError
    from distripy.kernels.fp8_codec import fp8_decode_
    from distripy.parallel.compression import CompressedKeysValues

    keep_warm, stores = CompressedKeysValues.keep_warm, []

    def poisoning(self, works, gathered):
        gathered[0, self.ctx.band_index, 1, 2] = float("inf")
        keep_warm(self, works, gathered)
        stores.append((self, self.state.exchange.buffers[1].clone()))  # as the warm-up left it

    monkeypatch.setattr(CompressedKeysValues, "keep_warm", poisoning)
    unet = _loopback_unet("residual2")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = sdxl_conditioning(2, 1)
    with pytest.raises(StepError, match="non-finite"):
        with torch.no_grad(), distripy.generation(unet, steps=4):
            for step, t in enumerate(TIMESTEPS[:4]):
                unet(latents + 0.01 * step, torch.tensor(t), **conditioning)
    assert stores
    for exchange, store in stores:
        for band, rows in enumerate(exchange.lengths):
            for item in range(store.shape[1]):
                values = torch.full((rows, exchange.width), float("nan"))
                fp8_decode_(exchange._store_slot(store, band, item, rows), values, "torch")
                assert torch.isfinite(values).all(), (band, item)
