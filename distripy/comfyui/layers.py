"""The patch-parallel layers of ComfyUI's UNet: its convolutions, GroupNorms and self-attentions on
one band, through the same exchanges as every other patch-parallel model (``distripy.parallel``).

ComfyUI's layers are subclasses of torch's (``torch.nn.Conv2d``, ``GroupNorm``, ``Linear``) whose
effective weights are not always their parameters: under a manual cast, in low-VRAM mode or with a
LoRA applied on the fly they come from ``comfy.ops.cast_bias_weight`` (the layer's
``comfy_cast_weights``, ``weight_function`` and ``bias_function``), and ComfyUI may replace a
parameter object when it patches a LoRA in. So each patch layer here keeps the ComfyUI layer it
stands for (``source``) and reads its weights from it at every call, as the layer's own forward
would, instead of holding parameters of its own: whatever ComfyUI does to the source is what the
band's layer computes with. Each call also runs ComfyUI's per-op hook (``run_every_op``: the
interrupt of a cancelled prompt).

* ``ComfyPatchConv2d``: a convolution with a kernel taller than one row, with halos.
* ``ComfyPatchGroupNorm``: GroupNorm with the whole image's statistics.
* ``FusedNormConv``: installed as the ``forward`` of a ``Sequential(GroupNorm, SiLU, [Dropout,]
  Conv2d)`` (a ResBlock's ``in_layers`` and ``out_layers``) whose norm and convolution are patch
  layers: the band is normalised and activated as the convolution reads it
  (``PatchGroupNorm.prologue`` -> ``PatchConv2d.forward(x, prologue)``, as the diffusers path's
  ``PatchResnetForward``), the activation read once instead of written twice and read twice;
* ``ComfySelfAttention``: installed as ``CrossAttention.forward`` of a transformer block's
  ``attn1``: keys and values of the whole image (gathered, stale, or block by block in ``exact``),
  attended over by ComfyUI's own attention function (``optimized_attention``, which honours an
  ``optimized_attention_override``) or, in an overlapped step, by the blockwise merge.

Outside a patch-parallel step (one band) each runs its source layer as it is.
"""

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch

from distripy.errors import UnsupportedModuleError
from distripy.parallel.attention import PatchSelfAttnProcessor
from distripy.parallel.context import ActivationExchange, PatchContext
from distripy.parallel.conv import PatchConv2d
from distripy.parallel.group_norm import PatchGroupNorm
from distripy.parallel.projection import KeysValues
from distripy.parallel.resnet import has_hooks

__all__ = ["ComfyPatchConv2d", "ComfyPatchGroupNorm", "ComfySelfAttention", "FusedNormConv", "casts_weights"]


def casts_weights(layer: torch.nn.Module) -> bool:
    """Whether ComfyUI computes this layer's effective weights on the fly (``cast_bias_weight``)."""
    return bool(
        getattr(layer, "comfy_cast_weights", False)
        or getattr(layer, "weight_function", None)
        or getattr(layer, "bias_function", None)
    )


def _run_every_op() -> None:
    import comfy.ops

    comfy.ops.run_every_op()


@contextlib.contextmanager
def _weights_of(layer: torch.nn.Module, x: torch.Tensor) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The layer's effective ``(weight, bias)`` for input ``x``, as its own forward takes them."""
    if not casts_weights(layer):
        yield layer.weight, layer.bias
        return
    import comfy.ops

    weight, bias, offload = comfy.ops.cast_bias_weight(layer, x, offloadable=True)
    try:
        yield weight, bias
    finally:
        comfy.ops.uncast_bias_weight(layer, weight, bias, offload)


