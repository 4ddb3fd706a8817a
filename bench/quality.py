"""The quality study: every mode x number of steps x sampler x warm-up x bands, against the
single device, on a trained model -- where the modes' errors mean something.

Per world of N ranks (one band each, no CFG split), for each sampler (``ddim``: DDIM with SD's
leading timesteps; ``euler-trailing``: Euler with trailing timesteps, SDXL-Lightning's), each
number of steps and each prompt, rank 0 makes the single-device trajectory; then every mode and
warm-up setting makes it patch-parallel. Warm-ups are given as steps (``1``) or as a share of the
steps (``10%``, rounded up); a warm-up that covers every step is ``full_sync`` and is skipped.
Rank 0 scores, per setting and mean over the prompts:

* PSNR of the final latents (peak: the reference latents' range) and of the images (peak 1);
* ``seam img``: the mean squared step between the rows that meet at band boundaries over the same
  on all other rows, of the image alone (about 1 without seams; the reference's own alongside);
  ``seam vis`` (images and latents): the squared step of the *error* across the boundaries over
  the reference's mean squared step between rows (near 0 when a seam is invisible);
* the error step by step: the RMS difference of the latents after every step from the
  reference's, over the RMS of the reference's final latents (one scale for the whole
  trajectory), and ``growth``: the error after the last step over the error halfway through the
  asynchronous steps (about 1 once it has stopped growing). Which modes' errors grow step over
  step is decided across step counts (``derive_policy``);
* LPIPS (torchmetrics, AlexNet) and FID (clean-fid) with ``--perceptual``, where their weights are
  at hand (otherwise the reason each is missing).

``--compress`` adds rows of the exchange codecs (``DistriConfig(compress=...)``): for the
asynchronous modes at their warm-ups, for ``full_sync`` and ``exact`` with only the first step at
full precision (their fresh exchanges compressed from the second step on: the strictest setting);
each row says its ``compress``, the policy and the plots use the uncompressed rows only, and the
summary gains a table of each codec's image PSNR beside the same setting's uncompressed one. ``--name`` names the results (so
that a codec study does not replace the mode study's).

Run without torchrun it is the whole study: it launches one world per ``--bands`` value (CPU
processes, an equal share of the cores each, or one GPU each), then merges their results into
``bench/results/quality-study-<time>.json``, the plots (``-psnr.png``: final PSNR against the
number of steps, one line per mode; ``-trajectory.png``: the error step by step at the most steps;
``-warmup.png``: PSNR against the warm-up) and a summary table.

    python bench/quality.py --model distripy/pipelines/models/tiny-shapes   # the committed study
    python bench/quality.py --model distripy/pipelines/models/tiny-shapes --modes corrected_async_gn exact \\
        --warmups 25% --steps 16 50 --compress none fp8 residual2 residual1 --name quality-codecs
    torchrun --nproc-per-node 2 bench/quality.py --model ./sdxl-base --height 1024 --width 1024 \\
        --steps 8 50 --samplers euler-trailing --prompts prompts.txt        # one world
"""

import argparse
import copy
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from common import RESULTS, environment, timestamp, write_json

from distripy.config import EXCHANGE_CODECS
from distripy.config import MODES as ALL_MODES
from distripy.demo import boundary_rows, psnr, seam_score, seam_visibility  # the demo's metrics

__all__ = [
    "boundary_rows",
    "derive_policy",
    "psnr",
    "run",
    "seam_score",
    "seam_visibility",
    "settings",
    "study",
]

PROMPTS = [
    "a red circle on a blue and yellow background",
    "a white square on a black and green background",
    "a yellow triangle on a purple and orange background",
    "a blue circle on a white and red background",
]
MODES = ("full_sync",) + tuple(m for m in ALL_MODES if m != "full_sync")
SAMPLERS = ("ddim", "euler-trailing")
STEPS = (2, 4, 8, 16, 50)
WARMUPS = ("10%", "25%", "1", "2", "4")  # the first: what --sweep-modes leaves the others at
ASYNC_MODES = ("corrected_async_gn", "sync_gn", "stale_gn", "separate_gn")  # the warm-up matters
FRESH_MODES = ("exact", "full_sync")  # every exchange fresh: a codec is their only departure from one device
SHRINK_DB = 1.0
"""A mode whose latent PSNR gains less than this from the second most to the most steps measured
(each asynchronous step then staler by less) has an error that grows step over step
(``derive_policy``)."""


