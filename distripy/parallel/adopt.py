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
    """
    if not isinstance(original, cls.__mro__[1]):
        raise InputTypeError(
            f"{cls.__name__} adopts {cls.__mro__[1].__name__} modules, not {type(original).__name__}"
        )
    module = cls.__new__(cls)
    module.__dict__.update(
        {key: value.copy() if isinstance(value, dict) else value for key, value in original.__dict__.items()}
    )
    return module
