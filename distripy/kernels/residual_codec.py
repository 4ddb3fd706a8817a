"""Residual exchange codec: each step a tensor travels as the 1- or 2-bit *change* since the
baseline its receivers already hold, with error feedback.

Sender and receivers keep one baseline ``b`` of the tensor (``rows x cols``; for a band's keys and
values, tokens x channels). A step sends ``r = x - b`` quantised, and both sides add the same
dequantised change to their copy: ``b += deq(q(r))``. What the quantisation lost this step is part
of the next step's residual, so the error is corrected instead of accumulated (error feedback). The
baseline is what receivers attend over: it *is* the stale buffer they would keep anyway.

Quantisation, per element, against a rank-1 scale ``s_ij = a_i * c_j``: ``a_i`` is the mean
absolute residual of row ``i``, ``c_j`` the mean absolute residual of column ``j`` divided by the
mean over the whole tensor (so that ``s`` has the residual's mean magnitude in both directions).
Against thresholds at multiples of ``s`` (no division, so a zero scale is no special case):

* 1 bit: code ``r >= 0``; level ``+1`` or ``-1`` (the sign, scaled);
* 2 bits: code ``(r >= -s) + (r >= 0) + (r >= s)``; level ``code - 1.5``: ``-1.5 .. 1.5``.

The change added is ``level * s_ij``, in fp32, then rounded to the baseline's dtype. The encoder
and the decoder compute it with one function (``add_change``), so a sender's baseline and its
receivers' stay bit-identical.

A row holding a non-finite residual (an ``inf`` or ``nan`` in the input or the baseline) is never
quantised: its scale is sent as ``nan`` (the marker), its codes as zero, the column scales are the
other rows', and neither side changes that row of its baseline. ``nonfinite_rows`` reads the
markers, on the device: the caller decides (send that tensor at full precision, or stop).

One packed ``uint8`` buffer carries a step's tensor (one all-gather or send), its sections aligned
to 4 bytes (``ResidualLayout``): the row scales (``rows`` fp32), the column scales (``cols`` fp32),
the codes (``rows x ceil(cols * bits / 8)`` bytes: element ``j`` of a row in byte ``j // per_byte``
at bits ``(j % per_byte) * bits``; a row's last byte padded with zero codes).

Three kernels: the sums (per-row means and per-row-block column sums of ``|r|``, in one pass),
the encoder (residual, codes, packing and the sender's baseline update, in one pass) and the decoder
(unpacking and the receiver's baseline update, in one pass). The small ``(cols,)`` scale arithmetic
between the first two is plain torch (``_scales``), shared with the reference.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels._layout import check_packed, needs_64_bit_offsets

__all__ = [
    "RESIDUAL_BITS",
    "ResidualLayout",
    "add_change",
    "nonfinite_rows",
    "residual_decode_",
    "residual_decode_reference_",
    "residual_encode_",
    "residual_encode_reference_",
    "residual_layout",
]

RESIDUAL_BITS = (1, 2)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_ROWS = 16  # rows per program of every kernel
BLOCK_BYTES = 16  # code bytes per program of the encoder and the decoder
SUM_BLOCK_COLS = 128  # columns per tile of the sums kernel


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 4) * 4


class ResidualLayout(NamedTuple):
    """Where the sections of a packed buffer lie (byte offsets), for ``rows x cols`` at ``bits``."""

    rows: int
    cols: int
    bits: int

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def row_bytes(self) -> int:
        """Code bytes per row."""
        return -(-self.cols // self.per_byte)

    @property
    def col_scales_at(self) -> int:
        return 4 * self.rows

    @property
    def codes_at(self) -> int:
        return self.col_scales_at + 4 * self.cols

    @property
    def nbytes(self) -> int:
        return self.codes_at + _aligned(self.rows * self.row_bytes)

    def views(self, packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(row_scales, col_scales, codes)`` of ``packed``: fp32 ``(rows,)``, fp32 ``(cols,)``,
        uint8 ``(rows, row_bytes)``, views sharing its memory."""
        check_packed("residual codec", packed, self.nbytes, f"{self.rows} x {self.cols} at {self.bits} bits")
        row_scales = packed[: self.col_scales_at].view(torch.float32)
        col_scales = packed[self.col_scales_at : self.codes_at].view(torch.float32)
        codes = packed[self.codes_at : self.codes_at + self.rows * self.row_bytes].view(self.rows, self.row_bytes)
        return row_scales, col_scales, codes