# -- metrics (rank 0) ------------------------------------------------------------------------------


def trajectory_error(value: np.ndarray, reference: np.ndarray, final: np.ndarray) -> float:
    """RMS of ``value - reference`` over the RMS of ``final`` (the reference's last latents)."""
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    scale = float(np.mean(np.asarray(final, np.float64) ** 2))
    return float(np.sqrt(np.mean((value - reference) ** 2) / max(scale, 1e-30)))


def error_growth(errors: Sequence[float], first_async: int) -> Optional[float]:
    """The error after the last step over the error halfway through the asynchronous steps (from
    step ``first_async`` on): about 1 when it has stopped growing. None when that error is 0."""
    middle = min(first_async + (len(errors) - first_async) // 2, len(errors) - 1)
    return None if errors[middle] == 0 else float(errors[-1] / errors[middle])


def lpips_scores(images: Sequence[np.ndarray], references: Sequence[np.ndarray]):
    """Mean LPIPS (AlexNet), or the reason it cannot be computed here."""
    try:
        import torch
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError as error:
        return None, f"torchmetrics is not installed ({error})"
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except Exception as error:  # its backbone weights are downloaded on first use
        return None, f"LPIPS weights unavailable: {type(error).__name__}: {str(error)[:120]}"

    def batch(arrays):
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().clamp(0, 1)

    with torch.no_grad():
        return float(metric(batch(images), batch(references))), None


def fid_score(images: Sequence[np.ndarray], references: Sequence[np.ndarray], folder: Path, minimum: int):
    """FID between the two sets (clean-fid), or the reason it is not computed."""
    if len(images) < minimum:
        return None, f"{len(images)} images < --fid-min-images {minimum}"
    try:
        from cleanfid import fid
        from PIL import Image
    except ImportError as error:
        return None, f"clean-fid is not installed ({error})"
    for name, arrays in (("mode", images), ("reference", references)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index, array in enumerate(arrays):
            Image.fromarray((array.clip(0, 1) * 255).round().astype("uint8")).save(
                folder / name / f"{index}.png"
            )
    try:
        return float(fid.compute_fid(str(folder / "mode"), str(folder / "reference"), verbose=False)), None
    except Exception as error:  # the Inception weights are downloaded on first use
        return None, f"FID unavailable: {type(error).__name__}: {str(error)[:120]}"


# -- the settings ----------------------------------------------------------------------------------


def warmup_steps(spec: str, steps: int) -> int:
    """A warm-up given as steps (``"2"``) or as a share of ``steps`` (``"10%"``, rounded up, at
    least 1)."""
    if spec.endswith("%"):
        return max(1, math.ceil(float(spec[:-1]) / 100 * steps - 1e-9))
    return int(spec)


def settings(
    modes: Sequence[str], warmups: Sequence[str], steps: int, sweep: Optional[Sequence[str]] = None
) -> List[Tuple[str, int, List[str]]]:
    """``(mode, warm-up steps, the specs that gave it)`` to run for ``steps`` steps: each distinct
    warm-up once for the modes it matters to (only the first spec for those not in ``sweep``,
    when given); none that covers every step (that is full_sync)."""
    rows = []
    for mode in modes:
        if mode not in ASYNC_MODES:
            rows.append((mode, 0, []))
            continue
        chosen: Dict[int, List[str]] = {}
        for spec in warmups if sweep is None or mode in sweep else warmups[:1]:
            value = warmup_steps(spec, steps)
            if value < steps:
                chosen.setdefault(value, []).append(spec)
        rows.extend((mode, value, specs) for value, specs in sorted(chosen.items()))
    return rows


def scheduler_for(config, sampler: str):
    """A scheduler of ``config`` (the model's own scheduler's) as ``sampler`` (see the module
    docstring)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if sampler == "ddim":
        return DDIMScheduler.from_config(
            config,
            timestep_spacing="leading",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        )
    if sampler == "euler-trailing":
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")


# -- generation (every rank) -----------------------------------------------------------------------


def _pipeline(args, device):
    import torch

    if args.model is None:
        from distripy.pipelines.tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(args.seed)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(
            args.model, torch_dtype=getattr(torch, args.dtype), local_files_only=True
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, args, index: int, steps: int):
    """The latents after every step, and the image, of one call."""
    import torch

    trajectory = []

    def keep_latents(pipe, step, timestep, tensors):
        trajectory.append(tensors["latents"][0].float().cpu().numpy())
        return tensors

    image = pipe(
        prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed + index),
        output_type="np",
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images[0]
    return np.stack(trajectory), image


def run(args) -> Optional[Dict]:
    """One world's share of the study. Every rank calls this; rank 0 returns (and writes) it."""
    import torch

    import distripy

    rank, world = distripy.init(backend=None if torch.cuda.is_available() else "gloo")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    prompts = args.prompts.read_text().splitlines() if args.prompts else PROMPTS
    prompts = [p.strip() for p in prompts if p.strip()][: args.max_prompts]
    base = _pipeline(args, device)
    from distripy.pipelines.unet import count_downsamplings

    # the bands are cut in rows of the UNet's deepest level (and may differ by one): the seams'
    # metrics need that row's height in image and latent rows
    args.deepest_rows = args.height // (base.vae_scale_factor * 2 ** count_downsamplings(base.unet))
    scheduler_config = base.scheduler.config
    cases = [(sampler, steps) for sampler in args.samplers for steps in args.steps]
    references = {}
    if rank == 0:
        for sampler, steps in cases:
            base.scheduler = scheduler_for(scheduler_config, sampler)
            references[sampler, steps] = [_generate(base, p, args, i, steps) for i, p in enumerate(prompts)]
    # One parallelised pipeline per (mode, warm-up, codec); every case that setting applies to.
    plan: Dict[Tuple[str, int, str], List[Tuple[str, int, List[str]]]] = {}
    for sampler, steps in cases:
        for mode, warmup, specs in settings(args.modes, args.warmups, steps, args.sweep_modes):
            for compress in args.compress:
                if compress == "none":
                    plan.setdefault((mode, warmup, compress), []).append((sampler, steps, specs))
                elif mode in FRESH_MODES:  # a codec on fresh exchanges: only the first step at full precision
                    plan.setdefault((mode, 1, compress), []).append((sampler, steps, ["1"]))
                elif mode != "naive_patch":  # which exchanges nothing
                    plan.setdefault((mode, warmup, compress), []).append((sampler, steps, specs))
    rows = []
    for (mode, warmup, compress), applies in plan.items():
        config = distripy.DistriConfig(mode=mode, warmup_steps=warmup, split_batch=False, compress=compress)
        pipe = distripy.parallelize(copy.deepcopy(base), config)
        for sampler, steps, specs in applies:
            pipe.scheduler = scheduler_for(scheduler_config, sampler)
            outputs = [_generate(pipe, p, args, i, steps) for i, p in enumerate(prompts)]
            if rank == 0:
                row = _score(outputs, references[sampler, steps], world, args)
                first_async = warmup if mode in ASYNC_MODES or compress != "none" else 0
                rows.append(
                    dict(
                        sampler=sampler,
                        steps=steps,
                        mode=mode,
                        compress=compress,
                        warmup_steps=warmup,
                        warmup_specs=specs,
                        growth=None  # nothing stale or compressed is used: float rounding only
                        if mode in FRESH_MODES and compress == "none"
                        else error_growth(row["step_errors"], first_async),
                        **row,
                    )
                )
        distripy.reset(pipe)
        del pipe
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    report = {
        "environment": environment(),
        "model": str(args.model) if args.model else "tiny random-weight SDXL (distripy demo)",
        "bands": world,
        "size": [args.height, args.width],
        "guidance": args.guidance,
        "prompts": prompts,
        "reference": [
            {
                "sampler": sampler,
                "steps": steps,
                "seam_image": float(
                    np.mean(
                        [
                            seam_score(r[1], world, r[1].shape[0] // args.deepest_rows)
                            for r in references[sampler, steps]
                        ]
                    )
                ),
            }
            for sampler, steps in cases
        ],
        "rows": rows,
    }
    folder = args.output_dir or RESULTS / f"quality-{timestamp()}"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"bands-{world}.json", report)
    print(table(rows, world))
    return report


def _score(outputs, references, bands: int, args) -> Dict:
    """The metrics of one setting's outputs against the single device's, mean over the prompts."""
    latents = [o[0][-1] for o in outputs]
    images = [o[1] for o in outputs]
    ref_latents = [r[0][-1] for r in references]
    ref_images = [r[1] for r in references]
    # the RMS difference after every step over the final reference's RMS: one scale for the whole
    # trajectory, so the curve's shape is the absolute error's (a relative error per step would
    # also grow as the noise leaves the latent)
    step_errors = np.mean(
        [[trajectory_error(a, b, r[0][-1]) for a, b in zip(o[0], r[0])] for o, r in zip(outputs, references)],
        axis=0,
    )
    row = {  # a PSNR of None: identical to the single device
        "psnr_latent_db": _finite(np.mean([psnr(a, b) for a, b in zip(latents, ref_latents)])),
        "psnr_image_db": _finite(np.mean([psnr(a, b, 1.0) for a, b in zip(images, ref_images)])),
        "seam_image": float(np.mean([seam_score(i, bands, i.shape[0] // args.deepest_rows) for i in images])),
        "seam_visibility_image": float(
            np.mean(
                [
                    seam_visibility(a, b, bands, b.shape[0] // args.deepest_rows)
                    for a, b in zip(images, ref_images)
                ]
            )
        ),
        "seam_visibility_latent": float(
            np.mean(
                [
                    seam_visibility(
                        a.transpose(1, 2, 0), b.transpose(1, 2, 0), bands, b.shape[1] // args.deepest_rows
                    )
                    for a, b in zip(latents, ref_latents)
                ]
            )
        ),
        "step_errors": [float(e) for e in step_errors],
    }
    if args.perceptual:
        lpips, lpips_reason = lpips_scores(images, ref_images)
        fid, fid_reason = fid_score(
            images, ref_images, Path(args.output_dir or RESULTS) / "fid", args.fid_min_images
        )
        row.update(lpips=lpips, fid=fid)
        row["missing"] = {k: v for k, v in (("lpips", lpips_reason), ("fid", fid_reason)) if v}
    return row


def table(rows: Sequence[Dict], bands: int) -> str:
    lines = [
        f"{'bands':>5} {'sampler':<15} {'steps':>5} {'mode':<19} {'compress':<9} {'warm-up':>7} {'PSNR lat':>9} "
        f"{'PSNR img':>9} {'seam img':>9} {'seam vis img':>12} {'growth':>7}"
    ]
    for row in rows:
        growth = "-" if row["growth"] is None else f"{row['growth']:.2f}"
        lines.append(
            f"{bands:>5} {row['sampler']:<15} {row['steps']:>5} {row['mode']:<19} "
            f"{row.get('compress', 'none'):<9} {row['warmup_steps']:>7} "
            f"{_db(row['psnr_latent_db']):>9} {_db(row['psnr_image_db']):>9} {row['seam_image']:>9.2f} "
            f"{row['seam_visibility_image']:>12.2e} {growth:>7}"
        )
    return "\n".join(lines)


def _finite(value) -> Optional[float]:
    return None if math.isinf(value) else float(value)


def _db(value: Optional[float]) -> str:
    return "inf" if value is None else f"{value:.1f}"


# -- the study (no torchrun): one world per --bands, merged ----------------------------------------


def launch_world(bands: int, argv: Sequence[str], folder: Path) -> None:
    """Run this script on ``bands`` local processes (what ``torchrun --nproc-per-node`` does)."""
    from distripy.runtime.distributed import launch_local

    launch_local(bands, [str(Path(__file__).resolve()), *argv, "--output-dir", str(folder)])


def _psnr_value(row: Dict, key: str) -> float:
    return math.inf if row[key] is None else row[key]


def derive_policy(rows: Sequence[Dict], target_db: float, fractions: Sequence[str]) -> Dict:
    """The ``auto`` policy the measurements support.

    * for each measured share of the steps as warm-up that keeps ``corrected_async_gn``'s image
      PSNR >= ``target_db`` at the most steps measured, for every sampler and band count: the
      fewest measured steps from which it keeps the target at every measured count at or above
      it (below it: ``exact``);
    * ``warmup_fraction`` and ``exact_below_steps``: the share, and its threshold, that make the
      fewest steps with full exchanges (warm-up steps, and every step of an ``exact`` generation)
      summed over the measured step counts (ties: the smaller share);
    * ``error_grows``: the modes whose error grows step over step: with more steps each
      asynchronous step is staler by less, so a mode whose error is one step's staleness gets
      closer to the single device; one whose latent PSNR gains less than ``SHRINK_DB`` from the
      second most to the most steps, in most (sampler, bands) runs, has an error that builds up
      with the steps instead (a stale mode at its first warm-up spec; ``naive_patch``).
    """
    rows = uncompressed(rows)
    corrected = [r for r in rows if r["mode"] == "corrected_async_gn"]
    all_steps = sorted({r["steps"] for r in rows})

    def passes(spec: str, steps: int) -> bool:
        measured = [r for r in corrected if r["steps"] == steps and spec in r["warmup_specs"]]
        return bool(measured) and all(_psnr_value(r, "psnr_image_db") >= target_db for r in measured)

    share, threshold, fewest = None, None, None
    for spec in sorted(fractions, key=lambda s: float(s.rstrip("%"))):
        if not all_steps or not passes(spec, all_steps[-1]):
            continue
        start = next(s for i, s in enumerate(all_steps) if all(passes(spec, t) for t in all_steps[i:]))
        full = sum(steps if steps < start else warmup_steps(spec, steps) for steps in all_steps)
        if fewest is None or full < fewest:
            share, threshold, fewest = spec, start, full
    grows = []
    smallest = min(fractions, key=lambda s: float(s.rstrip("%")), default=None)
    if len(all_steps) >= 2:
        fewer, most = all_steps[-2], all_steps[-1]
        for mode in sorted({r["mode"] for r in rows} - {"exact", "full_sync"}):
            verdicts = []
            for run in {(r["sampler"], r.get("bands")) for r in rows if r["mode"] == mode}:

                def psnr_at(steps, run=run):
                    found = [
                        r
                        for r in rows
                        if r["mode"] == mode
                        and (r["sampler"], r.get("bands")) == run
                        and r["steps"] == steps
                        and (mode not in ASYNC_MODES or smallest in r["warmup_specs"])
                    ]
                    return _psnr_value(found[0], "psnr_latent_db") if found else None

                before, after = psnr_at(fewer), psnr_at(most)
                if before is not None and after is not None:
                    verdicts.append(after - before < SHRINK_DB)
            if verdicts and sum(verdicts) * 2 > len(verdicts):
                grows.append(mode)
    return {
        "target_psnr_image_db": target_db,
        "exact_below_steps": threshold,
        "warmup_fraction": None if share is None else float(share.rstrip("%")) / 100,
        "error_grows": grows,
    }


def uncompressed(rows: Sequence[Dict]) -> List[Dict]:
    """The rows without a codec (what the policy and the plots are about)."""
    return [r for r in rows if r.get("compress", "none") == "none"]


def codec_rows(rows: Sequence[Dict]) -> List[Dict]:
    """Each codec's rows, with ``psnr_image_db_uncompressed``: the image PSNR of the uncompressed
    row of the same sampler, steps, bands, mode and warm-up (``delta_db``: the codec's less the
    uncompressed one; None where either is identical to the single device or is missing)."""
    plain = {
        (r["sampler"], r["steps"], r.get("bands"), r["mode"], r["warmup_steps"]): r for r in uncompressed(rows)
    }
    found = []
    for r in rows:
        if r.get("compress", "none") == "none":
            continue
        base = plain.get((r["sampler"], r["steps"], r.get("bands"), r["mode"], r["warmup_steps"]))
        before = None if base is None else base["psnr_image_db"]
        after = r["psnr_image_db"]
        delta = None if before is None or after is None else after - before
        found.append(dict(r, psnr_image_db_uncompressed=before, delta_db=delta))
    return found


def codecs_markdown(rows: Sequence[Dict]) -> List[str]:
    """The summary's codec section: per sampler, each (mode, codec)'s image PSNR and its change
    from the uncompressed row, and its error's growth at the most steps."""
    found = codec_rows(rows)
    if not found:
        return []
    lines = [
        "",
        "## The exchange codecs (`compress`)",
        "",
        "Image PSNR (dB) against the single device, and in brackets its change from the same setting "
        "uncompressed; then the error's growth at the most steps (last step / halfway through the "
        "asynchronous ones; for `full_sync` and `exact`, whose uncompressed rows equal the single device, "
        "over the halfway point of the compressed ones). Their codec rows send only the first step at full "
        "precision (warm-up 1).",
        "",
    ]
    steps_all = sorted({r["steps"] for r in found})
    bands = sorted({r.get("bands") for r in found})
    for sampler in sorted({r["sampler"] for r in found}):
        lines += [f"### {sampler}", ""]
        lines.append(
            "| mode | codec | warm-up | "
            + " | ".join(f"{s} steps, N={n}" for s in steps_all for n in bands)
            + " | growth, "
            + ", ".join(f"N={n}" for n in bands)
            + " |"
        )
        lines.append("|" + " --- |" * (4 + len(steps_all) * len(bands)))
        keys = sorted({(r["mode"], r["compress"]) for r in found if r["sampler"] == sampler})
        for mode, compress in sorted(keys, key=lambda k: (k[0], EXCHANGE_CODECS.index(k[1]))):
            mine = [r for r in found if r["sampler"] == sampler and (r["mode"], r["compress"]) == (mode, compress)]
            cells = []
            for steps in steps_all:
                for n in bands:
                    match = [r for r in mine if r["steps"] == steps and r.get("bands") == n]
                    if not match:
                        cells.append("-")
                        continue
                    value = "=" if match[0]["psnr_image_db"] is None else f"{match[0]['psnr_image_db']:.1f}"
                    delta = "" if match[0]["delta_db"] is None else f" ({match[0]['delta_db']:+.1f})"
                    cells.append(value + delta)
            growth = []
            for n in bands:
                match = [r for r in mine if r["steps"] == steps_all[-1] and r.get("bands") == n]
                growth.append("-" if not match or match[0]["growth"] is None else f"{match[0]['growth']:.2f}")
            specs = sorted({spec for r in mine for spec in r["warmup_specs"]})
            lines.append(
                f"| `{mode}` | `{compress}` | {', '.join(specs) or '-'} | "
                + " | ".join(cells)
                + " | "
                + ", ".join(growth)
                + " |"
            )
        lines.append("")
    return lines


def _line_rows(rows: Sequence[Dict], sampler: str, bands: int, mode: str, spec: str) -> List[Dict]:
    """The rows of one line of the PSNR plot: a mode at warm-up ``spec`` (others: their one run)."""
    chosen = [
        r
        for r in rows
        if r["sampler"] == sampler
        and r["bands"] == bands
        and r["mode"] == mode
        and (mode not in ASYNC_MODES or spec in r["warmup_specs"])
    ]
    return sorted(chosen, key=lambda r: r["steps"])


def plot_study(rows: Sequence[Dict], stem: Path, spec: str) -> List[Path]:
    """The three figures (see the module docstring), of the uncompressed rows; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = uncompressed(rows)
    samplers = sorted({r["sampler"] for r in rows})
    bands = sorted({r["bands"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    cap = 1 + max((r["psnr_image_db"] or 0) for r in rows)
    paths = []

    figure, axes = plt.subplots(
        len(samplers), len(bands), figsize=(4 * len(bands), 3.3 * len(samplers)), squeeze=False
    )
    for i, sampler in enumerate(samplers):
        for j, n in enumerate(bands):
            axis = axes[i][j]
            for mode in modes:
                line = _line_rows(rows, sampler, n, mode, spec)
                if line:
                    values = [cap if r["psnr_image_db"] is None else r["psnr_image_db"] for r in line]
                    axis.plot([r["steps"] for r in line], values, marker="o", label=mode)
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xticks(sorted({r["steps"] for r in rows}))
            axis.set_xticklabels([str(s) for s in sorted({r["steps"] for r in rows})])
            axis.set_title(f"{sampler}, {n} bands", fontsize=9)
            axis.set_xlabel("steps")
            axis.set_ylabel("image PSNR vs 1 device (dB)")
            axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, title=f"warm-up {spec}; top: identical", title_fontsize=7)
    paths.append(_save(figure, stem, "psnr"))

    most = max(r["steps"] for r in rows)
    figure, axes = plt.subplots(1, len(samplers), figsize=(5.5 * len(samplers), 3.6), squeeze=False)
    for i, sampler in enumerate(samplers):
        axis = axes[0][i]
        for mode in modes:
            line = [r for r in _line_rows(rows, sampler, max(bands), mode, spec) if r["steps"] == most]
            if line and any(e > 0 for e in line[0]["step_errors"]):
                axis.plot(np.arange(1, most + 1), line[0]["step_errors"], label=mode)
        axis.set_yscale("log")
        axis.set_title(f"{sampler}, {most} steps, {max(bands)} bands, warm-up {spec}", fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("latent error vs 1 device (RMS / final RMS)")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    paths.append(_save(figure, stem, "trajectory"))

    figure, axes = plt.subplots(1, len(samplers), figsize=(5.5 * len(samplers), 3.6), squeeze=False)
    for i, sampler in enumerate(samplers):
        axis = axes[0][i]
        for steps in sorted({r["steps"] for r in rows}):
            line = sorted(
                (
                    r
                    for r in rows
                    if r["sampler"] == sampler
                    and r["bands"] == max(bands)
                    and r["mode"] == "corrected_async_gn"
                    and r["steps"] == steps
                ),
                key=lambda r: r["warmup_steps"],
            )
            if line:
                axis.plot(
                    [r["warmup_steps"] / steps for r in line],
                    [r["psnr_image_db"] for r in line],
                    marker="o",
                    label=f"{steps} steps",
                )
        axis.set_title(f"corrected_async_gn, {sampler}, {max(bands)} bands", fontsize=9)
        axis.set_xlabel("warm-up (share of the steps)")
        axis.set_ylabel("image PSNR vs 1 device (dB)")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    paths.append(_save(figure, stem, "warmup"))
    return paths


def _save(figure, stem: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = stem.with_name(f"{stem.name}-{name}.png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summary_markdown(
    rows: Sequence[Dict], policy: Dict, record: Path, plots: Sequence[Path], spec: str
) -> str:
    """``quality-study.md``: the policy, how it follows, and the tables behind it (and the codecs')."""
    codecs = codecs_markdown(rows)
    rows = uncompressed(rows)
    samplers = sorted({r["sampler"] for r in rows})
    bands = sorted({r["bands"] for r in rows})
    steps_all = sorted({r["steps"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    lines = [
        '# The quality study: what `mode="auto"` runs',
        "",
        f"`python bench/quality.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"(data: [`{record.name}`]({record.name})"
        + ("; plots: " + ", ".join(f"[`{p.name}`]({p.name})" for p in plots) if plots else "")
        + ").",
        "",
        "## The policy",
        "",
        *(
            ["What these rows alone would support; the product's policy is the mode study's "
             "([quality-study.md](quality-study.md)).", ""]
            if codecs
            else []
        ),  # fmt: skip
        f"Target: image PSNR >= {policy['target_psnr_image_db']:g} dB against the single device, for "
        "every sampler and band count measured.",
        "",
        *(
            [
                f"- no measured share of the steps as warm-up keeps `corrected_async_gn` at the target at "
                f"{steps_all[-1]} steps: the measurements support no asynchronous policy;"
            ]
            if policy["warmup_fraction"] is None
            else [
                f"- `exact` below **{policy['exact_below_steps']}** steps: below it `corrected_async_gn` with "
                "that warm-up misses the target at some measured setting;",
                f"- `corrected_async_gn` from {policy['exact_below_steps']} steps on, with a warm-up of "
                f"**{policy['warmup_fraction']:.0%}** of the steps (rounded up): of the shares measured that "
                f"meet the target at {steps_all[-1]} steps, the one whose threshold and warm-ups make the "
                "fewest steps with full exchanges (warm-up steps, and every step of an `exact` generation) "
                f"over the measured step counts ({', '.join(map(str, steps_all))});",
            ]
        ),
        "- the error grows step over step (the latent PSNR gains less than "
        f"{SHRINK_DB:g} dB from {steps_all[-2] if len(steps_all) > 1 else '-'} to {steps_all[-1]} steps, "
        "though each asynchronous step is then less stale, in most runs) for: "
        + (", ".join(f"`{m}`" for m in policy["error_grows"]) or "no mode")
        + " -- choosing one warns.",
        "",
        "## Image PSNR (dB) against the single device",
        "",
        f"Warm-up {spec} of the steps (rounded up) for the asynchronous modes; `=` identical.",
        "",
    ]
    for sampler in samplers:
        lines += [f"### {sampler}", ""]
        header = "| mode | " + " | ".join(f"{s} steps, N={n}" for s in steps_all for n in bands) + " |"
        lines += [header, "|" + " --- |" * (1 + len(steps_all) * len(bands))]
        for mode in modes:
            cells = []
            for steps in steps_all:
                for n in bands:
                    match = [r for r in _line_rows(rows, sampler, n, mode, spec) if r["steps"] == steps]
                    cells.append(
                        "-"
                        if not match
                        else "="
                        if match[0]["psnr_image_db"] is None
                        else f"{match[0]['psnr_image_db']:.1f}"
                    )
            lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## The error's growth at the most steps (last step / halfway through the asynchronous ones)",
        "",
    ]
    most = steps_all[-1]
    lines += ["| mode | " + " | ".join(f"{s}, N={n}" for s in samplers for n in bands) + " |"]
    lines += ["|" + " --- |" * (1 + len(samplers) * len(bands))]
    for mode in modes:
        cells = []
        for sampler in samplers:
            for n in bands:
                match = [r for r in _line_rows(rows, sampler, n, mode, spec) if r["steps"] == most]
                cells.append("-" if not match or match[0]["growth"] is None else f"{match[0]['growth']:.2f}")
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    return "\n".join(lines + codecs) + "\n"


def study(args, argv: Sequence[str]) -> Dict:
    """Launch one world per ``--bands``, merge, derive the policy, plot, and write the results."""
    folder = args.output_dir or RESULTS / f"quality-worlds-{timestamp()}"
    for bands in args.bands:
        if not (args.reuse and (folder / f"bands-{bands}.json").exists()):
            launch_world(bands, argv, folder)
    worlds = [__import__("json").loads((folder / f"bands-{n}.json").read_text()) for n in args.bands]
    rows = [dict(row, bands=world["bands"]) for world in worlds for row in world["rows"]]
    policy = derive_policy(rows, args.target_db, [s for s in args.warmups if s.endswith("%")])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / args.name
    plots = [] if args.no_plot else plot_study(rows, stem, args.plot_warmup)
    record = write_json(
        args.results_dir / f"{args.name}-{timestamp()}.json",
        {
            "environment": environment(),
            "model": worlds[0]["model"],
            "size": worlds[0]["size"],
            "guidance": worlds[0]["guidance"],
            "prompts": {w["bands"]: w["prompts"] for w in worlds},
            "bands": list(args.bands),
            "policy": policy,
            "reference": {w["bands"]: w["reference"] for w in worlds},
            "rows": rows,
        },
    )
    markdown = args.results_dir / f"{args.name}.md"
    partial = markdown.with_name(markdown.name + ".partial")
    partial.write_text(summary_markdown(rows, policy, record, plots, args.plot_warmup))
    partial.replace(markdown)
    for world in worlds:
        print(table(world["rows"], world["bands"]))
    print(f"policy: {policy}")
    print(f"wrote {record}" + (f" and {', '.join(str(p) for p in plots)}" if plots else ""))
    return {"policy": policy, "rows": rows, "record": record, "plots": plots}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="local diffusers pipeline folder (default: random weights)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--max-prompts", type=int, default=1000)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--compress",
        nargs="+",
        default=["none"],
        choices=EXCHANGE_CODECS,
        help="the exchange codecs to run the modes with (none, uncompressed, always runs; full_sync and exact with a codec: warm-up 1)",
    )
    p.add_argument("--name", default="quality-study", help="the results' file name stem")
    p.add_argument("--no-plot", action="store_true", help="no plots (they show the uncompressed rows only)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument(
        "--warmups",
        nargs="+",
        default=list(WARMUPS),
        help="warm-ups: steps (2) or shares of the steps (10%%)",
    )
    p.add_argument("--bands", type=int, nargs="+", default=[2, 4, 8], help="the worlds the study launches")
    p.add_argument(
        "--sweep-modes",
        nargs="+",
        choices=ASYNC_MODES,
        default=None,
        help="the asynchronous modes run at every warm-up (default: all); the others at the first",
    )
    p.add_argument("--reuse", action="store_true", help="merge the worlds already in --output-dir")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--perceptual", action="store_true", help="LPIPS and FID too (their weights needed)")
    p.add_argument("--fid-min-images", type=int, default=50)
    p.add_argument("--target-db", type=float, default=30.0, help="the image PSNR the policy keeps")
    p.add_argument("--plot-warmup", default="10%", help="the warm-up of the PSNR plot's lines")
    p.add_argument("--output-dir", type=Path, help="where each world's results go")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the study's results go")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.model is not None and not (args.model / "model_index.json").exists():
        print(
            f"quality.py: --model {args.model}: no model_index.json (a diffusers pipeline folder)",
            file=sys.stderr,
        )
        return 2
    if "none" not in args.compress:  # the uncompressed rows: the policy's, and each codec's reference
        args.compress = ["none", *args.compress]
    for spec in args.warmups:
        try:
            warmup_steps(spec, 10)
        except ValueError:
            print(f"quality.py: --warmups {spec}: not a number of steps or a share like 10%", file=sys.stderr)
            return 2
    if "WORLD_SIZE" in os.environ:  # a rank of torchrun's (or of the study's own launch)
        run(args)
    else:
        study(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
