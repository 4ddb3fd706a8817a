"""Quality of each mode and warm-up setting against the single-device outputs.

For every prompt of a prompt file (one per line), rank 0 makes the single-device latents and
image; then, for each mode and warm-up setting, all ranks make them patch-parallel (one band per
rank, no CFG split unless ``--split-batch``). Rank 0 reports, per setting:

* PSNR of the final latents (peak: the reference latents' range) and of the images (peak 1);
* LPIPS (torchmetrics, AlexNet) when its weights are available, FID (clean-fid) when enough
  images and its weights are; otherwise the reason each is missing;
* seams: ``seam img`` is the mean squared step between the rows that meet at band boundaries
  over the same on all other rows, of the image alone -- about 1 without seams (the reference's
  own score alongside); it shows seams where images are smooth, as real models' are. ``seam vis``
  (images and latents) is the squared step of the *error* against the single device across the
  boundaries, over the reference's mean squared step between rows: how large the jump a seam adds
  is next to the image's own detail -- near 0 when invisible, whatever the model; random-weight
  images are too rough for ``seam img`` to see naive_patch's seams, ``seam vis`` sees them.

The model is a local diffusers folder (``--model``; nothing is downloaded) or, by default, the
demo's small SDXL-architecture pipeline with seeded random weights.

    torchrun --nproc-per-node 2 bench/quality.py --prompts prompts.txt
    torchrun --nproc-per-node 8 bench/quality.py --model ./sdxl-base --height 2048 --width 2048
"""

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from common import RESULTS, environment, timestamp, write_json

from distripy.config import MODES as ALL_MODES

DEFAULT_PROMPTS = ["a watercolour lighthouse on a cliff at dawn", "a red fox in fresh snow, photograph"]
MODES = ("full_sync",) + tuple(m for m in ALL_MODES if m != "full_sync")  # the reference first


# -- metrics (rank 0) ------------------------------------------------------------------------------


