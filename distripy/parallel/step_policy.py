"""What one step of a generation exchanges, as pure functions of its mode and step.

The first ``warmup_steps`` steps of a generation (at least the first: there is nothing stale yet),
and every step of ``full_sync`` and ``exact``, are synchronous: fresh activations and statistics.
The asynchronous steps of each mode then use the previous step's, as the tables below say.

With an exchange codec (``DistriConfig.compress``) the same warm-up steps send the self-attention's
keys and values at full precision and every later step compressed (``compressed``): the stale
exchanges of the asynchronous modes, the fresh ones of ``full_sync`` and ``exact``.
"""

import enum

__all__ = [
    "ALWAYS_SYNCHRONOUS",
    "ActivationExchange",
    "StatisticsExchange",
    "activation_exchange",
    "compressed",
    "keeps_activations",
    "keeps_statistics",
    "statistics_exchange",
    "synchronous",
]

ALWAYS_SYNCHRONOUS = ("full_sync", "exact")


class ActivationExchange(str, enum.Enum):
    """How a step gets the other bands' activations (halo rows, attention keys and values)."""

    NONE = "none"  # naive_patch: every band alone
    SYNC = "sync"  # fresh, exchanged and waited for in this step
    OVERLAPPED = "overlapped"  # exact: fresh, issued first, waited for by the compute that needs it
    STALE = "stale"  # the previous step's; this step's leave for the next


class StatisticsExchange(str, enum.Enum):
    """How a step gets the whole image's GroupNorm statistics."""

    LOCAL = "local"  # the band's own (naive_patch; separate_gn after the warm-up)
    SYNC = "sync"  # fresh, all-reduced and waited for in this step
    CORRECTED = "corrected"  # last step's image + this band's change since (the paper's)
    STALE = "stale"  # the other bands' from last step, this band's from this step


def synchronous(mode: str, warmup_steps: int, step: int) -> bool:
    """Whether step ``step`` (from 0) exchanges fresh values."""
    return mode in ALWAYS_SYNCHRONOUS or step < max(1, warmup_steps)


def compressed(mode: str, warmup_steps: int, step: int) -> bool:
    """Whether step ``step`` (from 0) sends the self-attention's keys and values compressed, where
    a codec is configured: every step after the warm-up (for the asynchronous modes, exactly their
    stale steps), none where nothing is exchanged (``naive_patch``). The first step never is: a
    residual codec's baselines come from a full-precision exchange."""
    return mode != "naive_patch" and step >= max(1, warmup_steps)


def keeps_activations(mode: str) -> bool:
    """Whether a synchronous step keeps the activations it exchanged (halo rows, keys and values)
    for the next step: only where a later step reads them stale. Kept for nothing, they would hold
    a whole stale-buffer set of memory (``planning.StepTraffic.kept_bytes``) in every step."""
    return mode not in ALWAYS_SYNCHRONOUS and activation_exchange(mode, False) is ActivationExchange.STALE


def keeps_statistics(mode: str) -> bool:
    """Whether a synchronous step keeps its GroupNorm sums: only where a later step combines them
    with its own (``corrected_async_gn``, ``stale_gn``)."""
    return mode not in ALWAYS_SYNCHRONOUS and statistics_exchange(mode, False) in (
        StatisticsExchange.CORRECTED,
        StatisticsExchange.STALE,
    )


def activation_exchange(mode: str, synchronous_step: bool) -> ActivationExchange:
    if mode == "naive_patch":
        return ActivationExchange.NONE
    if mode == "exact":
        return ActivationExchange.OVERLAPPED
    return ActivationExchange.SYNC if synchronous_step else ActivationExchange.STALE


def statistics_exchange(mode: str, synchronous_step: bool) -> StatisticsExchange:
    if mode == "naive_patch":
        return StatisticsExchange.LOCAL
    if synchronous_step or mode == "sync_gn":
        return StatisticsExchange.SYNC
    if mode == "corrected_async_gn":
        return StatisticsExchange.CORRECTED
    if mode == "stale_gn":
        return StatisticsExchange.STALE
    if mode == "separate_gn":
        return StatisticsExchange.LOCAL
    raise AssertionError(f"mode {mode!r} has no statistics exchange")
