"""The self-attention's keys and values sent compressed (``DistriConfig.compress``): the stale
exchanges of the asynchronous modes (below), and the fresh ones of ``full_sync`` and ``exact``
after their warm-up (at the end).

A stale step of the uncompressed exchange all-gathers every band's keys and values into a fresh
buffer for the next step (two whole-image buffers per module under CUDA graphs, one per step
parity). Compressed, a step attends over the other bands' keys and values as decoded from what
they sent at the end of the previous step, and sends its own at its checkpoint, one all-gather of
packed bytes per step and module:

* ``fp8``: each band's values (e4m3, a scale per row). Each rank keeps one buffer of the whole
  image's keys and values, ``(B, bands, tallest, 2 x inner)`` as the uncompressed gathered buffer:
  the last warm-up step's all-gather (full precision) fills it, and each stale step decodes the
  other bands' bytes over their slots and writes its own fresh keys and values into its own.
* ``residual2`` / ``residual1``: each band's change since the last step, 2 or 1 bits an element
  with a scale per row and per column, against a baseline its receivers hold (error feedback:
  what one step's quantisation leaves out, the next step's residual carries). The baselines are
  the only keys and values a rank keeps, and it keeps them **in fp8** (``store``: every band's,
  its own among them, one packed fp8 buffer each): a stale step decodes each other band's
  baseline into a buffer of the step, adds the change that band sent and stores the sum back in
  fp8 (one kernel, ``kernels.residual_fp8_decode``); at its checkpoint it decodes its own baseline, encodes its fresh keys and values against it
  (which adds the change to it, as the receivers will) and stores it back. So the whole image's
  keys and values are never kept at full precision: what a rank keeps is about half of the
  uncompressed exchange's one set, and under CUDA graphs a quarter of its two. The last warm-up
  step's full-precision keys and values, stored in fp8, are the first baselines.

Sender and receivers apply the same change with the same functions to the same bytes, so the
baselines stay bit-identical (``kernels.residual_codec``, ``kernels.fp8_codec``). A row the encoder
finds non-finite is sent marked and left as it was on both sides: the baseline is never poisoned.
The marked rows are counted on the device (``PatchContext.count_nonfinite``), and the generation's
end raises, on every rank, when any was (``PatchUNetForward.check_nonfinite``): the model made
non-finite keys and values, so its image is not to be trusted. A packed buffer whose row scales
are all marked decodes to no change: the first stale step decodes such a buffer, so every stale
step runs the same code (one compiled trace, one CUDA graph per parity).

The buffers are one set per module (no per-parity pair): the baselines are updated in place, the
packed ones are written after the transfer that read them was waited for.

Fresh exchanges (``full_sync``, ``exact``; ``step_policy.compressed``: every step after the
warm-up) send this step's keys and values packed and wait for them within the step: ``full_sync``
all-gathers every band's packed bytes and decodes the other bands' into a gathered buffer of the
step (``fresh_gather``); ``exact`` shifts its packed block around the ring and decodes each block
as it arrives, before its attention and merge (``encode_block``, ``decode_block``). A band
attends over its own keys and values at full precision and over the others' as decoded, so the
result no longer equals one device. fp8 keeps nothing across steps. A residual codec keeps every
band's baseline in fp8 as in a stale exchange, filled by each warm-up step's full-precision
exchange (``keep_baselines``, ``store_block``) and updated by every compressed step; its packed
bytes are the step's own.
"""

from typing import Optional, Tuple

import torch

from distripy.errors import ConfigError
from distripy.kernels.fp8_codec import fp8_decode_, fp8_encode_, fp8_layout
from distripy.kernels.residual_codec import nonfinite_rows, residual_decode_, residual_encode_, residual_layout
from distripy.kernels.residual_fp8_decode import residual_fp8_decode_

__all__ = ["CompressedKeysValues", "ExchangeCodec", "codec_for"]

_RESIDUAL_BITS = {"residual2": 2, "residual1": 1}


