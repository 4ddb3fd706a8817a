"""A receiver's step of the residual codec over a baseline stored in fp8, in one kernel.

A residual exchange's receivers keep each band's baseline as fp8 bytes (``fp8_codec``'s layout):
to take a band's change they decode the baseline into a buffer of the step, add the change
(``residual_codec``) and store the sum back in fp8. As three ops that is three passes over the
keys and values (and two more reads of them, for the fp8 encoder's row maxima and codes); this
op does it in one kernel of two passes over the bytes: the first reads the baseline's codes and the
change's codes and finds each row's largest magnitude of the sum, the second computes the sum
again, writes it (``out``, what the step attends over) and its fp8 codes.

It computes exactly what the three ops compute, bit for bit (the reference is their composition;
the kernel shares their formulas: ``fp8_codec.e4m3_values`` / ``e4m3_codes`` /
``e4m3_row_scales`` and ``residual_codec.add_change``), so a receiver that runs it and a sender
that runs the three ops still hold the same bytes:

* the baseline is decoded to ``out``'s dtype, the change added in fp32 and the sum rounded to
  ``out``'s dtype, which is what is stored back;
* a row whose change is marked non-finite is not changed (the decoded baseline); a row of the
  baseline marked non-finite (never stored by the exchange, which stores baselines finite) keeps
  ``out``'s row as it was, as the fp8 decoder does;
* a row whose sum is non-finite is stored marked (a nan scale, zero codes), as the fp8 encoder does.
"""

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels._layout import needs_64_bit_offsets
from distripy.kernels.fp8_codec import (
    e4m3_codes,
    e4m3_row_scales,
    e4m3_values,
    fp8_decode_reference_,
    fp8_encode_reference_,
    fp8_layout,
)
from distripy.kernels.residual_codec import add_change, residual_decode_reference_, residual_layout