def residual_layout(rows: int, cols: int, bits: int) -> ResidualLayout:
    """The packed layout of a ``rows x cols`` tensor at ``bits`` bits per element."""
    if bits not in RESIDUAL_BITS:
        raise InputError(f"residual codec: bits={bits!r}; expected one of {RESIDUAL_BITS}")
    if rows <= 0 or cols <= 0:
        raise InputError(f"residual codec: the tensor must not be empty, got {rows} x {cols}")
    return ResidualLayout(rows, cols, bits)


def _checked(op: str, x: Optional[torch.Tensor], baseline: torch.Tensor, packed: torch.Tensor, bits: int):
    """The layout of ``baseline`` at ``bits``, after checking ``baseline``, ``x`` (when given)
    and ``packed`` against it: every op's arguments, checked once, before any work."""
    if baseline.dim() != 2:
        raise InputError(f"{op}: the baseline must be 2-D (rows, cols), got {tuple(baseline.shape)}")
    layout = residual_layout(*baseline.shape, bits)
    if baseline.dtype not in DTYPES + (torch.float64,):
        raise InputError(f"{op}: baseline dtype {baseline.dtype} is not a floating type the codec takes")
    if baseline.stride(-1) != 1:
        raise InputError(f"{op}: baseline rows must be contiguous (stride 1 along the columns)")
    if x is not None:
        if tuple(x.shape) != tuple(baseline.shape) or x.dtype != baseline.dtype or x.device != baseline.device:
            raise InputError(
                f"{op}: x is {x.dtype} {tuple(x.shape)} on {x.device}, the baseline {baseline.dtype} "
                f"{tuple(baseline.shape)} on {baseline.device}; they must agree"
            )
        if x.stride(-1) != 1:
            raise InputError(f"{op}: x rows must be contiguous (stride 1 along the columns)")
    layout.views(packed)
    return layout


def _scales(row_means: torch.Tensor, col_sums: torch.Tensor, bad: torch.Tensor, rows: int):
    """Row and column scales from the per-row means of ``|r|`` and the column sums of
    ``|r| / rows`` over the finite rows: ``(a, c)``, ``a`` nan on the ``bad`` rows."""
    good = (rows - bad.sum()).clamp(min=1).to(col_sums.dtype)
    col_means = col_sums * (rows / good)
    mean = col_means.mean()
    c = torch.where(mean > 0, col_means / torch.where(mean > 0, mean, 1.0), 0.0)
    a = torch.where(bad, float("nan"), row_means)
    return a, c


def _levels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes * 2.0 - 1.0 if bits == 1 else codes - 1.5


# -- the reference ---------------------------------------------------------------------------------


