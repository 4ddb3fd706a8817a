"""A generation: one image's denoising run, declared by the caller, and where one begins when the
caller says nothing.

The caller that knows an image is starting (a parallelised pipeline's call, ``distripy.reset(unet,
steps=)``, ``with distripy.generation(unet, steps=)``, the Engine) declares a ``Generation``: its
number of steps (which fixes ``mode="auto"``'s choice), whether this rank runs it ``alone``, the
machine ``split_batch="auto"`` plans for, and whether one agreement round above has already
checked every rank's call, seed, models and plan (``agreed``: then the band wrappers check their
inputs on their own, without another round). Each band wrapper (UNet, ControlNet, VAE decoder)
gets that view of it.

Without a declaration (a bare UNet loop), ``GenerationTracker`` recognises a new generation on the
host, from what needs no wait for the GPU: a new input signature, a number or CPU timestep that goes
up, or a timestep that is an element of a schedule on the GPU moving back or into a new schedule
(read from the tensor's metadata). A timestep that is a tensor of its own on a GPU is never read
(that read would wait for every kernel queued before it): such a loop must declare its
generations, and is warned once when it does not.
"""

import dataclasses
import warnings
from typing import Any, Dict, Iterable, NamedTuple, Optional, Tuple

import torch

from distripy.parallel.policy import check_steps

__all__ = ["Generation", "GenerationTracker", "LoadedState", "StepStart", "UndeclaredGenerationWarning"]


class UndeclaredGenerationWarning(UserWarning):
    """A bare-UNet loop whose generations cannot be told apart on the host: declare them."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one generation runs, fixed when it is declared."""

    steps: Optional[int] = None
    """Its number of denoising steps (None: unknown), from which ``mode="auto"`` chooses."""
    alone: bool = False
    """This rank runs it by itself: the whole latent as one band, no transfer, no check across
    ranks (``distripy.alone``)."""
    agreed: bool = False
    """One round above (the pipeline call's) already checked that every rank was given the same
    call, seed, models and plan: the band wrappers check their own inputs without a round."""
    machine: Optional[Tuple[str, str]] = None
    """(GPU profile, fabric) the planner decides ``split_batch="auto"`` for; None: the plain rule
    (split when the world is even and at least 4)."""
    declared: bool = True
    """Opened by the caller (False: recognised from the inputs by ``GenerationTracker``)."""

    def __post_init__(self) -> None:
        check_steps(self.steps)

    def undeclared(self) -> "Generation":
        """The generation a wrapper runs when it recognises one by itself after this one: the same
        settings, nothing agreed above."""
        return dataclasses.replace(self, agreed=False, declared=False)


@dataclasses.dataclass(frozen=True)
class LoadedState:
    """What was loaded into a model when it last took adapters in (``pipelines.registry``): the
    adapters PEFT records on it (``peft_config``) and its patched attention modules' processors.
    A generation nobody declared cannot take in what was loaded since (that is the declaring
    caller's job), so its first step checks that nothing was: a LoRA layer left unswapped would
    run without halos, a standard processor on the band alone."""

    model: Any
    adapters: Tuple[str, ...]
    attentions: Tuple[Any, ...]
    processors: Tuple[int, ...]

    @classmethod
    def of(cls, model, attentions) -> "LoadedState":
        attentions = tuple(attentions)
        return cls(model, cls.adapters_of(model), attentions, tuple(id(a.processor) for a in attentions))

    @staticmethod
    def adapters_of(model) -> Tuple[str, ...]:
        return tuple(sorted(getattr(model, "peft_config", None) or ()))

    def changed(self) -> bool:
        return self.adapters_of(self.model) != self.adapters or any(
            id(attention.processor) != processor for attention, processor in zip(self.attentions, self.processors)
        )


class StepStart(NamedTuple):
    """What ``GenerationTracker.begin_step`` found."""

    new_generation: bool
    generation: Generation
    refresh_conditioning: bool


def _timestep_value(timestep) -> Optional[float]:
    """A number's or CPU tensor's value (the first element of a batch of them); None for a
    tensor on another device, which is not read."""
    if isinstance(timestep, torch.Tensor):
        if not timestep.is_cpu:
            return None
        return float(timestep if timestep.numel() == 1 else timestep.reshape(-1)[0])
    return float(timestep)


def _schedule_position(timestep: torch.Tensor) -> Optional[Tuple[int, int]]:
    """Where a timestep tensor sits in the schedule it is an element of: (the schedule's storage,
    the element's offset in it), or None when it is no view into a larger tensor. A diffusers loop
    iterates ``scheduler.timesteps``, so each ``t`` is a view of one element of the schedule's
    storage, one element further each step; a new schedule (``set_timesteps``, at every pipeline
    call) is a new storage. Read from the tensor's metadata only: nothing leaves the device."""
    storage = timestep.untyped_storage()
    span = 1 + sum((size - 1) * stride for size, stride in zip(timestep.shape, timestep.stride()))
    if timestep.numel() == 0 or span * timestep.element_size() >= storage.nbytes():
        return None  # all of its storage: a tensor of its own (torch.full((batch,), t), ...)
    return storage.data_ptr(), timestep.storage_offset()


