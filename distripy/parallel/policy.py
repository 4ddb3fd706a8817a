"""``mode="auto"``: the mode and warm-up of one generation, from its number of steps.

Stale activations work when adjacent steps are alike. With few steps they are not (each step
moves far along the noise schedule), and an asynchronous step's error is not denoised away by
the steps that follow; with many steps it is, and a warm-up of a fixed *share* of the steps lets
the activations settle before they go stale. ``bench/quality.py`` measured both on the project's
trained model (``bench/results/quality-study.md``, which states where these numbers come from):

* below ``EXACT_BELOW_STEPS`` steps: ``exact`` (equals one device; its exchanges are overlapped,
  not skipped);
* otherwise ``corrected_async_gn`` with ``ceil(WARMUP_FRACTION * steps)`` synchronous steps;
* steps unknown (a bare UNet not told with ``distripy.reset(unet, steps=n)``):
  ``corrected_async_gn`` with ``DistriConfig.warmup_steps``.

The modes in ``ERROR_GROWS`` were measured to drift further from the single device step after
step; choosing one warns (``QualityWarning``), it is not refused.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Optional

from distripy.config import AUTO_MODE, DistriConfig
from distripy.errors import InputError

__all__ = [
    "ERROR_GROWS",
    "EXACT_BELOW_STEPS",
    "WARMUP_FRACTION",
    "ModeChoice",
    "QualityWarning",
    "choose_mode",
    "warn_if_error_grows",
]

EXACT_BELOW_STEPS = 8
WARMUP_FRACTION = 0.25
ERROR_GROWS = frozenset({"naive_patch", "separate_gn"})


class QualityWarning(UserWarning):
    """A setting that runs but was measured to lose image quality (a mode whose error against one
    device grows step over step): warned, not refused (so not a ``DistripyError``)."""


@dataclass(frozen=True)
class ModeChoice:
    """What one generation runs, and why (printed by the ``distripy`` command)."""

    mode: str
    warmup_steps: int
    reason: str


def check_steps(steps: Optional[int]) -> Optional[int]:
    """``steps`` if it is None or a positive integer; otherwise an ``InputError`` naming it."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps={steps!r} must be a positive integer (or None: unknown)")
    return steps


def choose_mode(config: DistriConfig, steps: Optional[int] = None) -> ModeChoice:
    """The mode and warm-up a generation of ``steps`` denoising steps runs under ``config``."""
    check_steps(steps)
    if config.mode != AUTO_MODE:
        return ModeChoice(config.mode, config.warmup_steps, "set by DistriConfig.mode")
    if steps is None:
        return ModeChoice(
            "corrected_async_gn",
            config.warmup_steps,
            "auto, number of steps unknown: DistriConfig.warmup_steps synchronous steps",
        )
    if steps < EXACT_BELOW_STEPS:
        return ModeChoice(  # every step synchronous: its warm-up is the whole generation
            "exact", steps, f"auto: {steps} steps < {EXACT_BELOW_STEPS}, too few for stale activations"
        )
    warmup = max(1, math.ceil(WARMUP_FRACTION * steps))
    return ModeChoice(
        "corrected_async_gn",
        warmup,
        f"auto: {steps} steps >= {EXACT_BELOW_STEPS}; warm-up {WARMUP_FRACTION:.0%} of the steps",
    )


def warn_if_error_grows(mode: str) -> None:
    """Warn when ``mode`` is one whose error the quality study saw growing step over step."""
    if mode in ERROR_GROWS:
        warnings.warn(
            f"distripy: mode {mode!r} drifts further from the single-device image with every "
            "asynchronous step (bench/results/quality-study.md); 'auto' or 'corrected_async_gn' "
            "keep the error from growing",
            QualityWarning,
            stacklevel=3,
        )
