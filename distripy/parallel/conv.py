"""``PatchConv2d``: a convolution (kernel > 1) over one band, with its neighbours' halo rows.

Synchronous step: the band's boundary rows are exchanged with the neighbours and waited for; the
output equals the full image's convolution on this band. Overlapped step (``exact``): the same
exchange is issued first; the output rows that read no halo row are computed while it is in
flight, then, once it has arrived, the boundary rows, into the same output tensor. Stale step:
the halos received during the previous step are used, and this step's boundary rows are sent for
the next step. At the image's top and bottom the halo is the convolution's zero padding; in
``naive_patch`` every band edge is. A convolution whose input is the band of a tensor every rank
holds whole (the model's first convolution, ``PatchContext.cut_band``) reads its halo rows from
that tensor instead: no exchange, exact in every step and mode but ``naive_patch``.

``forward(x, prologue)`` takes the *input of a GroupNorm* and that GroupNorm's ``GroupNormPrologue``
(from ``PatchGroupNorm.prologue``): the band is normalised (+ SiLU) as the convolution reads it
(``kernels.halo_conv``: into its halo-padded input on the cuDNN path, the default; in the main
loop of the experimental Triton one, ``DistriConfig.halo_conv_backend="triton"``), and so are the
boundary rows sent to the neighbours: in a stale step the same pass writes them
(``halo_conv2d``'s ``sends``); a synchronous step needs them before the convolution and normalises
them on their own. The result is that of ``conv(silu(norm(x)))``.
"""

from typing import Optional

import torch
import torch.nn as nn

from distripy.errors import BandGeometryError, UnsupportedModuleError
from distripy.kernels import GroupNormPrologue, halo_conv2d, halo_rows, interior_rows, write_sends
from distripy.parallel.adopt import adopt
from distripy.parallel.context import ActivationExchange, PatchContext, PatchState

__all__ = ["PatchConv2d", "conv_needs_halo", "check_conv"]


def conv_needs_halo(conv: nn.Conv2d) -> bool:
    """Whether the convolution reads more than one input row per output row (kernel > 1 along the
    height); a 1x1 (or 1xk) convolution works on a band as it is."""
    return conv.kernel_size[0] > 1


def check_conv(conv: nn.Conv2d, path: str) -> None:
    """Refuse a convolution whose output bands would not be the image's output bands."""
    if isinstance(conv.padding, str):
        raise UnsupportedModuleError(
            f"{path}: Conv2d with padding={conv.padding!r}; patch parallelism needs integer padding"
        )
    if conv.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"{path}: Conv2d with padding_mode={conv.padding_mode!r}; only zero padding is band-exact"
        )
    kernel, padding, stride, dilation = conv.kernel_size[0], conv.padding[0], conv.stride[0], conv.dilation[0]
    try:
        halo_rows(kernel, padding, stride, dilation)
    except ValueError as error:
        raise UnsupportedModuleError(f"{path}: {error}") from None