class _SourceWeights:
    """A patch layer whose weights are its ComfyUI source layer's (module docstring)."""

    source: torch.nn.Module
    _current: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @classmethod
    def of(cls, layer: torch.nn.Module, context: PatchContext, path: str):
        """The patch layer standing for ComfyUI's ``layer`` (which stays as it is)."""
        module = cls.adopted(layer, context, path)
        # A plain attribute, not a child module: the source belongs to ComfyUI's model (or to this
        # rank's replica), and its parameters are no parameters of the patch layer.
        module.__dict__["source"] = layer
        for name in list(module._parameters):
            module._parameters[name] = None
        return module

    def current_weights(self):
        if self._current is None:
            raise AssertionError(f"{self.patch_path}: weights read outside the layer's call")
        return self._current

    def _on_band(self, x: torch.Tensor, band_forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``band_forward()`` with the source's weights of this call; the source itself when there
        is no band to exchange with."""
        if not self.patch_context.has_neighbours:
            return self.source(x)
        _run_every_op()
        with _weights_of(self.source, x) as weights:
            self._current = weights
            try:
                return band_forward()
            finally:
                self._current = None


class ComfyPatchConv2d(_SourceWeights, PatchConv2d):
    """A ComfyUI ``Conv2d`` (kernel > 1) on this rank's band, with halos."""

    adopts = torch.nn.Conv2d

    @classmethod
    def adopted(cls, layer, context, path):
        return cls.from_conv(layer, context, path)

    def forward(self, x: torch.Tensor, prologue=None) -> torch.Tensor:
        return self._on_band(x, lambda: PatchConv2d.forward(self, x, prologue))


class ComfyPatchGroupNorm(_SourceWeights, PatchGroupNorm):
    """A ComfyUI ``GroupNorm`` on this rank's band, with the whole image's statistics."""

    adopts = torch.nn.GroupNorm

    @classmethod
    def adopted(cls, layer, context, path):
        return cls.from_group_norm(layer, context, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._on_band(x, lambda: PatchGroupNorm.forward(self, x))


class FusedNormConv:
    """``forward`` of a ``Sequential(ComfyPatchGroupNorm, SiLU, [Dropout,] ComfyPatchConv2d)``: the
    norm's statistics handed to the convolution as its prologue (module docstring). The result is
    the sequence's own; it runs as the sequence would (its layers one after the other) outside a
    patch-parallel step, while a layer has hooks, a dropout is active, or ComfyUI casts the norm's
    weights on the fly (a cast copy may be released before the convolution reads it)."""

    def __init__(self, sequence: torch.nn.Sequential) -> None:
        if not fusable(sequence):
            raise UnsupportedModuleError(f"FusedNormConv: {sequence} is not GroupNorm, SiLU, [Dropout,] Conv2d")
        self.sequence = sequence
        self.original = sequence.forward  # the class's, bound: the layers one after the other

    def _fused_now(self) -> bool:
        layers = list(self.sequence)
        norm, conv = layers[0], layers[-1]
        if not (isinstance(norm, ComfyPatchGroupNorm) and isinstance(conv, ComfyPatchConv2d)):
            return False  # replaced since
        if not norm.patch_context.has_neighbours or casts_weights(norm.source):
            return False
        dropouts = layers[2:-1]
        if any(dropout.training and dropout.p > 0 for dropout in dropouts):
            return False
        return not any(has_hooks(layer) for layer in layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_now():
            return self.original(x)
        norm, conv = self.sequence[0], self.sequence[-1]
        prologue = norm._on_band(x, lambda: norm.prologue(x, silu=True))
        return conv(x, prologue)


def fusable(sequence: torch.nn.Module) -> bool:
    """Whether ``sequence`` is ``Sequential(ComfyPatchGroupNorm, SiLU, [Dropout,] ComfyPatchConv2d)``."""
    if type(sequence) is not torch.nn.Sequential or not 3 <= len(sequence) <= 4:
        return False
    layers = list(sequence)
    return (
        isinstance(layers[0], ComfyPatchGroupNorm)
        and type(layers[1]) is torch.nn.SiLU
        and all(type(layer) is torch.nn.Dropout for layer in layers[2:-1])
        and isinstance(layers[-1], ComfyPatchConv2d)
    )


class ComfySelfAttention(PatchSelfAttnProcessor):
    """``forward`` of a ComfyUI ``CrossAttention`` used as a self-attention (a transformer block's
    ``attn1``): the band's queries over the whole image's keys and values. The projections are the
    attention's own layers (their casts and on-the-fly patches apply)."""

    def __init__(self, attention: torch.nn.Module, context: PatchContext, path: str) -> None:
        super().__init__(context, path)
        self.attention = attention
        self.original = attention.forward  # the class's forward, bound: one band's attention

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):
        ctx = self.patch_context
        if not ctx.has_neighbours:
            return self.original(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        ctx.enter(self, self.patch_path)
        if mask is not None:
            raise UnsupportedModuleError(
                f"{self.patch_path}: a mask on self-attention cannot run on bands (its keys span the image)"
            )
        keys_from = x if context is None else context
        values_from = keys_from if value is None else value
        for name, tokens in (("context", keys_from), ("value", values_from)):
            if tokens.shape[:2] != x.shape[:2]:
                raise UnsupportedModuleError(
                    f"{self.patch_path}: an attn1 patch gave the self-attention a {name} of shape "
                    f"{tuple(tokens.shape)} for {tuple(x.shape)} tokens of the band; patch parallelism "
                    "exchanges keys and values of the band's own tokens only (a reference-image patch "
                    "adds tokens of its own)"
                )
        attn = self.attention
        query = attn.to_q(x)
        projected = KeysValues(attn.to_k(keys_from), attn.to_v(values_from))
        if ctx.activation_exchange is ActivationExchange.OVERLAPPED:
            return self._blockwise(attn, query, projected)
        key, value = self._image_keys_values(projected)
        import comfy.ldm.modules.attention as comfy_attention

        out = comfy_attention.optimized_attention(
            query,
            key,
            value,
            attn.heads,
            attn_precision=attn.attn_precision,
            transformer_options=transformer_options,
        )
        return attn.to_out(out)
