"""``distripy demo``: what patch parallelism does to a real image, with no download and no GPU.

The project's own trained pipeline (``pipelines.tiny.trained_sdxl_pipeline``: an SDXL-architecture
model that draws a coloured shape on a two-colour gradient) generates one prompt on one device
and patch-parallel in ``auto``, ``corrected_async_gn``, ``naive_patch`` and ``exact`` (every mode
with ``--all-modes``), one band per rank, once per band count (one world of N ranks each;
``--bands 2 4``). Into ``--output-dir``:

* ``grid.png``: a row per band count of single device | auto | corrected_async_gn | naive_patch,
  each panel labelled (mode, bands, PSNR against the single device) with its band boundaries
  ticked in the margin, and beside each row the strip around the middle boundary enlarged
  (single device, corrected_async_gn, naive_patch), where naive_patch's seam is;
* ``report.json`` (strict JSON; a PSNR of ``null`` means identical) and a printed table per band
  count: seconds, PSNR, largest pixel error, the seam score (``seam_score``: about 1 without
  seams) and how visible the error is across the boundaries (``seam_visibility``).

With a GPU per rank each rank uses its own; otherwise the ranks are CPU processes with an equal
share of the cores, and their timings say nothing of GPU speedups (the table says so).
The image metrics here are the ones ``bench/quality.py`` reports.
"""

import json
import math
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from distripy.application.checks import CheckError
from distripy.config import AUTO_MODE, MODES
from distripy.errors import BandGeometryError, InputError
from distripy.geometry import BandGeometry
from distripy.parallel.bands import BandLayout
from distripy.parallel.policy import QualityWarning

__all__ = [
    "GRID_MODES",
    "PROMPT",
    "boundary_rows",
    "check_demo",
    "compose_demo",
    "psnr",
    "run_demo",
    "seam_score",
    "seam_visibility",
]

PROMPT = "a white square on a black and green background"
SEED = 2  # one whose image shows the shape cleanly (``bench/results/train-tiny-*-samples.png``)
GUIDANCE = 5.0
GRID_MODES = ("single_device", AUTO_MODE, "corrected_async_gn", "naive_patch")
DEMO_MODES = (AUTO_MODE, "corrected_async_gn", "naive_patch", "exact")
"""What every world runs (``--all-modes``: every mode): the grid's, and ``exact``, which must equal
the single device."""
ZOOM_MODES = ("single_device", "corrected_async_gn", "naive_patch")
SCALE = 2  # grid panels: pixels per image pixel
ZOOM = 4  # the enlarged strips: pixels per image pixel
CPU_NOTE = (
    "CPU processes share this machine's cores: these seconds say nothing of GPU speedups "
    "(bench/e2e.py measures those)"
)


# -- image metrics ---------------------------------------------------------------------------------