class PatchConv2d(nn.Conv2d, PatchState):
    """``nn.Conv2d`` over this rank's band; shares the original convolution's parameters. Its
    exchange: the (top, bottom) halo rows received for the next step."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, context: PatchContext, path: str) -> "PatchConv2d":
        check_conv(conv, path)
        module = adopt(cls, conv)
        module.attach(context, path)
        module.halo_top, module.halo_bottom = halo_rows(
            conv.kernel_size[0], conv.padding[0], conv.stride[0], conv.dilation[0]
        )
        return module

    def _halo_buffers(self, x: torch.Tensor, prologue: Optional[GroupNormPrologue], write: bool = True):
        """``(top_send, bottom_send, top_recv, bottom_recv)`` of an exchange of ``x``'s boundary rows
        (after the prologue, when there is one).

        The rank above needs this band's first ``halo_bottom`` rows as its bottom halo; the rank
        below its last ``halo_top`` rows as its top halo. The sends are tensors of their own: the
        transfer may leave later (at a checkpoint) and must not alias live activations. With
        ``write`` they are filled now; otherwise the convolution fills them as it reads the band
        (``halo_conv2d``'s ``sends``: on the cuDNN path, in the kernel that builds its input).
        """
        ctx = self.patch_context
        batch, channels, rows, width = x.shape
        first, last = ctx.band_index == 0, ctx.band_index == ctx.band_count - 1
        top_send = None if first else x.new_empty((batch, channels, self.halo_bottom, width))
        bottom_send = None if last else x.new_empty((batch, channels, self.halo_top, width))
        if write:
            write_sends(x, prologue, (top_send, bottom_send), ctx.kernel_backend)
        top_recv = None if first else ctx.new_buffer(self, "top", (batch, channels, self.halo_top, width), x)
        bottom_recv = (
            None if last else ctx.new_buffer(self, "bottom", (batch, channels, self.halo_bottom, width), x)
        )
        return top_send, bottom_send, top_recv, bottom_recv

    def forward(self, x: torch.Tensor, prologue: Optional[GroupNormPrologue] = None) -> torch.Tensor:
        ctx = self.patch_context
        if not ctx.has_neighbours:
            return super().forward(x if prologue is None else prologue.apply(x, backend=ctx.kernel_backend))
        ctx.enter(self, self.patch_path)
        rows = x.shape[2]
        if max(self.halo_top, self.halo_bottom) > rows:
            raise BandGeometryError(
                f"{self.patch_path}: needs {max(self.halo_top, self.halo_bottom)} halo rows but bands are "
                f"{rows} rows here; use fewer ranks or a taller image"
            )
        exchange = ctx.activation_exchange
        top = bottom = None
        whole = None
        if prologue is None and exchange is not ActivationExchange.NONE:
            whole = ctx.whole_input_of(x)
        if exchange is ActivationExchange.OVERLAPPED and whole is None:
            return self._overlapped(x, prologue)
        if whole is not None:
            top, bottom = whole.halos(self.halo_top, self.halo_bottom)
        elif exchange is ActivationExchange.SYNC:
            buffers = self._halo_buffers(x, prologue)
            work = ctx.comm.halo_exchange(*buffers)
            work.wait()
            top, bottom = buffers[2], buffers[3]
            if ctx.keeps_activations:  # for a stale step to come
                self.keep_exchange((work,), top, bottom)
        elif exchange is ActivationExchange.STALE:
            top, bottom = self.take_stale()
            # This step's boundary rows, for the next step: written by the convolution below.
            buffers = self._halo_buffers(x, prologue, write=False)

            def issue() -> None:
                self.keep_exchange((ctx.comm.halo_exchange(*buffers),), buffers[2], buffers[3])

            ctx.defer(issue)
            return self._conv(x, top, bottom, prologue, sends=buffers[:2])
        elif exchange is not ActivationExchange.NONE:  # NONE: every band edge is zero padding
            raise AssertionError(f"unhandled activation exchange {exchange!r}")
        return self._conv(x, top, bottom, prologue)

    def current_weights(self):
        """``(weight, bias)`` of this step's convolution: the layer's own; a subclass whose weights
        live elsewhere (cast or patched on the fly by the host program) gives them here."""
        return self.weight, self.bias

    def _conv(self, x, top, bottom, prologue, out=None, rows=None, sends=(None, None)) -> torch.Tensor:
        """The band's convolution (output rows ``rows`` into ``out``, see ``kernels.halo_conv2d``),
        writing the activated boundary rows into ``sends``. Where the kernels are Triton's, the
        convolution is ``DistriConfig.halo_conv_backend``'s: the halo-padded band + cuDNN unless
        the experimental fused Triton kernel is asked for."""
        ctx = self.patch_context
        halo_backend = ctx.config.halo_conv_backend
        backend = halo_backend if ctx.kernel_backend == "triton" else ctx.kernel_backend
        weight, bias = self.current_weights()
        return halo_conv2d(
            x,
            top,
            bottom,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            prologue=prologue,
            backend=backend,
            out=out,
            rows=rows,
            sends=sends,
            cuda_backend=halo_backend,
        )

    def _overlapped(self, x: torch.Tensor, prologue: Optional[GroupNormPrologue]) -> torch.Tensor:
        """Interior first: issue the exchange, compute the rows that need no halo, wait, compute
        the boundary rows into the same output."""
        ctx = self.patch_context
        buffers = self._halo_buffers(x, prologue)
        work = ctx.comm.halo_exchange(*buffers)
        begin, end = interior_rows(
            x.shape[2], self.kernel_size[0], self.padding[0], self.stride[0], self.dilation[0]
        )
        out = self._conv(x, None, None, prologue, rows=(begin, end))
        work.wait()
        top, bottom = buffers[2], buffers[3]
        # A band thinner than the kernel has no interior: its rows may read both halos.
        self._conv(x, top, bottom, prologue, out=out, rows=(0, begin))
        self._conv(x, top, bottom, prologue, out=out, rows=(end, out.shape[2]))
        return out
