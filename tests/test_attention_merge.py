"""Blockwise attention merged by log-sum-exp equals whole-sequence attention (float64 reference,
fresh random inputs, odd lengths, one-token blocks, any arrival order)."""

import math

import pytest
import torch

from distripy.errors import InputError
from distripy.kernels.attention_merge import attention_with_lse, merge_partial, merge_partials


def _whole(q, k, v):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v.double(), torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("lengths", [[7, 5, 9], [1, 1, 1, 1], [13], [3, 1, 6, 2, 11]])
@pytest.mark.parametrize("order", ["arrival", "reversed"])
def test_blocks_merged_equal_whole_sequence_attention(lengths, order):
    generator = torch.Generator().manual_seed(sum(lengths) * 31 + len(order))
    q = torch.randn(2, 3, 5, 8, generator=generator)
    k = torch.randn(2, 3, sum(lengths), 8, generator=generator) * 2
    v = torch.randn(2, 3, sum(lengths), 8, generator=generator)
    blocks = list(zip(k.split(lengths, dim=2), v.split(lengths, dim=2)))
    if order == "reversed":
        blocks = blocks[::-1]
    out, lse = merge_partials([attention_with_lse(q, kb, vb) for kb, vb in blocks])
    expected_out, expected_lse = _whole(q, k, v)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_half_precision_blocks_stay_close_and_keep_the_dtype():
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 4, 16, generator=generator).to(torch.bfloat16) for _ in range(3))
    k2, v2 = (torch.randn(1, 2, 3, 16, generator=generator).to(torch.bfloat16) for _ in range(2))
    out, lse = merge_partial(*attention_with_lse(q, k, v), *attention_with_lse(q, k2, v2))
    expected, _ = _whole(q, torch.cat((k, k2), 2), torch.cat((v, v2), 2))
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_shapes_are_checked():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(InputError, match="at least one key"):
        attention_with_lse(q, q[:, :, :0], q[:, :, :0])
    with pytest.raises(InputError, match="must be"):
        attention_with_lse(q, torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4))
    with pytest.raises(InputError, match="do not match"):
        merge_partial(q, q[..., 0], q[:, :, :2], q[:, :, :2, 0])
    with pytest.raises(InputError, match="no blocks"):
        merge_partials([])
