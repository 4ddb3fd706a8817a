"""The application layer: what ``distripy generate`` and the serving ranks both do with a pipeline,
written once, between the library (``api``) and its two front ends (``cli``, ``serving``).

A ``PipelineSpec`` (``spec``) says what to load; ``checks`` checks it and each
``GenerationRequest`` (``request``) once, in one process, before any rank runs; ``loader`` loads
and parallelises the spec on every rank; ``RequestRunner`` (``runner``) applies each request (task
pipeline, scheduler and spacing, LoRAs by path, ControlNet images, img2img / inpainting, the
refiner, the mode) and runs it, reporting each step (``progress``); ``generate`` is the command's
job (checked, handed to the ranks as a file, run, written). ``ThreadedExecutor`` (``executor``)
runs the ranks of one image as worker threads of the caller's process, one per device, for programs
that keep their models in their own process.

Importing it is cheap: torch and diffusers load when first used.
"""

from distripy.application.checks import (
    CheckError,
    SpecFacts,
    check_request,
    check_size,
    check_spec,
    check_world,
)
from distripy.application.executor import ThreadedExecutor
from distripy.application.generate import GenerateJob, GenerateResult, check_job, read_job, run_job, write_job
from distripy.application.loader import RANK_MODULES, LoadedPipeline, load, rank_device
from distripy.application.progress import StepProgress
from distripy.application.request import REFINER_START, TIMESTEP_SPACINGS, GenerationRequest, adapter_names
from distripy.application.runner import RequestRunner
from distripy.application.spec import DTYPES, PipelineSpec, parse_lora

__all__ = [
    "ThreadedExecutor",
    "CheckError",
    "DTYPES",
    "GenerateJob",
    "GenerateResult",
    "GenerationRequest",
    "LoadedPipeline",
    "PipelineSpec",
    "RANK_MODULES",
    "REFINER_START",
    "RequestRunner",
    "SpecFacts",
    "StepProgress",
    "TIMESTEP_SPACINGS",
    "adapter_names",
    "check_job",
    "check_request",
    "check_size",
    "check_spec",
    "check_world",
    "load",
    "parse_lora",
    "rank_device",
    "read_job",
    "run_job",
    "write_job",
]
