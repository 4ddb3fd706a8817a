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
  behind the blocks already received. With a codec (``parallel.compression``), after the warm-up,
  full_sync's all-gather and exact's shifts carry packed bytes, decoded before they are attended
  over.
* ``PatchCrossAttnProcessor``: cross-attention, local to the band. Its keys and values depend on
  the prompt embeddings only, which do not change during a generation: they are computed once per
  generation and reused while the embeddings are the same tensor, unmodified (same storage, shape,
  strides and version counter; the cache holds the tensor, so its memory cannot be reused by
  another while cached), and recomputed otherwise. Under CUDA graphs they live in a persistent
  buffer that the graphs read; a step whose conditioning may have changed
  (``PatchContext.refresh_conditioning``, decided on the host by the UNet wrapper) computes them
  into it again.

How the self-attention's keys and values travel, so that a step makes one copy of them:

* One projection: ``to_q``, ``to_k`` and ``to_v`` of the same input run as one GEMM over their
  stacked weights (``FusedProjection``). The stacked weight is the only copy: the three layers'
  weights become views of it (same values, no extra memory). A layer replaced or wrapped since (a
  LoRA's layer, a weight assigned anew) is seen, and the three run apart until they are plain again.
* Keys and values side by side, batch-major: the gathered buffer is ``(B, bands, tallest, 2 x
  inner)``, filled by one all-gather per batch item (in one ``group()``), so that for equal bands
  the image's sequence of keys (values) is a view of it: ``(B, bands x tallest, inner)`` with rows
  ``2 x inner`` apart, which scaled-dot-product attention reads in place. The band's own keys and
  values are written once, into its own slot of the buffer it attends over; a stale step sends them
  from there (the buffer is this module's alone until its next step).
* Bands of unequal height travel padded to the tallest; their sequence is cut out of the padded
  slots (one copy).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from distripy.errors import InputError, StepError
from distripy.kernels import attention_with_lse, merge_partial_
from distripy.parallel.bands import pad_to
from distripy.parallel.compression import CompressedKeysValues, codec_for
from distripy.parallel.context import ActivationExchange, PatchContext, PatchState
from distripy.parallel.projection import FusedProjection, KeysValues

__all__ = ["SHIFT_LAUNCH_BYTES", "PatchCrossAttnProcessor", "PatchSelfAttnProcessor"]

SHIFT_LAUNCH_BYTES = 8 << 20
"""The fewest bytes one launch of ``exact``'s ring shifts carries: consecutive shifts go out as one
``group()`` until they do. A small transfer costs a launch's latency more than its bytes, and the
attention of one band's small block is too short to hide a latency per band (the planner's fabric
profiles hold the launch latencies); large blocks go one per launch, each hidden behind the
block before it."""


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

    def _image_keys_values(self, projected: "KeysValues") -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every band, (B, image tokens, inner) each, in band (= image row) order:
        views of the gathered buffer for equal bands (module docstring)."""
        ctx = self.patch_context
        exchange = ctx.activation_exchange
        if exchange is ActivationExchange.NONE:
            return projected.key, projected.value
        own = projected.tokens
        lengths = ctx.band_sizes(own)
        tallest = max(lengths)
        batch, width = projected.batch, 2 * projected.inner
        like = projected.key
        compressed = self._compressed(ctx, lengths, width)
        if exchange is ActivationExchange.SYNC and compressed is not None and ctx.compressed_step:
            gathered = compressed.fresh_gather(projected)  # full_sync after its warm-up
        elif exchange is ActivationExchange.SYNC:
            # Under CUDA graphs: the keys and values a compressed exchange's stale steps update in
            # place are one buffer for both step parities (whichever parity the warm-up ends on,
            # the stale steps' graphs read the buffer it wrote); what is sent is read within the
            # step. A residual codec keeps only fp8 baselines: both are the step's own.
            in_place = compressed is not None and ctx.keeps_activations
            shape = (batch, ctx.band_count, tallest, width)
            if in_place and not compressed.keeps_gathered:  # only fp8 baselines are kept: the step's own
                gathered, send = like.new_empty(shape), like.new_empty((batch, tallest, width))
            else:
                gathered = ctx.new_buffer(self, "keys_values", shape, like, per_parity=not in_place)
                send = ctx.new_buffer(self, "send", (batch, tallest, width), like, per_parity=False)
            projected.write_into(send[:, :own])
            with ctx.comm.group():
                works = [ctx.comm.all_gather(send[item], gathered[item]) for item in range(batch)]
            for work in works:
                work.wait()
            if ctx.keeps_activations and compressed is not None:  # the baselines of the stale steps
                compressed.keep_warm(works, gathered)
            elif ctx.keeps_activations:  # for a stale step to come
                self.keep_exchange(works, gathered)
            elif compressed is not None:  # full_sync's warm-up: a residual's first baselines
                compressed.keep_baselines(gathered)
        elif exchange is ActivationExchange.STALE and compressed is not None:
            gathered = compressed.stale_step(projected)
        elif exchange is ActivationExchange.STALE:
            (gathered,) = self.take_stale()
            if torch.is_grad_enabled() and projected.key.requires_grad:
                # the previous step's attention saved views of it for its backward: write a copy
                gathered = gathered.clone()
            # The stale buffer is this module's alone: its own slot takes this step's keys and
            # values, and is what this step sends, at the next checkpoint, for the next step.
            send = gathered[:, ctx.band_index]
            projected.write_into(send[:, :own])
            fresh = ctx.new_buffer(self, "keys_values", gathered.shape, like)

            def issue() -> None:
                works = [ctx.comm.all_gather(send[item], fresh[item]) for item in range(batch)]
                self.keep_exchange(works, fresh)

            ctx.defer(issue)
        else:
            raise AssertionError(f"unhandled activation exchange {exchange!r}")
        sequence = _bands_to_sequence(gathered, lengths)
        return sequence[..., : projected.inner], sequence[..., projected.inner :]

    def _compressed(self, ctx: PatchContext, lengths: Tuple[int, ...], width: int) -> Optional[CompressedKeysValues]:
        """The compressed exchange of this module's keys and values, if ``compress`` asks for one
        (``parallel.compression``)."""
        codec = codec_for(ctx.compress)
        return None if codec is None else CompressedKeysValues(codec, self, ctx, lengths, width)

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
        query, projected = self._project(attn, tokens.hidden)
        mask = tokens.mask(attention_mask, projected.tokens)  # only unpatched: patched refuses masks
        if patched and ctx.activation_exchange is ActivationExchange.OVERLAPPED:
            return tokens.finish(self._blockwise(attn, query, projected))
        key, value = self._image_keys_values(projected) if patched else (projected.key, projected.value)
        return tokens.finish(_attend(attn, query, key, value, mask))

    def _project(self, attn, hidden: torch.Tensor) -> Tuple[torch.Tensor, "KeysValues"]:
        """The query and the keys/values of ``hidden``: one GEMM when the projections are fused
        (diffusers' ``fuse_projections``, or this processor's ``FusedProjection``)."""
        if getattr(attn, "fused_projections", False):
            qkv = attn.to_qkv(hidden)
        else:
            fused = self._fused_projection(attn)
            if fused is None:
                return attn.to_q(hidden), KeysValues(attn.to_k(hidden), attn.to_v(hidden))
            qkv = fused(hidden)
        inner = qkv.shape[-1] // 3
        return qkv[..., :inner], KeysValues.side_by_side(qkv[..., inner:])

    def _fused_projection(self, attn) -> Optional["FusedProjection"]:
        """The processor's fused q/k/v projection of ``attn`` if it still holds, made (again) when
        the three layers allow it; None to run them apart. Not checked while torch.compile traces
        (a traced step runs what the eager checks decided) and not made during a CUDA-graph capture
        (its eager step before made it)."""
        fused = getattr(self, "_fused", None)
        layers = (attn.to_q, attn.to_k, attn.to_v)
        if torch.is_grad_enabled() and any(p.requires_grad for layer in layers for p in layer.parameters()):
            return None  # the stacked weight is no leaf of autograd: the layers' own GEMMs then
        if torch.compiler.is_compiling():
            # the eager checks decided; that the layers are still these is guarded on in the trace
            same = fused is not None and all(a is b for a, b in zip(layers, fused.layers))
            return fused if same else None
        if fused is not None and fused.holds(attn):
            return fused
        self._fused = None
        ctx = self.patch_context
        if ctx is not None and ctx.capturing:
            return None
        self._fused = FusedProjection.of(attn)
        return self._fused

    def unfuse(self) -> None:
        """Give the layers of the fused projection weights of their own again (copies of their
        views of the stacked weight), as they were before it: for ``unparallelize``."""
        fused, self._fused = getattr(self, "_fused", None), None
        if fused is not None:
            fused.unfuse()

    def _blockwise(self, attn, query: torch.Tensor, projected: "KeysValues") -> torch.Tensor:
        """The overlapped step's attention (module docstring): one shift per other band (grouped
        into launches of ``SHIFT_LAUNCH_BYTES``), every one issued before any block is computed;
        block ``d`` (band ``index - d``'s) merged once it is in."""
        ctx = self.patch_context
        backend = ctx.kernel_backend
        inner = projected.inner
        key, value = projected.key, projected.value
        lengths = ctx.band_sizes(projected.tokens)
        # One transfer per band for both; unequal bands travel padded to the tallest.
        block = pad_to(projected.block(), max(lengths), dim=1)
        compressed = self._compressed(ctx, lengths, 2 * inner)
        packed = compressed is not None and ctx.compressed_step  # bytes travel, decoded as they arrive
        store = None if compressed is None else compressed.block_store(block)  # a residual's baselines
        if packed:
            sent = compressed.encode_block(block, store)
            received = [sent.new_empty(sent.shape) for _ in range(1, ctx.band_count)]
        else:
            sent = block
            received = [ctx.new_buffer(self, f"block{d}", block.shape, block) for d in range(1, ctx.band_count)]
        per_launch = max(1, SHIFT_LAUNCH_BYTES // max(1, sent.numel() * sent.element_size()))
        works = []
        for first in range(0, len(received), per_launch):
            with ctx.comm.group():
                works += [
                    ctx.comm.shift(sent, received[d - 1], d)
                    for d in range(first + 1, min(first + per_launch, len(received)) + 1)
                ]
        if store is not None and not packed:  # a residual's warm-up: every band's keys and values its baseline
            compressed.store_block(store, ctx.band_index, block)
        heads = _Heads(attn, query.shape[0], inner)
        q = heads.query(query)
        out, lse = attention_with_lse(q, heads.key(key), heads.value(value), backend=backend)
        accumulate = torch.float64 if query.dtype == torch.float64 else torch.float32
        out, lse = out.to(accumulate), lse.to(accumulate)  # merged in fp32, rounded once at the end
        for distance, (work, buffer) in enumerate(zip(works, received), start=1):
            work.wait()
            source = (ctx.band_index - distance) % ctx.band_count
            if packed:
                buffer = compressed.decode_block(buffer, source, store, block)
            elif store is not None:
                compressed.store_block(store, source, buffer)
            block_key, block_value = buffer[:, : lengths[source]].split(inner, dim=-1)
            block_out, block_lse = attention_with_lse(
                q, heads.key(block_key), heads.value(block_value), backend=backend
            )
            merge_partial_(out, lse, block_out, block_lse)
        return heads.project_out(out.to(query.dtype))


class PatchCrossAttnProcessor:
    """Cross-attention with its keys and values computed once per generation (module docstring).

    Eagerly, the cache is used inside a patch-parallel step only, not under torch.compile, and not
    for embeddings made under ``torch.inference_mode`` (they keep no version counter, so a change in
    place could not be seen; ``torch.no_grad``, which diffusers' pipelines use, is fine). Under CUDA
    graphs (``static_buffers``) they are kept in a persistent buffer instead, refreshed when the
    UNet wrapper says the conditioning may have changed. Made without a context it is unbound, as
    ``PatchSelfAttnProcessor``."""

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
        if ctx.active and ctx.static_buffers and not torch.compiler.is_compiling():
            return self._persistent_keys_values(attn, encoder_hidden_states)
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
        key, value = self._project_context(attn, encoder_hidden_states)
        if torch.compiler.is_compiling():  # a counter read in the trace would guard each step on it
            return key, value
        self.computed += 1
        # The embeddings are held with their keys and values: their memory stays theirs.
        self._cache = None if fingerprint is None else (fingerprint, encoder_hidden_states, key, value)
        return key, value

    def _persistent_keys_values(self, attn, encoder_hidden_states: torch.Tensor):
        """Under CUDA graphs: the keys and values in one persistent buffer that every graph of the
        input signature reads, computed into it when the step's conditioning may have changed
        (``PatchContext.refresh_conditioning``; a graph captured for such a step computes them on
        every replay), read as they are otherwise."""
        ctx = self.patch_context
        written = self.__dict__.setdefault("_persistent", {})  # input signature -> (shape, dtype, width)
        if ctx.refresh_conditioning:
            key, value = self._project_context(attn, encoder_hidden_states)
            shape = key.shape[:-1] + (key.shape[-1] + value.shape[-1],)
            both = ctx.new_buffer(self, "keys_values", shape, key, per_parity=False)
            both[..., : key.shape[-1]].copy_(key)
            both[..., key.shape[-1] :].copy_(value)
            self.computed += 1
            written[ctx.shape_key] = (tuple(shape), key.dtype, key.shape[-1])
        else:
            spec = written.get(ctx.shape_key)
            if spec is None:
                raise StepError(
                    f"{self.patch_path}: a step that reuses the cross-attention keys and values came "
                    "before any step of its input signature that computed them"
                )
            shape, dtype, width = spec
            # exactly the buffer the last computing step wrote (its shape and dtype)
            both = ctx.new_buffer(self, "keys_values", shape, encoder_hidden_states, per_parity=False, dtype=dtype)
        width = written[ctx.shape_key][2]
        return both[..., :width], both[..., width:]

    @staticmethod
    def _project_context(attn, encoder_hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        return attn.to_k(context), attn.to_v(context)

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
        if attn.rescale_output_factor != 1.0:  # a division by one is a kernel that changes nothing
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


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
        norm = getattr(self.attn, "norm_q", None)  # absent from attention modules without one
        return query if norm is None else norm(query)

    def key(self, key: torch.Tensor) -> torch.Tensor:
        key = self._split(key)
        norm = getattr(self.attn, "norm_k", None)
        return key if norm is None else norm(key)

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
    """(B, bands, tallest, width), band ``b``'s tokens first ``lengths[b]`` of its slot ->
    (B, sum(lengths), width); a view when the bands are equal."""
    batch, bands, tallest, width = gathered.shape
    if all(length == tallest for length in lengths):
        return gathered.view(batch, bands * tallest, width)
    return torch.cat([gathered[:, b, :length] for b, length in enumerate(lengths)], dim=1)
