"""Attention processors of patch parallelism, installed with diffusers' processor API
(``Attention.set_processor``), so the projections remain the model's own modules: a LoRA loaded or
fused into them later still applies. Both mirror diffusers' ``AttnProcessor2_0``
(scaled-dot-product attention), so a synchronous step equals the single-device result.

* ``PatchSelfAttnProcessor``: self-attention of one band over the whole image's keys and values.
  Queries are the band's own tokens. Keys and values cover every token of the image: this band's
  fresh ones and the other bands' from an all-gather, waited for in a synchronous step, or from
  the previous step in a stale one (while this step's are gathered for the next). In an
  overlapped step (``exact``) the band's keys and values go to every other rank by ring shifts
  (distance 1, 2, ...: one other band's block each), issued first; the band attends over its own
  block at once and over each other band's as it arrives, and the partial results merge by their
  log-sum-exp (``kernels.attention_merge``): the whole-image attention, with the transfers hidden
  behind the blocks already received.
* ``PatchCrossAttnProcessor``: cross-attention, local to the band. Its keys and values depend on
  the prompt embeddings only, which do not change during a generation: they are computed once per
  generation and reused while the embeddings are the same tensor, unmodified (same storage, shape,
  strides and version counter; the cache holds the tensor, so its memory cannot be reused by
  another while cached), and recomputed otherwise.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from distripy.errors import InputError, StepError
from distripy.kernels import attention_with_lse, merge_partial_
from distripy.parallel.bands import pad_to
from distripy.parallel.context import ActivationExchange, PatchContext, PatchState

__all__ = ["SHIFT_LAUNCH_BYTES", "PatchCrossAttnProcessor", "PatchSelfAttnProcessor"]

SHIFT_LAUNCH_BYTES = 8 << 20
"""The fewest bytes one launch of ``exact``'s ring shifts carries: consecutive shifts go out as one
``group()`` until they do. A smaller transfer costs a launch's latency (10-25 us on NVLink and
PCIe) more than its bytes, and the attention of one band's block is too short to hide a latency
per band: at 1024² on 8 GPUs, SDXL's blocks are 1-3 MB and one shift per band made the step slower
than ``full_sync``'s one all-gather (the scaling model's table). Blocks of 8 MB and more (2048² and
up) go one per launch, each hidden behind the block before it."""


def _require_bound(processor) -> None:
    if processor.patch_context is None:
        raise StepError(
            f"{type(processor).__name__} made without a context (by a loader that re-creates every "
            "processor as its class()) ran before the next generation bound it to its model"
        )


class PatchSelfAttnProcessor(PatchState):
    """Made without a context (``PatchSelfAttnProcessor()``, as diffusers' IP-Adapter loader and
    unloader re-create every processor they do not replace) it is unbound: the next generation of
    its model replaces it with a bound one (``pipelines.swap.swap_modules``)."""

    patch_context = None

    def __init__(self, context: Optional[PatchContext] = None, path: str = "") -> None:
        # Its exchange: the all-gathered keys and values, (bands, B, L, inner) each.
        if context is not None:
            self.attach(context, path)

    def _gather_buffers(self, tallest: int, key: torch.Tensor, value: torch.Tensor):
        ctx = self.patch_context
        bands = ctx.band_count
        batch = key.shape[0]
        return (
            ctx.new_buffer(self, "keys", (bands, batch, tallest, key.shape[2]), key),
            ctx.new_buffer(self, "values", (bands, batch, tallest, value.shape[2]), value),
        )

    def _image_keys_values(self, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every band, (B, image tokens, inner), in band (= image row) order.

        Bands of unequal height (``BandLayout``) travel padded to the tallest band's tokens: the
        all-gather needs equal blocks; each band's own tokens are cut out after."""
        ctx = self.patch_context
        exchange = ctx.activation_exchange
        if exchange is ActivationExchange.NONE:
            return key, value
        lengths = ctx.band_sizes(key.shape[1])
        tallest = max(lengths)
        if exchange is ActivationExchange.SYNC:
            keys, values = self._gather_buffers(tallest, key, value)
            send_key, send_value = pad_to(key, tallest, dim=1), pad_to(value, tallest, dim=1)
            with ctx.comm.group():
                works = (ctx.comm.all_gather(send_key, keys), ctx.comm.all_gather(send_value, values))
            for work in works:
                work.wait()
            self.keep_exchange((), keys, values)
        elif exchange is ActivationExchange.STALE:
            keys, values = self.take_stale()
            # The stale buffers are this module's alone: this band's slot takes the fresh rows.
            own = key.shape[1]
            keys[ctx.band_index, :, :own].copy_(key)
            values[ctx.band_index, :, :own].copy_(value)
            fresh_keys, fresh_values = self._gather_buffers(tallest, key, value)
            send_key, send_value = pad_to(key, tallest, dim=1), pad_to(value, tallest, dim=1)

            def issue() -> None:
                works = (
                    ctx.comm.all_gather(send_key, fresh_keys),
                    ctx.comm.all_gather(send_value, fresh_values),
                )
                self.keep_exchange(works, fresh_keys, fresh_values)

            ctx.defer(issue)
        else:
            raise AssertionError(f"unhandled activation exchange {exchange!r}")
        return _bands_to_sequence(keys, lengths), _bands_to_sequence(values, lengths)

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
        _require_bound(self)
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
        tokens = _Tokens(attn, hidden_states)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(tokens.hidden).chunk(3, dim=-1)
            key, value = key.contiguous(), value.contiguous()
        else:
            query = attn.to_q(tokens.hidden)
            key = attn.to_k(tokens.hidden)
            value = attn.to_v(tokens.hidden)
        mask = tokens.mask(attention_mask, key.shape[1])  # only unpatched: patched refuses masks
        if patched and ctx.activation_exchange is ActivationExchange.OVERLAPPED:
            return tokens.finish(self._blockwise(attn, query, key, value))
        if patched:
            key, value = self._image_keys_values(key, value)
        return tokens.finish(_attend(attn, query, key, value, mask))

    def _blockwise(self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The overlapped step's attention (module docstring): one shift per other band (grouped
        into launches of ``SHIFT_LAUNCH_BYTES``), every one issued before any block is computed;
        block ``d`` (band ``index - d``'s) merged once it is in."""
        ctx = self.patch_context
        backend = ctx.kernel_backend
        inner = key.shape[-1]
        lengths = ctx.band_sizes(key.shape[1])
        # One transfer per band for both; unequal bands travel padded to the tallest.
        block = pad_to(torch.cat((key, value), dim=-1), max(lengths), dim=1)
        received = [ctx.new_buffer(self, f"block{d}", block.shape, block) for d in range(1, ctx.band_count)]
        per_launch = max(1, SHIFT_LAUNCH_BYTES // max(1, block.numel() * block.element_size()))
        works = []
        for first in range(0, len(received), per_launch):
            with ctx.comm.group():
                works += [
                    ctx.comm.shift(block, received[d - 1], d)
                    for d in range(first + 1, min(first + per_launch, len(received)) + 1)
                ]
        heads = _Heads(attn, query.shape[0], inner)
        q = heads.query(query)
        out, lse = attention_with_lse(q, heads.key(key), heads.value(value), backend=backend)
        accumulate = torch.float64 if query.dtype == torch.float64 else torch.float32
        out, lse = out.to(accumulate), lse.to(accumulate)  # merged in fp32, rounded once at the end
        for distance, (work, buffer) in enumerate(zip(works, received), start=1):
            work.wait()
            source = (ctx.band_index - distance) % ctx.band_count
            block_key, block_value = buffer[:, : lengths[source]].split(inner, dim=-1)
            block_out, block_lse = attention_with_lse(
                q, heads.key(block_key), heads.value(block_value), backend=backend
            )
            merge_partial_(out, lse, block_out, block_lse)
        return heads.project_out(out.to(query.dtype))


class PatchCrossAttnProcessor:
    """Cross-attention with its keys and values computed once per generation (module docstring).

    The cache is used inside a patch-parallel step only, not with CUDA graphs (a replayed graph
    computes them anyway, without launch cost) or under torch.compile, and not for embeddings made under
    ``torch.inference_mode`` (they keep no version counter, so a change in place could not be
    seen; ``torch.no_grad``, which diffusers' pipelines use, is fine). Made without a context it
    is unbound, as ``PatchSelfAttnProcessor``."""

    def __init__(self, context: Optional[PatchContext] = None, path: str = "") -> None:
        self.patch_context = context
        self.patch_path = path
        self._cache: Optional[Tuple[Tuple, torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.computed = 0  # how many times the keys and values were computed (tests, benchmarks)

    def _fingerprint(self, attn, encoder_hidden_states: torch.Tensor) -> Tuple:
        t = encoder_hidden_states
        return (
            self.patch_context.generation,
            t.data_ptr(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
            t._version,
            attn.to_k.weight._version,
            attn.to_v.weight._version,
        )

    def _keys_values(self, attn, encoder_hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx = self.patch_context
        # An inference-mode tensor has no version counter: a change in place would go unseen.
        cacheable = (
            ctx.active
            and not ctx.static_buffers
            and not torch.compiler.is_compiling()  # a compiled step computes them, as a graph does
            and not encoder_hidden_states.is_inference()
        )
        fingerprint = self._fingerprint(attn, encoder_hidden_states) if cacheable else None
        if fingerprint is not None and self._cache is not None and self._cache[0] == fingerprint:
            return self._cache[2], self._cache[3]
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        if torch.compiler.is_compiling():  # a counter read in the trace would guard each step on it
            return key, value
        self.computed += 1
        # The embeddings are held with their keys and values: their memory stays theirs.
        self._cache = None if fingerprint is None else (fingerprint, encoder_hidden_states, key, value)
        return key, value

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
        _require_bound(self)
        tokens = _Tokens(attn, hidden_states)
        query = attn.to_q(tokens.hidden)
        if encoder_hidden_states is None:  # used as a self-attention: nothing to cache
            key, value = attn.to_k(tokens.hidden), attn.to_v(tokens.hidden)
        else:
            key, value = self._keys_values(attn, encoder_hidden_states)
        return tokens.finish(_attend(attn, query, key, value, tokens.mask(attention_mask, key.shape[1])))


class _Tokens:
    """An attention's input as ``(B, L, C)`` tokens (a ``(B, C, H, W)`` map flattened, the
    attention's own group norm applied), and the way back to its output, as ``AttnProcessor2_0``."""

    def __init__(self, attn, hidden_states: torch.Tensor) -> None:
        self.attn = attn
        self.residual = hidden_states
        self.map_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if self.map_shape is not None:
            batch, channels, height, width = self.map_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self.hidden = hidden_states

    def mask(self, attention_mask: Optional[torch.Tensor], key_length: int) -> Optional[torch.Tensor]:
        """``attention_mask`` as scaled-dot-product attention takes it: (B, heads, 1 or L, keys)."""
        if attention_mask is None:
            return None
        batch = self.hidden.shape[0]
        attention_mask = self.attn.prepare_attention_mask(attention_mask, key_length, batch)
        return attention_mask.view(batch, self.attn.heads, -1, attention_mask.shape[-1])

    def finish(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if self.map_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(self.map_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + self.residual
        return hidden_states / attn.rescale_output_factor


class _Heads:
    """``(B, L, inner)`` projections as ``(B, heads, L, d)`` (the attention's query/key norms
    applied), and the way back through the output projection, as ``AttnProcessor2_0``."""

    def __init__(self, attn, batch: int, inner: int) -> None:
        self.attn = attn
        self.batch = batch
        self.head_dim = inner // attn.heads

    def _split(self, projection: torch.Tensor) -> torch.Tensor:
        return projection.reshape(self.batch, -1, self.attn.heads, self.head_dim).transpose(1, 2)

    def query(self, query: torch.Tensor) -> torch.Tensor:
        query = self._split(query)
        return query if self.attn.norm_q is None else self.attn.norm_q(query)

    def key(self, key: torch.Tensor) -> torch.Tensor:
        key = self._split(key)
        return key if self.attn.norm_k is None else self.attn.norm_k(key)

    def value(self, value: torch.Tensor) -> torch.Tensor:
        return self._split(value)

    def project_out(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, heads, L, d)`` -> ``(B, L, inner)`` -> the output projection (and its dropout)."""
        attn = self.attn
        hidden_states = hidden_states.transpose(1, 2).reshape(self.batch, -1, attn.heads * self.head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _attend(attn, query, key, value, attention_mask) -> torch.Tensor:
    """Multi-head scaled-dot-product attention of ``(B, L, inner)`` projections, then the output
    projection (and its dropout)."""
    heads = _Heads(attn, query.shape[0], key.shape[-1])
    hidden_states = F.scaled_dot_product_attention(
        heads.query(query),
        heads.key(key),
        heads.value(value),
        attn_mask=attention_mask,
        dropout_p=0.0,
        is_causal=False,
    )
    return heads.project_out(hidden_states.to(query.dtype))


def _bands_to_sequence(gathered: torch.Tensor, lengths: Tuple[int, ...]) -> torch.Tensor:
    """(bands, B, tallest, inner), band ``b``'s tokens first ``lengths[b]`` of its slot ->
    (B, sum(lengths), inner); a view when B == 1 and the bands are equal."""
    bands, batch, tallest, inner = gathered.shape
    if all(length == tallest for length in lengths):
        return gathered.transpose(0, 1).reshape(batch, bands * tallest, inner)
    return torch.cat([gathered[b, :, :length] for b, length in enumerate(lengths)], dim=1)
