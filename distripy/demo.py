"""``distripy demo``: what patch parallelism does, with no weights to download and no GPU needed.

A small SDXL-architecture pipeline with seeded random weights (``pipelines.tiny``: real CLIP
tokenizers over a byte vocabulary, so prompts are encoded by the pipeline itself) generates the
same image on one device (rank 0) and on every rank in every mode, one band per rank. Rank 0 writes

* ``grid.png``: single device | corrected_async_gn | naive_patch, side by side;
* ``report.json`` (strict JSON; a PSNR of ``null`` means identical) and a printed table: latency
  and speedup per mode, PSNR and largest pixel error against the single-device image.

Random weights make abstract images, but the comparison is the real one: ``full_sync`` and
``exact`` match the single device to float rounding; the asynchronous modes are close; ``naive_patch`` shows its seams.
With a GPU per rank each rank uses its own; otherwise the ranks are CPU processes, each with an
equal share of the cores, and the single-device run gets one share too, so speedups compare like
with like (per-rank compute against the same compute plus communication).
"""

import json
import time
from pathlib import Path

from distripy.config import MODES

__all__ = ["run_demo"]

PROMPT = "a watercolour lighthouse on a cliff at dawn"
NEGATIVE_PROMPT = "blurry"
GUIDANCE = 5.0
GRID_MODES = ("single_device", "corrected_async_gn", "naive_patch")


def _generate(pipe, args, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
    ).images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images[0], time.perf_counter() - start


def _pipeline(seed: int, device):
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(image, reference) -> dict:
    import numpy as np

    difference = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(difference**2))
    return {
        "psnr_db": None if mse == 0 else float(10 * np.log10(1.0 / mse)),  # None: identical
        "max_abs_error": float(np.abs(difference).max()),
    }


def _write_grid(images: dict, path: Path) -> None:
    import numpy as np
    from PIL import Image

    gap = np.ones((images[GRID_MODES[0]].shape[0], 4, 3))
    row = np.concatenate([part for mode in GRID_MODES for part in (images[mode], gap)][:-1], axis=1)
    Image.fromarray((row.clip(0, 1) * 255).round().astype("uint8")).save(path)


def _table(report: dict) -> str:
    lines = [f"{'mode':<20} {'seconds':>8} {'speedup':>8} {'PSNR dB':>8} {'max err':>8}"]
    for mode, row in report["modes"].items():
        lines.append(
            f"{mode:<20} {row['seconds']:>8.2f} {row['speedup']:>8.2f} {_psnr_text(row['psnr_db']):>8} "
            f"{row['max_abs_error']:>8.4f}"
        )
    return "\n".join(lines)


def _psnr_text(psnr_db) -> str:
    return "inf" if psnr_db is None else f"{psnr_db:.1f}"


def _uses_gpus(world: int) -> bool:
    """GPUs when there is one per rank; otherwise every rank is a CPU process."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def run_demo(args) -> int:
    import os

    import torch
    import torch.distributed as dist

    import distripy

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = _uses_gpus(world)
    rank, world = distripy.init(backend=None if gpus else "gloo", timeout_s=args.timeout)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpus else torch.device("cpu")
    images, seconds = {}, {}
    if rank == 0:
        # warm-up (first-call costs), then the timed single-device run
        _generate(_pipeline(args.seed, device), args, device)
        images["single_device"], seconds["single_device"] = _generate(
            _pipeline(args.seed, device), args, device
        )
    for mode in MODES:
        # every rank a band of the image (no CFG split), so that the modes differ where bands meet
        config = distripy.DistriConfig(
            mode=mode, warmup_steps=args.warmup_steps, split_batch=False, timeout_s=args.timeout
        )
        pipe = distripy.parallelize(_pipeline(args.seed, device), config)
        images[mode], seconds[mode] = _generate(pipe, args, device)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return 0
    reference, base = images["single_device"], seconds["single_device"]
    report = {
        "ranks": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": [args.height, args.width],
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "modes": {
            mode: {
                "seconds": seconds[mode],
                "speedup": base / seconds[mode],
                **_compare(images[mode], reference),
            }
            for mode in ("single_device",) + MODES
        },
        "versions": {"distripy": distripy.__version__, "torch": torch.__version__},
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    _write_grid(images, args.output_dir / "grid.png")
    partial = args.output_dir / "report.json.partial"  # whole or not at all
    partial.write_text(json.dumps(report, indent=2, allow_nan=False))
    partial.replace(args.output_dir / "report.json")
    print(
        f"distripy demo: {args.width}x{args.height}, {args.steps} steps, {world} ranks ({report['device']})"
    )
    print(_table(report))
    print(
        f"wrote {args.output_dir / 'grid.png'} (single device | corrected_async_gn | naive_patch) "
        f"and report.json"
    )
    return 0