def psnr(value, reference, peak: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB (``math.inf`` when identical); ``peak`` defaults to the
    reference's range."""
    import numpy as np

    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    peak = float(reference.max() - reference.min()) if peak is None else peak
    mse = float(np.mean((value - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def boundary_rows(height: int, bands: int, unit: int = 1) -> List[int]:
    """Rows ``r`` (0 < r < height) where bands 1.. start: ``bands`` bands of whole ``unit``-row
    steps (an image's rows per row of the UNet's deepest level) differing by at most one step, the
    larger first, as the ranks cut them (``parallel.bands.BandLayout``)."""
    if bands < 1 or unit < 1 or height % unit or height // unit < bands:
        raise InputError(f"{height} rows do not split into {bands} bands of {unit}-row steps")
    layout = BandLayout.split(height // unit, bands)
    return [layout.rows(b, height)[0] for b in range(1, bands)]


def seam_score(image, bands: int, unit: int = 1) -> float:
    """Mean squared step between the rows meeting at band boundaries, over the mean squared step
    between all other adjacent rows: about 1 without seams. ``image``: rows first, (H, W) or
    (H, W, C). It sees seams where images are smooth, as trained models' are."""
    import numpy as np

    image = np.asarray(image, np.float64)
    steps = np.diff(image, axis=0) ** 2  # steps[r - 1]: between rows r - 1 and r
    per_row = steps.reshape(steps.shape[0], -1).mean(axis=1)
    seams = [r - 1 for r in boundary_rows(image.shape[0], bands, unit)]
    if not seams:
        return 1.0
    others = np.delete(per_row, seams)
    return float(per_row[seams].mean() / max(others.mean(), 1e-30))


def seam_visibility(value, reference, bands: int, unit: int = 1) -> float:
    """The error's mean squared step across the band boundaries over the reference's mean squared
    step between adjacent rows (rows first, as ``seam_score``): near 0 when a seam is invisible,
    whatever the model."""
    import numpy as np

    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    seams = [r - 1 for r in boundary_rows(reference.shape[0], bands, unit)]
    if not seams:
        return 0.0
    error_steps = np.diff(value - reference, axis=0) ** 2
    detail = float((np.diff(reference, axis=0) ** 2).mean())
    return float(error_steps[seams].mean() / max(detail, 1e-30))


# -- one world (every rank) ------------------------------------------------------------------------


def check_demo(args, world: int) -> None:
    """Every check the demo can make before any process starts, for a world of ``world`` ranks
    (``CheckError`` naming the value: the command prints it as one line)."""
    from distripy.pipelines.tiny import TINY_DOWNSAMPLINGS, TINY_VAE_SCALE, TRAINED_MODEL

    if world < 1:
        raise CheckError(f"--bands {world}: needs at least 1")
    if not (TRAINED_MODEL / "model_index.json").is_file():
        raise CheckError(f"the trained model is missing from {TRAINED_MODEL}; `python bench/train_tiny.py` makes it")
    if not args.timeout > 0:
        raise CheckError(f"--timeout {args.timeout:g}: must be a positive number of seconds")
    geometry = BandGeometry(levels=TINY_DOWNSAMPLINGS, vae_scale=TINY_VAE_SCALE)
    try:
        geometry.check_side("--height", args.height, world, world)  # one band per rank (no CFG split)
        geometry.check_side("--width", args.width, 1, world)
    except BandGeometryError as error:
        raise CheckError(str(error)) from None
    if args.steps < 1 or args.warmup_steps < 0:
        raise CheckError(f"--steps {args.steps} / --warmup-steps {args.warmup_steps}: too small")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise CheckError(f"--output-dir {args.output_dir}: exists and is not a folder")


def _generate(pipe, args, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = pipe(
        PROMPT,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED if args.seed is None else args.seed),
        output_type="np",
    ).images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images[0], time.perf_counter() - start


def _pipeline(device):
    from distripy.pipelines.tiny import trained_sdxl_pipeline

    return trained_sdxl_pipeline().to(device)


def _uses_gpus(world: int) -> bool:
    """GPUs when there is one per rank; otherwise every rank is a CPU process."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def _world_stem(output_dir: Path, bands: int) -> Path:
    return output_dir / ".worlds" / f"bands-{bands}"


def run_demo(args) -> int:
    """One world's share: every rank generates in every mode; rank 0 also on one device, and
    writes the world's images and timings (then the grid, unless a parent composes it)."""
    import os

    import numpy as np
    import torch
    import torch.distributed as dist

    import distripy

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = _uses_gpus(world)
    rank, world = distripy.init(backend=None if gpus else "gloo", timeout_s=args.timeout)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpus else torch.device("cpu")
    images, seconds, chosen = {}, {}, {}
    if rank == 0:
        _generate(_pipeline(device), args, device)  # first-call costs, untimed
        images["single_device"], seconds["single_device"] = _generate(_pipeline(device), args, device)
    for mode in (AUTO_MODE,) + MODES if args.all_modes else DEMO_MODES:
        # every rank a band of the image (no CFG split), so that the modes differ where bands meet
        config = distripy.DistriConfig(
            mode=mode, warmup_steps=args.warmup_steps, split_batch=False, timeout_s=args.timeout
        )
        chosen[mode] = distripy.choose_mode(config, args.steps)
        with warnings.catch_warnings():  # the demo shows naive_patch on purpose
            warnings.simplefilter("ignore", QualityWarning)
            pipe = distripy.parallelize(_pipeline(device), config)
        images[mode], seconds[mode] = _generate(pipe, args, device)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return 0
    stem = _world_stem(args.output_dir, world)
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "bands": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seconds": seconds,
        "chosen": {m: {"mode": c.mode, "warmup_steps": c.warmup_steps} for m, c in chosen.items()},
    }
    _write_whole(stem.with_suffix(".json"), json.dumps(record))
    partial = stem.with_name(stem.name + ".partial.npz")
    np.savez(partial, **images)
    partial.replace(stem.with_suffix(".npz"))
    if not args.no_compose:
        compose_demo(args, [world])
    return 0


# -- the grid and the report (one process, after every world) --------------------------------------


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _load_world(output_dir: Path, bands: int):
    import numpy as np

    stem = _world_stem(output_dir, bands)
    record = json.loads(stem.with_suffix(".json").read_text())
    with np.load(stem.with_suffix(".npz")) as data:
        images = {name: data[name] for name in data.files}
    return record, images


def _world_report(record: dict, images: dict) -> dict:
    import numpy as np

    from distripy.pipelines.tiny import TINY_DOWNSAMPLINGS, TINY_VAE_SCALE

    unit = TINY_VAE_SCALE * 2**TINY_DOWNSAMPLINGS  # image rows per row of the deepest level

    reference, bands = images["single_device"], record["bands"]
    base = record["seconds"]["single_device"]
    modes = {}
    for mode in [m for m in ("single_device", AUTO_MODE) + MODES if m in images]:
        value = psnr(images[mode], reference, 1.0)
        modes[mode] = {
            "seconds": record["seconds"][mode],
            "speedup": base / record["seconds"][mode],
            "psnr_db": None if math.isinf(value) else value,  # None: identical
            "max_abs_error": float(np.abs(images[mode].astype(np.float64) - reference).max()),
            "seam_score": seam_score(images[mode], bands, unit),
            "seam_visibility": seam_visibility(images[mode], reference, bands, unit),
        }
        if mode in record["chosen"]:
            modes[mode]["runs"] = record["chosen"][mode]
    return {"bands": bands, "device": record["device"], "modes": modes}


def _psnr_text(psnr_db) -> str:
    return "identical" if psnr_db is None else f"{psnr_db:.1f} dB"


def _label(mode: str, world: dict) -> List[str]:
    row = world["modes"][mode]
    if mode == "single_device":
        return ["single device", "the reference"]
    name = mode
    if mode == AUTO_MODE:
        runs = row["runs"]
        name = f"auto = {runs['mode']}" + ("" if runs["mode"] == "exact" else f" W={runs['warmup_steps']}")
    return [f"{name}, {_bands_text(world['bands'])}", f"PSNR {_psnr_text(row['psnr_db'])}"]


def _bands_text(bands: int) -> str:
    return f"{bands} band{'s' * (bands != 1)}"


def _write_grid(worlds: Sequence[dict], images: Sequence[dict], path: Path) -> None:
    """One row per world: the labelled panels, boundary ticks, and the enlarged strips."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    height, width = images[0]["single_device"].shape[:2]
    panel_h, panel_w = height * SCALE, width * SCALE
    label_h, gap, tick = 26, 10, 6
    strip_rows, strip_cols = max(4, height // 8), max(8, width // 2)
    strip_h, strip_w = strip_rows * ZOOM, strip_cols * ZOOM
    row_h = max(label_h + panel_h, len(ZOOM_MODES) * (strip_h + 14)) + gap
    canvas_w = len(GRID_MODES) * (panel_w + gap + tick) + gap + strip_w + 60
    canvas = Image.new("RGB", (canvas_w, row_h * len(worlds) + gap), "white")
    draw = ImageDraw.Draw(canvas)

    def pixels(array):
        return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"))

    for r, (world, row_images) in enumerate(zip(worlds, images)):
        top = gap + r * row_h
        boundaries = boundary_rows(height, world["bands"])
        for c, mode in enumerate(GRID_MODES):
            left = tick + c * (panel_w + gap + tick)
            for line, text in enumerate(_label(mode, world)):
                draw.text((left, top + line * 12), text, fill="black", font=font)
            panel = pixels(row_images[mode]).resize((panel_w, panel_h), Image.NEAREST)
            canvas.paste(panel, (left, top + label_h))
            for b in boundaries:  # the band boundaries, ticked in the margin
                y = top + label_h + b * SCALE
                draw.line([(left - tick, y), (left - 1, y)], fill=(220, 0, 0), width=2)
        # the strip around the middle boundary, enlarged, where naive_patch's seam is
        middle = boundaries[len(boundaries) // 2] if boundaries else height // 2
        first = min(max(0, middle - strip_rows // 2), height - strip_rows)
        columns = ((width - strip_cols) // 2, (width - strip_cols) // 2 + strip_cols)
        left = tick + len(GRID_MODES) * (panel_w + gap + tick) + gap
        for z, mode in enumerate(ZOOM_MODES):
            y = top + z * (strip_h + 14)
            draw.text(
                (left, y), f"{mode}, rows {first}-{first + strip_rows - 1} x{ZOOM}", fill="black", font=font
            )
            crop = row_images[mode][first : first + strip_rows, columns[0] : columns[1]]
            canvas.paste(pixels(crop).resize((strip_w, strip_h), Image.NEAREST), (left, y + 12))
            y_seam = y + 12 + (middle - first) * ZOOM
            draw.line(
                [(left + strip_w + 2, y_seam), (left + strip_w + 10, y_seam)], fill=(220, 0, 0), width=2
            )
    partial = path.with_name(path.name + ".partial.png")
    canvas.save(partial)
    partial.replace(path)


def _table(world: dict) -> str:
    lines = [
        f"{_bands_text(world['bands'])}:",
        f"  {'mode':<20} {'seconds':>8} {'PSNR':>10} {'max err':>8} {'seam':>6} {'seam vis':>9}",
    ]
    for mode, row in world["modes"].items():
        name = mode
        if mode == AUTO_MODE:
            name = f"auto ({row['runs']['mode']})"
        lines.append(
            f"  {name:<20} {row['seconds']:>8.2f} {_psnr_text(row['psnr_db']):>10} "
            f"{row['max_abs_error']:>8.4f} {row['seam_score']:>6.2f} {row['seam_visibility']:>9.2e}"
        )
    return "\n".join(lines)


def compose_demo(args, bands: Sequence[int]) -> int:
    """Read each world's images, write ``grid.png`` and ``report.json``, print the tables."""
    loaded = [_load_world(args.output_dir, n) for n in bands]
    worlds = [_world_report(record, images) for record, images in loaded]
    _write_grid(worlds, [images for _, images in loaded], args.output_dir / "grid.png")
    import distripy

    report = {
        "prompt": PROMPT,
        "model": "distripy.pipelines.tiny.trained_sdxl_pipeline",
        "size": [args.height, args.width],
        "steps": args.steps,
        "seed": SEED if args.seed is None else args.seed,
        "warmup_steps": args.warmup_steps,
        "worlds": worlds,
        "versions": {"distripy": distripy.__version__},
    }
    _write_whole(args.output_dir / "report.json", json.dumps(report, indent=2, allow_nan=False))
    device = worlds[0]["device"]
    print(f"distripy demo: {PROMPT!r}, {args.width}x{args.height}, {args.steps} steps ({device})")
    for world in worlds:
        print(_table(world))
    if device == "cpu":
        print(f"note: {CPU_NOTE}")
    print(
        f"wrote {args.output_dir / 'grid.png'} ({' | '.join(GRID_MODES)}; one row per band count) "
        "and report.json"
    )
    return 0
