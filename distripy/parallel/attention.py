"""``PatchSelfAttnProcessor``: self-attention of one band over the whole image's keys and values.

Queries are the band's own tokens. Keys and values cover every token of the image: this band's
fresh ones and the other bands' from an all-gather, waited for in a synchronous step, or from the
previous step in a stale one (while this step's are gathered for the next). Installed with
diffusers' processor API (``Attention.set_processor``), so the projections remain the model's own
modules: a LoRA loaded or fused into them later still applies.

The computation mirrors diffusers' ``AttnProcessor2_0`` (scaled-dot-product attention), so a
synchronous step equals the single-device result.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from distripy.errors import InputError
from distripy.parallel.context import ActivationExchange, PatchContext, PatchState

__all__ = ["PatchSelfAttnProcessor"]


class PatchSelfAttnProcessor(PatchState):
    def __init__(self, context: PatchContext, path: str) -> None:
        # Its exchange: the all-gathered keys and values, (bands, B, L, inner) each.
        self.attach(context, path)

    def _gather_buffers(self, key: torch.Tensor, value: torch.Tensor):
        ctx = self.patch_context
        bands = ctx.band_count
        return (
            ctx.new_buffer(self, "keys", (bands,) + tuple(key.shape), key),
            ctx.new_buffer(self, "values", (bands,) + tuple(value.shape), value),
        )

    def _image_keys_values(self, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every band, (B, bands * L, inner), in band (= image row) order."""
        ctx = self.patch_context
        exchange = ctx.activation_exchange
        if exchange is ActivationExchange.NONE:
            return key, value
        if exchange is ActivationExchange.SYNC:
            keys, values = self._gather_buffers(key, value)
            with ctx.comm.group():
                works = (ctx.comm.all_gather(key, keys), ctx.comm.all_gather(value, values))
            for work in works:
                work.wait()
            self.keep_exchange((), keys, values)
        elif exchange is ActivationExchange.STALE:
            keys, values = self.take_stale()
            # The stale buffers are this module's alone: this band's slot takes the fresh rows.
            keys[ctx.band_index].copy_(key)
            values[ctx.band_index].copy_(value)
            fresh_keys, fresh_values = self._gather_buffers(key, value)

            def issue() -> None:
                works = (ctx.comm.all_gather(key, fresh_keys), ctx.comm.all_gather(value, fresh_values))
                self.keep_exchange(works, fresh_keys, fresh_values)

            ctx.defer(issue)
        else:
            raise AssertionError(f"unhandled activation exchange {exchange!r}")
        return _bands_to_sequence(keys), _bands_to_sequence(values)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        ctx = self.patch_context
        if encoder_hidden_states is not None:
            raise InputError(f"{self.patch_path}: patch self-attention was called with encoder_hidden_states")
        patched = ctx.has_neighbours
        if patched:
            ctx.enter(self, self.patch_path)
            if attention_mask is not None:
                raise InputError(
                    f"{self.patch_path}: an attention_mask on self-attention is not supported under patch "
                    "parallelism (its key tokens would span every band)"
                )

        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            key, value = key.contiguous(), value.contiguous()
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        if patched:
            key, value = self._image_keys_values(key, value)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _bands_to_sequence(gathered: torch.Tensor) -> torch.Tensor:
    """(bands, B, L, inner) -> (B, bands * L, inner); a view when B == 1."""
    bands, batch, length, inner = gathered.shape
    return gathered.transpose(0, 1).reshape(batch, bands * length, inner)