def psnr(value: np.ndarray, reference: np.ndarray, peak: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB; ``peak`` defaults to the reference's range."""
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    peak = float(reference.max() - reference.min()) if peak is None else peak
    mse = float(np.mean((value - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def boundary_rows(height: int, bands: int) -> List[int]:
    """Rows ``r`` (0 < r < height) where band ``r // (height / bands)`` starts."""
    if bands < 1 or height % bands:
        raise ValueError(f"{height} rows do not split into {bands} bands")
    return [b * height // bands for b in range(1, bands)]


def seam_score(image: np.ndarray, bands: int) -> float:
    """Mean squared step between the rows meeting at band boundaries, over the mean squared step
    between all other adjacent rows. ``image``: rows first, (H, W) or (H, W, C)."""
    image = np.asarray(image, np.float64)
    steps = np.diff(image, axis=0) ** 2  # steps[r - 1]: between rows r - 1 and r
    per_row = steps.reshape(steps.shape[0], -1).mean(axis=1)
    seams = [r - 1 for r in boundary_rows(image.shape[0], bands)]
    if not seams:
        return 1.0
    others = np.delete(per_row, seams)
    return float(per_row[seams].mean() / max(others.mean(), 1e-30))


def seam_visibility(value: np.ndarray, reference: np.ndarray, bands: int) -> float:
    """The error's mean squared step across the band boundaries over the reference's mean squared
    step between adjacent rows (rows first, as ``seam_score``)."""
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    seams = [r - 1 for r in boundary_rows(reference.shape[0], bands)]
    if not seams:
        return 0.0
    error_steps = np.diff(value - reference, axis=0) ** 2
    detail = float((np.diff(reference, axis=0) ** 2).mean())
    return float(error_steps[seams].mean() / max(detail, 1e-30))


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


# -- generation (every rank) -----------------------------------------------------------------------


def _pipeline(args, device):
    import torch

    if args.model is None:
        from distripy.pipelines.tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(args.seed)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, args, index: int):
    """The final latents and the image, from one call."""
    import torch

    kept = {}

    def keep_latents(pipe, step, timestep, tensors):
        kept["latents"] = tensors["latents"]
        return tensors

    image = pipe(
        prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed + index),
        output_type="np",
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images[0]
    return kept["latents"][0].float().cpu().numpy(), image


def run(args) -> Optional[Dict]:
    """Every rank calls this; rank 0 returns (and writes) the report."""
    import torch

    import distripy

    rank, world = distripy.init(backend=None if torch.cuda.is_available() else "gloo")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    prompts = args.prompts.read_text().splitlines() if args.prompts else DEFAULT_PROMPTS
    prompts = [p.strip() for p in prompts if p.strip()][: args.max_prompts]
    base = _pipeline(args, device)
    references = [_generate(base, p, args, i) for i, p in enumerate(prompts)] if rank == 0 else []
    outputs: Dict[str, List] = {}
    for mode in args.modes:
        for warmup in args.warmup_steps:
            if mode in ("full_sync", "naive_patch") and warmup != args.warmup_steps[0]:
                continue  # warm-up does not change them
            config = distripy.DistriConfig(mode=mode, warmup_steps=warmup, split_batch=args.split_batch)
            pipe = distripy.parallelize(copy.deepcopy(base), config)
            outputs[f"{mode}/warmup={warmup}"] = [_generate(pipe, p, args, i) for i, p in enumerate(prompts)]
            distripy.reset(pipe)
            del pipe
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    bands = world // 2 if args.split_batch and world % 2 == 0 else world
    return _report(args, prompts, references, outputs, bands, world)


def _report(args, prompts, references, outputs, bands: int, world: int) -> Dict:
    ref_latents, ref_images = [r[0] for r in references], [r[1] for r in references]
    folder = args.output_dir or RESULTS / f"quality-{timestamp()}"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "reference": {
            "seam_image": float(np.mean([seam_score(i, bands) for i in ref_images])),
        }
    }
    for name, results in outputs.items():
        latents, images = [r[0] for r in results], [r[1] for r in results]
        lpips, lpips_reason = lpips_scores(images, ref_images)
        fid, fid_reason = fid_score(
            images, ref_images, folder / "fid" / name.replace("/", "-"), args.fid_min_images
        )
        settings[name] = {
            "psnr_latent_db": float(np.mean([psnr(a, b) for a, b in zip(latents, ref_latents)])),
            "psnr_image_db": float(np.mean([psnr(a, b, 1.0) for a, b in zip(images, ref_images)])),
            "lpips": lpips,
            "fid": fid,
            "seam_image": float(np.mean([seam_score(i, bands) for i in images])),
            "seam_visibility_image": float(
                np.mean([seam_visibility(a, b, bands) for a, b in zip(images, ref_images)])
            ),
            "seam_visibility_latent": float(
                np.mean(
                    [
                        seam_visibility(a.transpose(1, 2, 0), b.transpose(1, 2, 0), bands)
                        for a, b in zip(latents, ref_latents)
                    ]
                )
            ),
            "missing": {k: v for k, v in (("lpips", lpips_reason), ("fid", fid_reason)) if v},
        }
    report = {
        "environment": environment(),
        "model": str(args.model) if args.model else "tiny random-weight SDXL (distripy demo)",
        "ranks": world,
        "bands": bands,
        "size": [args.height, args.width],
        "steps": args.steps,
        "prompts": prompts,
        "settings": settings,
    }
    write_json(folder / "report.json", report)
    print(_table(report))
    print(f"wrote {folder / 'report.json'}")
    return report


def _table(report: Dict) -> str:
    lines = [
        f"{'setting':<32} {'PSNR lat':>9} {'PSNR img':>9} {'LPIPS':>7} {'FID':>7} {'seam img':>9} "
        f"{'seam vis img':>12} {'seam vis lat':>12}"
    ]

    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    for name, row in report["settings"].items():
        lines.append(
            f"{name:<32} {cell(row, 'psnr_latent_db', '.1f'):>9} {cell(row, 'psnr_image_db', '.1f'):>9} "
            f"{cell(row, 'lpips', '.4f'):>7} {cell(row, 'fid', '.2f'):>7} "
            f"{cell(row, 'seam_image', '.2f'):>9} "
            f"{cell(row, 'seam_visibility_image', '.2e'):>12} "
            f"{cell(row, 'seam_visibility_latent', '.2e'):>12}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="local diffusers pipeline folder (default: the demo's)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--max-prompts", type=int, default=1000)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--warmup-steps", type=int, nargs="+", default=[1, 4])
    p.add_argument("--split-batch", action="store_true")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--fid-min-images", type=int, default=50)
    p.add_argument("--output-dir", type=Path)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.model is not None and not (args.model / "model_index.json").exists():
        print(
            f"quality.py: --model {args.model}: no model_index.json (a diffusers pipeline folder)",
            file=sys.stderr,
        )
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
