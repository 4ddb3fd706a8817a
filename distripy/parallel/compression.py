"""The self-attention's stale keys and values sent compressed (``DistriConfig.compress``).

A stale step of the uncompressed exchange all-gathers every band's keys and values into a fresh
buffer for the next step. Compressed, each rank keeps one buffer of the whole image's keys and
values across the steps of a generation, ``(B, bands, tallest, 2 x inner)`` as the uncompressed
gathered buffer, whose slots of the other bands are what it attends over:

* the last warm-up step's all-gather (full precision) fills it: every rank starts from the exact
  keys and values, and a sender keeps its own band's as the baseline its receivers hold;
* each stale step, before it attends, decodes the packed buffers the other ranks sent at the end of
  the previous step into their slots (``residual``: the change added to the slot, which is that
  band's baseline; ``fp8``: the values written over it), then writes its own fresh keys and values
  into its own slot; at its checkpoint it encodes its band (``residual``: against its baseline,
  which the encoder updates as the receivers' decoders will) and all-gathers the packed bytes, one
  transfer per step and module.

Sender and receivers apply the same change with the same function, so the baselines stay
bit-identical (``kernels.residual_codec``). A row the encoder finds non-finite is sent marked and
left as it was on both sides: the baseline is never poisoned. The marked rows are counted on the
device (``PatchContext.count_nonfinite``), and the generation's end raises, on every rank, when
any was (``PatchUNetForward.check_nonfinite``): the model made non-finite keys and values, so its
image is not to be trusted. A packed buffer whose row scales
are all marked decodes to no change: the first stale step decodes such a buffer, so every stale
step runs the same code (one compiled trace, one CUDA graph per parity).

The buffers are one set per module (no per-parity pair): the baselines are updated in place, the
packed ones are written after the transfer that read them was waited for.
"""

from typing import Optional, Tuple

import torch

from distripy.errors import ConfigError
from distripy.kernels.fp8_codec import fp8_decode_, fp8_encode_, fp8_layout
from distripy.kernels.residual_codec import nonfinite_rows, residual_decode_, residual_encode_, residual_layout

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
    is the module (a ``PatchState``: it keeps the exchange), ``ctx`` its ``PatchContext``."""

    def __init__(self, codec: ExchangeCodec, state, ctx, lengths: Tuple[int, ...], width: int) -> None:
        self.codec = codec
        self.state = state
        self.ctx = ctx
        self.lengths = lengths
        self.width = width
        self.slot_bytes = codec.nbytes(max(lengths), width)

    def _packed_buffers(self, batch: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """What this rank sends, ``(B, slot_bytes)``, and receives, ``(bands, B, slot_bytes)``."""
        ctx, uint8 = self.ctx, torch.uint8
        send = ctx.new_buffer(self.state, "packed_send", (batch, self.slot_bytes), like, per_parity=False, dtype=uint8)
        received = ctx.new_buffer(
            self.state, "packed_received", (ctx.band_count, batch, self.slot_bytes), like, per_parity=False, dtype=uint8
        )
        return send, received

    def keep_warm(self, works, gathered: torch.Tensor) -> None:
        """After a synchronous step's full-precision all-gather into ``gathered``: keep it as the
        baselines, this band's slot copied as the sender's own, and a received buffer that decodes
        to no change (every row scale a NaN, the marker of a row left as it was)."""
        ctx = self.ctx
        batch = gathered.shape[0]
        own = None
        if self.codec.residual:
            own = ctx.new_buffer(self.state, "own_baseline", gathered[:, 0].shape, gathered, per_parity=False)
            own.copy_(gathered[:, ctx.band_index])
        _, received = self._packed_buffers(batch, gathered)
        received.fill_(255)  # 0xFFFFFFFF: a NaN in every row scale
        # one handle (completed), as a stale step keeps one: the same structure for a compiled step
        self.state.keep_exchange(works[-1:], gathered, own, received)

    def stale_step(self, projected) -> torch.Tensor:
        """A stale step's gathered buffer: the other bands' slots updated with what they sent at
        the end of the last step, this band's holding ``projected`` (its fresh keys and values);
        the encode and all-gather of this band's queued for the next checkpoint."""
        ctx, codec, backend = self.ctx, self.codec, self.ctx.kernel_backend
        gathered, own, received = self.state.take_stale()
        if torch.is_grad_enabled() and projected.key.requires_grad:
            # the previous step's attention saved views of it for its backward: update a copy
            gathered = gathered.clone()
        batch = gathered.shape[0]
        for band, length in enumerate(self.lengths):
            if band == ctx.band_index:
                continue
            size = codec.nbytes(length, self.width)
            for item in range(batch):
                codec.decode(received[band, item, :size], gathered[item, band, :length], backend)
        mine = self.lengths[ctx.band_index]
        slot = gathered[:, ctx.band_index]
        projected.write_into(slot[:, :mine])
        send, received_next = self._packed_buffers(batch, gathered)
        size = codec.nbytes(mine, self.width)

        def issue() -> None:
            for item in range(batch):
                baseline = None if own is None else own[item, :mine]
                codec.encode(slot[item, :mine], baseline, send[item, :size], backend)
            ctx.count_nonfinite(nonfinite_rows(send[:, :size], mine))
            work = ctx.comm.all_gather(send, received_next)
            self.state.keep_exchange([work], gathered, own, received_next)

        ctx.defer(issue)
        return gathered
