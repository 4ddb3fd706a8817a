"""``kernels.halo_pad``: the halo-padded convolution input in one pass, against a float64 reference
computed another way (slices of a zero-padded tensor), on fresh random inputs.

Without a GPU the Triton kernel runs under ``TRITON_INTERPRET=1`` (conftest.py) on small shapes:
odd widths and channel counts, groups of one and several channels, channels-last, missing halos
(the image's edges), halos of 0-2 rows, boundary rows of different heights written out, sends
poisoned with NaN first (every element must be written), fp16, and the cuDNN path of the halo
convolution, which builds its input with it.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from distripy.errors import InputError
from distripy.kernels import GroupNormPrologue, halo_conv2d, halo_pad, meta_as_gpu, write_sends


def _random(*shape, generator, dtype=torch.float32):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _prologue(batch, channels, groups, silu, generator, affine=True):
    mean = _random(batch, groups, generator=generator)
    rstd = torch.rand(batch, groups, generator=generator, dtype=torch.float64).float() + 0.5
    weight = _random(channels, generator=generator) if affine else None
    bias = _random(channels, generator=generator) if affine else None
    return GroupNormPrologue(mean, rstd, weight, bias, groups, silu)


def _expected(x, top, bottom, top_rows, bottom_rows, prologue):
    """float64: the band activated by group statistics spelled out per channel, zero rows where a
    halo is missing, concatenated."""
    x = x.double()
    if prologue is not None:
        batch, channels = x.shape[:2]
        per = channels // prologue.num_groups
        mean = prologue.mean.double().repeat_interleave(per, dim=1)[:, :, None, None]
        rstd = prologue.rstd.double().repeat_interleave(per, dim=1)[:, :, None, None]
        x = (x - mean) * rstd
        if prologue.weight is not None:
            x = x * prologue.weight.double()[None, :, None, None] + prologue.bias.double()[None, :, None, None]
        if prologue.silu:
            x = x * torch.sigmoid(x)
    padded = F.pad(x, (0, 0, top_rows, bottom_rows))
    if top is not None:
        padded[:, :, :top_rows] = top.double()
    if bottom is not None:
        padded[:, :, top_rows + x.shape[2] :] = bottom.double()
    return padded, x


CASES = [
    # batch, channels, rows, width, top, bottom, groups (None: no prologue), silu, sends (rows)
    (2, 8, 5, 7, 1, 1, 4, True, (1, 1)),
    (1, 6, 3, 5, 1, 1, 3, False, (1, 2)),
    (2, 5, 4, 9, 2, 0, 1, True, (0, 2)),
    (1, 4, 1, 3, 1, 1, None, False, (1, 1)),
    (3, 12, 6, 4, 0, 2, 2, True, (2, 0)),
    # groups wider than a channel tile (64): several tiles of one group's channels
    (1, 130, 3, 5, 1, 1, None, False, (1, 1)),
    (1, 256, 2, 3, 1, 1, 2, True, (1, 1)),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("edges", ["both", "none", "top"])
@pytest.mark.parametrize("case", CASES)
def test_halo_pad_equals_the_padded_activation(case, edges, channels_last, backend):
    batch, channels, rows, width, top_rows, bottom_rows, groups, silu, (send_top, send_bottom) = case
    generator = torch.Generator().manual_seed(zlib.crc32(repr((case, edges, channels_last)).encode()))
    x = _random(batch, channels, rows, width, generator=generator)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    top = _random(batch, channels, top_rows, width, generator=generator) if edges in ("both", "top") else None
    bottom = _random(batch, channels, bottom_rows, width, generator=generator) if edges == "both" else None
    prologue = None if groups is None else _prologue(batch, channels, groups, silu, generator)
    sends = tuple(
        torch.full((batch, channels, count, width), float("nan")) if count else None
        for count in (send_top, send_bottom)
    )
    padded = halo_pad(x, top, bottom, top_rows, bottom_rows, prologue, sends, backend=backend)
    expected, activated = _expected(x, top, bottom, top_rows, bottom_rows, prologue)
    assert padded.shape == (batch, channels, top_rows + rows + bottom_rows, width)
    assert padded.is_contiguous(memory_format=torch.channels_last) == channels_last or rows == 1
    torch.testing.assert_close(padded.double(), expected, rtol=1e-5, atol=1e-5)
    if sends[0] is not None:
        torch.testing.assert_close(sends[0].double(), activated[:, :, :send_top], rtol=1e-5, atol=1e-5)
    if sends[1] is not None:
        torch.testing.assert_close(
            sends[1].double(), activated[:, :, rows - send_bottom :], rtol=1e-5, atol=1e-5
        )


def test_halo_pad_in_half_precision_and_on_extreme_values():
    generator = torch.Generator().manual_seed(5)
    x = _random(2, 8, 4, 6, generator=generator, dtype=torch.float16) * 300
    x[0, 0, 0, 0] = float("inf")
    top = _random(2, 8, 1, 6, generator=generator, dtype=torch.float16)
    prologue = _prologue(2, 8, 4, True, generator)
    send = torch.full((2, 8, 1, 6), float("nan"), dtype=torch.float16)
    padded = halo_pad(x, top, None, 1, 1, prologue, (None, send), backend="triton")
    reference = halo_pad(x, top, None, 1, 1, prologue, (None, None), backend="torch")
    torch.testing.assert_close(padded, reference, rtol=2e-3, atol=2e-3, equal_nan=True)
    torch.testing.assert_close(send, reference[:, :, 4:5], rtol=2e-3, atol=2e-3)


def test_halo_pad_refuses_bad_halos_and_sends_naming_them():
    x = torch.randn(1, 4, 3, 5)
    with pytest.raises(InputError, match="top must be"):
        halo_pad(x, torch.randn(1, 4, 2, 5), None, 1, 1)
    with pytest.raises(InputError, match="send_bottom"):
        halo_pad(x, None, None, 1, 1, None, (None, torch.randn(1, 4, 4, 5)))
    with pytest.raises(InputError, match="top_rows=-1"):
        halo_pad(x, None, None, -1, 1)


def test_halo_pad_on_meta_counts_as_the_gpu_op():
    """Under ``meta_as_gpu`` the op dispatches as on a GPU (its fake implementation on meta)."""
    x = torch.empty(2, 8, 4, 6, device="meta")
    with meta_as_gpu():
        padded = halo_pad(x, None, None, 1, 1, backend="auto")
    assert padded.shape == (2, 8, 6, 6) and padded.is_meta


@pytest.mark.parametrize("with_prologue", [False, True])
def test_the_cudnn_paths_sends_equal_the_activated_boundary_rows(with_prologue):
    """The halo convolution's ``sends`` (written by ``halo_pad`` on the cuDNN path, separately on
    the others) hold the band's activated first and last rows, and the convolution is unchanged."""
    generator = torch.Generator().manual_seed(11)
    x = _random(2, 6, 5, 7, generator=generator)
    top, bottom = _random(2, 6, 1, 7, generator=generator), _random(2, 6, 1, 7, generator=generator)
    weight, bias = _random(4, 6, 3, 3, generator=generator), _random(4, generator=generator)
    prologue = _prologue(2, 6, 3, True, generator) if with_prologue else None
    activated = _expected(x, None, None, 0, 0, prologue)[1]
    for backend in ("cudnn", "torch", "triton"):
        sends = (torch.full((2, 6, 1, 7), float("nan")), torch.full((2, 6, 1, 7), float("nan")))
        out = halo_conv2d(x, top, bottom, weight, bias, 1, 1, prologue=prologue, backend=backend, sends=sends)
        expected = F.conv2d(_expected(x, top, bottom, 1, 1, prologue)[0], weight.double(), bias.double(), padding=(0, 1))
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4, msg=backend)
        torch.testing.assert_close(sends[0].double(), activated[:, :, :1], rtol=1e-5, atol=1e-5, msg=backend)
        torch.testing.assert_close(sends[1].double(), activated[:, :, 4:], rtol=1e-5, atol=1e-5, msg=backend)
    fresh = (torch.empty(2, 6, 1, 7), torch.empty(2, 6, 1, 7))
    write_sends(x, prologue, fresh, "torch")
    torch.testing.assert_close(fresh[0].double(), activated[:, :, :1], rtol=1e-5, atol=1e-5)
