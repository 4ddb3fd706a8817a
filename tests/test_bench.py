"""The performance instruments of ``bench/``: they run (scaled down, on CPU) and compute what they
claim. Nothing here times anything: the timing is the benchmarks' business.

* ``step_profile``: the roofline clock and the step profiles built from a ``LoopbackComm`` log;
* ``scaling``: the fabric cost formulas (nccl-tests' conventions), the overlap rules of the
  simulation on hand-made steps, and the check against the DistriFusion paper;
* ``e2e``: the scaled-down run writes rows, bytes by kind, measured profiles and a plot;
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


# -- step_profile ---------------------------------------------------------------------------------


def test_the_roofline_clock_charges_flops_or_bytes_whichever_is_slower():
    from step_profile import RooflineClock

    a = torch.empty(64, 128, device="meta", dtype=torch.float16)
    b = torch.empty(128, 32, device="meta", dtype=torch.float16)
    with RooflineClock(peak_flops=1e3, bandwidth=1e12) as clock:  # compute-bound
        a @ b
    assert clock.now() == pytest.approx(2 * 64 * 128 * 32 / 1e3)
    with RooflineClock(peak_flops=1e30, bandwidth=1e3) as clock:  # bandwidth-bound
        a.view(128, 64)  # a view moves nothing
        a + 1.0
    assert clock.now() == pytest.approx(2 * a.numel() * 2 / 1e3)
    q = torch.empty(1, 2, 10, 8, device="meta")
    with RooflineClock(peak_flops=1.0, bandwidth=1e30) as clock:  # attention as one fused kernel
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert clock.now() == pytest.approx(4 * 1 * 2 * 10 * 10 * 8)


def test_roofline_profiles_of_the_tiny_unet_follow_the_band_geometry():
    from step_profile import roofline_profiles

    small = roofline_profiles((32, 16), 4, False, tiny=True)
    wide = roofline_profiles((32, 32), 4, False, tiny=True)
    tall = roofline_profiles((64, 16), 4, False, tiny=True)
    for phase in ("sync", "async"):
        profile = small[phase]
        assert profile.compute_s > 0 and profile.transfers
        assert all(0.0 <= t.issued <= 1.0 for t in profile.transfers)
        sent = profile.bytes_sent()
        assert all(sent[kind] > 0 for kind in ("halo", "kv", "gn_stats", "output"))
        # Halo rows are as wide as the image; K/V cover the band's tokens; statistics are fixed.
        assert wide[phase].bytes_sent()["halo"] == 2 * sent["halo"]
        assert tall[phase].bytes_sent()["kv"] == 2 * sent["kv"]
        assert tall[phase].bytes_sent()["gn_stats"] == sent["gn_stats"]
    assert all(not t.waited_next for t in small["sync"].transfers)
    stale = [t for t in small["async"].transfers if t.kind != "output"]
    assert stale and all(t.waited_next for t in stale)


# -- scaling --------------------------------------------------------------------------------------


def _profile(phase, compute, *transfers):
    from step_profile import ProfiledTransfer, StepProfile

    return StepProfile(phase, compute, [ProfiledTransfer(*t) for t in transfers])


def test_fabric_costs_follow_nccl_tests_bus_bandwidth_conventions():
    from scaling import Fabric, bandwidth_seconds
    from step_profile import ProfiledTransfer

    fabric = Fabric("test", busbw_gbps=100.0, p2p_gbps=50.0, latency_us=0.0, comm_sm_share=0.0, source="")
    gather = ProfiledTransfer("kv", "all_gather", 8, 10**9, 7 * 10**9, None, 0.0, None, False)
    reduce = ProfiledTransfer("gn_stats", "all_reduce", 4, 10**9, 10**9, None, 0.0, None, False)
    halo = ProfiledTransfer("halo", "halo_exchange", 4, 2 * 10**8, 10**8, None, 0.0, None, False)
    assert bandwidth_seconds(gather, fabric) == pytest.approx(7 / 100)  # send * (n - 1) / busbw
    assert bandwidth_seconds(reduce, fabric) == pytest.approx(2 * 3 / 4 / 100)  # S * 2(n-1)/n / busbw
    assert bandwidth_seconds(halo, fabric) == pytest.approx(0.2 / 50)


def test_the_simulation_hides_what_fits_in_a_step_and_exposes_what_does_not():
    from scaling import Fabric, simulate

    fabric = Fabric("test", busbw_gbps=1.0, p2p_gbps=1.0, latency_us=0.0, comm_sm_share=0.0, source="")
    second = 10**9  # bytes one link moves in a second (2 ranks: all-gather moves `sent` once)

    def steps(sent, waited, waited_next, phase):
        transfer = ("kv", "all_gather", 2, sent, sent, None, 0.5, waited, waited_next)
        return _profile(phase, 1.0, transfer)

    hidden = {"sync": steps(0, 0.5, False, "sync"), "async": steps(second // 2, 0.5, True, "async")}
    assert simulate(hidden, fabric, steps=5, warmup_steps=1) == pytest.approx([1.0] * 5)
    # A transfer longer than a step: each async step waits for the previous one's remainder.
    slow = {"sync": hidden["sync"], "async": steps(3 * second // 2, 0.5, True, "async")}
    durations = simulate(slow, fabric, steps=5, warmup_steps=1)
    assert durations[:2] == pytest.approx([1.0, 1.0]) and durations[-1] == pytest.approx(1.5)
    # Synchronous: waited where issued, so fully exposed.
    sync = {"sync": steps(second // 2, 0.5, False, "sync"), "async": hidden["async"]}
    assert simulate(sync, fabric, steps=1, warmup_steps=1) == pytest.approx([1.5])
    # With graphs a step joins its transfers at its end: half a second fits in the second half.
    assert simulate(hidden, fabric, steps=3, warmup_steps=1, graphs=True) == pytest.approx([1.0] * 3)
    assert simulate(slow, fabric, steps=2, warmup_steps=1, graphs=True)[-1] == pytest.approx(2.0)


def test_grouped_transfers_pay_one_latency():
    from scaling import Fabric, simulate

    fabric = Fabric("test", busbw_gbps=1e9, p2p_gbps=1e9, latency_us=1e5, comm_sm_share=0.0, source="")
    alone = [("gn_stats", "all_reduce", 2, 8, 8, None, 0.0, 0.0, False)] * 3
    grouped = [("gn_stats", "all_reduce", 2, 8, 8, 7, 0.0, 0.0, False)] * 3
    for transfers, expected in ((alone, 1.3), (grouped, 1.1)):
        profiles = {"sync": _profile("sync", 1.0, *transfers), "async": _profile("async", 1.0)}
        assert simulate(profiles, fabric, steps=1, warmup_steps=1) == pytest.approx([expected])


def test_the_model_reproduces_the_papers_latencies_within_15_percent():
    """From the committed roofline profiles of SDXL (bench/results/profiles)."""
    from scaling import paper_check

    rows = [r for r in paper_check() if "predicted_s" in r]
    assert {(r["resolution"], r["gpus"]) for r in rows} == {(1024, 8), (2048, 8), (3840, 8)}
    for row in rows:
        assert abs(row["error"]) <= 0.15, row


# -- e2e ------------------------------------------------------------------------------------------


def test_the_end_to_end_benchmark_runs_scaled_down(tmp_path):
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
    profile = results["profiles"]["256-n4"]
    assert {t["kind"] for t in profile["async"]["transfers"]} == {"halo", "kv", "gn_stats", "output"}
    pytest.importorskip("matplotlib")
    assert output.with_suffix(".png").stat().st_size > 0


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
            "--max-prompts", "1", "--output-dir", str(output_dir),
        ]
    )  # fmt: skip
    return quality.run(args)


def test_quality_run_on_two_ranks(run_ranks, tmp_path):
    report = run_ranks(_quality_body, 2, tmp_path, timeout=300)[0]
    rows = {(r["steps"], r["mode"], r["warmup_steps"]): r for r in report["rows"]}
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
    from quality import derive_policy, settings, warmup_steps

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
        "--write-dispatch",
        "3840",
        "comm.py",
        "host_overhead.py",
    ):
        assert needed in commands, needed
    assert set(TARGETS) >= {"efficiency_n8_1024", "halo_conv_vs_cudnn_band", "host_us_per_grouped_op"}


def test_the_dispatch_table_merges_a_partial_run(tmp_path):
    """A run (or a run stopped at its time limit) replaces the entries of the shapes it measured
    and keeps every other shape and GPU."""
    import importlib.util

    # by its path: the name ``kernels`` is also the repository's kernel package
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "kernels.py")
    kernels_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels_bench)

    def row(channels, rows, winner):
        ms = {"norm_conv_triton": 1.0, "norm_conv_cudnn_path": 2.0}
        return dict(batch=1, in_channels=channels, out_channels=channels, stride=1, band_rows=rows,
                    width=128, fused_conv_winner=winner, ms=ms)  # fmt: skip

    table = tmp_path / "paths.json"
    kernels_bench.write_dispatch_table(
        [row(320, 16, "cudnn"), row(640, 8, "cudnn")], "GPU A", table, quiet=True
    )
    kernels_bench.write_dispatch_table([row(320, 16, "triton")], "GPU B", table, quiet=True)
    kernels_bench.write_dispatch_table([row(320, 16, "triton")], "GPU A", table, quiet=True)
    entries = {(e["device"], e["in_channels"]): e["path"] for e in json.loads(table.read_text())["entries"]}
    assert entries == {("GPU A", 320): "triton", ("GPU A", 640): "cudnn", ("GPU B", 320): "triton"}
