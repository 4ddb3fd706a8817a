"""``distripy.planning``: the traffic walk against what the real model sends, the fits against known
coefficients and measured files, the cost of a transfer (nccl-tests' conventions) and the overlap
rules of each kind of step on hand-made machines, the band rules (``BandGeometry``), the
predictions against the paper, and ``distripy plan``."""

import json
import re
from collections import Counter

import pytest
import torch

import distripy
from distripy.errors import ConfigError
from distripy.parallel.bands import BandLayout
from distripy.geometry import BandGeometry
from distripy.planning import (
    FABRICS,
    GPUS,
    SDXL_UNET,
    Fabric,
    band_units,
    fit_gpu,
    load_fabric,
    load_gpu,
    plan_configurations,
    predict,
    step_traffic,
)
from distripy.planning.hardware import GpuProfile
from unet_models import POOLED_DIM, TEXT_DIM, sdxl_conditioning, tiny_sdxl_unet

WIDTH = 16


def _logged_step(world, rank, height, split, mode, compress="none"):
    """What rank ``rank`` of ``world`` sends in its second step (asynchronous after a 1-step
    warm-up), as a ``LoopbackComm`` logs it while the tiny UNet runs, and the bytes its modules
    keep for the next step after it (every registered module's exchange buffers)."""
    from distripy.runtime import LoopbackComm, TrafficLog

    unet = tiny_sdxl_unet(0)
    log = TrafficLog()
    config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=split, compress=compress)
    distripy.parallelize(unet, config, comm=LoopbackComm(rank, world, log=log))
    sample = torch.randn(2, 4, height, WIDTH, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        for step, timestep in enumerate((900, 800)):
            log.step = step
            unet(sample, timestep, **sdxl_conditioning(2, 1))
    (context,) = {id(m.patch_context): m.patch_context for m in unet.modules() if hasattr(m, "patch_context")}.values()
    kept = context.kept_bytes()
    distripy.reset(unet)
    return [t for t in log.transfers if t.step == 1], kept


@pytest.mark.parametrize(
    "world, rank, height, split, mode",
    [
        (3, 1, 32, False, "corrected_async_gn"),  # bands 3, 3, 2: a middle band
        (5, 0, 24, False, "full_sync"),  # 2, 1, 1, 1, 1: the top band, the larger
        (6, 4, 28, True, "exact"),  # CFG split: bands 3, 2, 2 per half; ring shifts
        (6, 5, 28, True, "corrected_async_gn"),  # the bottom band of the second half
        (2, 1, 32, True, "corrected_async_gn"),  # one band per half: only the output travels
        (4, 2, 32, False, "sync_gn"),  # stale activations, fresh statistics
    ],
)
def test_traffic_walk_equals_what_the_model_sends(world, rank, height, split, mode):
    from distripy.pipelines.tiny import tiny_sdxl_unet_config

    logged, kept = _logged_step(world, rank, height, split, mode)
    bands = world // 2 if split else world
    layout = BandLayout.split(height // 4, bands)
    walk = step_traffic(
        (height, WIDTH), 1 if split else 2, layout.units, rank % bands, tiny_sdxl_unet_config(TEXT_DIM, POOLED_DIM),
        dtype_bytes=4, exact=mode == "exact", halves=2 if split else 1,
    )  # fmt: skip
    assert Counter((t.op, t.sent, t.received) for t in logged) == Counter(
        (t.op, t.sent, t.received) for t in walk.transfers
    )
    # the stale buffers; full_sync and exact keep nothing (no step of theirs reads them), sync_gn
    # no GroupNorm sums (every step's are fresh)
    from distripy.parallel.step_policy import keeps_activations, keeps_statistics

    expected = walk.kept_bytes(statistics=keeps_statistics(mode)) if keeps_activations(mode) else 0
    assert kept == expected
    assert (kept > 0) == (bands > 1 and mode not in ("full_sync", "exact"))
    if mode == "corrected_async_gn":  # the same transfers leave together at each checkpoint
        by_group, by_block = {}, {}
        for t in logged:
            by_group.setdefault(t.group, []).append((t.op, t.sent))
        for t in walk.transfers:
            by_block.setdefault("output" if t.kind == "output" else t.block, []).append((t.op, t.sent))
        assert sorted(map(sorted, by_group.values())) == sorted(map(sorted, by_block.values()))


@pytest.mark.parametrize(
    "world, rank, height, split, compress, mode",
    [
        (3, 1, 32, False, "residual2", "corrected_async_gn"),  # bands 3, 3, 2: a middle band, packed to the tallest
        (6, 5, 28, True, "fp8", "corrected_async_gn"),  # CFG split, the bottom band of the second half (the shortest)
        (4, 0, 32, False, "residual1", "corrected_async_gn"),
        (3, 2, 32, False, "fp8", "full_sync"),  # a fresh all-gather of packed bytes
        (6, 4, 28, True, "residual2", "exact"),  # packed blocks by ring shifts
    ],
)
def test_compressed_traffic_walk_equals_what_the_model_sends(world, rank, height, split, compress, mode):
    """A step after the warm-up under ``compress``: each self-attention's keys and values leave as
    one all-gather of the packed bytes of every batch item (``packed_bytes``: the kernels' layouts;
    in ``exact`` one shift of them per other band), the rest as uncompressed; its codec work is
    counted, and what the modules keep for the next step is what the walk predicts (``full_sync``
    and ``exact``: a residual's baselines only)."""
    from distripy.pipelines.tiny import tiny_sdxl_unet_config

    logged, kept = _logged_step(world, rank, height, split, mode, compress)
    bands = world // 2 if split else world
    layout = BandLayout.split(height // 4, bands)
    walk = step_traffic(
        (height, WIDTH), 1 if split else 2, layout.units, rank % bands, tiny_sdxl_unet_config(TEXT_DIM, POOLED_DIM),
        dtype_bytes=4, halves=2 if split else 1, compress=compress, exact=mode == "exact", fresh=mode == "full_sync",
    )  # fmt: skip
    assert Counter((t.op, t.sent, t.received) for t in logged) == Counter(
        (t.op, t.sent, t.received) for t in walk.transfers
    )
    # the codecs' work is counted once per module (on the first of exact's shifts)
    coded = [t for t in walk.transfers if t.codec_bytes > 0]
    assert all(t.kind == "kv" for t in coded) and len(coded) == len(walk.attention_channels), len(coded)
    # what the modules keep: one whole-image set of keys and values each (and a residual's own
    # baseline, and the packed bytes received), the halos and GroupNorm sums as uncompressed; a
    # fresh exchange only a residual's baselines
    assert kept == walk.kept_bytes()
    assert (kept > 0) == (mode == "corrected_async_gn" or compress != "fp8")


def test_sdxl_traffic_counts_follow_its_architecture():
    """SDXL's UNet: 17 ResNet blocks (2 GroupNorms, 2 3x3 convolutions each), 11 transformers (a
    GroupNorm and their layers' self-attention each: 70 layers), 2 downsamplers, 2 upsamplers,
    the output GroupNorm and convolution; a middle band of 8 at 2048²."""
    layout = BandLayout.split(64, 8)
    walk = step_traffic((256, 256), 2, layout.units, 4)
    assert walk.count_by_kind() == {
        "halo": 17 * 2 + 2 + 2 + 1,
        "gn_stats": 17 * 2 + 11 + 1,
        "kv": 70 * 2,
        "output": 1,
    }
    # keys or values of one self-attention: batch 2 x the band's rows x the level's width x channels x
    # fp16; at level 2 (1280 channels) a band of 8 deepest rows, at level 1 (640) twice the rows and width
    sizes = [t.sent for t in walk.transfers if t.kind == "kv"]
    assert sorted(set(sizes)) == [2 * 8 * 64 * 1280 * 2, 2 * 16 * 128 * 640 * 2]
    top = step_traffic((256, 256), 2, layout.units, 0)
    assert sum(t.sent for t in top.transfers if t.kind == "halo") < sum(
        t.sent for t in walk.transfers if t.kind == "halo"
    )  # the top band sends no halo upwards


def test_traffic_follows_the_band_geometry():
    """Halo rows are as wide as the image; keys and values cover the band's tokens; GroupNorm
    statistics are a fixed size; the output is the band's whole rows."""
    units = band_units(8, 4)
    small = step_traffic((32, 16), 2, units, 2).bytes_by_kind()
    wide = step_traffic((32, 32), 2, units, 2).bytes_by_kind()
    tall = step_traffic((64, 16), 2, band_units(16, 4), 2).bytes_by_kind()
    assert all(small[kind] > 0 for kind in ("halo", "kv", "gn_stats", "output"))
    assert wide["halo"] == 2 * small["halo"] and tall["halo"] == small["halo"]
    assert wide["kv"] == tall["kv"] == 2 * small["kv"]
    assert wide["gn_stats"] == tall["gn_stats"] == small["gn_stats"]
    assert wide["output"] == tall["output"] == 2 * small["output"]


# -- the cost of a step, on hand-made machines: every rank's step takes `compute` seconds ------------

LATENT, GPUS_4, MIDDLE = (32, 16), 4, 2  # 8 deepest rows in 4 bands; band 2 has two neighbours
BETWEEN = ("halo", "gn_stats", "kv")


def _flat(compute):
    """A GPU whose every step takes ``compute`` seconds, whatever it computes; no host bound."""
    return GpuProfile("flat", 0.0, 0.0, compute, 0.0, 0.0, 0.0, "test")


def _link_s(transfers, fabric, bands, ranks):
    """nccl-tests' conventions: an all-gather moves ``sent (n - 1)`` at the bus bandwidth, an
    all-reduce ``sent 2 (n - 1) / n``; a neighbour exchange the larger direction at the
    point-to-point bandwidth. n: the bands, or every rank for the output."""
    total = 0.0
    for t in transfers:
        n = ranks if t.kind == "output" else bands
        if t.op == "all_gather":
            total += t.sent * (n - 1) / (fabric.busbw_gbps * 1e9)
        elif t.op == "all_reduce":
            total += t.sent * 2 * (n - 1) / n / (fabric.busbw_gbps * 1e9)
        else:
            total += max(t.sent, t.received) / (fabric.p2p_gbps * 1e9)
    return total


def _middle(exact=False):
    return step_traffic(LATENT, 2, band_units(8, GPUS_4), MIDDLE, exact=exact).transfers


def _run(compute, fabric, mode, steps, warmup=1, graphs=False):
    return predict(_flat(compute), fabric, LATENT, steps, GPUS_4, False, mode, warmup, graphs)


def test_a_synchronous_step_exposes_every_transfer_at_nccl_tests_costs():
    fabric = Fabric("test", busbw_gbps=100.0, p2p_gbps=25.0, latency_us=0.0, comm_sm_share=0.0, source="")
    expected = max(
        _link_s(step_traffic(LATENT, 2, band_units(8, GPUS_4), index).transfers, fabric, GPUS_4, GPUS_4)
        for index in range(GPUS_4)
    )
    assert expected == _link_s(_middle(), fabric, GPUS_4, GPUS_4)  # the middle band sends the most
    result = _run(0.01, fabric, "full_sync", 3)
    assert result.exposed_s == pytest.approx(expected)
    assert result.seconds == pytest.approx(3 * (0.01 + expected))
    assert result.step_compute_s == 0.01 and result.speedup == pytest.approx(3 * 0.01 / result.seconds)


def test_an_asynchronous_step_hides_what_fits_behind_a_step_and_exposes_the_rest():
    """After the synchronous warm-up, a step's transfers are waited for in the next step: hidden
    behind its compute (less the SMs NCCL takes), exposed where longer; with CUDA graphs a step
    joins its own at its end, so at least its last block's transfers are exposed; ``exact``
    exposes GroupNorm's all-reduces and hides halos and keys/values only partly."""
    share = 0.25
    fabric = Fabric("test", busbw_gbps=1.0, p2p_gbps=1.0, latency_us=0.0, comm_sm_share=share, source="")
    between = _link_s([t for t in _middle() if t.kind in BETWEEN], fabric, GPUS_4, GPUS_4)
    long = 1e3 * between  # a step far longer than its transfers

    def gap(compute, **kw):
        full = _run(compute, fabric, "full_sync", 4, **kw).seconds
        return full - _run(compute, fabric, "corrected_async_gn", 4, **kw).seconds

    assert gap(long) == pytest.approx(3 * (1 - share) * between)  # 3 async steps hide all but the SMs
    assert gap(1e-12) == pytest.approx(0.0, abs=1e-9)  # nothing to hide behind: all exposed
    blocks = [t.block for t in _middle() if t.kind in BETWEEN]
    last = _link_s([t for t in _middle() if t.block == max(blocks) and t.kind in BETWEEN], fabric, 4, 4)
    assert 0 < last < between
    no_sms = Fabric("test", busbw_gbps=1.0, p2p_gbps=1.0, latency_us=0.0, comm_sm_share=0.0, source="")
    graphs = _run(long, no_sms, "corrected_async_gn", 4, graphs=True).seconds
    eager = _run(long, no_sms, "corrected_async_gn", 4).seconds
    assert graphs - eager == pytest.approx(3 * last)
    exact = _middle(exact=True)
    norms = _link_s([t for t in exact if t.kind == "gn_stats"], fabric, GPUS_4, GPUS_4)
    output = _link_s([t for t in exact if t.kind == "output"], fabric, GPUS_4, GPUS_4)
    assert _run(long, fabric, "exact", 2).exposed_s == pytest.approx(norms + output)
    everything = _link_s(exact, fabric, GPUS_4, GPUS_4)
    assert _run(1e-12, fabric, "exact", 2).exposed_s == pytest.approx(everything, rel=1e-6)


def test_grouped_transfers_pay_one_launch_latency():
    """Synchronous: one launch per exchange, a self-attention's keys and values (one all-gather
    per batch item) as one group; asynchronous: one launch per block, at its checkpoint."""
    latency = 100.0
    fabric = Fabric("test", busbw_gbps=1e12, p2p_gbps=1e12, latency_us=latency, comm_sm_share=0.0, source="")
    transfers = _middle()
    counts = Counter(t.kind for t in transfers)
    launches = counts["halo"] + counts["gn_stats"] + counts["kv"] // 2 + 1  # + the output's
    sync = _run(1e-9, fabric, "full_sync", 2).exposed_s
    assert sync == pytest.approx(launches * latency * 1e-6, rel=1e-6)
    blocks = len({t.block for t in transfers if t.kind in BETWEEN})
    both = _run(1e-9, fabric, "corrected_async_gn", 2).exposed_s  # a sync step, then an async one
    assert 2 * both - sync == pytest.approx((blocks + 1) * latency * 1e-6, abs=1e-8)  # less the 1 ns step


def test_the_planner_cuts_bands_by_band_geometry():
    """The planner's band rules are ``BandGeometry``'s: sides in whole deepest rows of the VAE and
    UNet given, a deepest row per band, the CFG split halving the bands."""
    geometry = BandGeometry.from_configs(SDXL_UNET)
    assert geometry.pixel_unit == 32
    with pytest.raises(ConfigError, match=re.escape(geometry.latent_problem(34, 2))):
        predict(GPUS["h100"], FABRICS["nvlink4"], (34, 32), 50, 2, False, "full_sync", 0, True)
    with pytest.raises(ConfigError, match="cannot be cut into 5 bands"):
        predict(GPUS["h100"], FABRICS["nvlink4"], (16, 32), 50, 5, False, "full_sync", 0, True)
    assert predict(GPUS["h100"], FABRICS["nvlink4"], (16, 32), 50, 8, True, "full_sync", 0, True).gpus == 8
    planned = plan_configurations(8, (96, 96), 30, [("full_sync", 0)])  # 3 deepest rows
    assert {(c.gpus, c.split_batch) for c in planned.candidates if c.gpus > 1} == {
        (2, False), (2, True), (3, False), (4, True), (6, True)
    }
    with pytest.raises(ConfigError, match="multiples of 64 pixels"):
        plan_configurations(2, (96, 96), 30, [("full_sync", 0)], vae_scale=16)


def test_fit_recovers_known_coefficients_and_the_measured_file():
    truth = GpuProfile("synthetic", 2e-6, 3e-11, 1.1e-2, 2e-7, 0.2, 0.1, "test")
    points = [
        (pixels, 1 / n, truth.step_seconds(pixels, 1 / n, graphs=True))
        for pixels in (128**2, 256**2, 480**2)
        for n in (1, 4, 8)
    ]
    fitted = fit_gpu("synthetic", points, "test")
    for name in ("a", "b", "c", "d"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    from pathlib import Path

    measured = Path(__file__).resolve().parents[1] / "bench/results/e2e-h100-20261124T1950Z.json"
    profile = load_gpu(measured)
    assert profile.measured and profile.host_s > 0.1
    for row in json.loads(measured.read_text())["rows"]:
        if row["variant"] == "graphs":
            pixels = (row["resolution"] / 8) ** 2
            predicted = profile.step_seconds(pixels, 1 / row["gpus"], graphs=True)
            assert predicted == pytest.approx(row["step_ms"] / 1e3, rel=0.06), row
    with pytest.raises(ConfigError, match="needs 4 or more"):
        fit_gpu("few", points[:3], "test")


def test_fabric_files(tmp_path):
    def comm_file(world, busbw):
        rows = [
            {
                "op": "all_gather",
                "size": size,
                "distripy": {"time_us": time, "busbw": busbw * size / (1 << 30)},
            }
            for size, time in ((1 << 10, 14.0), (1 << 30, 3500.0))
        ]
        path = tmp_path / f"comm-{world}.json"
        path.write_text(json.dumps({"environment": {"world_size": world}, "bandwidth": rows}))
        return path

    fabric = load_fabric(comm_file(8, 300.0))
    assert (fabric.busbw_gbps, fabric.latency_us, fabric.measured) == (300.0, 14.0, True)
    with pytest.raises(ConfigError, match="measured on one GPU"):
        load_fabric(comm_file(1, 0.0))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a bench/comm.py result"):
        load_fabric(tmp_path / "bad.json")


def test_predictions_reproduce_the_paper_within_15_percent():
    """The DistriFusion paper's A100 NVLink latencies (50 steps, warm-up 4 in its counting = 5
    here, CUDA graphs, no CFG split)."""
    paper = {(1024, 8): 1.77, (2048, 8): 4.81, (3840, 2): 140 / 1.8, (3840, 4): 140 / 3.4, (3840, 8): 22.9}
    for (size, gpus), seconds in paper.items():
        predicted = predict(
            GPUS["a100"],
            FABRICS["nvlink3"],
            (size // 8, size // 8),
            50,
            gpus,
            False,
            "corrected_async_gn",
            5,
            True,
        )
        assert predicted.seconds == pytest.approx(seconds, rel=0.15), (size, gpus, predicted.seconds)


def test_plan_ranks_and_recommends():
    planned = distripy.plan(8, (2048, 2048), 50, fabric="pcie4", gpu="a100")
    seconds = [c.seconds for c in planned.candidates]
    assert seconds == sorted(seconds)
    best = planned.candidates[0]
    assert planned.recommended.seconds <= best.seconds * 1.05
    assert all(
        c.gpus >= planned.recommended.gpus for c in planned.candidates if c.seconds <= best.seconds * 1.05
    )
    assert {c.gpus for c in planned.candidates} == set(range(1, 9))
    # the CFG split halves what every rank sends: never slower than the same configuration without
    for c in planned.candidates:
        if c.split_batch:
            twin = [
                o
                for o in planned.candidates
                if not o.split_batch and (o.gpus, o.mode, o.graphs) == (c.gpus, c.mode, c.graphs)
            ]
            assert all(c.seconds <= o.seconds + 1e-12 for o in twin)
    # a 1152-high image has 36 deepest rows: every count up to 8 is a candidate (uneven bands)
    assert {c.gpus for c in distripy.plan(8, (1152, 1152), 30).candidates} == set(range(1, 9))
    # 64-high: 2 deepest rows, so 3 GPUs are only possible... not at all; 4 only with the split
    small = {(c.gpus, c.split_batch) for c in distripy.plan(4, (64, 64), 30).candidates}
    assert (3, False) not in small and (4, True) in small and (4, False) not in small
    assert json.loads(json.dumps(planned.as_dict()))["recommended"]["gpus"] == planned.recommended.gpus
    with pytest.raises(ConfigError, match="height 1000 and width 1024 are not whole rows"):
        distripy.plan(2, (1000, 1024), 50)
    with pytest.raises(ConfigError, match="fabric 'infiniband'"):
        distripy.plan(2, 1024, 50, fabric="infiniband")


def test_split_auto_follows_the_plan():
    from distripy.parallel.split import machine_of, wants_split

    config = distripy.DistriConfig(split_batch="auto")
    h100 = machine_of("NVIDIA H100 80GB HBM3")
    assert h100 == ("h100", "nvlink4")
    assert wants_split(config, (128, 128), 4, 2, 50, True, h100)
    assert not wants_split(config, (128, 128), 3, 2, 50, True, h100)  # odd: no split possible
    assert not wants_split(distripy.DistriConfig(split_batch=False), (128, 128), 4, 2, 50, True, h100)
    assert machine_of("NVIDIA A100-SXM4-80GB") == ("a100", "nvlink3")
    assert machine_of("NVIDIA L40") == ("l40", "pcie4")
    # no profile (an unknown GPU, a CPU run): the plain rule, an even world of 4 or more
    assert machine_of("NVIDIA B200") is None and machine_of(None) is None
    assert wants_split(config, (128, 128), 4, 2, 50, True, None)
    assert not wants_split(config, (128, 128), 2, 2, 50, True, None)
    with pytest.raises(ConfigError, match="split_batch='maybe' must be True, False or 'auto'"):
        distripy.DistriConfig(split_batch="maybe")


def test_engine_prior_is_the_planned_speedup():
    from distripy.serving.scheduling import PRIOR_EFFICIENCY, SpeedupEstimate

    estimate = SpeedupEstimate(8)
    planned = max(c.speedup for c in distripy.plan(8, (1024, 1024), 30).candidates if c.gpus == 8)
    assert estimate.speedup((1024, 1024, 30, 1)) == pytest.approx(planned)
    assert estimate.speedup((1000, 1024, 30, 1)) == PRIOR_EFFICIENCY * 8  # the planner cannot cut it


def test_the_plan_command(capsys):
    from distripy import cli

    assert cli.main(["plan", "--gpus", "8", "--size", "2048x2048", "--steps", "50", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["size"] == {"height": 2048, "width": 2048} and planned["recommended"]["gpus"] >= 1
    assert len(planned["candidates"]) > 8 and planned["assumptions"]
    assert cli.main(["plan", "--gpus", "4", "--size", "1024x1024", "--fabric", "pcie4", "--top", "3"]) == 0
    table = capsys.readouterr().out
    assert "recommended (*)" in table and table.count("\n* ") + table.startswith("* ") == 1
    assert "assumed: fabric: PCIe Gen4" in table
    assert cli.main(["plan", "--gpus", "2", "--size", "2048by2048"]) == 2
    assert "--size 2048by2048: must be WIDTHxHEIGHT" in capsys.readouterr().err
    assert cli.main(["plan", "--gpus", "2", "--gpu", "v100"]) == 2
    assert "gpu 'v100': one of h100, a100, l40" in capsys.readouterr().err
    # the asynchronous mode once per codec asked for
    assert cli.main(["plan", "--gpus", "4", "--size", "2048x2048", "--fabric", "pcie4", "--compress", "all"]) == 0
    table = capsys.readouterr().out
    assert all("corrected_async_gn (w" in line for line in table.splitlines() if "residual2" in line)
    assert all(codec in table for codec in ("fp8", "residual2", "residual1"))
    assert cli.main(["plan", "--gpus", "2", "--compress", "none,int4"]) == 2
    assert "compress ['none', 'int4']: each must be one of none, fp8, residual2, residual1" in capsys.readouterr().err


def test_compression_is_predicted_to_lift_four_gpus_over_pcie():
    """4 GPUs over PCIe Gen4 at 2048²: without the CFG split the uncompressed keys and values are
    not hidden (most of a step exposed); ``fp8`` closes more than half of the gap to what a fabric
    that costs nothing would allow, ``residual2`` (a seventh of the bytes, but its baselines decoded
    and stored back in fp8 every step) more than a third, keeping less than a third of the memory
    (the rest of the gap: the warm-up's uncompressed steps and the codecs' work, counted at an
    assumed rate, ``CODEC_BYTES_PER_S``). Where the transfers already hide (the CFG split's two
    halves, NVLink) compression gains nothing."""
    free = Fabric("free", 1e9, 1e9, 0.0, 0.0, "a fabric that costs nothing")
    for split in (False, True):
        common = dict(latent=(256, 256), steps=50, gpus=4, split_batch=split, mode="corrected_async_gn",
                      warmup_steps=5, graphs=True)  # fmt: skip
        plain = predict(GPUS["h100"], FABRICS["pcie4"], **common)
        fp8, packed = (predict(GPUS["h100"], FABRICS["pcie4"], **common, compress=c) for c in ("fp8", "residual2"))
        ceiling = predict(GPUS["h100"], free, **common)
        assert packed.sent_bytes < plain.sent_bytes / 5 and packed.step_compute_s > fp8.step_compute_s > plain.step_compute_s
        assert packed.memory.persistent < plain.memory.persistent / 3 and fp8.memory.persistent < plain.memory.persistent
        assert plain.speedup < packed.speedup < ceiling.speedup or split
        if not split:  # the uncompressed transfers take longer than the compute
            gap = ceiling.speedup - plain.speedup
            assert fp8.speedup - plain.speedup > gap / 2 and packed.speedup - plain.speedup > gap / 3, (plain, fp8, packed)
        nvlink = [predict(GPUS["h100"], FABRICS["nvlink4"], **common, compress=c) for c in ("none", "residual2")]
        assert nvlink[1].seconds >= nvlink[0].seconds
    # exact's fresh exchanges, compressed after its first step: half the bytes or fewer on the link,
    # faster over PCIe; a residual keeps its baselines (an uncompressed exact step keeps nothing)
    exact = dict(common, split_batch=False, mode="exact", warmup_steps=1, steps=4)
    plain, fp8, packed = (predict(GPUS["h100"], FABRICS["pcie4"], **exact, compress=c) for c in ("none", "fp8", "residual2"))
    assert fp8.sent_bytes < plain.sent_bytes / 1.9 and packed.sent_bytes < plain.sent_bytes / 5
    assert plain.speedup < fp8.speedup < packed.speedup, (plain, fp8, packed)
    assert fp8.memory.persistent == plain.memory.persistent < packed.memory.persistent
    # every step at full precision: the codec is never used
    whole = dict(exact, warmup_steps=4)
    assert predict(GPUS["h100"], FABRICS["pcie4"], **whole, compress="fp8").seconds == pytest.approx(
        predict(GPUS["h100"], FABRICS["pcie4"], **whole).seconds
    )


@pytest.mark.parametrize("latent", [128, 256, 480])
@pytest.mark.parametrize("bands", [2, 4, 8])
def test_compressed_keys_values_of_sdxl_are_several_times_smaller(latent, bands):
    """SDXL's asynchronous step (the walk is the model's log: the test above): its keys and values
    travel >= 7x smaller with ``residual2``, >= 1.9x with ``fp8``, scales included."""
    units = band_units(latent // 4, bands)
    kv = {
        compress: step_traffic((latent, latent), 1, units, bands // 2, compress=compress).bytes_by_kind()["kv"]
        for compress in ("none", "fp8", "residual2", "residual1")
    }
    assert kv["none"] / kv["residual2"] >= 7, kv
    assert kv["none"] / kv["fp8"] >= 1.9, kv
    assert kv["none"] / kv["residual1"] >= 12, kv


# -- memory ------------------------------------------------------------------------------------------


def _persistent(world, rank, height, split, mode, compress, graphs):
    """The bytes a parallelised tiny UNet's patch modules keep after a generation of 5 steps (2 of
    warm-up: both step parities of each kind run; ``PatchContext.kept_bytes``): with ``graphs``,
    every persistent buffer of its pool; without, the stale buffers its modules hold. And the
    prompt's tokens."""
    from distripy.pipelines.unet import installed_forward
    from distripy.runtime import LoopbackComm

    unet = tiny_sdxl_unet(0)
    config = distripy.DistriConfig(mode=mode, warmup_steps=2, split_batch=split, compress=compress, use_cuda_graph=False)
    distripy.parallelize(unet, config, comm=LoopbackComm(rank, world))
    context = installed_forward(unet).context
    context.static_buffers = graphs  # what CUDA graphs make them (tests/test_step_graphs.py)
    conditioning = sdxl_conditioning(2, 1)
    sample = torch.randn(2, 4, height, WIDTH, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():  # the generation left open: its stale buffers still held
        distripy.reset(unet, steps=5)
        for step in range(5):
            unet(sample + 0.01 * step, 900 - 50 * step, **conditioning)
    return context.kept_bytes(), conditioning["encoder_hidden_states"].shape[1]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize(
    "world, rank, height, split, mode, compress",
    [
        (3, 1, 32, False, "corrected_async_gn", "none"),  # bands 3, 3, 2: a middle band
        (3, 1, 32, False, "corrected_async_gn", "residual2"),
        (6, 5, 28, True, "corrected_async_gn", "fp8"),  # CFG split, the bottom (shortest) band
        (4, 0, 32, False, "corrected_async_gn", "residual1"),  # the top band
        (5, 0, 24, False, "full_sync", "none"),
        (6, 4, 28, True, "exact", "none"),  # ring shifts: a block per other band
        (3, 1, 32, False, "full_sync", "residual2"),  # fresh exchanges: only the baselines outlive a step
        (5, 0, 24, False, "full_sync", "fp8"),
        (6, 4, 28, True, "exact", "residual1"),
        (3, 2, 32, False, "exact", "fp8"),
    ],
)
def test_predicted_persistent_memory_equals_what_the_model_allocates(world, rank, height, split, mode, compress, graphs):
    """``planning.memory.persistent_bytes`` from the step walks, byte for byte against the buffers
    the tiny UNet's modules hold: its stale buffers, or under CUDA graphs every persistent buffer of
    its pool (one per step parity; a compressed exchange's gathered keys and values one in all)."""
    from distripy.pipelines.tiny import tiny_sdxl_unet_config
    from distripy.planning.memory import persistent_bytes

    held, tokens = _persistent(world, rank, height, split, mode, compress, graphs)
    bands = world // 2 if split else world
    layout = BandLayout.split(height // 4, bands)
    common = dict(
        latent=(height, WIDTH), batch=1 if split else 2, units=layout.units, index=rank % bands,
        config=tiny_sdxl_unet_config(TEXT_DIM, POOLED_DIM), dtype_bytes=4, halves=2 if split else 1,
    )  # fmt: skip
    fresh, exact = mode != "corrected_async_gn", mode == "exact"
    walks = [step_traffic(exact=exact, **common)]
    if compress != "none" or not fresh:
        walks.append(step_traffic(exact=exact, fresh=fresh, compress=compress, **common))
    keeps = not fresh
    baselines = compress.startswith("residual")
    assert held == persistent_bytes(walks, graphs, keeps, keeps, tokens)
    assert (held > 0) == (graphs or keeps or baselines)


def test_compressed_keys_and_values_under_cuda_graphs_keep_less():
    """SDXL at 2048² on 4 ranks: what a rank keeps across steps under each codec, with and without
    CUDA graphs (the uncompressed exchange: one set of the image's keys and values, one per step
    parity under graphs)."""
    from distripy.planning.memory import persistent_bytes

    units = band_units(32, 4)
    kept = {}
    for compress in ("none", "fp8", "residual2"):
        walks = [step_traffic((256, 256), 2, units, 1)]
        walks.append(step_traffic((256, 256), 2, units, 1, compress=compress))
        kept[compress] = {graphs: persistent_bytes(walks, graphs, True, True) for graphs in (False, True)}
    # fp8 keeps one set of the image's keys and values beside its packed bytes: less than the
    # uncompressed two under graphs, more than its one without; residual2 keeps only fp8 baselines
    assert kept["fp8"][True] < kept["none"][True] and kept["fp8"][False] > kept["none"][False], kept
    assert kept["residual2"][True] < kept["none"][True] / 3 and kept["residual2"][False] < kept["none"][False] * 2 / 3
    # the keys and values dominate: the graphs' second set about doubles what is kept
    assert 1.8 < kept["none"][True] / kept["none"][False] < 2.6


def test_sdxl_parameter_counts_are_its_models():
    """``SDXL_PARAMETERS``, the planner's weights: the UNet, both text encoders and the VAE of SDXL
    base built on ``meta`` from their published configurations, their parameters counted."""
    import sys
    from pathlib import Path

    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from distripy.planning.memory import SDXL_PARAMETERS, SDXL_VAE

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from sdxl import build_unet

    def count(model):
        return sum(p.numel() for p in model.parameters())

    text = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        models = {
            "unet": build_unet("meta"),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               projection_dim=768, hidden_act="quick_gelu", **text)  # fmt: skip
            ),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               projection_dim=1280, hidden_act="gelu", **text)  # fmt: skip
            ),
            "vae": AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=SDXL_VAE["latent_channels"],
                block_out_channels=SDXL_VAE["block_out_channels"], layers_per_block=SDXL_VAE["layers_per_block"],
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            ),  # fmt: skip
        }
    assert {name: count(model) for name, model in models.items()} == SDXL_PARAMETERS


def test_plan_leaves_out_what_does_not_fit_and_says_why(capsys):
    from distripy import cli
    from distripy.planning.memory import GIB

    whole = distripy.plan(8, (2048, 2048), 50, fabric="pcie4")
    fitting = distripy.plan(8, (2048, 2048), 50, fabric="pcie4", memory=24)
    assert all(c.memory.peak <= 24 * GIB for c in fitting.candidates)
    assert fitting.left_out and all(c.memory.peak > 24 * GIB for c in fitting.left_out)
    assert len(fitting.candidates) + len(fitting.left_out) == len(whole.candidates)
    assert 1 not in {c.gpus for c in fitting.candidates}  # one GPU decodes the whole image
    for c in whole.candidates:  # the parts add up; more GPUs never need more per GPU
        m = c.memory
        assert m.peak == m.weights + m.persistent + m.graph_pool + max(m.activations, m.vae_decode)
        assert (m.graph_pool > 0) == c.graphs and (m.persistent > 0) == (c.gpus > 1 and (c.graphs or c.mode == "corrected_async_gn") and not (c.split_batch and c.gpus == 2))
        for other in whole.candidates:
            if (other.split_batch, other.mode, other.graphs, other.compress) == (c.split_batch, c.mode, c.graphs, c.compress) and other.gpus > c.gpus > 1:
                assert other.memory.peak < m.peak, (c, other)
    with pytest.raises(ConfigError, match=r"no configuration of up to 2 GPUs fits in 24 GiB per GPU for 3840x3840: the smallest, .* needs \d+\.\d GiB: weights"):
        distripy.plan(2, 3840, 50, memory=24)
    for bad in (0, -1, float("nan"), "24", True):
        with pytest.raises(ConfigError, match="memory=.* must be a positive number of GiB"):
            distripy.plan(2, 1024, 50, memory=bad)
    assert cli.main(["plan", "--gpus", "4", "--size", "2048x2048", "--fabric", "pcie4", "--memory", "24"]) == 0
    table = capsys.readouterr().out
    assert "peak GiB/GPU" in table and "its fullest GPU: " in table
    assert re.search(r"left out, over 24 GiB per GPU \(\d+; the fastest\):\n  \d GPUs?.*: \d+\.\d GiB: weights", table)
    assert cli.main(["plan", "--gpus", "4", "--memory", "0"]) == 2
    assert "--memory 0: must be a positive number of GiB" in capsys.readouterr().err
    assert cli.main(["plan", "--gpus", "4", "--size", "2048x2048", "--memory", "24", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["memory_gib"] == 24 and planned["left_out"]
    assert all(c["memory"]["peak_gib"] <= 24 for c in planned["candidates"])
