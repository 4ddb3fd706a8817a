"""Halo-aware 2-D convolution of one horizontal band.

A band of rows ``[r0, r0 + h)`` of an image, convolved as part of the whole image, needs ``top``
rows above it and ``bottom`` rows below it from the neighbouring bands (the halo); at the image's
top and bottom edge those rows are the convolution's zero padding. The halo rows arrive from other
ranks in their own buffers. The reference concatenates them (plain torch); the cuDNN path writes
the band and its halos into one padded buffer (``kernels.halo_pad``); the experimental Triton
kernel (``kernels.halo_conv_triton``) reads them in place.

Row arithmetic, for kernel ``k`` (dilated extent ``k_eff = d (k - 1) + 1``), padding ``p`` and
stride ``s`` along the height, with ``r0`` and ``h`` multiples of ``s``: output row ``o`` reads
input rows ``s o - p`` to ``s o - p + k_eff - 1``, so the band's ``h / s`` output rows need
``top = p`` rows above and ``bottom = k_eff - p - s`` rows below (none for a 3x3 stride-2 conv).
The band's outputs are the image's exactly when the convolution maps ``H`` rows to ``H / s``:
``0 <= 2 p - k_eff + s < s``.

Optional prologue (``GroupNormPrologue``): the band is a GroupNorm's *input*, normalised with given
per-(batch, group) mean and rstd, affine and SiLU as it is loaded, so that a ResNet block reads its
activation once instead of writing and re-reading the normalised tensor. The halos are the
neighbours' rows *after* the prologue (what they send is their activated boundary rows), and the
zero padding is the padding of the activated image, so the result equals the unfused
``GroupNorm -> SiLU -> conv`` of the whole image.

Output-row ranges (``rows``, ``interior_rows``): a band's output rows that read no halo row can be
computed before the halos arrive, and the boundary rows after, into the same output tensor (the
``exact`` mode's convolution: the halo exchange hides behind the interior rows). The kernel takes
the range's first row and row count; the references convolve the rows the range reads.

Three ways to compute a band (``backend``): ``torch`` (the reference: prologue, ``torch.cat``,
convolution), ``cudnn`` (one pass, ``kernels.halo_pad``, writes the band activated by the prologue
into the interior rows of a halo-padded buffer and the halo rows around it; then one cuDNN
convolution), ``triton`` (the fused kernel of ``kernels.halo_conv_triton``, through its ops
``distripy::halo_conv2d`` and ``distripy::halo_conv2d_rows_``, registered with the package).
``auto`` takes the reference on CPU and, on CUDA, ``cuda_backend``: ``cudnn`` unless the caller
opts in to ``triton`` (``DistriConfig(halo_conv_backend="triton")``). The cuDNN path is the
default because it is the measured winner (``bench/kernel_speed.py``; the figures:
``bench/results/README.md``); the fused kernel is experimental, kept, tested and compiled for
every target so that a benchmark can show where it wins.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from distripy.config import HALO_CONV_BACKENDS, KERNEL_BACKENDS
from distripy.errors import InputError
from distripy.kernels._backend import on_gpu
from distripy.kernels.group_norm_apply import GroupNormPrologue, prologue_op_args
from distripy.kernels.halo_pad import halo_pad

__all__ = [
    "GroupNormPrologue",
    "band_compatible",
    "halo_conv2d",
    "halo_conv2d_cudnn",
    "halo_conv2d_reference",
    "halo_rows",
    "interior_rows",
]

BACKENDS = KERNEL_BACKENDS + ("cudnn",)  # cudnn: the halo-padded buffer + cuDNN path
CUDA_BACKENDS = HALO_CONV_BACKENDS  # what ``auto`` runs on CUDA: ``cudnn`` (default) or ``triton``


def band_compatible(kernel: int, padding: int, stride: int, dilation: int = 1) -> bool:
    """Whether a convolution with these height parameters maps ``H`` rows to ``H / stride`` rows
    for every ``H`` divisible by ``stride``, so that bands of the input give bands of the output."""
    extent = dilation * (kernel - 1) + 1
    return 0 <= 2 * padding - extent + stride < stride


def halo_rows(kernel: int, padding: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """Rows ``(top, bottom)`` a band needs from the bands above and below it."""
    if not band_compatible(kernel, padding, stride, dilation):
        raise InputError(
            f"a convolution with kernel={kernel}, padding={padding}, stride={stride}, dilation={dilation} "
            "along the height does not map bands to bands (needs 0 <= 2*padding - extent + stride < stride)"
        )
    extent = dilation * (kernel - 1) + 1
    return padding, max(0, extent - padding - stride)


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_halo(halo: Optional[torch.Tensor], x: torch.Tensor, rows: int, name: str) -> None:
    if halo is None:
        return
    expected = (x.shape[0], x.shape[1], rows, x.shape[3])
    if tuple(halo.shape) != expected:
        raise InputError(f"halo_conv2d: {name} halo must have shape {expected}, got {tuple(halo.shape)}")
    if halo.dtype != x.dtype or halo.device != x.device:
        raise InputError(
            f"halo_conv2d: {name} halo is {halo.dtype} on {halo.device}, the band is {x.dtype} on {x.device}"
        )


class BandConv(NamedTuple):
    """A band convolution's parameters along the height and width, checked (``band_conv``): what
    the reference, the cuDNN path and the Triton kernel (``kernels.halo_conv_triton``) share."""

    stride: Tuple[int, int]
    pad_w: int
    dilation: Tuple[int, int]
    top_rows: int
    bottom_rows: int


def _check_prologue(prologue: Optional[GroupNormPrologue], x: torch.Tensor) -> None:
    if prologue is None:
        return
    batch, channels = x.shape[:2]
    groups = prologue.num_groups
    if groups <= 0 or channels % groups != 0:
        raise InputError(f"halo_conv2d: {channels} channels do not split into num_groups={groups} groups")
    for name in ("mean", "rstd"):
        value = getattr(prologue, name)
        if tuple(value.shape) != (batch, groups) or value.device != x.device:
            raise InputError(
                f"halo_conv2d: prologue {name} must be ({batch}, {groups}) on {x.device}, "
                f"got {tuple(value.shape)} on {value.device}"
            )
    for name in ("weight", "bias"):
        value = getattr(prologue, name)
        if value is not None and (tuple(value.shape) != (channels,) or value.device != x.device):
            raise InputError(
                f"halo_conv2d: prologue {name} must be ({channels},) on {x.device}, "
                f"got {tuple(value.shape)} on {value.device}"
            )


def band_conv(x, top, bottom, weight, stride, padding, dilation, prologue=None) -> BandConv:
    """The height/width parameters of a band's convolution, after checking the band, its halos and
    the prologue."""
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    top_rows, bottom_rows = halo_rows(weight.shape[2], pad_h, stride_h, dil_h)
    rows = x.shape[2]
    if rows % stride_h != 0:
        raise InputError(f"halo_conv2d: band height {rows} is not a multiple of the stride {stride_h}")
    _check_halo(top, x, top_rows, "top")
    _check_halo(bottom, x, bottom_rows, "bottom")
    _check_prologue(prologue, x)
    return BandConv((stride_h, stride_w), pad_w, (dil_h, dil_w), top_rows, bottom_rows)


def _zeros_if_none(halo: Optional[torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_zeros((x.shape[0], x.shape[1], rows, x.shape[3])) if halo is None else halo


def interior_rows(height: int, kernel: int, padding: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """Output rows ``[begin, end)`` of a band of ``height`` input rows that read no halo row: what
    can be computed before the halo arrives. The rows before ``begin`` read the top halo, the rows
    from ``end`` the bottom halo; for a band thinner than the kernel the range is empty (and
    ``[0, begin)`` and ``[end, height / stride)`` still cover every output row)."""
    top, _ = halo_rows(kernel, padding, stride, dilation)
    extent = dilation * (kernel - 1) + 1
    out_rows = height // stride
    begin = min(-(-top // stride), out_rows)
    end = max(begin, min((height - extent + top) // stride + 1, out_rows))
    return begin, end


def check_range(x, weight, conv: BandConv, out, rows) -> Tuple[int, int]:
    """``rows`` as ``(begin, end)`` (every output row when ``None``), after checking it and ``out``."""
    out_rows = x.shape[2] // conv.stride[0]
    if out is not None:
        out_width = conv_out_width(x.shape[3], weight.shape[3], conv.pad_w, conv.stride[1], conv.dilation[1])
        expected = (x.shape[0], weight.shape[0], out_rows, out_width)
        if tuple(out.shape) != expected or out.dtype != x.dtype or out.device != x.device:
            raise InputError(
                f"halo_conv2d: out is {tuple(out.shape)} {out.dtype} on {out.device}; expected {expected} "
                f"{x.dtype} on {x.device}"
            )
    if rows is None:
        return 0, out_rows
    begin, end = int(rows[0]), int(rows[1])
    if not 0 <= begin <= end <= out_rows:
        raise InputError(f"halo_conv2d: rows={tuple(rows)} is not a range within [0, {out_rows}]")
    return begin, end


def _window_conv(x, top, bottom, weight, bias, conv: BandConv, groups, begin, end, activate):
    """The convolution of output rows ``[begin, end)`` from the input rows they read, taken from
    the top halo, the band (through ``activate``, the prologue or nothing) and the bottom halo, a
    missing halo reading as zeros; concatenated only when the window spans more than one."""
    kernel_h, stride_h = weight.shape[2], conv.stride[0]
    extent = conv.dilation[0] * (kernel_h - 1) + 1
    height = x.shape[2]
    low = stride_h * begin - conv.top_rows  # the window's first row, in the band's coordinates
    high = stride_h * (end - 1) - conv.top_rows + extent  # one past its last
    pieces = []
    if low < 0:
        halo = _zeros_if_none(top, x, conv.top_rows)
        pieces.append(halo[:, :, conv.top_rows + low : conv.top_rows + min(high, 0)])
    if min(high, height) > max(low, 0):
        pieces.append(activate(x[:, :, max(low, 0) : min(high, height)]))
    if high > height:
        halo = _zeros_if_none(bottom, x, conv.bottom_rows)
        pieces.append(halo[:, :, max(low - height, 0) : high - height])
    window = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return F.conv2d(window, weight, bias, conv.stride, (0, conv.pad_w), conv.dilation, groups)


def _place(result: torch.Tensor, x, weight, conv: BandConv, out, begin: int, end: int) -> torch.Tensor:
    """``result`` (the rows ``[begin, end)``) as the band's output: itself when it is every row and
    no ``out`` was given, else copied into those rows of ``out`` (a new tensor when ``None``)."""
    out_rows = x.shape[2] // conv.stride[0]
    if out is None and (begin, end) == (0, out_rows):
        return result
    if out is None:
        out = new_output(x, weight.shape[0], out_rows, result.shape[3])
    out[:, :, begin:end].copy_(result)
    return out


def write_sends(
    x: torch.Tensor,
    prologue: Optional[GroupNormPrologue],
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    backend: str,
) -> None:
    """The band's activated first rows into ``sends[0]`` and last rows into ``sends[1]`` (each
    optional; its height says how many rows): what the neighbours receive as their halos."""
    for send, first in ((sends[0], True), (sends[1], False)):
        if send is None:
            continue
        count = send.shape[2]
        if send.shape[:2] != x.shape[:2] or send.shape[3] != x.shape[3] or count > x.shape[2]:
            raise InputError(f"halo_conv2d: a send of shape {tuple(send.shape)} for a band of {tuple(x.shape)}")
        rows = x[:, :, :count] if first else x[:, :, x.shape[2] - count :]
        if prologue is None:
            send.copy_(rows)
        else:
            prologue.apply(rows, out=send, backend=backend)


def halo_conv2d_reference(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    prologue: Optional[GroupNormPrologue] = None,
    out: Optional[torch.Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """Plain torch: the input rows the output rows read, ``[top or zeros, band, bottom or zeros]``
    along the height (the prologue applied to the band's), convolved with the height padding
    removed (it is the halo) and the width padding kept."""
    conv = band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
    begin, end = check_range(x, weight, conv, out, rows)
    write_sends(x, prologue, sends, "torch")
    if begin == end:
        return empty_output(x, weight, conv) if out is None else out

    def activate(band_rows: torch.Tensor) -> torch.Tensor:
        return band_rows if prologue is None else prologue.apply(band_rows)

    result = _window_conv(x, top, bottom, weight, bias, conv, groups, begin, end, activate)
    return _place(result, x, weight, conv, out, begin, end)


def conv_out_width(width: int, kernel_w: int, pad_w: int, stride_w: int, dil_w: int) -> int:
    """The output columns of a convolution along the width (padded there as usual)."""
    return (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) // stride_w + 1


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is channels-last and not also contiguous (a new output follows its layout)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def new_output(x: torch.Tensor, out_channels: int, out_rows: int, out_width: int) -> torch.Tensor:
    """An uninitialised output in ``x``'s memory format (channels-last in, channels-last out)."""
    return torch.empty(
        (x.shape[0], out_channels, out_rows, out_width),
        device=x.device,
        dtype=x.dtype,
        memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format,
    )


def empty_output(x: torch.Tensor, weight: torch.Tensor, conv: BandConv) -> torch.Tensor:
    """An uninitialised output of the band's convolution."""
    out_width = conv_out_width(x.shape[3], weight.shape[3], conv.pad_w, conv.stride[1], conv.dilation[1])
    return new_output(x, weight.shape[0], x.shape[2] // conv.stride[0], out_width)


def halo_conv2d_cudnn(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    prologue: Optional[GroupNormPrologue] = None,
    out: Optional[torch.Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """``F.conv2d`` (cuDNN on CUDA), the prologue by a Triton kernel on CUDA.

    Every row: one halo-padded buffer in ``x``'s memory format, built in one pass by
    ``kernels.halo_pad`` (the band activated into its interior, the halo rows or zeros around it,
    the activated boundary rows into ``sends``), then one convolution without height padding.
    The interior rows (``interior_rows``) of a band with at most 1/8 boundary rows into a new
    output: one convolution of the band with the layer's own zero padding, no halo and no copy;
    the other rows of that output read zeros in place of the halos (they are the boundary rows,
    computed again next). Any other range (and the interior of a thin band, where that would
    compute up to twice the rows): the rows it reads, convolved, copied into ``out``."""
    conv = band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
    begin, end = check_range(x, weight, conv, out, rows)
    height = x.shape[2]
    out_rows = height // conv.stride[0]
    prologue_backend = "triton" if on_gpu(x) else "torch"

    def activate(band_rows: torch.Tensor, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        if prologue is None:
            return band_rows if into is None else into.copy_(band_rows)
        return prologue.apply(band_rows, out=into, backend=prologue_backend)

    if (begin, end) == (0, out_rows):
        padded = halo_pad(
            x, top, bottom, conv.top_rows, conv.bottom_rows, prologue, sends, backend=prologue_backend
        )
        result = F.conv2d(padded, weight, bias, conv.stride, (0, conv.pad_w), conv.dilation, groups)
        return _place(result[:, :, :out_rows], x, weight, conv, out, begin, end)
    write_sends(x, prologue, sends, prologue_backend)
    if begin == end:
        return empty_output(x, weight, conv) if out is None else out
    inner_begin, inner_end = interior_rows(
        height, weight.shape[2], conv.top_rows, conv.stride[0], conv.dilation[0]
    )
    boundary = out_rows - (inner_end - inner_begin)
    if out is None and (begin, end) == (inner_begin, inner_end) and 8 * boundary <= out_rows:
        # Recomputing the few boundary rows costs less than copying the interior into an output.
        padding_hw = (conv.top_rows, conv.pad_w)
        return F.conv2d(activate(x), weight, bias, conv.stride, padding_hw, conv.dilation, groups)
    result = _window_conv(x, top, bottom, weight, bias, conv, groups, begin, end, activate)
    return _place(result, x, weight, conv, out, begin, end)


def halo_conv2d(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    prologue: Optional[GroupNormPrologue] = None,
    backend: str = "torch",
    out: Optional[torch.Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
    cuda_backend: str = "cudnn",
) -> torch.Tensor:
    """A band's convolution output from the band ``x`` (B, C, h, W) and its halos: ``top``
    (B, C, top_rows, W) from the band above, ``bottom`` (B, C, bottom_rows, W) from the band below,
    ``None`` at the image's edge (zero padding). See ``halo_rows`` for the row counts. With a
    ``prologue`` the band is first normalised (+ SiLU); the halos must already be.

    ``rows``: compute only the output rows ``[begin, end)`` (every row when ``None``), written into
    ``out`` (the band's whole output tensor, its other rows untouched) or into a new output whose
    other rows are unspecified. A range that reads no halo (``interior_rows``) can be computed
    before the halos arrive (pass ``None`` for them), the boundary rows into the same ``out`` after.

    ``sends``: tensors (B, C, rows, W) that take the band's first and last rows, activated (after
    the prologue), for its neighbours (either may be None): on the cuDNN path they are written by
    the same kernel that builds the convolution's input.

    ``backend``: ``torch`` (the reference), ``cudnn`` (the halo-padded band + ``F.conv2d``, see
    ``halo_conv2d_cudnn``), ``triton`` (experimental: the fused kernel, the ops
    ``distripy::halo_conv2d`` and ``distripy::halo_conv2d_rows_``; grouped convolutions take the
    ``cudnn`` path) or ``auto`` (``torch`` on CPU; on CUDA ``cuda_backend``, ``cudnn`` unless
    ``triton`` is asked for: ``DistriConfig.halo_conv_backend``)."""
    if x.dim() != 4:
        raise InputError(f"halo_conv2d: x must be (B, C, h, W), got shape {tuple(x.shape)}")
    if backend not in BACKENDS:
        raise InputError(f"halo_conv2d: backend={backend!r}; expected one of {BACKENDS}")
    if cuda_backend not in CUDA_BACKENDS:
        raise InputError(f"halo_conv2d: cuda_backend={cuda_backend!r}; expected one of {CUDA_BACKENDS}")
    if backend == "auto":
        backend = cuda_backend if on_gpu(x) else "torch"
    arguments = (x, top, bottom, weight, bias, stride, padding, dilation, groups, prologue)
    sends = tuple(sends)
    if backend == "triton" and groups == 1:
        write_sends(x, prologue, sends, "triton")
        ints = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)))
        if out is None and rows is None:
            return torch.ops.distripy.halo_conv2d(
                x, top, bottom, weight, bias, *ints, *prologue_op_args(prologue)
            )
        conv = band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
        begin, end = check_range(x, weight, conv, out, rows)
        out = empty_output(x, weight, conv) if out is None else out
        torch.ops.distripy.halo_conv2d_rows_(
            x, top, bottom, weight, bias, *ints, *prologue_op_args(prologue), out, begin, end
        )
        return out
    if backend in ("triton", "cudnn"):
        return halo_conv2d_cudnn(*arguments, out=out, rows=rows, sends=sends)
    return halo_conv2d_reference(*arguments, out=out, rows=rows, sends=sends)
