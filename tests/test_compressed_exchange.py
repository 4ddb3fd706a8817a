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
    from distripy.parallel import PatchSelfAttnProcessor
    from distripy.pipelines.unet import installed_forward

    config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1, split_batch=False, compress=compress)
    unet = distripy.parallelize(tiny_sdxl_unet(0), config)
    latents = torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(11))
    conditioning = sdxl_conditioning(1, 12)
    outputs = []
    with torch.no_grad():
        distripy.reset(unet, steps=len(TIMESTEPS))
        for step, t in enumerate(TIMESTEPS):
            outputs.append(unet(latents + 0.05 * step, torch.tensor(t), **conditioning).sample)
    context = installed_forward(unet).context
    modules = []
    for state in context.states:
        if not isinstance(state, PatchSelfAttnProcessor) or compress == "none":
            continue
        gathered, own, received = state.exchange.buffers
        for work in state.exchange.works:
            work.wait()
        width = gathered.shape[-1]
        lengths = context.layout.sizes(gathered.shape[2], 0)  # band 0 is the tallest
        me = context.band_index
        compressed = state._compressed(context, lengths, width)
        held = gathered.clone()
        for band, length in enumerate(lengths):
            if band != me:
                size = compressed.codec.nbytes(length, width)
                compressed.codec.decode(received[band, 0, :size], held[0, band, :length], "torch")
        modules.append(
            {
                "fresh": gathered[0, me, : lengths[me]].clone(),
                "own": None if own is None else own[0, : lengths[me]].clone(),
                "held": [held[0, band, :length].clone() for band, length in enumerate(lengths)],
                "before": [gathered[0, band, :length].clone() for band, length in enumerate(lengths)],
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


def _fp8_round_trip(x):
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
                    expected = _fp8_round_trip(source["fresh"])
                else:
                    expected = source["own"]
                    # the step's change brought the baseline closer to the keys and values it was
                    # sent for (what a receiver held before the step's change: the baseline before)
                    before = per_rank[(sender + 1) % world_size][index]["before"][sender]
                    error, error_before = (relative_error(b, source["fresh"]) for b in (expected, before))
                    assert 0 < error < 0.8 * error_before, (compress, index, sender, error, error_before)
                for receiver in range(world_size):
                    if receiver != sender:
                        held = per_rank[receiver][index]["held"][sender]
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
        # the warm-up step and the first stale step (over the warm-up's exact keys and values)
        for step in (0, 1):
            assert torch.equal(outputs[step], plain[step]), (compress, step)
        errors[compress] = [relative_error(outputs[step], plain[step]) for step in range(2, len(TIMESTEPS))]
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
    for compress in ("none", "residual2", "fp8"):
        config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1, split_batch=True, compress=compress)
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
        results[compress] = (latents, torch.from_numpy(image))
    return results


def test_a_compressed_pipeline_with_the_cfg_split_matches_its_uncompressed_steps(run_ranks):
    """4 ranks, 2 bands per CFG half: the pipeline's VAE decode and text encoders are untouched by
    ``compress``; every rank ends with the same image; the warm-up step and the first stale step
    (over the warm-up's full-precision keys and values) equal the uncompressed ones, bit for bit;
    the later steps attend over decoded keys and values: close, not equal."""
    per_rank = run_ranks(_pipeline_body, 4, timeout=600)
    for compress in ("residual2", "fp8"):
        for rank in range(1, 4):
            assert torch.equal(per_rank[rank][compress][1], per_rank[0][compress][1]), (compress, rank)
        plain, packed = per_rank[0]["none"][0], per_rank[0][compress][0]
        assert len(plain) == len(packed) == 5
        for step in (0, 1):
            assert torch.equal(packed[step], plain[step]), (compress, step)
        errors = [relative_error(packed[step], plain[step]) for step in range(2, 5)]
        assert all(0 < error < 0.05 for error in errors), (compress, errors)


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
    ``test_graph_bookkeeping``): every buffer a compressed step uses exists before its capture, and
    the self-attention modules keep one set of whole-image keys and values, where uncompressed
    they keep one per step parity."""
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
        kept[codec] = sum(
            tensor.numel() * tensor.element_size()
            for buffers in pool.values()
            for key, tensor in buffers.items()
            if key[0] in attention and tensor.dtype != torch.uint8
        )
    # S: one whole-image set of keys and values, S / 2 one band's (2 bands). Uncompressed: a set
    # per step parity and the warm-up's send buffer; compressed: the warm-up's set, updated in
    # place, its send buffer, and for a residual the sender's own baseline
    whole = kept["none"] / 2.5
    assert kept[compress] == whole * (2 if compress.startswith("residual") else 1.5), kept


def test_auto_compresses_where_the_planner_says_the_link_cannot_hide_keys_and_values(monkeypatch):
    """``compress="auto"``: per generation, ``residual2`` where the planner predicts it faster by
    more than ``AUTO_GAIN`` on the generation's machine (8 GPUs on PCIe Gen4 without the CFG split,
    2048²), ``none`` where the link hides them (NVLink), on a machine without a profile, and for a
    generation that runs no stale step; a codec named is kept. Through a parallelised UNet (on
    ``meta``: a 2048²-sized latent without memory) the generation's context gets the choice."""
    import distripy
    from distripy.kernels import meta_as_gpu
    from distripy.parallel.compress_choice import AUTO_CODEC, chosen_codec
    from distripy.parallel.policy import ModeChoice
    from distripy.pipelines import generation as generations
    from distripy.pipelines.unet import installed_forward
    from distripy.runtime import LoopbackComm

    auto = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=5, compress="auto")
    stale, exact = ModeChoice("corrected_async_gn", 5, ""), ModeChoice("exact", 0, "")
    pcie, nvlink = ("l40", "pcie4"), ("h100", "nvlink4")
    latent = (256, 256)
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, pcie, stale) == AUTO_CODEC
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, nvlink, stale) == "none"
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, None, stale) == "none"
    assert chosen_codec(auto, latent, 8, False, 8, 50, True, pcie, exact) == "none"
    assert chosen_codec(auto, latent, 2, True, 1, 50, True, pcie, stale) == "none"  # one band per image
    named = distripy.DistriConfig(compress="fp8")
    assert chosen_codec(named, latent, 8, False, 8, 50, True, None, exact) == "fp8"

    for machine, expected in ((pcie, AUTO_CODEC), (nvlink, "none")):
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
    from distripy.kernels.residual_codec import nonfinite_rows
    from distripy.parallel import PatchSelfAttnProcessor
    from distripy.parallel.compression import CompressedKeysValues, ExchangeCodec
    from distripy.pipelines.unet import installed_forward

    stale_step, encode = CompressedKeysValues.stale_step, ExchangeCodec.encode
    poisoned, marked = [], []

    def counting(self, x, baseline, packed, backend):
        encode(self, x, baseline, packed, backend)
        marked.append(int(nonfinite_rows(packed, x.shape[0])))

    def poisoning(self, projected):
        gathered = stale_step(self, projected)
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
    for module in context.states:
        if not isinstance(module, PatchSelfAttnProcessor):
            continue
        gathered, own, received = module.exchange.buffers
        peer, other = gathered[:, 1 - context.band_index].clone(), 1 - context.band_index
        codec = module._compressed(context, (gathered.shape[2],) * 2, gathered.shape[-1]).codec
        for item in range(peer.shape[0]):  # what the next step would decode
            codec.decode(received[other, item, : codec.nbytes(*peer.shape[1:])], peer[item], "torch")
        assert torch.isfinite(peer).all(), module.patch_path
        if own is not None:
            assert torch.isfinite(own).all() and torch.equal(own, peer), module.patch_path


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
    poison["on"] = False
    generation()  # the count starts afresh with each generation
