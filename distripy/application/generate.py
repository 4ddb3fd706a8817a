"""``distripy generate``'s work, apart from its command line: a ``GenerateJob`` (the spec, the
request, the output file) checked once in the launching process (``check_job``), written for the
ranks as one file (``write_job``: whole or absent), and run on each rank (``run_job``), rank 0
writing the image under a temporary name first, then renaming it, so a failed run leaves no
partial file.
"""

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Mapping, Optional

from distripy.application.checks import (
    NO_LABELS,
    CheckError,
    check_request,
    check_size,
    check_spec,
    check_world,
)
from distripy.application.progress import StepProgress
from distripy.application.request import GenerationRequest
from distripy.application.runner import RequestRunner
from distripy.application.spec import PipelineSpec

__all__ = ["GenerateJob", "GenerateResult", "check_job", "read_job", "run_job", "save_image", "write_job"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass(frozen=True)
class GenerateJob:
    """One image to generate and where to write it."""

    spec: PipelineSpec
    request: GenerationRequest
    output: str


@dataclasses.dataclass
class GenerateResult:
    """What a rank's run took: the whole call and each step, in seconds."""

    rank: int
    world: int
    device_type: str
    seconds: float
    step_seconds: List[float]

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else float("nan")


def _check_output(path: Path, label: str) -> None:
    folder = path.resolve().parent
    if not folder.is_dir():
        raise CheckError(f"{label} {path}: folder {folder} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise CheckError(f"{label} {path}: name an image file (.png, .jpg, .webp)")


def check_job(job: GenerateJob, world: int, labels: Mapping[str, str] = NO_LABELS) -> GenerateJob:
    """Every check before any rank starts (``application.checks``), for ``world`` ranks: the job
    with its spec checked and its request resolved (size, LoRA files)."""
    check_world(world, labels.get("nproc", "nproc"))
    spec, facts = check_spec(job.spec, labels)
    default_size = facts.geometry.default_size if facts.geometry is not None else None
    request = check_request(job.request, spec, labels, default_size, controls_required=True)
    split = bool(spec.config.split_batch)
    for geometry in (facts.geometry, facts.refiner_geometry):
        if geometry is not None:
            check_size(request, geometry, world, split, labels)
    _check_output(Path(job.output), labels.get("output", "output"))
    return dataclasses.replace(job, spec=spec, request=request)


def write_job(job: GenerateJob, folder: str) -> str:
    """``job`` as JSON in ``folder``, written whole (a temporary name, then renamed); its path."""
    values = {"spec": job.spec.to_dict(), "request": job.request.to_dict(), "output": job.output}
    descriptor, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    path = os.path.join(folder, "job.json")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(values, file)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_job(path: str) -> GenerateJob:
    """The checked job ``write_job`` wrote (its spec marked checked: the ranks trust it)."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckError(f"the launch's job file {path} is unreadable ({error})") from None
    spec = PipelineSpec.from_dict(dict(values["spec"], checked=True))
    return GenerateJob(spec, GenerationRequest.from_dict(values["request"]), values["output"])


def save_image(image, path: Path) -> None:
    """Write to a temporary name beside ``path``, then rename: no partial file on failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        image.save(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def run_job(
    job: GenerateJob, announce: Optional[Callable] = None, labels: Mapping[str, str] = NO_LABELS
) -> GenerateResult:
    """This rank's share of ``job`` (torch.distributed initialised from torchrun's environment,
    if any). ``announce(world, choice, deepest_rows)`` is called on rank 0 once the pipeline is
    loaded (the mode the generation runs, ``distripy.choose_mode``'s, and the rows of the UNet's
    deepest level the image has); rank 0 writes the image. ``labels``: the caller's names of the
    spec's values, for a loading failure's message."""
    import distripy

    spec, request = job.spec, job.request
    rank, world = distripy.init(timeout_s=spec.config.timeout_s)
    runner = RequestRunner.start(spec, progress_bar=True, labels=labels)
    if rank == 0 and announce is not None:
        rows = request.height // runner.geometry.pixel_unit if request.height else None
        announce(world, distripy.choose_mode(spec.config, request.steps), rows)
    timer = StepProgress(total=request.steps, sync_device=runner.loaded.device)
    start = time.perf_counter()
    image = runner.run(request, timer=timer)[0]
    seconds = time.perf_counter() - start
    if rank == 0:
        save_image(image, Path(job.output))
    steps = [b - a for a, b in zip([start] + timer.ends[:-1], timer.ends)]
    return GenerateResult(rank, world, runner.loaded.device.type, seconds, steps)
