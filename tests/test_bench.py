"""The performance instruments of ``bench/``: they run (scaled down, on CPU) and compute what they
claim. Nothing here times anything: the timing is the benchmarks' business.

* ``results``: ``bench/results/`` holds what its index names (measurements), nothing else;
* ``scaling``, ``plan_checks``: thin commands over ``distripy.planning`` (whose cost formulas and
  overlap rules ``tests/test_planning.py`` checks): their tables are the planner's, the check
  against the DistriFusion paper holds, nothing is written unless asked;
* ``e2e``: the scaled-down run writes rows, bytes by kind, measured profiles and a plot; a CFG
  split row; the kernel summary of a profiled step;
* ``gpu_check``: the one-call GPU check dry-runs on CPU, its plan fits its budget, a part is killed
  at its limit;
* ``quality``: PSNR and the seam score on known images, and a 2-rank run of the demo model in
  which full_sync matches the single device and naive_patch shows seams the corrected mode lacks.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


# -- results -------------------------------------------------------------------------------------


def test_the_results_index_names_every_file_and_only_those():
    """``bench/results/README.md`` says what each file is and which figure it backs: a file it does
    not name (a model's output left behind, a stray run) fails, and so does a name with no file."""
    import re

    results = BENCH / "results"
    index = (results / "README.md").read_text()
    named = set()
    for row in index.splitlines():
        if row.startswith("| `"):
            named.update(re.findall(r"`([^`/]+\.[a-z]+)`", row.split(" | ")[0]))
    present = {p.name for p in results.iterdir() if p.name != "README.md" and not p.name.startswith(".")}
    assert not any(p.is_dir() for p in results.iterdir()), "bench/results/ has no subfolders"
    assert present == named, {"not in the index": present - named, "indexed, missing": named - present}


# -- scaling, plan_checks ---------------------------------------------------------------------------


def test_the_scaling_command_prints_the_planners_tables(capsys, tmp_path, monkeypatch):
    """``bench/scaling.py``: every speedup is ``distripy.planning.predict``'s, the paper check holds
    within 15% per cell, ``--modes`` compares the three modes, and nothing is written unless
    ``--output`` names a file (``--json`` prints)."""
    import scaling

    from distripy.planning import FABRICS, GPUS, predict

    before = sorted((BENCH / "results").iterdir())
    assert scaling.main(["--json", "--fabric", "nvlink4", "pcie4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted((BENCH / "results").iterdir()) == before
    check = {(r["resolution"], r["gpus"]): r for r in data["paper_check"]}
    assert set(check) == {(1024, 8), (2048, 8), (3840, 2), (3840, 4), (3840, 8)}
    for row in check.values():
        assert abs(row["error"]) <= 0.15, row
    rows = data["predictions"]
    assert len(rows) == 2 * 3 * 3 * 2 and data["cuda_graphs"] is True
    for row in rows:
        fabric = FABRICS["nvlink4" if row["fabric"] == FABRICS["nvlink4"].name else "pcie4"]
        latent = (row["resolution"] // 8,) * 2
        expected = predict(GPUS["h100"], fabric, latent, 50, row["gpus"], row["split_batch"],
                           "corrected_async_gn", 5, True)  # fmt: skip
        assert row["speedup"] == pytest.approx(expected.speedup) and row["predicted_s"] == expected.seconds
    # a measured GPU (e2e.py's file, fitted) and a text table
    measured = BENCH / "results" / "e2e-h100-20261124T1950Z.json"
    assert scaling.main(["--gpu", str(measured), "--fabric", "nvlink4", "--skip-check", "--eager"]) == 0
    table = capsys.readouterr().out
    assert "DistriFusion" not in table and "(eager, 50 steps" in table and "NVIDIA H100" in table
    output = tmp_path / "modes.json"
    monkeypatch.setattr(scaling, "environment", lambda: {"command": "bench/scaling.py"})  # no imports
    assert scaling.main(["--modes", "--output", str(output)]) == 0
    assert "exact/corrected" in capsys.readouterr().out
    modes = json.loads(output.read_text())
    assert modes["environment"]["command"] and len(modes["modes"]) == 4 * 3 * 3 * 2
    for row in modes["modes"]:
        assert set(row["speedup"]) == {"full_sync", "exact", "corrected_async_gn"}
        assert row["exact_over_corrected"] == pytest.approx(
            row["seconds"]["exact"] / row["seconds"]["corrected_async_gn"]
        )
        if row["gpus"] == 2 and row["split_batch"]:  # one band per image: nothing between bands
            assert len({round(v, 9) for v in row["seconds"].values()}) == 1
    assert scaling.main(["--gpu", "v100"]) == 2
    assert "gpu 'v100'" in capsys.readouterr().err


def test_the_codec_table_is_the_planners(capsys, tmp_path):
    """``bench/scaling.py --codecs``: each codec's speedup, bytes and peak memory are ``predict``'s
    at ``mode="auto"``'s warm-up, over PCIe Gen4 and Gen5 by default; ``--markdown`` writes its
    table whole."""
    import scaling

    from distripy.config import EXCHANGE_CODECS
    from distripy.planning import FABRICS, GPUS, predict
    from distripy.planning.memory import GIB

    markdown = tmp_path / "codecs.md"
    assert scaling.main(["--codecs", "--json", "--markdown", str(markdown)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["codecs"]
    assert {r["fabric"] for r in rows} == {FABRICS["pcie4"].name, FABRICS["pcie5"].name}
    assert len(rows) == 2 * 2 * 3 * 3 * 2
    # the asynchronous mode at auto's warm-up of 50 steps; exact as 4 steps, the first uncompressed
    assert {(r["mode"], r["steps"], r["warmup_steps"]) for r in rows} == {("corrected_async_gn", 50, 13), ("exact", 4, 1)}
    for row in rows[::7]:
        fabric = FABRICS["pcie4" if row["fabric"] == FABRICS["pcie4"].name else "pcie5"]
        common = ((row["resolution"] // 8,) * 2, row["steps"], row["gpus"], row["split_batch"], row["mode"],
                  row["warmup_steps"], True)  # fmt: skip
        for codec in EXCHANGE_CODECS:
            expected = predict(GPUS["h100"], fabric, *common, compress=codec)
            assert row["speedup"][codec] == pytest.approx(expected.speedup)
            assert row["peak_gib"][codec] == pytest.approx(expected.memory.peak / GIB)
        # nothing beats a free link: the compute's ceiling
        assert row["ceiling"] >= max(row["speedup"].values()) - 1e-9, row
    text = markdown.read_text()
    assert text.count("\n| size | GPUs | CFG split | none |") == 4 and text.count("\n| 3840 | 8 | yes | ") == 4
    assert text.startswith("<!-- python bench/scaling.py --codecs")


def test_the_plan_checks_print_and_write_only_when_asked(capsys, tmp_path):
    import plan_checks

    before = sorted((BENCH / "results").iterdir())
    assert plan_checks.main([]) == 0
    table = capsys.readouterr().out
    assert sorted((BENCH / "results").iterdir()) == before
    paper = next(line for line in table.splitlines() if line.startswith("| DistriFusion paper"))
    assert paper.endswith("| yes |")
    assert plan_checks.main(["--output", str(tmp_path / "checks.json")]) == 0
    rows = json.loads((tmp_path / "checks.json").read_text())["checks"]
    assert len(rows) == len(plan_checks.CASES) and (tmp_path / "checks.md").read_text() + "\n" == table


# -- e2e ------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """One torch thread while the scaled-down benchmarks run: on a CPU shared with other processes
    a thread pool spinning against them made the tiny UNet's steps 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_end_to_end_benchmark_runs_scaled_down(tmp_path, one_thread):
    import e2e

    output = tmp_path / "e2e.json"
    argv = [
        "--smoke",
        "--device",
        "cpu",
        "--resolutions",
        "256",
        "--gpus",
        "2",
        "4",
        "--repeats",
        "1",
        "--skip",
        "2",
        "--modes",
        "corrected_async_gn",
        "exact",
    ]
    assert e2e.main(argv + ["--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["environment"]["command"]
    rows = {(r["gpus"], r["split_batch"]): r for r in results["rows"] if r["mode"] != "exact"}
    assert set(rows) == {(1, False), (2, False), (2, True), (4, False), (4, True)}
    exact = {(r["gpus"], r["split_batch"]): r for r in results["rows"] if r["mode"] == "exact"}
    assert set(exact) == set(rows) - {(1, False)}
    # exact sends its K/V to each of the 3 other bands by a shift (an all-gather is logged once)
    assert exact[(4, False)]["sent_bytes"]["kv"] == 3 * rows[(4, False)]["sent_bytes"]["kv"]
    assert exact[(4, False)]["sent_bytes"]["halo"] == rows[(4, False)]["sent_bytes"]["halo"]
    for row in rows.values():
        assert row["step_ms"] > 0 and math.isfinite(row["efficiency"]) and row["variant"] == "eager"
    assert rows[(1, False)]["efficiency"] == 1.0
    sent = rows[(4, False)]["sent_bytes"]
    assert all(sent[kind] > 0 for kind in ("halo", "kv", "gn_stats", "output"))
    # Twice the bands: a band of half the rows sends half the K/V.
    assert rows[(4, False)]["sent_bytes"]["kv"] * 2 == rows[(2, False)]["sent_bytes"]["kv"]
    halves = rows[(2, True)]["sent_bytes"]  # one band per CFG half: only the output is gathered
    assert halves["kv"] == halves["halo"] == halves["gn_stats"] == 0 and halves["output"] > 0
    # what each rank's modules keep across steps, as the planner predicts it (planning.memory)
    for row in list(rows.values())[1:] + list(exact.values()):
        assert row["kept_bytes"] == row["predicted_kept_bytes"], row
        assert row["predicted_step_bytes"] > 0
    assert rows[(4, False)]["kept_bytes"] > 0 and exact[(4, False)]["kept_bytes"] == 0
    profile = results["profiles"]["256-n4"]
    assert {t["kind"] for t in profile["async"]["transfers"]} == {"halo", "kv", "gn_stats", "output"}
    pytest.importorskip("matplotlib")
    assert output.with_suffix(".png").stat().st_size > 0


def test_the_end_to_end_benchmark_measures_a_cfg_split_row(tmp_path, one_thread):
    """``--split yes``: the rank is a middle band of its group of N / 2 holding batch 1, its
    efficiency is against the same T1 (the plain UNet at batch 2); on CPU no memory or kernel
    figures (``null``)."""
    import e2e
    from step_profile import middle_rank

    output = tmp_path / "e2e.json"
    argv = ["--smoke", "--device", "cpu", "--resolutions", "128", "--gpus", "4", "--split", "yes"]
    argv += ["--skip", "1", "--repeats", "1", "--no-profiles", "--no-plot", "--output", str(output)]
    assert e2e.main(argv) == 0
    results = json.loads(output.read_text())
    assert results["complete"] is True and results["environment"]["command"]
    rows = {(r["gpus"], r["split_batch"]): r for r in results["rows"]}
    assert set(rows) == {(1, False), (4, True)}
    single, split = rows[(1, False)], rows[(4, True)]
    assert split["rank"] == middle_rank(4, True) == 1 and split["mode"] == "corrected_async_gn"
    assert split["efficiency"] == pytest.approx(single["step_ms"] / (4 * split["step_ms"]))
    # two bands per group: halos and GroupNorm statistics cross the band boundary
    assert split["sent_bytes"]["halo"] > 0 and split["sent_bytes"]["gn_stats"] > 0
    for row in rows.values():
        assert row["peak_memory_bytes"] is None and row["kernels"] is None and row["replay"] is None
    assert not output.with_suffix(".png").exists()
    with pytest.raises(SystemExit):
        e2e.parser().parse_args(["--split", "maybe"])
    assert e2e.parser().parse_args(["--split", "no", "yes"]).split == [False, True]


def _event(name, device, start, end, annotation=False, activity="kernel"):
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    device_type = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    return SimpleNamespace(
        name=name, device_type=device_type, time_range=Interval(start, end),
        is_user_annotation=annotation, activity_type=activity,
    )  # fmt: skip


def test_the_kernel_summary_of_a_profiled_step():
    """Kernels and copies counted apart, the duration histogram, the span and the share of the
    wall time; the GPU-side span of a label is no kernel; a session's events split by label."""
    from e2e import kernel_summary
    from gpu_check import split_by_marks

    events = [
        _event("gpu_check:plain", "cpu", 0.0, 100.0, annotation=True, activity="user_annotation"),
        _event("gpu_check:plain", "cuda", 10.0, 60.0, annotation=True, activity="gpu_user_annotation"),
        _event("cudaGraphLaunch", "cpu", 5.0, 8.0, activity="cuda_runtime"),
        _event("gemm", "cuda", 10.0, 30.0),
        _event("gemm", "cuda", 31.0, 41.0),
        _event("small", "cuda", 42.0, 44.0),
        _event("Memcpy DtoD (Device -> Device)", "cuda", 45.0, 50.0, activity="gpu_memcpy"),
        _event("gpu_check:band", "cpu", 200.0, 300.0, annotation=True, activity="user_annotation"),
        _event("halo", "cuda", 210.0, 215.0),
    ]
    groups = split_by_marks(events)
    assert sorted(groups) == ["band", "plain"]
    assert [e.name for e in groups["band"]] == ["halo"]
    summary = kernel_summary(groups["plain"], wall_ms=0.05)
    assert (summary["kernels"], summary["copies"]) == (3, 1)
    assert summary["kernel_us"] == 32.0 and summary["copy_us"] == 5.0
    assert (summary["under_3us"], summary["under_10us"]) == (1, 1)  # 2 µs; 10 µs is not under 10
    assert summary["span_us"] == 40.0 and summary["kernel_share_of_wall"] == pytest.approx(32 / 50)
    assert summary["top"][0] == {"name": "gemm", "count": 2, "total_us": 30.0}
    assert kernel_summary([], None)["kernels"] == 0


def test_the_gpu_check_dry_runs_on_cpu(tmp_path, one_thread):
    """The one-call GPU check as a CPU runs it (tiny UNet, eager, in one process): its e2e part
    gives rows without and with CFG split, its replay part the three steps; the JSON has the GPU
    run's structure with the GPU-only figures null. (Its other parts run the same code at other
    sizes and modes: their command lines are checked below.)"""
    import gpu_check

    output = tmp_path / "gpu-check.json"
    argv = ["--dry-run", "--output", str(output), "--work", str(tmp_path / "work")]
    assert gpu_check.main(argv + ["--parts", "e2e-1024", "replay-1024"]) == 0
    record = json.loads(output.read_text())
    assert record["complete"] is True and record["environment"]["dry_run"] is True
    assert {"device", "versions", "command", "git_commit"} <= set(record["environment"])
    assert [(p["name"], p["status"]) for p in record["parts"]] == [
        ("e2e-1024", "passed"),
        ("replay-1024", "passed"),
    ]
    rows = {(r["gpus"], r["split_batch"]): r for r in record["rows"]}
    assert set(rows) == {(1, False), (4, False), (4, True), (8, False), (8, True)}
    for row in rows.values():
        assert row["part"] == "e2e-1024" and row["step_ms"] > 0
        assert row["peak_memory_bytes"] is None and row["kernels"] is None
    assert rows[(8, False)]["rank"] == 4 and rows[(8, True)]["rank"] == 2
    assert record["exact_rows"] == []
    figures = record["efficiency_n8"]["256"]
    assert figures["no_split"] == rows[(8, False)]["efficiency"]
    assert figures["split"] == rows[(8, True)]["efficiency"]
    replay = record["replay"]
    assert replay["resolution"] == 256 and replay["gpus"] == 8 and replay["graphs"] is False
    steps = replay["steps"]
    assert [(k, v["rank"], v["split_batch"]) for k, v in steps.items()] == [
        ("plain", None, False),
        ("band", 4, False),
        ("band_split", 2, True),
    ]
    for step in steps.values():
        assert step["step_ms"] > 0 and step["profiled_step_ms"] > 0 and step["kernels"] is None


def test_the_gpu_check_plan_fits_its_budget_and_its_commands_parse(tmp_path):
    """Every part's command line parses (dry run and GPU); the required parts fit the budget, which
    fits the outer ``timeout`` of the documented command with room for the install."""
    import e2e
    import gpu_check

    for dry_run in (True, False):
        for part in gpu_check.plan(tmp_path, dry_run):
            if part.kind == "e2e":
                args = e2e.parser().parse_args(part.argv)
                assert args.split == [False, True] and args.gpus == [4, 8] and args.variants == ["graphs"]
            else:
                assert part.argv[0] == "replay"
                args = gpu_check.replay_parser().parse_args(part.argv[1:])
                assert args.gpus == 8
            assert Path(args.output).parent == tmp_path
    parts = {p.name: p for p in gpu_check.plan(tmp_path, dry_run=False)}
    assert list(parts) == ["e2e-1024", "replay-1024", "e2e-2048", "e2e-3840", "exact"]
    sizes = [e2e.parser().parse_args(p.argv).resolutions for p in parts.values() if p.kind == "e2e"]
    assert sizes == [[1024], [2048], [3840], [1024, 2048]]
    assert gpu_check.replay_parser().parse_args(parts["replay-1024"].argv[1:]).resolution == 1024
    required = sum(p.limit_s for p in parts.values() if not p.optional)
    assert required + parts["exact"].min_s <= gpu_check.BUDGET_S <= 420
    command = "timeout 450 python3 bench/gpu_check.py --output $OUT/gpu-check.json"
    assert command in gpu_check.__doc__ and command in (BENCH / "README.md").read_text()


def test_the_gpu_check_kills_a_part_at_its_limit(tmp_path):
    from gpu_check import run_subprocess

    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    result = run_subprocess("sleeper", sleeper, 1.0, tmp_path)
    assert result["status"] == "timed out after 1 s" and result["seconds"] < 30
    assert "started" in result["log_tail"] and (tmp_path / "sleeper.log").exists()


# -- train_tiny -----------------------------------------------------------------------------------


def test_training_the_tiny_model_writes_a_loadable_pipeline_and_its_loss_curve(tmp_path):
    import train_tiny
    from diffusers import StableDiffusionXLPipeline

    image, prompt = train_tiny.scene(np.random.default_rng(0))
    assert image.shape == (3, 128, 128) and -1.0 <= image.min() and image.max() <= 1.0
    words = prompt.split()
    assert words[1] in train_tiny.COLORS and words[2] in train_tiny.SHAPES and prompt.endswith("background")
    argv = ["--vae-steps", "2", "--unet-steps", "2", "--scenes", "16", "--batch", "4", "--sample-steps", "2"]
    argv += ["--out", str(tmp_path / "model"), "--results", str(tmp_path)]
    assert train_tiny.main(argv) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert pipe.vae.config.scaling_factor > 0
    (record,) = tmp_path.glob("train-tiny-*.json")
    data = json.loads(record.read_text())
    assert [r["stage"] for r in data["loss"]] == ["vae", "vae", "unet", "unet"]
    assert all(math.isfinite(r["loss"]) for r in data["loss"]) and data["model_bytes"] > 0
    assert record.with_suffix(".png").exists() and record.with_name(record.stem + "-samples.png").exists()
    # the model card: the command and seed that reproduce the weights
    card = (tmp_path / "model" / "README.md").read_text()
    assert "python bench/train_tiny.py --seed 0 --vae-steps 2 --unet-steps 2 --batch 4 --scenes 16" in card


# -- quality --------------------------------------------------------------------------------------


def test_psnr_and_seam_score_on_known_images():
    from quality import boundary_rows, psnr, seam_score, seam_visibility

    reference = np.linspace(0, 1, 64).reshape(8, 8)
    assert psnr(reference, reference) == math.inf
    assert psnr(reference + 0.1, reference, peak=1.0) == pytest.approx(20.0)
    assert boundary_rows(32, 4) == [8, 16, 24]
    assert boundary_rows(64, 3, unit=16) == [32, 48]  # 4 deepest rows in bands of 2, 1, 1
    with pytest.raises(ValueError, match="do not split"):
        boundary_rows(30, 4, unit=8)
    rows = np.arange(64)[:, None, None]
    smooth = 0.02 * rows + 0.01 * np.random.default_rng(0).standard_normal((64, 48, 3))
    assert 0.5 < seam_score(smooth, 4) < 2.0
    seamed = smooth + 0.5 * ((rows // 16) % 2)  # a step at every band boundary
    assert seam_score(seamed, 4) > 20.0
    assert seam_score(seamed, 1) == 1.0
    assert seam_visibility(smooth, smooth, 4) == 0.0
    # steps of 0.5 at the boundaries over the ramp's 0.02 plus the noise's 2 x 0.01² per row
    assert seam_visibility(seamed, smooth, 4) == pytest.approx(0.25 / (0.02**2 + 2 * 0.01**2), rel=0.1)


def _quality_body(rank, world_size, output_dir):
    sys.path.insert(0, str(BENCH))
    import quality

    args = quality.parser().parse_args(
        [
            "--height", "256", "--width", "64", "--steps", "3", "6", "--warmups", "1", "50%",
            "--samplers", "euler-trailing", "--modes", "full_sync", "corrected_async_gn", "naive_patch",
            "--compress", "none", "residual2", "--max-prompts", "1", "--output-dir", str(output_dir),
        ]
    )  # fmt: skip
    return quality.run(args)


def test_quality_run_on_two_ranks(run_ranks, tmp_path):
    report = run_ranks(_quality_body, 2, tmp_path, timeout=300)[0]
    compressed = [r for r in report["rows"] if r["compress"] == "residual2"]
    codecs = {(r["steps"], r["warmup_steps"]): r for r in compressed if r["mode"] == "corrected_async_gn"}
    fresh = {r["steps"]: r for r in compressed if r["mode"] == "full_sync"}
    rows = {(r["steps"], r["mode"], r["warmup_steps"]): r for r in report["rows"] if r["compress"] == "none"}
    # a codec for the asynchronous mode at its warm-ups, for full_sync from its second step on
    # (its first at full precision), none for naive_patch (nothing exchanged)
    assert set(codecs) == {(3, 1), (3, 2), (6, 1), (6, 3)} and len(compressed) == 6
    for steps, row in fresh.items():
        plain = rows[steps, "full_sync", 0]["step_errors"]
        assert row["warmup_steps"] == 1 and row["step_errors"][0] == plain[0], steps
        assert all(a > 1e-5 > b for a, b in zip(row["step_errors"][1:], plain[1:])), steps
        assert row["growth"] is not None and row["psnr_image_db"] > 30, row["psnr_image_db"]
    # the warm-up steps are the uncompressed ones; the stale steps attend over decoded keys and
    # values (residual2: from its baselines, stored in fp8 from the warm-up's on)
    for (steps, warmup), row in codecs.items():
        plain = rows[steps, "corrected_async_gn", warmup]["step_errors"]
        assert row["step_errors"][:warmup] == plain[:warmup], (steps, warmup)
        assert all(a != b for a, b in zip(row["step_errors"][warmup:], plain[warmup:])), (steps, warmup)
    # warm-ups: 1 step, and half the steps rounded up (2 of 3: one asynchronous step; 3 of 6)
    assert set(rows) == {
        (3, "full_sync", 0), (3, "naive_patch", 0), (3, "corrected_async_gn", 1), (3, "corrected_async_gn", 2),
        (6, "full_sync", 0), (6, "naive_patch", 0), (6, "corrected_async_gn", 1), (6, "corrected_async_gn", 3),
    }  # fmt: skip
    assert rows[3, "corrected_async_gn", 2]["warmup_specs"] == ["50%"]
    full, corrected, naive = (
        rows[6, "full_sync", 0],
        rows[6, "corrected_async_gn", 1],
        rows[6, "naive_patch", 0],
    )
    for row in (full,):
        assert row["psnr_image_db"] is None or row["psnr_image_db"] > 80
        assert max(row["step_errors"]) < 1e-5 and len(row["step_errors"]) == 6
    assert corrected["psnr_latent_db"] > naive["psnr_latent_db"]
    # the error after each step: none in the synchronous first step, then stale values' error
    assert corrected["step_errors"][0] < 1e-5 < corrected["step_errors"][1]
    # growth: the last step's error over the error halfway through the asynchronous steps (1..5)
    assert corrected["growth"] == pytest.approx(corrected["step_errors"][-1] / corrected["step_errors"][3])
    for where in ("seam_visibility_latent", "seam_visibility_image"):
        assert naive[where] > 3 * corrected[where], where
        assert full[where] < 1e-8, where
    reference = {(r["sampler"], r["steps"]): r for r in report["reference"]}
    assert full["seam_image"] == pytest.approx(reference["euler-trailing", 6]["seam_image"], rel=1e-4)
    assert json.loads((tmp_path / "bands-2.json").read_text())["bands"] == 2


def test_quality_warmups_and_the_policy_from_rows():
    from quality import codec_rows, codecs_markdown, derive_policy, settings, warmup_steps

    assert [warmup_steps(s, 50) for s in ("1", "10%", "25%")] == [1, 5, 13]
    assert [warmup_steps(s, 4) for s in ("10%", "25%", "50%")] == [1, 1, 2]
    # every warm-up once; none that covers every step; the warm-up is moot for the other modes
    assert settings(["exact", "stale_gn"], ["1", "2", "10%", "50%"], 2) == [
        ("exact", 0, []),
        ("stale_gn", 1, ["1", "10%", "50%"]),
    ]

    def row(steps, mode, db, specs=(), latent=None, sampler="ddim"):
        return dict(steps=steps, mode=mode, psnr_image_db=db, psnr_latent_db=latent, warmup_specs=list(specs),
                    sampler=sampler, bands=2)  # fmt: skip

    rows = [
        row(4, "corrected_async_gn", 22.0, ["10%"]), row(4, "corrected_async_gn", 28.0, ["25%"]),
        row(8, "corrected_async_gn", 27.0, ["10%"]), row(8, "corrected_async_gn", 33.0, ["25%"]),
        row(16, "corrected_async_gn", 31.0, ["10%"], latent=30.0),
        row(16, "corrected_async_gn", 35.0, ["25%"]),
        row(50, "corrected_async_gn", 34.0, ["10%"], latent=36.0),
        row(50, "corrected_async_gn", 40.0, ["25%"]),
        # no better with more steps: an error that builds up step by step
        row(16, "naive_patch", 15.0, latent=15.5), row(50, "naive_patch", 15.0, latent=15.2),
        row(16, "separate_gn", 25.0, ["10%"], latent=25.0), row(50, "separate_gn", 25.5, ["10%"], latent=25.5),
        row(16, "exact", None, latent=None), row(50, "exact", None, latent=None),
    ]  # fmt: skip
    # 10% passes 30 dB at 50 steps (the fewest synchronous steps there), and from 16 steps on
    policy = derive_policy(rows, 30.0, ["10%", "25%"])
    assert policy == {"target_psnr_image_db": 30.0, "exact_below_steps": 16, "warmup_fraction": 0.1,
                      "error_grows": ["naive_patch", "separate_gn"]}  # fmt: skip
    # 34.5 dB: only 25% passes at 50 steps; it does from 16 on (33 dB at 8)
    tighter = derive_policy(rows, 34.5, ["25%", "10%"])
    assert (tighter["exact_below_steps"], tighter["warmup_fraction"]) == (16, 0.25)
    looser = derive_policy(rows, 26.5, ["10%", "25%"])
    assert (looser["exact_below_steps"], looser["warmup_fraction"]) == (8, 0.1)
    unreachable = derive_policy(rows, 50.0, ["10%", "25%"])
    assert unreachable["exact_below_steps"] is None and unreachable["warmup_fraction"] is None
    # a codec's rows are reported beside the uncompressed ones and never move the policy
    compressed = [
        dict(row(50, "corrected_async_gn", 12.0, ["10%"], latent=12.0), compress="residual2", warmup_steps=5, growth=1.0),
        dict(row(50, "corrected_async_gn", None, ["10%"], latent=None), compress="fp8", warmup_steps=5, growth=None),
    ]
    for r in rows:
        r.update(warmup_steps={"10%": 5, "25%": 13}.get((r["warmup_specs"] or [""])[0], 0), growth=1.0)
    assert derive_policy(rows + compressed, 30.0, ["10%", "25%"]) == policy
    residual, fp8 = codec_rows(rows + compressed)
    assert (residual["psnr_image_db_uncompressed"], residual["delta_db"]) == (34.0, -22.0)
    assert fp8["delta_db"] is None  # identical to the single device: no difference in dB
    markdown = "\n".join(codecs_markdown(rows + compressed))
    assert "| `corrected_async_gn` | `fp8` | 10% | = | -" in markdown
    assert "| `corrected_async_gn` | `residual2` | 10% | 12.0 (-22.0) | 1.00 |" in markdown
    assert codecs_markdown(rows) == []
    # one run of two says it grows: not most of them
    rows.append(row(16, "naive_patch", 15.0, latent=15.0, sampler="euler-trailing"))
    rows.append(row(50, "naive_patch", 15.0, latent=20.0, sampler="euler-trailing"))
    assert "naive_patch" not in derive_policy(rows, 30.0, ["10%", "25%"])["error_grows"]


# -- reference_compare ------------------------------------------------------------------------------


def test_the_reference_alignment_turns_its_unbiased_group_norm_into_torchs():
    """``reference_worker._align_variance``: the reference's GroupNorm formula (unbiased variance over
    a band's N elements, written out here in float64) with the aligned parameters equals torch's
    GroupNorm with the original ones, on every GroupNorm of a UNet, on a band of its real input."""
    import torch.nn.functional as F
    from reference_worker import _align_variance
    from unet_models import sdxl_conditioning, tiny_sdxl_unet

    bands = 2
    unet = tiny_sdxl_unet(70)
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    originals = {id(m): (m.eps, m.weight.detach().clone(), m.bias.detach().clone()) for m in norms}
    conditioning = sdxl_conditioning(1, seed=71)
    inputs = {
        "latents": [torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(72))],
        "timesteps": [500],
        "encoder_hidden_states": conditioning["encoder_hidden_states"],
        "text_embeds": conditioning["added_cond_kwargs"]["text_embeds"],
        "time_ids": conditioning["added_cond_kwargs"]["time_ids"],
    }
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), args[0])) for m in norms]
    with torch.no_grad():
        unet(**{"sample": inputs["latents"][0], "timestep": 500, **conditioning})
    for hook in hooks:
        hook.remove()
    restore = _align_variance(unet, inputs, bands)
    for norm in norms:
        x = seen[id(norm)]
        band = x[:, :, : x.shape[2] // bands].double()
        n, c, h, w = band.shape
        grouped = band.reshape(n, norm.num_groups, -1)
        elements = grouped.shape[-1]
        var = grouped.var(-1, unbiased=False, keepdim=True) * (elements / (elements - 1))
        normed = ((grouped - grouped.mean(-1, keepdim=True)) / (var + norm.eps).sqrt()).reshape(band.shape)
        reference = normed * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
        eps, weight, bias = originals[id(norm)]
        expected = F.group_norm(band, norm.num_groups, weight.double(), bias.double(), eps)
        torch.testing.assert_close(reference, expected, rtol=1e-6, atol=1e-6)
    restore()
    for norm in norms:
        eps, weight, _ = originals[id(norm)]
        assert norm.eps == eps and torch.equal(norm.weight, weight)


# -- gpu_acceptance, host_overhead -----------------------------------------------------------------


# The dry run's e2e, demo and generate stages run commands that tests of their own run (the
# scaled-down e2e above, test_cli's demo and generate): here their command lines are parsed only.
COVERED_ELSEWHERE = ("e2e", "demo", "generate")


def test_the_gpu_acceptance_plan_dry_runs_on_cpu(tmp_path):
    """The one command a lent GPU runs, as a CPU machine runs it: every stage that needs CUDA is
    skipped and says so, the others pass on tiny shapes, and exactly three files come back."""
    import subprocess
    import tarfile

    from gpu_acceptance import plan

    out = tmp_path / "acceptance"
    stages = [stage.name for stage in plan(out, dry_run=True) if stage.name not in COVERED_ELSEWHERE]
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_acceptance.py"),
            "--dry-run",
            "--out",
            str(out),
            "--stages",
            *stages,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["artifacts.tar.gz", "summary.json", "summary.txt"]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s for s in summary["stages"]}
    assert list(status) == ["cuda_tests", "sanitizer", "kernels", "comm", "host_overhead"]
    for stage in ("sanitizer", "kernels", "comm"):
        assert status[stage]["status"] == "skipped" and "needs a CUDA GPU" in status[stage]["why"]
    for stage in ("cuda_tests", "host_overhead"):
        assert status[stage]["status"] == "passed", status[stage]
    # the figures next to their targets; what a CPU cannot measure says so
    targets = {row["figure"]: row for row in summary["targets"]}
    assert targets["async_ops_vs_plain"]["value"] > 0 and targets["async_ops_vs_plain"]["target"] == "<= 1.1"
    assert targets["host_us_per_grouped_op"]["met"] is None
    assert summary["figures"]["cuda_tests"]["skipped"] == summary["figures"]["cuda_tests"]["tests"] > 0
    text = (out / "summary.txt").read_text()
    assert "host_overhead" in text and "not measured" in text
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/cuda_tests.log", "logs/host_overhead.log", "host_overhead.json"} <= names


def test_the_dry_runs_other_commands_parse(tmp_path):
    """The dry run's stages covered elsewhere: their command lines are what those tests run."""
    import e2e
    from gpu_acceptance import plan

    from distripy import cli

    commands = {stage.name: stage.commands for stage in plan(tmp_path, dry_run=True)}
    (e2e_command,) = commands["e2e"]
    assert e2e_command[1].endswith("e2e.py") and "--smoke" in e2e_command and "cpu" in e2e_command
    with pytest.raises(SystemExit) as shown:
        e2e.main(e2e_command[2:] + ["--help"])
    assert shown.value.code == 0
    for name in ("demo", "generate"):
        command = commands[name][-1]
        assert command[1:3] == ["-m", "distripy.cli"], command
        arguments = cli._parser().parse_args(command[3:])
        assert arguments.command == name and arguments.height == 64


def test_the_gpu_acceptance_plan_fits_25_minutes_and_names_every_stage(tmp_path):
    from gpu_acceptance import TARGETS, plan

    stages = plan(tmp_path, dry_run=False)
    assert [s.name for s in stages] == [s.name for s in plan(tmp_path, dry_run=True)]
    assert sum(s.limit_s for s in stages) <= 25 * 60
    commands = " ".join(" ".join(c) for s in stages for c in s.commands)
    for needed in (
        "-m cuda",
        "memcheck",
        "racecheck",
        "--shapes all",
        "3840",
        "comm.py",
        "host_overhead.py",
    ):
        assert needed in commands, needed
    assert set(TARGETS) >= {"efficiency_n8_1024", "halo_conv_vs_cudnn_band", "host_us_per_grouped_op"}
