"""The schedulers a command line or a request may name, by short name (diffusers class names)."""

from typing import Optional

from distripy.errors import InputError

__all__ = ["SCHEDULERS", "scheduler_class_name"]

SCHEDULERS = {
    "default": None,  # the pipeline's own
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}


def scheduler_class_name(name: str) -> Optional[str]:
    """The diffusers class of scheduler ``name``; None for the pipeline's own."""
    if name not in SCHEDULERS:
        raise InputError(f"scheduler {name!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]
