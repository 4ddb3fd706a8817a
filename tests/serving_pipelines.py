"""Pipelines for the serving tests' rank processes, which import this module by name (the tests
put this folder on their ``PYTHONPATH``)."""

import functools

from diffusers import StableDiffusionXLPipeline

from distripy.errors import CommTimeoutError
from distripy.pipelines.tiny import tiny_sdxl_pipeline

FAILING_PROMPT = "a transfer that times out"


class FailsOnOnePrompt(StableDiffusionXLPipeline):
    """The tiny SDXL pipeline, except that ``FAILING_PROMPT`` raises ``CommTimeoutError`` on every
    rank, as a transfer between the ranks that timed out would."""

    @functools.wraps(StableDiffusionXLPipeline.__call__)  # its signature, which the ranks read
    def __call__(self, *args, **kwargs):
        if kwargs.get("prompt", args[0] if args else None) == FAILING_PROMPT:
            raise CommTimeoutError("halo_exchange on rank 0 of 2 did not complete within 30 s (staged)")
        return StableDiffusionXLPipeline.__call__(self, *args, **kwargs)


def tiny_pipeline_failing_on_one_prompt(seed: int) -> StableDiffusionXLPipeline:
    pipe = tiny_sdxl_pipeline(seed)
    pipe.__class__ = FailsOnOnePrompt
    return pipe
