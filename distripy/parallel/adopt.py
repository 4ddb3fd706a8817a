"""Turning a module into its patch-parallel subclass without copying its weights."""

from typing import Type, TypeVar

import torch.nn as nn

from distripy.errors import InputTypeError

__all__ = ["adopt"]

M = TypeVar("M", bound=nn.Module)


def adopt(cls: Type[M], original: nn.Module) -> M:
    """An instance of ``cls`` (a subclass of ``original``'s class) that is ``original`` in every
    other respect: the same ``Parameter`` objects, buffers, children, hooks and flags.

    The weights are shared, not copied, so whatever later changes them in place (a fused LoRA,
    ``load_state_dict``, ``.to()``) acts on the parallel model too, and state-dict keys and module
    paths stay those of the original model (LoRA loaders find their targets).

    ``cls`` adopts instances of its first base class, or of its ``adopts`` class attribute where it
    has one (a subclass of a patch module adopting the same torch modules).
    """
    base = getattr(cls, "adopts", cls.__mro__[1])
    if not isinstance(original, base):
        raise InputTypeError(f"{cls.__name__} adopts {base.__name__} modules, not {type(original).__name__}")
    module = cls.__new__(cls)
    module.__dict__.update(
        {key: value.copy() if isinstance(value, dict) else value for key, value in original.__dict__.items()}
    )
    return module