class _ByIdentity:
    """In a conditioning fingerprint, an object compared by identity (its own ``==`` may not give
    a bool: an array's)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
"""Argument values compared by value (everything else is a tensor, a container or an object)."""


def _fingerprint(value: Any, kept: list) -> Any:
    """What of ``value`` (an argument: tensors, numbers, dicts, lists, tuples) differs whenever its
    contents may differ, computed on the host: a tensor's memory, layout and version counter (bumped
    by every in-place change), a plain value itself, any other object by identity. The tensors and
    objects are appended to ``kept``, which the caller holds until the next comparison: alive, their
    memory cannot be reused by a new tensor that would then look the same. An inference tensor has
    no version counter: it counts as changed every time."""
    if isinstance(value, torch.Tensor):
        kept.append(value)
        version = _ByIdentity(object()) if value.is_inference() else value._version
        return (value.data_ptr(), value.shape, value.stride(), value.dtype, value.device, version)
    if isinstance(value, PLAIN_VALUES):
        return (type(value), value)  # 1, 1.0 and True are equal, but not the same argument
    if type(value) in (dict, list, tuple):
        items = value.items() if type(value) is dict else enumerate(value)
        return (type(value), tuple((key, _fingerprint(item, kept)) for key, item in items))
    kept.append(value)
    return _ByIdentity(value)


class GenerationTracker:
    """One band wrapper's record of generations: the declared one, and what recognising the next
    one by itself needs from the last step (its timestep, schedule position, signature and
    conditioning), all on the host."""

    def __init__(self, model_name: str = "UNet") -> None:
        self.model_name = model_name
        self.generation = Generation(declared=False)  # the one in force (or the next, if pending)
        self._pending = True  # the next step begins a generation
        self._pending_declared = False  # ... and it is the declared one
        self._current_declared = False  # the generation running now was declared
        self._signature: Optional[Tuple] = None
        self._last_value: Optional[float] = None
        self._previous_timestep: Any = None  # kept alive: see _schedule_position
        self._schedule: Optional[Tuple[int, int]] = None
        self._conditioning: Optional[Tuple[Any, list]] = None
        self._warned = False

    def declare(self, generation: Generation) -> None:
        """The next step begins ``generation``."""
        self.generation = generation
        self._pending = True
        self._pending_declared = True

    def fail(self) -> None:
        """A step failed (its modules may have consumed their stale buffers): the next step begins
        a generation the wrapper recognises by itself, whose inputs are checked again."""
        self.generation = self.generation.undeclared()
        self._pending = True
        self._pending_declared = False
        self._signature = None

    def begin_step(self, timestep, signature: Tuple, conditioning: Iterable[Tuple[str, Any]]) -> StepStart:
        """Whether this step begins a generation (and which one is in force), and whether its
        conditioning may differ from the previous step's. Every detector runs every step, so that
        each remembers this step for the next."""
        same_signature = signature == self._signature
        declared = self._pending_declared if self._pending else self._current_declared and same_signature
        starts = self._timestep_starts_generation(timestep, declared)
        changed = self._conditioning_changed(conditioning)
        new = self._pending or not same_signature or starts
        if new:
            if not (self._pending and self._pending_declared):
                self.generation = self.generation.undeclared()
            self._current_declared = self._pending and self._pending_declared
            self._pending = self._pending_declared = False
            self._signature = signature
        return StepStart(new, self.generation, new or changed)

    def _timestep_starts_generation(self, timestep, declared: bool) -> bool:
        """Whether this step's timestep begins a new generation (timesteps do not increase within
        one), read without waiting for a GPU:

        * a number or a CPU tensor: its value, against the last step's;
        * a GPU tensor that is an element of a schedule (``_schedule_position``): the generation
          goes on while it is the same schedule and the element does not move back;
        * any other GPU tensor: nothing is read; in a generation that was not declared the loop is
          warned (once) that its generations cannot be told apart.

        A number, CPU tensor or schedule element after a timestep of another kind begins a
        generation: there is nothing to compare it with."""
        previous_schedule, self._schedule = self._schedule, None
        self._previous_timestep = timestep
        if isinstance(timestep, torch.Tensor) and not timestep.is_cpu:
            position = _schedule_position(timestep)
            self._last_value = None
            if position is not None:
                self._schedule = position
                return (
                    previous_schedule is None
                    or position[0] != previous_schedule[0]
                    or position[1] < previous_schedule[1]
                )
            if not declared and not self._warned:
                self._warned = True
                warnings.warn(
                    f"distripy: the {self.model_name}'s timesteps are tensors on the GPU that are not "
                    "elements of a schedule, so where a generation begins cannot be told without "
                    "waiting for the GPU; declare each generation (distripy.reset(unet, steps=n) "
                    "before it, or `with distripy.generation(unet, steps=n):`), or its steps may use "
                    "another generation's stale activations",
                    UndeclaredGenerationWarning,
                    stacklevel=5,
                )
            return False
        value = _timestep_value(timestep)
        new = self._last_value is None or value > self._last_value
        self._last_value = value
        return new

    def _conditioning_changed(self, conditioning: Iterable[Tuple[str, Any]]) -> bool:
        """Whether any conditioning argument may differ from the previous step's: a new tensor, one
        changed in place, another value. On the host, from metadata (``_fingerprint``)."""
        kept: list = []
        fingerprint = tuple((name, _fingerprint(value, kept)) for name, value in conditioning)
        previous, self._conditioning = self._conditioning, (fingerprint, kept)
        return previous is None or previous[0] != fingerprint

    def conditioning_of(self, arguments: Dict[str, Any], skipped: Tuple[str, ...]):
        """The arguments that are conditioning: all but ``skipped`` (the latent, the timestep and
        the spatial ones, which change every step)."""
        return ((name, value) for name, value in arguments.items() if name not in skipped)
