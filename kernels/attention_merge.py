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

``attention_with_lse`` gives one block's ``(o_i, l_i)``: the math (scores, logsumexp, softmax) in
fp32 as the reference.
"""

import math
from typing import Optional, Sequence, Tuple

import torch

from distripy.errors import InputError

__all__ = ["attention_with_lse", "merge_partial", "merge_partials"]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale) v, logsumexp(q k^T * scale))`` for ``q`` (B, H, Lq, d) and ``k``,
    ``v`` (B, H, Lk, d); the output in ``q``'s dtype, the log-sum-exp fp32 (B, H, Lq)."""
    if q.dim() != 4 or k.shape != v.shape[:-1] + (k.shape[-1],) or q.shape[:2] != k.shape[:2]:
        raise InputError(
            f"attention_with_lse: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
            "(B, H, L, d) with matching batch, heads and key lengths"
        )
    if k.shape[2] == 0:
        raise InputError("attention_with_lse: a block needs at least one key")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's ``(block_out, block_lse)`` into the running ``(out, lse)``."""
    if out.shape != block_out.shape or lse.shape != block_lse.shape or out.shape[:-1] != lse.shape:
        raise InputError(
            f"merge_partial: outputs {tuple(out.shape)} / {tuple(block_out.shape)} and log-sum-exps "
            f"{tuple(lse.shape)} / {tuple(block_lse.shape)} do not match"
        )
    total = torch.logaddexp(lse.float(), block_lse.float())
    merged = torch.exp(lse.float() - total)[..., None] * out.float() + (
        torch.exp(block_lse.float() - total)[..., None] * block_out.float()
    )
    return merged.to(out.dtype), total


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