class ExchangeCodec:
    """One of ``config.EXCHANGE_CODECS`` other than ``none``, as the exchange uses it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bits: Optional[int] = _RESIDUAL_BITS.get(name)
        if self.bits is None and name != "fp8":
            raise ConfigError(f"compress={name!r}: no exchange codec of that name")

    @property
    def residual(self) -> bool:
        """Whether it sends a change against a baseline the sender keeps (else the values)."""
        return self.bits is not None

    def nbytes(self, rows: int, cols: int) -> int:
        """The packed size of a ``rows x cols`` tensor."""
        if self.residual:
            return residual_layout(rows, cols, self.bits).nbytes
        return fp8_layout(rows, cols).nbytes

    def encode(self, x: torch.Tensor, baseline: Optional[torch.Tensor], packed: torch.Tensor, backend: str) -> None:
        if self.residual:
            residual_encode_(x, baseline, packed, self.bits, backend=backend)
        else:
            fp8_encode_(x, packed, backend=backend)

    def decode(self, packed: torch.Tensor, slot: torch.Tensor, backend: str) -> None:
        """Into ``slot``: the change added to it (residual), or the values written over it (fp8)."""
        if self.residual:
            residual_decode_(packed, slot, self.bits, backend=backend)
        else:
            fp8_decode_(packed, slot, backend=backend)


_CODECS = {name: ExchangeCodec(name) for name in ("fp8", *_RESIDUAL_BITS)}


def codec_for(name: str) -> Optional[ExchangeCodec]:
    """The codec of ``DistriConfig.compress`` (None for ``none``)."""
    if name == "none":
        return None
    if name not in _CODECS:
        raise ConfigError(f"compress={name!r}: no exchange codec of that name")
    return _CODECS[name]


class CompressedKeysValues:
    """The compressed stale exchange of one self-attention module (module docstring). ``state``
    is the module (a ``PatchState``: it keeps the exchange), ``ctx`` its ``PatchContext``.

    What the module keeps (``state.exchange.buffers``): ``(gathered, None, received)`` for
    ``fp8`` (the whole image's keys and values, what was received); ``(None, store, received)``
    for a residual codec (every band's baseline in fp8, ``(bands, B, store_bytes)``)."""

    def __init__(self, codec: ExchangeCodec, state, ctx, lengths: Tuple[int, ...], width: int) -> None:
        self.codec = codec
        self.state = state
        self.ctx = ctx
        self.lengths = lengths
        self.width = width
        self.slot_bytes = codec.nbytes(max(lengths), width)
        self.store_bytes = fp8_layout(max(lengths), width).nbytes

    @property
    def keeps_gathered(self) -> bool:
        """Whether the whole image's keys and values are kept across steps (``fp8``) or only the
        baselines, in fp8 (a residual codec): then a synchronous step's gathered buffer is one of
        the step's own, not kept."""
        return not self.codec.residual

    def _backend(self) -> str:
        """The codecs' kernels: the patch layer's, except the Triton ops (opaque to inductor)
        while torch.compile traces a step on a GPU: the references' ``float8_e4m3fn`` casts would
        become Triton fp8 types, which do not compile for sm_80; the Triton codecs use integer
        arithmetic. On a CPU (and ``meta``) the references run either way."""
        return "auto" if torch.compiler.is_compiling() else self.ctx.kernel_backend

    def _store(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Every band's baseline, fp8-packed: ``(bands, B, store_bytes)``."""
        shape = (self.ctx.band_count, batch, self.store_bytes)
        return self.ctx.new_buffer(self.state, "baselines_fp8", shape, like, per_parity=False, dtype=torch.uint8)

    def _store_slot(self, store: torch.Tensor, band: int, item: int, rows: int) -> torch.Tensor:
        return store[band, item, : fp8_layout(rows, self.width).nbytes]

    def _packed_buffers(self, batch: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """What this rank sends, ``(B, slot_bytes)``, and receives, ``(bands, B, slot_bytes)``."""
        ctx, uint8 = self.ctx, torch.uint8
        send = ctx.new_buffer(self.state, "packed_send", (batch, self.slot_bytes), like, per_parity=False, dtype=uint8)
        received = ctx.new_buffer(
            self.state, "packed_received", (ctx.band_count, batch, self.slot_bytes), like, per_parity=False, dtype=uint8
        )
        return send, received

    def keep_warm(self, works, gathered: torch.Tensor) -> None:
        """After a synchronous step's full-precision all-gather into ``gathered``: keep it (fp8),
        or every band's slot stored in fp8 as its baseline (a residual codec), and a received
        buffer that decodes to no change (every row scale a NaN, the marker of a row left as it
        was)."""
        batch = gathered.shape[0]
        store = self._store_gathered(gathered) if self.codec.residual else None
        _, received = self._packed_buffers(batch, gathered)
        received.fill_(255)  # 0xFFFFFFFF: a NaN in every row scale
        # one handle (completed), as a stale step keeps one: the same structure for a compiled step
        kept = gathered if self.keeps_gathered else None
        self.state.keep_exchange(works[-1:], kept, store, received)

    def stale_step(self, projected) -> torch.Tensor:
        """A stale step's gathered buffer: the other bands' slots updated with what they sent at
        the end of the last step, this band's holding ``projected`` (its fresh keys and values);
        the encode and all-gather of this band's queued for the next checkpoint."""
        ctx = self.ctx
        gathered, store, received = self.state.take_stale()
        batch = received.shape[1]
        if store is not None:  # this step's keys and values, from the baselines (fp8) below
            gathered = projected.key.new_empty((batch, ctx.band_count, max(self.lengths), self.width))
        elif torch.is_grad_enabled() and projected.key.requires_grad:
            # the previous step's attention saved views of it for its backward: update a copy
            gathered = gathered.clone()
        for band, length in enumerate(self.lengths):
            if band != ctx.band_index:
                self._receive(received[band], band, gathered[:, band, :length], store)
        mine = self.lengths[ctx.band_index]
        slot = gathered[:, ctx.band_index]
        projected.write_into(slot[:, :mine])
        send, received_next = self._packed_buffers(batch, gathered)

        def issue() -> None:
            self._send(slot[:, :mine], store, send)
            work = ctx.comm.all_gather(send, received_next)
            kept = gathered if self.keeps_gathered else None
            self.state.keep_exchange([work], kept, store, received_next)

        ctx.defer(issue)
        return gathered

    # -- fresh exchanges (full_sync, exact) ---------------------------------------------------------

    def keep_baselines(self, gathered: torch.Tensor) -> None:
        """After a ``full_sync`` warm-up step's full-precision all-gather into ``gathered``: a
        residual codec stores every band's slot in fp8, the baselines of the compressed steps to
        come (fp8 keeps nothing: a fresh exchange sends the values)."""
        if self.codec.residual:
            self._keep_store(self._store_gathered(gathered))

    def fresh_gather(self, projected) -> torch.Tensor:
        """A compressed ``full_sync`` step's gathered buffer, ``(B, bands, tallest, width)``: this
        band's slot holding ``projected`` at full precision, the others' decoded from one
        all-gather of packed bytes, waited for here (a residual codec: their baselines plus the
        change, stored back)."""
        ctx = self.ctx
        store = self._kept_store()
        batch = projected.batch
        gathered = projected.key.new_empty((batch, ctx.band_count, max(self.lengths), self.width))
        mine = self.lengths[ctx.band_index]
        projected.write_into(gathered[:, ctx.band_index, :mine])
        send = gathered.new_empty((batch, self.slot_bytes), dtype=torch.uint8)
        received = gathered.new_empty((ctx.band_count, batch, self.slot_bytes), dtype=torch.uint8)
        self._send(gathered[:, ctx.band_index, :mine], store, send)
        ctx.comm.all_gather(send, received).wait()
        for band, length in enumerate(self.lengths):
            if band != ctx.band_index:
                self._receive(received[band], band, gathered[:, band, :length], store)
        self._keep_store(store)
        return gathered

    def block_store(self, block: torch.Tensor) -> Optional[torch.Tensor]:
        """An ``exact`` step's baselines (a residual codec; None for fp8): a warm-up step's to fill
        (``store_block``, one band at a time as its block arrives), a compressed step's as the last
        step left them. ``block``: this band's keys and values, ``(B, tallest, width)``."""
        if not self.codec.residual:
            return None
        store = self._store(block.shape[0], block) if not self.ctx.compressed_step else self._kept_store()
        self._keep_store(store)
        return store

    def store_block(self, store: torch.Tensor, band: int, block: torch.Tensor) -> None:
        """An ``exact`` warm-up step of a residual codec: band ``band``'s full-precision keys and
        values, ``(B, >= rows, width)``, stored as its baseline."""
        self._store_band(store, band, block[:, : self.lengths[band]])

    def encode_block(self, block: torch.Tensor, store: Optional[torch.Tensor]) -> torch.Tensor:
        """A compressed ``exact`` step: this band's keys and values, ``(B, tallest, width)``,
        packed for the ring shifts, ``(B, slot_bytes)`` (a residual: against its baseline, updated
        as the receivers will update theirs)."""
        send = block.new_empty((block.shape[0], self.slot_bytes), dtype=torch.uint8)
        self._send(block[:, : self.lengths[self.ctx.band_index]], store, send)
        return send

    def decode_block(self, packed: torch.Tensor, band: int, store: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """A compressed ``exact`` step: band ``band``'s keys and values, ``(B, rows, width)``,
        decoded from what it shifted here, ``packed`` (``(B, slot_bytes)``)."""
        values = like.new_empty((packed.shape[0], self.lengths[band], self.width))
        self._receive(packed, band, values, store)
        return values

    # -- the codec's work, per band ------------------------------------------------------------------

    def _send(self, values: torch.Tensor, store: Optional[torch.Tensor], send: torch.Tensor) -> None:
        """This band's ``values`` (``(B, rows, width)``) encoded into ``send`` (``(B, slot_bytes)``),
        a residual's against its own baseline in ``store`` (decoded, updated as the receivers will
        update theirs, stored back); its non-finite rows counted (the generation raises)."""
        ctx, codec, backend = self.ctx, self.codec, self._backend()
        rows = values.shape[1]
        size = codec.nbytes(rows, self.width)
        for item in range(values.shape[0]):
            baseline = None
            if store is not None:
                baseline = values.new_empty((rows, self.width))
                fp8_decode_(self._store_slot(store, ctx.band_index, item, rows), baseline, backend)
            codec.encode(values[item], baseline, send[item, :size], backend)
            if store is not None:
                fp8_encode_(baseline, self._store_slot(store, ctx.band_index, item, rows), backend)
        ctx.count_nonfinite(nonfinite_rows(send[:, :size], rows))

    def _receive(self, packed: torch.Tensor, band: int, values: torch.Tensor, store: Optional[torch.Tensor]) -> None:
        """Band ``band``'s keys and values into ``values`` (``(B, rows, width)``) from ``packed``
        (``(B, >= its bytes)``): fp8 written over them; a residual's change added to the band's
        baseline in ``store`` (decoded into ``values``), and the sum stored back, as the sender
        stores its own."""
        codec, backend = self.codec, self._backend()
        rows = values.shape[1]
        size = codec.nbytes(rows, self.width)
        for item in range(values.shape[0]):
            if store is not None:  # the three steps in one kernel (kernels.residual_fp8_decode)
                slot = self._store_slot(store, band, item, rows)
                residual_fp8_decode_(packed[item, :size], slot, values[item], codec.bits, backend)
            else:
                codec.decode(packed[item, :size], values[item], backend)

    def _store_band(self, store: torch.Tensor, band: int, values: torch.Tensor) -> None:
        """Band ``band``'s full-precision ``values`` (``(B, rows, width)``) as its baseline, stored
        finite (a non-finite value as 0, so that no baseline row is ever marked: a marked row
        would decode to whatever a step's buffer held); this band's non-finite rows counted."""
        backend = self._backend()
        if band == self.ctx.band_index:
            self.ctx.count_nonfinite((~torch.isfinite(values)).any(dim=-1).sum())  # the generation raises
        for item in range(values.shape[0]):
            clean = torch.nan_to_num(values[item], nan=0.0, posinf=0.0, neginf=0.0)
            fp8_encode_(clean, self._store_slot(store, band, item, values.shape[1]), backend)

    def _store_gathered(self, gathered: torch.Tensor) -> torch.Tensor:
        """Every band's slot of a full-precision all-gather stored as its baseline."""
        store = self._store(gathered.shape[0], gathered)
        for band, length in enumerate(self.lengths):
            self._store_band(store, band, gathered[:, band, :length])
        return store

    def _keep_store(self, store: Optional[torch.Tensor]) -> None:
        """A fresh exchange's baselines, kept for the next step (nothing in flight)."""
        if store is not None:
            self.state.keep_exchange((), None, store, None)

    def _kept_store(self) -> Optional[torch.Tensor]:
        """The baselines a fresh exchange's last step left (a residual codec; None for fp8)."""
        if not self.codec.residual:
            return None
        _, store, _ = self.state.take_stale()
        return store