__all__ = ["residual_fp8_decode_", "residual_fp8_decode_reference_"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_ROWS = 16  # rows per program
BLOCK_COLS = 128  # columns per tile


def _checked(packed: torch.Tensor, store: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    """Every argument checked against ``out``'s shape, before any work."""
    if out.dim() != 2:
        raise InputError(f"residual_fp8_decode: out must be 2-D (rows, cols), got {tuple(out.shape)}")
    if out.stride(-1) != 1:
        raise InputError("residual_fp8_decode: out rows must be contiguous (stride 1 along the columns)")
    if out.dtype not in DTYPES + (torch.float64,):
        raise InputError(f"residual_fp8_decode: out dtype {out.dtype} is not a floating type the codecs take")
    residual_layout(*out.shape, bits).views(packed)
    fp8_layout(*out.shape).views(store)
    if packed.device != out.device or store.device != out.device:
        raise InputError(
            f"residual_fp8_decode: packed on {packed.device}, store on {store.device}, out on {out.device}: "
            "they must be on one device"
        )


def residual_fp8_decode_reference_(packed: torch.Tensor, store: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    """Plain torch: the three ops one after the other (``fp8_decode_``, ``residual_decode_``,
    ``fp8_encode_``, each its reference)."""
    _checked(packed, store, out, bits)
    fp8_decode_reference_(store, out)
    residual_decode_reference_(packed, out, bits)
    fp8_encode_reference_(out, store)


@triton.jit
def _sum_tile(store_scale, store_codes_ptr, res_codes_ptr, a, good, c_ptr, out_ptr, row, row_ok, col, cols,
              row_bytes, stride_out, BITS: tl.constexpr):
    """One tile of the sum, ``out``'s dtype: the baseline decoded (``out``'s own row where the
    baseline's is marked), the change added where the change's row is not marked."""
    PER_BYTE: tl.constexpr = 8 // BITS
    col_ok = col < cols
    mask = row_ok[:, None] & col_ok[None, :]
    marked = store_scale != store_scale  # a nan scale: the baseline's row marked, ``out``'s kept
    codes = tl.load(store_codes_ptr + row[:, None] * cols + col[None, :], mask=mask, other=0).to(tl.int32)
    decoded = (e4m3_values(codes) * store_scale[:, None]).to(out_ptr.dtype.element_ty)
    kept = tl.load(out_ptr + row[:, None] * stride_out + col[None, :], mask=mask & marked[:, None], other=0.0)
    baseline = tl.where(marked[:, None], kept, decoded)
    byte = tl.load(
        res_codes_ptr + row[:, None] * row_bytes + (col // PER_BYTE)[None, :], mask=mask, other=0
    ).to(tl.int32)
    change_codes = (byte >> ((col % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
    c = tl.load(c_ptr + col, mask=col_ok, other=0.0)
    updated = add_change(baseline, change_codes, a, c, BITS).to(out_ptr.dtype.element_ty)
    return tl.where(good[:, None], updated, baseline), mask


@triton.jit
def _residual_fp8_decode_kernel(
    a_ptr,
    c_ptr,
    res_codes_ptr,
    store_scales_ptr,
    store_codes_ptr,
    out_ptr,
    rows,
    cols,
    row_bytes,
    stride_out,
    INDEX_64: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    if INDEX_64:
        row = row.to(tl.int64)
    a = tl.load(a_ptr + row, mask=row_ok, other=0.0)
    good = row_ok & (a == a)  # a nan row scale: the change's row marked, not applied
    store_scale = tl.load(store_scales_ptr + row, mask=row_ok, other=1.0)
    # first pass (reads only): each row's largest magnitude of the sum, and whether it is finite
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        total, mask = _sum_tile(store_scale, store_codes_ptr, res_codes_ptr, a, good, c_ptr, out_ptr, row, row_ok,
                                col, cols, row_bytes, stride_out, BITS)  # fmt: skip
        magnitude = tl.where(mask, tl.abs(total.to(tl.float32)), 0.0)
        finite = magnitude < float("inf")  # false for inf and nan
        bad = tl.maximum(bad, tl.max(tl.where(finite, 0, 1), axis=1))
        amax = tl.maximum(amax, tl.max(tl.where(finite, magnitude, 0.0), axis=1))
    inverse, scale = e4m3_row_scales(amax)
    # second pass: the sum again (the same reads: nothing was written), written with its codes
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        total, mask = _sum_tile(store_scale, store_codes_ptr, res_codes_ptr, a, good, c_ptr, out_ptr, row, row_ok,
                                col, cols, row_bytes, stride_out, BITS)  # fmt: skip
        finite_row = (bad == 0)[:, None]
        codes = e4m3_codes(tl.where(finite_row, total.to(tl.float32), 0.0) * inverse[:, None])
        tl.store(out_ptr + row[:, None] * stride_out + col[None, :], total, mask=mask)
        tl.store(store_codes_ptr + row[:, None] * cols + col[None, :], codes.to(tl.uint8), mask=mask)
    tl.store(store_scales_ptr + row, tl.where(bad == 0, scale, float("nan")), mask=row_ok)


def decode_launch(packed: torch.Tensor, store: torch.Tensor, out: torch.Tensor, bits: int) -> Launch:
    residual = residual_layout(*out.shape, bits)
    a, c, res_codes = residual.views(packed)
    store_scales, store_codes = fp8_layout(*out.shape).views(store)
    return Launch(
        _residual_fp8_decode_kernel,
        (-(-residual.rows // BLOCK_ROWS),),
        (a, c, res_codes, store_scales, store_codes, out, residual.rows, residual.cols, residual.row_bytes,
         out.stride(0)),
        dict(INDEX_64=needs_64_bit_offsets(out, store_codes), BITS=bits, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS),
    )  # fmt: skip


@torch.library.custom_op("distripy::residual_fp8_decode_", mutates_args=("store", "out"))
def _residual_fp8_decode_op(packed: torch.Tensor, store: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    decode_launch(packed, store, out, bits).run()


@_residual_fp8_decode_op.register_fake
def _(packed: torch.Tensor, store: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    return None


def residual_fp8_decode_(
    packed: torch.Tensor, store: torch.Tensor, out: torch.Tensor, bits: int, backend: str = "torch"
) -> None:
    """Into ``out`` (rows, cols): the baseline ``store`` holds (fp8, ``fp8_layout``) plus the
    change ``packed`` carries (``residual_layout`` at ``bits``); and the sum stored back into
    ``store``. ``backend``: ``torch`` (the reference), ``triton`` (the op
    ``distripy::residual_fp8_decode_``) or ``auto`` (Triton on CUDA). Triton takes fp16, bf16 and
    fp32; fp64 runs the reference."""
    if use_triton(backend, out, "residual_fp8_decode") and out.dtype != torch.float64:
        _checked(packed, store, out, bits)
        torch.ops.distripy.residual_fp8_decode_(packed, store, out, bits)
    else:
        residual_fp8_decode_reference_(packed, store, out, bits)
