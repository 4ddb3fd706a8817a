"""FP8 exchange codec: a tensor travels as one e4m3 byte per element and a power-of-two scale per
row (for a band's keys and values: per token).

Row ``i`` is scaled by ``2^e_i``, the smallest power of two with ``max_j |x_ij| <= 448 * 2^e_i``
(448: e4m3's largest finite value) and ``e_i >= -126`` (a normal fp32, so that a zero row needs no
special case). Scaling by a power of two is exact, so each element's only error is e4m3's rounding
(to nearest, ties to even) of ``x_ij / 2^e_i``, which never exceeds 448: nothing saturates.
Decoding is exact: ``e4m3(code) * 2^e_i``.

The conversion is integer arithmetic on the fp32 bit pattern (Triton's fp8 types do not compile
for sm_80, and the codec must): normal values round their mantissa to 3 bits by adding the
rounding bias, values below e4m3's smallest normal (``2^-6``) round ``|y| * 2^9`` to an integer.
The reference converts with torch's own ``float8_e4m3fn`` cast.

A row holding a non-finite value is never encoded: its scale is sent as ``nan`` (the marker), its
codes as zero, and the decoder leaves that row of its output as it was. Both codecs' packed
buffers begin with the row scales, so ``residual_codec.nonfinite_rows`` counts the marked rows of
either.

One packed ``uint8`` buffer carries a tensor (one all-gather or send): the row scales (``rows``
fp32), then the codes (``rows x cols`` bytes), the whole padded to 4 bytes (``Fp8Layout``).
"""

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels._layout import check_packed, needs_64_bit_offsets
from distripy.kernels.residual_codec import nonfinite_rows

__all__ = [
    "E4M3_MAX",
    "Fp8Layout",
    "e4m3_codes",
    "e4m3_row_scales",
    "e4m3_values",
    "fp8_decode_",
    "fp8_decode_reference_",
    "fp8_encode_",
    "fp8_encode_reference_",
    "fp8_layout",
    "nonfinite_rows",
]

E4M3_MAX = 448.0
MIN_EXPONENT = -126  # the smallest scale exponent: 2^-126, fp32's smallest normal
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_ROWS = 16  # rows per program
BLOCK_COLS = 128  # columns per tile


