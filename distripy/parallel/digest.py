"""Digests of a call's inputs, for the ranks to compare before they make one image together.

Ranks given different prompts, guidance, step counts, noise or conditioning would each compute
their bands of a different image and stitch a wrong one together, silently. So before a
generation every rank digests everything that decides the image and the ranks compare
(``parallel.agreement``). A digest is small and picklable:

* a tensor (or a numpy array, or a PIL image): its shape, dtype and three float64 reductions --
  the sum, the sum of absolute values and a position-weighted sum, which tells apart two tensors
  that differ by a permutation or a sign. Every tensor's reductions are computed where it lives and
  reach the host in one copy per device;
* a ``torch.Generator``: the digest of its state;
* numbers, strings, booleans, None: themselves; lists, tuples and dicts: their items' digests;
* anything else (a callback, a processor): its type's name -- not compared by content.

A meta tensor (shape propagation) has no values: its digest is its shape and dtype.
"""

from typing import Any, Dict, Hashable, List, Tuple

import torch

__all__ = ["digest_arguments"]

_PLAIN = (int, float, bool, str, bytes, type(None))


def _as_tensor(value: Any):
    """A tensor for array-like ``value`` (numpy array, PIL image), else None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, torch.Generator):
        return value.get_state()
    if type(value).__module__.startswith("PIL.") or type(value).__name__ == "ndarray":
        import numpy as np

        return torch.from_numpy(np.array(value, order="C"))  # a copy: a PIL image's array is read-only
    return None


def _reductions(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1).to(torch.float64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) / max(
        flat.numel(), 1
    )
    return torch.stack([flat.sum(), flat.abs().sum(), (flat * weights).sum()])


def digest_arguments(arguments: Dict[str, Any]) -> Dict[str, Hashable]:
    """One digest per argument name (see the module docstring)."""
    tensors: List[torch.Tensor] = []

    def walk(value: Any) -> Any:
        tensor = _as_tensor(value)
        if tensor is not None:
            if tensor.is_meta:
                return ("tensor", tuple(tensor.shape), str(tensor.dtype))
            tensors.append(tensor)
            return ("tensor", tuple(tensor.shape), str(tensor.dtype), len(tensors) - 1)
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(walk(item) for item in value))
        if isinstance(value, dict):
            return ("dict", tuple(sorted((str(k), walk(v)) for k, v in value.items())))
        return ("object", type(value).__qualname__)

    skeleton = {name: walk(value) for name, value in arguments.items()}
    values = _reduced_on_host(tensors)

    def fill(entry: Any) -> Hashable:
        if isinstance(entry, tuple) and entry and entry[0] == "tensor" and len(entry) == 4:
            return entry[:3] + (values[entry[3]],)
        if isinstance(entry, tuple):
            return tuple(fill(item) for item in entry)
        return entry

    return {name: fill(entry) for name, entry in skeleton.items()}


def _reduced_on_host(tensors: List[torch.Tensor]) -> List[Tuple[float, ...]]:
    """Every tensor's reductions as floats: one device-to-host copy per device."""
    by_device: Dict[torch.device, List[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    values: List[Tuple[float, ...]] = [()] * len(tensors)
    for indices in by_device.values():
        stacked = torch.stack([_reductions(tensors[i]) for i in indices]).cpu().tolist()
        for index, row in zip(indices, stacked):
            values[index] = tuple(row)
    return values