def _codes_reference(r: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 1:
        return (r >= 0).to(torch.uint8)
    return ((r >= -s).to(torch.uint8) + (r >= 0).to(torch.uint8) + (r >= s).to(torch.uint8)).to(torch.uint8)


def _pack_reference(codes: torch.Tensor, layout: ResidualLayout) -> torch.Tensor:
    padded = codes.new_zeros((layout.rows, layout.row_bytes * layout.per_byte))
    padded[:, : layout.cols] = codes
    grouped = padded.view(layout.rows, layout.row_bytes, layout.per_byte).to(torch.int32)
    shifts = torch.arange(layout.per_byte, device=codes.device, dtype=torch.int32) * layout.bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_reference(codes: torch.Tensor, layout: ResidualLayout) -> torch.Tensor:
    shifts = torch.arange(layout.per_byte, device=codes.device, dtype=torch.int32) * layout.bits
    values = (codes.to(torch.int32)[..., None] >> shifts) & ((1 << layout.bits) - 1)
    return values.reshape(layout.rows, -1)[:, : layout.cols]


def _add_change_reference(baseline, codes, a, c, layout: ResidualLayout) -> None:
    compute = torch.float64 if baseline.dtype == torch.float64 else torch.float32
    s = a.to(compute)[:, None] * c.to(compute)[None, :]
    change = _levels(codes.to(compute), layout.bits) * s
    good = ~torch.isnan(a)
    updated = (baseline.to(compute) + change).to(baseline.dtype)
    baseline.copy_(torch.where(good[:, None], updated, baseline))


def residual_encode_reference_(x: torch.Tensor, baseline: torch.Tensor, packed: torch.Tensor, bits: int) -> None:
    """Plain torch: ``x``'s residual against ``baseline`` into ``packed`` (``residual_layout``),
    and the sender's ``baseline`` updated as its receivers' will be. Computes in fp32 (fp64 for
    fp64 tensors)."""
    _encode_reference(x, baseline, packed, _checked("residual_encode", x, baseline, packed, bits))


def _encode_reference(x, baseline, packed, layout: ResidualLayout) -> None:
    row_scales, col_scales, codes = layout.views(packed)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = x.to(compute) - baseline.to(compute)
    bad = ~torch.isfinite(r).all(dim=1)
    magnitude = torch.where(bad[:, None], 0.0, r.abs())
    a, c = _scales(magnitude.mean(dim=1), (magnitude / layout.rows).sum(dim=0), bad, layout.rows)
    s = a.to(compute)[:, None] * c.to(compute)[None, :]
    element_codes = torch.where(bad[:, None], 0, _codes_reference(r, s, layout.bits)).to(torch.uint8)
    row_scales.copy_(a)
    col_scales.copy_(c)
    codes.copy_(_pack_reference(element_codes, layout))
    _add_change_reference(baseline, element_codes, row_scales, col_scales, layout)


def residual_decode_reference_(packed: torch.Tensor, baseline: torch.Tensor, bits: int) -> None:
    """Plain torch: the change ``packed`` carries added to a receiver's ``baseline``."""
    _decode_reference(packed, baseline, _checked("residual_decode", None, baseline, packed, bits))


def _decode_reference(packed, baseline, layout: ResidualLayout) -> None:
    row_scales, col_scales, codes = layout.views(packed)
    _add_change_reference(baseline, _unpack_reference(codes, layout), row_scales, col_scales, layout)


def nonfinite_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """How many rows of a packed residual (or fp8) buffer were marked non-finite, summed over its
    leading dimensions (``(..., nbytes)``: one count for every item of a batch, so a step adds one
    reduction per module, not one per item). A 0-d int64 tensor on the packed buffer's device:
    reading it is the caller's synchronisation."""
    return torch.isnan(packed[..., : 4 * rows].view(torch.float32)).sum()


# -- the Triton kernels ----------------------------------------------------------------------------


@triton.jit
def add_change(baseline, codes, a, c, BITS: tl.constexpr):
    """``baseline + level(codes) * a * c`` in fp32: the one formula of the encoder and the decoder."""
    if BITS == 1:
        level = codes.to(tl.float32) * 2.0 - 1.0
    else:
        level = codes.to(tl.float32) - 1.5
    return baseline.to(tl.float32) + level * (a[:, None] * c[None, :])


@triton.jit
def _residual_sums_kernel(
    x_ptr,
    b_ptr,
    row_means_ptr,
    bad_ptr,
    col_sums_ptr,
    rows,
    cols,
    stride_x,
    stride_b,
    inv_rows,
    inv_cols,
    INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per row: the mean of ``|r|`` and whether it is finite; per (row block, column): the sum of
    ``|r| / rows`` over the block's finite rows."""
    block = tl.program_id(0)
    row = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    if INDEX_64:
        block = block.to(tl.int64)
        row = row.to(tl.int64)
    # first pass: which rows are finite
    bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (col < cols)[None, :]
        x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row[:, None] * stride_b + col[None, :], mask=mask, other=0.0).to(tl.float32)
        r = x - b
        finite = tl.abs(r) < float("inf")  # false for inf and nan
        bad = tl.maximum(bad, tl.max(tl.where(finite, 0, 1), axis=1))
    # second pass: the sums, over the finite rows only
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        col_ok = col < cols
        mask = (row_ok & (bad == 0))[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row[:, None] * stride_b + col[None, :], mask=mask, other=0.0).to(tl.float32)
        magnitude = tl.abs(x - b)
        total += tl.sum(magnitude * inv_cols, axis=1)
        tl.store(col_sums_ptr + block * cols + col, tl.sum(magnitude * inv_rows, axis=0), mask=col_ok)
    tl.store(row_means_ptr + row, total, mask=row_ok)
    tl.store(bad_ptr + row, bad.to(tl.int8), mask=row_ok)


@triton.jit
def _tile(a_ptr, c_ptr, rows, cols, INDEX_64: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_B: tl.constexpr):
    """A program's tile of the encoder and the decoder: its rows, code bytes and columns, which rows
    are in range and which are ``good`` (a nan row scale marks a non-finite row: left as it is),
    and the row and column scales."""
    PER_BYTE: tl.constexpr = 8 // BITS
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    col = tl.program_id(1) * BLOCK_B * PER_BYTE + tl.arange(0, BLOCK_B * PER_BYTE)
    row_ok = row < rows
    if INDEX_64:
        row = row.to(tl.int64)
    a = tl.load(a_ptr + row, mask=row_ok, other=0.0)
    good = row_ok & (a == a)
    c = tl.load(c_ptr + col, mask=col < cols, other=0.0)
    return row, byte, col, row_ok, good, a, c


@triton.jit
def _residual_encode_kernel(
    x_ptr,
    b_ptr,
    a_ptr,
    c_ptr,
    codes_ptr,
    rows,
    cols,
    row_bytes,
    stride_x,
    stride_b,
    INDEX_64: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    row, byte, col, row_ok, good, a, c = _tile(a_ptr, c_ptr, rows, cols, INDEX_64, BITS, BLOCK_R, BLOCK_B)
    mask = good[:, None] & (col < cols)[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row[:, None] * stride_b + col[None, :], mask=mask, other=0.0)
    r = x - b.to(tl.float32)
    s = a[:, None] * c[None, :]
    if BITS == 1:
        codes = (r >= 0).to(tl.int32)
    else:
        codes = (r >= -s).to(tl.int32) + (r >= 0).to(tl.int32) + (r >= s).to(tl.int32)
    codes = tl.where(mask, codes, 0)
    updated = add_change(b, codes, a, c, BITS)
    tl.store(b_ptr + row[:, None] * stride_b + col[None, :], updated.to(b_ptr.dtype.element_ty), mask=mask)
    shifts = tl.arange(0, PER_BYTE) * BITS
    grouped = tl.reshape(codes, (BLOCK_R, BLOCK_B, PER_BYTE))
    packed = tl.sum(grouped << shifts[None, None, :], axis=2)
    byte_mask = row_ok[:, None] & (byte < row_bytes)[None, :]
    tl.store(codes_ptr + row[:, None] * row_bytes + byte[None, :], packed.to(tl.uint8), mask=byte_mask)


@triton.jit
def _residual_decode_kernel(
    b_ptr,
    a_ptr,
    c_ptr,
    codes_ptr,
    rows,
    cols,
    row_bytes,
    stride_b,
    INDEX_64: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    row, byte, col, row_ok, good, a, c = _tile(a_ptr, c_ptr, rows, cols, INDEX_64, BITS, BLOCK_R, BLOCK_B)
    packed = tl.load(
        codes_ptr + row[:, None] * row_bytes + byte[None, :], mask=row_ok[:, None] & (byte < row_bytes)[None, :], other=0
    ).to(tl.int32)
    shifts = tl.arange(0, PER_BYTE) * BITS
    spread = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    codes = tl.reshape(spread, (BLOCK_R, BLOCK_B * PER_BYTE))
    mask = good[:, None] & (col < cols)[None, :]
    b = tl.load(b_ptr + row[:, None] * stride_b + col[None, :], mask=mask, other=0.0)
    updated = add_change(b, codes, a, c, BITS)
    tl.store(b_ptr + row[:, None] * stride_b + col[None, :], updated.to(b_ptr.dtype.element_ty), mask=mask)


def encode_launches(x: torch.Tensor, baseline: torch.Tensor, packed: torch.Tensor, bits: int):
    """The two launches of an encode (sums, then codes) and the torch step between them: ``(sums,
    finish, encode)``, where ``finish()`` turns the sums into the packed scales."""
    layout = residual_layout(*baseline.shape, bits)
    row_scales, col_scales, codes = layout.views(packed)
    index_64 = needs_64_bit_offsets(x, baseline, codes)
    row_blocks = -(-layout.rows // BLOCK_ROWS)
    row_means = torch.empty(layout.rows, dtype=torch.float32, device=x.device)
    bad = torch.empty(layout.rows, dtype=torch.int8, device=x.device)
    col_sums = torch.empty((row_blocks, layout.cols), dtype=torch.float32, device=x.device)
    sums = Launch(
        _residual_sums_kernel,
        (row_blocks,),
        (x, baseline, row_means, bad, col_sums, layout.rows, layout.cols, x.stride(0), baseline.stride(0),
         1.0 / layout.rows, 1.0 / layout.cols),
        dict(INDEX_64=index_64, BLOCK_R=BLOCK_ROWS, BLOCK_C=SUM_BLOCK_COLS),
    )  # fmt: skip

    def finish() -> None:
        a, c = _scales(row_means, col_sums.sum(dim=0), bad.bool(), layout.rows)
        row_scales.copy_(a)
        col_scales.copy_(c)

    encode = Launch(
        _residual_encode_kernel,
        (row_blocks, -(-layout.row_bytes // BLOCK_BYTES)),
        (x, baseline, row_scales, col_scales, codes, layout.rows, layout.cols, layout.row_bytes, x.stride(0),
         baseline.stride(0)),
        dict(INDEX_64=index_64, BITS=bits, BLOCK_R=BLOCK_ROWS, BLOCK_B=BLOCK_BYTES),
    )  # fmt: skip
    return sums, finish, encode


def decode_launch(packed: torch.Tensor, baseline: torch.Tensor, bits: int) -> Launch:
    layout = residual_layout(*baseline.shape, bits)
    row_scales, col_scales, codes = layout.views(packed)
    return Launch(
        _residual_decode_kernel,
        (-(-layout.rows // BLOCK_ROWS), -(-layout.row_bytes // BLOCK_BYTES)),
        (baseline, row_scales, col_scales, codes, layout.rows, layout.cols, layout.row_bytes, baseline.stride(0)),
        dict(INDEX_64=needs_64_bit_offsets(baseline, codes), BITS=bits, BLOCK_R=BLOCK_ROWS, BLOCK_B=BLOCK_BYTES),
    )


@torch.library.custom_op("distripy::residual_encode_", mutates_args=("baseline", "packed"))
def _residual_encode_op(x: torch.Tensor, baseline: torch.Tensor, packed: torch.Tensor, bits: int) -> None:
    sums, finish, encode = encode_launches(x, baseline, packed, bits)
    sums.run()
    finish()
    encode.run()


@_residual_encode_op.register_fake
def _(x: torch.Tensor, baseline: torch.Tensor, packed: torch.Tensor, bits: int) -> None:
    return None


@torch.library.custom_op("distripy::residual_decode_", mutates_args=("baseline",))
def _residual_decode_op(packed: torch.Tensor, baseline: torch.Tensor, bits: int) -> None:
    decode_launch(packed, baseline, bits).run()


@_residual_decode_op.register_fake
def _(packed: torch.Tensor, baseline: torch.Tensor, bits: int) -> None:
    return None


def residual_encode_(
    x: torch.Tensor, baseline: torch.Tensor, packed: torch.Tensor, bits: int, backend: str = "torch"
) -> None:
    """Encode ``x`` (rows, cols) against the sender's ``baseline`` into ``packed`` (uint8,
    ``residual_layout(rows, cols, bits).nbytes``) and update ``baseline`` as the receivers will.
    ``backend``: ``torch`` (the reference), ``triton`` (the op ``distripy::residual_encode_``) or
    ``auto`` (Triton on CUDA). Triton takes fp16, bf16 and fp32; fp64 runs the reference."""
    layout = _checked("residual_encode", x, baseline, packed, bits)
    if use_triton(backend, x, "residual_encode") and x.dtype != torch.float64:
        torch.ops.distripy.residual_encode_(x, baseline, packed, bits)
    else:
        _encode_reference(x, baseline, packed, layout)


def residual_decode_(packed: torch.Tensor, baseline: torch.Tensor, bits: int, backend: str = "torch") -> None:
    """Add the change ``packed`` carries to a receiver's ``baseline`` (rows, cols). ``backend`` as
    ``residual_encode_``'s."""
    layout = _checked("residual_decode", None, baseline, packed, bits)
    if use_triton(backend, baseline, "residual_decode") and baseline.dtype != torch.float64:
        torch.ops.distripy.residual_decode_(packed, baseline, bits)
    else:
        _decode_reference(packed, baseline, layout)