class Fp8Layout(NamedTuple):
    """Where the sections of a packed buffer lie (byte offsets), for ``rows x cols``."""

    rows: int
    cols: int

    @property
    def codes_at(self) -> int:
        return 4 * self.rows

    @property
    def nbytes(self) -> int:
        return self.codes_at + -(-self.rows * self.cols // 4) * 4

    def views(self, packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scales, codes)`` of ``packed``: fp32 ``(rows,)`` and uint8 ``(rows, cols)``, views
        sharing its memory."""
        check_packed("fp8 codec", packed, self.nbytes, f"{self.rows} x {self.cols}")
        scales = packed[: self.codes_at].view(torch.float32)
        codes = packed[self.codes_at : self.codes_at + self.rows * self.cols].view(self.rows, self.cols)
        return scales, codes


def fp8_layout(rows: int, cols: int) -> Fp8Layout:
    """The packed layout of a ``rows x cols`` tensor."""
    if rows <= 0 or cols <= 0:
        raise InputError(f"fp8 codec: the tensor must not be empty, got {rows} x {cols}")
    return Fp8Layout(rows, cols)


def _checked(op: str, tensor: torch.Tensor, packed: torch.Tensor) -> Fp8Layout:
    """The layout of ``tensor`` (the encoder's input, the decoder's output), after checking it and
    ``packed``: every op's arguments, checked once, before any work."""
    if tensor.dim() != 2:
        raise InputError(f"{op}: the tensor must be 2-D (rows, cols), got {tuple(tensor.shape)}")
    layout = fp8_layout(*tensor.shape)
    if tensor.dtype not in DTYPES + (torch.float64,):
        raise InputError(f"{op}: dtype {tensor.dtype} is not a floating type the codec takes")
    if tensor.stride(-1) != 1:
        raise InputError(f"{op}: rows must be contiguous (stride 1 along the columns)")
    if packed.device != tensor.device:
        raise InputError(f"{op}: the packed buffer is on {packed.device}, the tensor on {tensor.device}")
    layout.views(packed)
    return layout


# -- the reference ---------------------------------------------------------------------------------


def _exponents_reference(amax: torch.Tensor) -> torch.Tensor:
    """``e`` per row: the smallest with ``amax <= 448 * 2^e``, at least -126 (``torch.frexp``:
    ``amax = m 2^k``, ``m`` in [0.5, 1); ``448 = 0.875 * 2^9``)."""
    mantissa, exponent = torch.frexp(amax.to(torch.float64))
    e = torch.where(mantissa <= 0.875, exponent - 9, exponent - 8)
    return torch.where(amax > 0, e, MIN_EXPONENT).clamp(min=MIN_EXPONENT)


def fp8_encode_reference_(x: torch.Tensor, packed: torch.Tensor) -> None:
    """Plain torch: ``x`` into ``packed`` (``fp8_layout``) through torch's ``float8_e4m3fn``."""
    _encode_reference(x, packed, _checked("fp8_encode", x, packed))


def _encode_reference(x: torch.Tensor, packed: torch.Tensor, layout: Fp8Layout) -> None:
    scales, codes = layout.views(packed)
    values = x.to(torch.float64)
    bad = ~torch.isfinite(values).all(dim=1)
    amax = torch.where(bad[:, None], 0.0, values.abs()).amax(dim=1)
    e = _exponents_reference(amax)
    scaled = torch.where(bad[:, None], 0.0, values * torch.exp2(-e.to(torch.float64))[:, None])
    element_codes = scaled.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    scales.copy_(torch.where(bad, float("nan"), torch.exp2(e.to(torch.float64))))
    codes.copy_(element_codes)


def fp8_decode_reference_(packed: torch.Tensor, out: torch.Tensor) -> None:
    """Plain torch: the values ``packed`` carries into ``out`` (its marked rows left as they were)."""
    _decode_reference(packed, out, _checked("fp8_decode", out, packed))


def _decode_reference(packed: torch.Tensor, out: torch.Tensor, layout: Fp8Layout) -> None:
    scales, codes = layout.views(packed)
    values = codes.view(torch.float8_e4m3fn).to(torch.float64) * scales.to(torch.float64)[:, None]
    good = ~torch.isnan(scales)
    out.copy_(torch.where(good[:, None], values.to(out.dtype), out))


# -- the Triton kernels ----------------------------------------------------------------------------


@triton.jit
def e4m3_codes(y):
    """e4m3 codes (int32, 0..255) of fp32 ``y`` with ``|y| <= 448``: round to nearest, ties to even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    magnitude = bits & 0x7FFFFFFF
    # below 2^-6, e4m3's subnormals m 2^-9: |y| 2^9 rounded to an integer (0..8; 8 is 2^-6's code)
    # by adding and taking away 2^23, at which fp32 has no fraction bits left
    absolute = magnitude.to(tl.float32, bitcast=True)
    subnormal = ((absolute * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    # from 2^-6 up: the mantissa rounded to 3 bits (a carry moves into the exponent), the exponent
    # rebiased from 127 to 7: (127 - 7) << 3 = 960
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - 960
    return tl.where(magnitude < 0x3C800000, subnormal, normal) | (sign << 7)


@triton.jit
def e4m3_row_scales(amax):
    """``(2^-e, 2^e)`` of rows whose largest finite magnitude is ``amax`` (fp32, >= 0): the
    smallest ``e >= -126`` with ``amax <= 448 * 2^e``."""
    # amax = 1.f 2^E; 448 = 1.75 2^8, so e = E - 8, or E - 7 past 1.75
    amax_bits = amax.to(tl.int32, bitcast=True)
    e = (amax_bits >> 23) - 127 - 8 + ((amax_bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    e = tl.maximum(e, -126)
    inverse = ((127 - e) << 23).to(tl.float32, bitcast=True)
    scale = ((127 + e) << 23).to(tl.float32, bitcast=True)
    return inverse, scale


@triton.jit
def e4m3_values(codes):
    """fp32 values of e4m3 ``codes`` (int32, never the nan code)."""
    exponent = (codes >> 3) & 15
    mantissa = codes & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # 2^-9
    return tl.where((codes >> 7) != 0, -value, value)


@triton.jit
def _fp8_encode_kernel(
    x_ptr,
    scales_ptr,
    codes_ptr,
    rows,
    cols,
    stride_x,
    INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    if INDEX_64:
        row = row.to(tl.int64)
    # first pass: each row's largest magnitude, and whether it is finite
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (col < cols)[None, :]
        x = tl.abs(tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32))
        finite = x < float("inf")  # false for inf and nan
        bad = tl.maximum(bad, tl.max(tl.where(finite, 0, 1), axis=1))
        amax = tl.maximum(amax, tl.max(tl.where(finite, x, 0.0), axis=1))
    inverse, scale = e4m3_row_scales(amax)
    good = row_ok & (bad == 0)
    tl.store(scales_ptr + row, tl.where(bad == 0, scale, float("nan")), mask=row_ok)
    # second pass: the codes
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (col < cols)[None, :]
        x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask & good[:, None], other=0.0)
        codes = e4m3_codes(x.to(tl.float32) * inverse[:, None])
        tl.store(codes_ptr + row[:, None] * cols + col[None, :], codes.to(tl.uint8), mask=mask)


@triton.jit
def _fp8_decode_kernel(
    scales_ptr,
    codes_ptr,
    out_ptr,
    rows,
    cols,
    stride_out,
    INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = row < rows
    if INDEX_64:
        row = row.to(tl.int64)
    scale = tl.load(scales_ptr + row, mask=row_ok, other=0.0)
    mask = (row_ok & (scale == scale))[:, None] & (col < cols)[None, :]  # a nan scale: left as it was
    codes = tl.load(codes_ptr + row[:, None] * cols + col[None, :], mask=mask, other=0).to(tl.int32)
    values = e4m3_values(codes) * scale[:, None]
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], values.to(out_ptr.dtype.element_ty), mask=mask)


def encode_launch(x: torch.Tensor, packed: torch.Tensor) -> Launch:
    layout = fp8_layout(*x.shape)
    scales, codes = layout.views(packed)
    return Launch(
        _fp8_encode_kernel,
        (-(-layout.rows // BLOCK_ROWS),),
        (x, scales, codes, layout.rows, layout.cols, x.stride(0)),
        dict(INDEX_64=needs_64_bit_offsets(x, codes), BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS),
    )


def decode_launch(packed: torch.Tensor, out: torch.Tensor) -> Launch:
    layout = fp8_layout(*out.shape)
    scales, codes = layout.views(packed)
    return Launch(
        _fp8_decode_kernel,
        (-(-layout.rows // BLOCK_ROWS), -(-layout.cols // BLOCK_COLS)),
        (scales, codes, out, layout.rows, layout.cols, out.stride(0)),
        dict(INDEX_64=needs_64_bit_offsets(out, codes), BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS),
    )


@torch.library.custom_op("distripy::fp8_encode_", mutates_args=("packed",))
def _fp8_encode_op(x: torch.Tensor, packed: torch.Tensor) -> None:
    encode_launch(x, packed).run()


@_fp8_encode_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor) -> None:
    return None


@torch.library.custom_op("distripy::fp8_decode_", mutates_args=("out",))
def _fp8_decode_op(packed: torch.Tensor, out: torch.Tensor) -> None:
    decode_launch(packed, out).run()


@_fp8_decode_op.register_fake
def _(packed: torch.Tensor, out: torch.Tensor) -> None:
    return None


def fp8_encode_(x: torch.Tensor, packed: torch.Tensor, backend: str = "torch") -> None:
    """Encode ``x`` (rows, cols) into ``packed`` (uint8, ``fp8_layout(rows, cols).nbytes``).
    ``backend``: ``torch`` (the reference), ``triton`` (the op ``distripy::fp8_encode_``) or
    ``auto`` (Triton on CUDA). Triton takes fp16, bf16 and fp32; fp64 runs the reference."""
    layout = _checked("fp8_encode", x, packed)
    if use_triton(backend, x, "fp8_encode") and x.dtype != torch.float64:
        torch.ops.distripy.fp8_encode_(x, packed)
    else:
        _encode_reference(x, packed, layout)


def fp8_decode_(packed: torch.Tensor, out: torch.Tensor, backend: str = "torch") -> None:
    """Decode ``packed`` into ``out`` (rows, cols), leaving the rows marked non-finite as they
    were. ``backend`` as ``fp8_encode_``'s."""
    layout = _checked("fp8_decode", out, packed)
    if use_triton(backend, out, "fp8_decode") and out.dtype != torch.float64:
        torch.ops.distripy.fp8_decode_(packed, out)
    else:
        _decode_reference(packed, out, layout)
