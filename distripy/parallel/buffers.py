"""``BufferPool``: the tensors a model's patch modules keep for the next step.

Normally each is a fresh tensor. With ``static_buffers`` (CUDA graphs) each is one of two
persistent tensors per module, buffer name and input signature, chosen by the step's parity: a step
writes the set of its parity and reads the other, so a graph captured for an even step and one for
an odd step replay each other's results forever, without copies. A buffer shared by every step of
a signature (``per_parity=False``) is keyed by its shape and dtype too.
"""

from typing import Dict, Hashable, Optional, Tuple

import torch

from distripy.errors import StepError

__all__ = ["BufferPool"]


class BufferPool:
    def __init__(self) -> None:
        self.static = False  # persistent buffers (CUDA graphs)
        self.capturing = False  # a capture is running: no new persistent buffer may appear
        self._buffers: Dict[Hashable, Dict[Tuple, torch.Tensor]] = {}

    def new(
        self,
        owner_path: str,
        name: str,
        shape,
        like: torch.Tensor,
        signature: Hashable,
        parity: int,
        per_parity: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """An uninitialised tensor (``like``'s device, ``dtype`` or ``like``'s): fresh, or the
        persistent one of ``signature`` for (``owner_path``, ``name``) and this ``parity`` (or, not
        ``per_parity``, this shape and dtype)."""
        shape = tuple(shape)
        dtype = like.dtype if dtype is None else dtype
        if not self.static:
            return like.new_empty(shape, dtype=dtype)
        buffers = self._buffers.setdefault(signature, {})
        # A shared buffer is keyed by its shape and dtype too: another shape of the same name (a
        # longer prompt) is another buffer, and the graphs that read the first keep reading it.
        key = (owner_path, name, parity) if per_parity else (owner_path, name, shape, dtype)
        buffer = buffers.get(key)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != dtype or buffer.device != like.device:
            if self.capturing:
                raise StepError(
                    f"{owner_path}: buffer {name!r} {shape} first appeared inside a CUDA-graph "
                    "capture; the eager step before the capture should have made it"
                )
            buffer = like.new_empty(shape, dtype=dtype)
            buffers[key] = buffer
        return buffer

    def nbytes(self, signature: Hashable = None) -> int:
        """The bytes of the persistent buffers of one input signature (``planning.memory.
        persistent_bytes`` predicts them), or with ``None`` of every signature held."""
        pools = self._buffers.values() if signature is None else [self._buffers.get(signature, {})]
        return sum(t.numel() * t.element_size() for kept in pools for t in kept.values())

    def release(self, signature: Hashable) -> None:
        """Forget the persistent buffers of one input signature (its graphs are gone)."""
        self._buffers.pop(signature, None)
