"""``distripy.planning``: the traffic walk against what the real model sends, the fits against known
coefficients and measured files, the predictions against the paper, and ``distripy plan``."""

import json
from collections import Counter

import pytest
import torch

import distripy
from distripy.errors import ConfigError
from distripy.parallel.bands import BandLayout
from distripy.planning import FABRICS, GPUS, fit_gpu, load_fabric, load_gpu, predict, step_traffic
from distripy.planning.hardware import GpuProfile
from unet_models import POOLED_DIM, TEXT_DIM, sdxl_conditioning, tiny_sdxl_unet

WIDTH = 16


def _logged_step(world, rank, height, split, mode):
    """What rank ``rank`` of ``world`` sends in its second step (asynchronous after a 1-step
    warm-up), as a ``LoopbackComm`` logs it while the tiny UNet runs."""
    from distripy.runtime import LoopbackComm, TrafficLog

    unet = tiny_sdxl_unet(0)
    log = TrafficLog()
    config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=split)
    distripy.parallelize(unet, config, comm=LoopbackComm(rank, world, log=log))
    sample = torch.randn(2, 4, height, WIDTH, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        for step, timestep in enumerate((900, 800)):
            log.step = step
            unet(sample, timestep, **sdxl_conditioning(2, 1))
    distripy.reset(unet)
    return [t for t in log.transfers if t.step == 1]


@pytest.mark.parametrize(
    "world, rank, height, split, mode",
    [
        (3, 1, 32, False, "corrected_async_gn"),  # bands 3, 3, 2: a middle band
        (5, 0, 24, False, "full_sync"),  # 2, 1, 1, 1, 1: the top band, the larger
        (6, 4, 28, True, "exact"),  # CFG split: bands 3, 2, 2 per half; ring shifts
        (6, 5, 28, True, "corrected_async_gn"),  # the bottom band of the second half
        (2, 1, 32, True, "corrected_async_gn"),  # one band per half: only the output travels
    ],
)
def test_traffic_walk_equals_what_the_model_sends(world, rank, height, split, mode):
    from distripy.pipelines.tiny import tiny_sdxl_unet_config

    logged = _logged_step(world, rank, height, split, mode)
    bands = world // 2 if split else world
    layout = BandLayout.split(height // 4, bands)
    walk = step_traffic(
        (height, WIDTH), 1 if split else 2, layout.units, rank % bands, tiny_sdxl_unet_config(TEXT_DIM, POOLED_DIM),
        dtype_bytes=4, exact=mode == "exact", halves=2 if split else 1,
    )  # fmt: skip
    assert Counter((t.op, t.sent, t.received) for t in logged) == Counter(
        (t.op, t.sent, t.received) for t in walk.transfers
    )
    if mode == "corrected_async_gn":  # the same transfers leave together at each checkpoint
        by_group, by_block = {}, {}
        for t in logged:
            by_group.setdefault(t.group, []).append((t.op, t.sent))
        for t in walk.transfers:
            by_block.setdefault("output" if t.kind == "output" else t.block, []).append((t.op, t.sent))
        assert sorted(map(sorted, by_group.values())) == sorted(map(sorted, by_block.values()))


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
    assert wants_split(config, (128, 128), 4, 2, 50, True, "NVIDIA H100 80GB HBM3")
    assert not wants_split(config, (128, 128), 3, 2, 50, True, None)  # odd: no split possible
    assert not wants_split(distripy.DistriConfig(split_batch=False), (128, 128), 4, 2, 50, True, None)
    assert machine_of("NVIDIA A100-SXM4-80GB") == ("a100", "nvlink3")
    assert machine_of("NVIDIA L40") == ("l40", "pcie4") and machine_of(None) == ("h100", "nvlink4")
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
