"""The self-attention's projections as they travel: ``FusedProjection`` (``to_q``, ``to_k`` and
``to_v`` as one GEMM over their stacked weights, the layers' weights views of it) and
``KeysValues`` (a band's keys and values, side by side in one tensor where they can be, so that
one copy and one transfer carry both). See ``parallel.attention``.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FusedProjection", "KeysValues"]


class KeysValues:
    """A band's keys and values, ``(B, tokens, inner)`` each: side by side in one tensor (views of
    a fused projection's output, or of a gathered buffer), or two tensors."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, both: Optional[torch.Tensor] = None) -> None:
        self.key = key
        self.value = value
        self.both = both  # (B, tokens, 2 x inner) holding key | value, when they are side by side
        self.batch, self.tokens, self.inner = key.shape

    @classmethod
    def side_by_side(cls, both: torch.Tensor) -> "KeysValues":
        inner = both.shape[-1] // 2
        return cls(both[..., :inner], both[..., inner:], both)

    def write_into(self, slot: torch.Tensor) -> None:
        """Into ``slot`` (B, tokens, 2 x inner): one copy when side by side, two otherwise."""
        if self.both is not None:
            slot.copy_(self.both)
        else:
            slot[..., : self.inner].copy_(self.key)
            slot[..., self.inner :].copy_(self.value)

    def block(self) -> torch.Tensor:
        """``(B, tokens, 2 x inner)`` keys | values in one contiguous tensor (one transfer)."""
        if self.both is not None:
            return self.both.contiguous()
        return torch.cat((self.key, self.value), dim=-1)


class FusedProjection:
    """``to_q``, ``to_k`` and ``to_v`` as one GEMM over their stacked weights, the three layers'
    weights made views of the stacked one (no second copy of them; the layers compute what they
    did). ``holds`` checks that the layers are still those plain ``nn.Linear`` layers, unhooked,
    over the same storage: a LoRA layer wrapped around one, a weight assigned anew (a safe LoRA
    merge, ``.to()``) or a hook ends it."""

    def __init__(self, layers: Tuple[nn.Linear, ...], weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        self.layers = layers
        self.weight = weight
        self.bias = bias

    @staticmethod
    def _plain(layer) -> bool:
        return type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)

    @classmethod
    def of(cls, attn) -> Optional["FusedProjection"]:
        """The fused projection of ``attn``'s three layers, or None where they cannot be fused
        (not plain linear layers, unlike inputs, dtypes or devices, a bias on some only)."""
        layers = (attn.to_q, attn.to_k, attn.to_v)
        if not all(cls._plain(layer) for layer in layers):
            return None
        weights = [layer.weight for layer in layers]
        biases = [layer.bias for layer in layers]
        first = weights[0]
        if any(w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device for w in weights):
            return None
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        if weights[1].shape != weights[2].shape or weights[0].shape[0] != weights[1].shape[0]:
            return None  # the query's width must equal the keys' and values' (split in thirds)
        with torch.no_grad():
            weight = torch.cat([w.detach() for w in weights])
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
            start = 0
            for layer in layers:
                rows = layer.weight.shape[0]
                layer.weight.data = weight[start : start + rows]
                if bias is not None:
                    layer.bias.data = bias[start : start + rows]
                start += rows
        return cls(layers, weight, bias)

    def unfuse(self) -> None:
        """Each layer's weight and bias in storage of its own again, where they still are views of
        the stacked ones."""
        with torch.no_grad():
            for layer in self.layers:
                for name, stacked in (("weight", self.weight), ("bias", self.bias)):
                    parameter = getattr(layer, name)
                    if stacked is not None and parameter is not None and parameter.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr():
                        parameter.data = parameter.data.clone()

    def holds(self, attn) -> bool:
        layers = (attn.to_q, attn.to_k, attn.to_v)
        if any(a is not b or not self._plain(a) for a, b in zip(layers, self.layers)):
            return False
        start = 0
        for layer in layers:
            rows = layer.weight.shape[0]
            if layer.weight.data_ptr() != self.weight[start].data_ptr():
                return False
            if self.bias is None and layer.bias is not None:
                return False  # a bias added since
            if self.bias is not None and (layer.bias is None or layer.bias.data_ptr() != self.bias[start].data_ptr()):
                return False
            start += rows
        return True

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)
