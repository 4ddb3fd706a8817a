"""Blockwise attention merged by log-sum-exp equals whole-sequence attention (float64 reference,
fresh random inputs, odd lengths, one-token blocks, any arrival order)."""

import math

import pytest
import torch

from distripy.errors import InputError
from distripy.kernels.attention_merge import attention_with_lse, merge_partial, merge_partial_, merge_partials


def _whole(q, k, v):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v.double(), torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("lengths", [[7, 5, 9], [1, 1, 1, 1], [13], [3, 1, 6, 2, 11]])
@pytest.mark.parametrize("order", ["arrival", "reversed"])
@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto on CPU: torch's flash attention for CPU
def test_blocks_merged_equal_whole_sequence_attention(lengths, order, backend):
    generator = torch.Generator().manual_seed(sum(lengths) * 31 + len(order) + len(backend))
    q = torch.randn(2, 3, 5, 8, generator=generator)
    k = torch.randn(2, 3, sum(lengths), 8, generator=generator) * 2
    v = torch.randn(2, 3, sum(lengths), 8, generator=generator)
    blocks = list(zip(k.split(lengths, dim=2), v.split(lengths, dim=2)))
    if order == "reversed":
        blocks = blocks[::-1]
    out, lse = merge_partials([attention_with_lse(q, kb, vb, backend=backend) for kb, vb in blocks])
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


def test_the_in_place_merge_of_half_precision_blocks_equals_whole_sequence_attention():
    generator = torch.Generator().manual_seed(12)
    q = torch.randn(1, 3, 7, 16, generator=generator).to(torch.bfloat16)
    k = (torch.randn(1, 3, 11, 16, generator=generator) * 2).to(torch.bfloat16)
    v = torch.randn(1, 3, 11, 16, generator=generator).to(torch.bfloat16)
    blocks = list(zip(k.split([4, 1, 6], dim=2), v.split([4, 1, 6], dim=2)))
    out, lse = attention_with_lse(q, *blocks[0])
    out, lse = out.float(), lse.float()
    for kb, vb in blocks[1:]:
        merge_partial_(out, lse, *attention_with_lse(q, kb, vb))
    expected_out, expected_lse = _whole(q, k, v)
    torch.testing.assert_close(out.double(), expected_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-3, atol=1e-3)
    with pytest.raises(InputError, match="must be fp32 or fp64"):
        merge_partial_(out.bfloat16(), lse, *attention_with_lse(q, kb, vb))


def test_float64_blocks_are_computed_in_float64():
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    out, lse = merge_partials(
        [attention_with_lse(q, k[:, :, :2], v[:, :, :2]), attention_with_lse(q, k[:, :, 2:], v[:, :, 2:])]
    )
    expected_out, expected_lse = _whole(q, k, v)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)


def test_an_unknown_backend_is_refused():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(InputError, match="backend='cudnn'"):
        attention_with_lse(q, q, q, backend="cudnn")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 40])  # 40: flash attention's multiple of 8, not of 16
def test_fused_cuda_blocks_merged_equal_whole_sequence_attention(dtype, head_dim):
    """Flash attention (16-bit) or memory-efficient attention (fp32) with their log-sum-exps, a
    query count that is not a multiple of 32 (the efficient kernel pads its log-sum-exp)."""
    generator = torch.Generator().manual_seed(head_dim)
    lengths = [100, 37, 1, 64]
    q = torch.randn(2, 5, 77, head_dim, generator=generator).cuda().to(dtype)
    k = (torch.randn(2, 5, sum(lengths), head_dim, generator=generator) * 2).cuda().to(dtype)
    v = torch.randn(2, 5, sum(lengths), head_dim, generator=generator).cuda().to(dtype)
    out = lse = None
    for kb, vb in zip(k.split(lengths, dim=2), v.split(lengths, dim=2)):
        block_out, block_lse = attention_with_lse(q, kb, vb, backend="auto")
        assert block_lse.shape == (2, 5, 77)
        if out is None:
            out, lse = block_out.float(), block_lse
        else:
            out, lse = merge_partial(out, lse, block_out, block_lse)
    expected_out, expected_lse = _whole(q, k, v)
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(out.double().cpu(), expected_out.cpu(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lse.double().cpu(), expected_lse.cpu(), rtol=tolerance, atol=tolerance)
