"""Attention over keys and values that arrive in blocks, merged by log-sum-exp.

Softmax attention of queries ``q`` over keys and values split into blocks ``(k_i, v_i)`` (a
band's own tokens, then each other band's as it arrives) equals the attention over all of them
when each block's partial result keeps its log-sum-exp. For one query, with ``s_i`` the block's
scaled scores, ``l_i = logsumexp(s_i)`` and ``o_i = softmax(s_i) @ v_i``:

    L = logsumexp_i(l_i)            o = sum_i exp(l_i - L) * o_i

since ``exp(l_i - L)`` is the share of the whole softmax's mass that block ``i`` holds. The merge
is associative, so blocks can be folded in one at a time as they arrive (``merge_partial``) and
the result does not depend on the order. Plain torch on ``(B, heads, L_q, d)`` outputs and
``(B, heads, L_q)`` log-sum-exps, computed in fp32.

``attention_with_lse`` gives one block's ``(o_i, l_i)``. Its reference (``backend='torch'``) is the
math (scores, logsumexp, softmax) in fp32 (fp64 for fp64 inputs). The fused path is torch's own
scaled-dot-product attention kernels that return the log-sum-exp: on CUDA flash attention (fp16 /
bf16, head size a multiple of 8 up to 256) or memory-efficient attention (otherwise); on CPU
torch's flash attention for CPU.
"""

import math
from typing import Optional, Sequence, Tuple

import torch

from distripy.errors import InputError

__all__ = [
    "attention_with_lse",
    "attention_with_lse_reference",
    "merge_partial",
    "merge_partial_",
    "merge_partials",
]

BACKENDS = ("auto", "triton", "torch")  # auto, triton: torch's fused kernels; torch: the reference


def _check_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape[:-1] + (k.shape[-1],) or q.shape[:2] != k.shape[:2]:
        raise InputError(
            f"attention_with_lse: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
            "(B, H, L, d) with matching batch, heads and key lengths"
        )
    if k.shape[2] == 0:
        raise InputError("attention_with_lse: a block needs at least one key")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise InputError(
            f"attention_with_lse: q, k, v are {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}; dtype and device must agree"
        )


def attention_with_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The math, in fp32 (fp64 for fp64 inputs)."""
    _check_blocks(q, k, v)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.to(compute))
    return out.to(q.dtype), lse


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]):
    """torch's fused attention that returns the log-sum-exp (B, H, Lq)."""
    length = q.shape[2]
    if q.device.type == "cpu":  # (meta: the CUDA kernels' shapes, for estimates without a GPU)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale
        )
        return out, lse
    head = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16) and head % 8 == 0 and head <= 256:
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return result[0], result[1]
    # Memory-efficient attention pads the log-sum-exp's query axis (to a multiple of 32).
    result = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, False, scale=scale
    )
    return result[0], result[1][:, :, :length]


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    backend: str = "torch",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale) v, logsumexp(q k^T * scale))`` for ``q`` (B, H, Lq, d) and ``k``,
    ``v`` (B, H, Lk, d) (``scale`` 1 / sqrt(d) when ``None``); the output in ``q``'s dtype, the
    log-sum-exp fp32 (fp64 for fp64 inputs), (B, H, Lq). ``backend``: ``torch`` (the reference) or
    ``auto`` / ``triton`` (torch's fused kernels, see the module docstring)."""
    if backend not in BACKENDS:
        raise InputError(f"attention_with_lse: backend={backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return attention_with_lse_reference(q, k, v, scale)
    _check_blocks(q, k, v)
    if q.device.type not in ("cpu", "cuda", "meta"):
        return attention_with_lse_reference(q, k, v, scale)
    return _fused(q, k, v, scale)


def _check_partials(op: str, out, lse, block_out, block_lse) -> None:
    if out.shape != block_out.shape or lse.shape != block_lse.shape or out.shape[:-1] != lse.shape:
        raise InputError(
            f"{op}: outputs {tuple(out.shape)} / {tuple(block_out.shape)} and log-sum-exps "
            f"{tuple(lse.shape)} / {tuple(block_lse.shape)} do not match"
        )


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's ``(block_out, block_lse)`` into the running ``(out, lse)``; the result in
    ``out``'s dtype (keep the running output in fp32 to merge 16-bit blocks without rounding each
    step)."""
    _check_partials("merge_partial", out, lse, block_out, block_lse)
    compute = torch.float64 if torch.float64 in (out.dtype, lse.dtype) else torch.float32
    lse, block_lse = lse.to(compute), block_lse.to(compute)
    total = torch.logaddexp(lse, block_lse)
    merged = torch.exp(lse - total)[..., None] * out.to(compute) + (
        torch.exp(block_lse - total)[..., None] * block_out.to(compute)
    )
    return merged.to(out.dtype), total


def merge_partial_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """``merge_partial`` in place, into a running fp32 (or fp64) ``out`` and ``lse``: two passes over
    the output (scale it, add the scaled block) instead of a new tensor per step."""
    if out.dtype not in (torch.float32, torch.float64) or lse.dtype != out.dtype:
        raise InputError(
            f"merge_partial_: the running out and lse must be fp32 or fp64 of one dtype, got {out.dtype} "
            f"and {lse.dtype}"
        )
    _check_partials("merge_partial_", out, lse, block_out, block_lse)
    block_lse = block_lse.to(lse.dtype)
    total = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - total).unsqueeze(-1))
    out.addcmul_(block_out, torch.exp(block_lse - total).unsqueeze(-1))
    lse.copy_(total)


def merge_partials(
    partials: Sequence[Tuple[torch.Tensor, torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge every block's ``(out, lse)`` (any order) into the whole attention's."""
    if not partials:
        raise InputError("merge_partials: no blocks")
    out, lse = partials[0]
    for block_out, block_lse in partials[1:]:
        out, lse = merge_partial(out, lse, block_out, block_lse)
    return out, lse
