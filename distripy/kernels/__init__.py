"""distripy.kernels: the math of the patch-parallel modules, one op per file.

Each file holds an op's plain-torch reference, which defines the op; the fused Triton kernels that run on
CUDA live beside their reference and are tested against it (on CPU under ``TRITON_INTERPRET=1``).

* ``group_norm_stats``: per (batch, group) sum and sum of squares of a band (+ Triton kernel);
* ``group_norm_partial_stats``: the same per spatial chunk, left for the next op to add (its kernel);
* ``group_norm_sum_partials``: those partial sums added, into the buffers that keep them (+ Triton
  kernel);
* ``group_norm_combine``: the sync / corrected / stale / local combination and mean, rstd;
* ``group_norm_mean_rstd``: those formulas as one op, to mean and rstd, from sums or partial sums,
  optionally writing the band's sums into buffers besides (+ Triton kernel);
* ``group_norm_apply``: normalise + affine (+ SiLU), optionally into a view (+ Triton kernel);
* ``halo_conv``: a band's convolution from the band and its halo rows held apart, optionally
  with the GroupNorm (+ SiLU) of its input fused in as a prologue, whole or by output-row range
  (the interior rows before the halos arrive, the boundary rows after); on CUDA the halo-padded
  band (``halo_pad``) + cuDNN;
* ``halo_conv_triton``: the same convolution as one fused Triton kernel (groups=1), experimental,
  run only when asked for (``DistriConfig(halo_conv_backend="triton")``);
* ``attention_merge``: attention over key/value blocks as they arrive, merged by log-sum-exp;
* ``halo_pad``: a band's halo-padded convolution input in one pass (the band activated, the halos
  around it, the boundary rows its neighbours need written out on the way) (+ Triton kernel);
* ``residual_codec``: an exchanged tensor as its 1- or 2-bit change since the baseline sender and
  receivers share, with rank-1 scales and error feedback, packed for one transfer (+ Triton
  kernels: encode and decode, each one pass with the baseline's update);
* ``fp8_codec``: an exchanged tensor as e4m3 bytes with a power-of-two scale per row, packed for
  one transfer (+ Triton kernels: encode and decode, each one pass; integer arithmetic, so that they
  compile for sm_80 too).
* ``residual_fp8_decode``: a receiver's residual step over a baseline kept as fp8 bytes (decode,
  add the change, store back) in one kernel.

``meta_as_gpu()`` makes ``auto`` choose the GPU paths for tensors on the ``meta`` device, where a
whole step runs without memory (``bench/kernel_count.py`` counts a GPU step's kernels so).

Every function takes ``backend``: ``torch`` (the reference), ``triton`` or ``auto`` (on CUDA the
Triton kernels, and the cuDNN path for the convolution; on CPU the references).
"""

from distripy.kernels.attention_merge import (
    attention_with_lse,
    attention_with_lse_reference,
    merge_partial,
    merge_partial_,
    merge_partials,
)
from distripy.kernels.group_norm_apply import group_norm_apply, group_norm_apply_reference
from distripy.kernels.group_norm_combine import corrected_sums, mean_rstd, stale_sums
from distripy.kernels.group_norm_mean_rstd import (
    Combine,
    group_norm_mean_rstd,
    group_norm_mean_rstd_reference,
)
from distripy.kernels.group_norm_partial_stats import (
    group_norm_partial_stats,
    group_norm_partial_stats_reference,
)
from distripy.kernels.group_norm_stats import elements_per_group, group_norm_stats, group_norm_stats_reference
from distripy.kernels.group_norm_sum_partials import (
    group_norm_sum_partials,
    group_norm_sum_partials_reference,
)
from distripy.kernels.halo_conv import (
    GroupNormPrologue,
    band_compatible,
    halo_conv2d,
    halo_conv2d_reference,
    halo_rows,
    interior_rows,
    write_sends,
)
from distripy.kernels.halo_conv_triton import halo_conv2d_triton  # noqa: F401  (registers its ops)
from distripy.kernels._backend import meta_as_gpu
from distripy.kernels.halo_pad import halo_pad, halo_pad_reference
from distripy.kernels.residual_codec import nonfinite_rows, residual_decode_, residual_encode_, residual_layout
from distripy.kernels.fp8_codec import fp8_decode_, fp8_encode_, fp8_layout
from distripy.kernels.residual_fp8_decode import residual_fp8_decode_

__all__ = [
    "fp8_decode_",
    "fp8_encode_",
    "fp8_layout",
    "nonfinite_rows",
    "residual_decode_",
    "residual_encode_",
    "residual_fp8_decode_",
    "residual_layout",
    "halo_pad",
    "halo_pad_reference",
    "meta_as_gpu",
    "write_sends",
    "Combine",
    "attention_with_lse",
    "attention_with_lse_reference",
    "GroupNormPrologue",
    "band_compatible",
    "corrected_sums",
    "elements_per_group",
    "group_norm_apply",
    "group_norm_apply_reference",
    "group_norm_mean_rstd",
    "group_norm_mean_rstd_reference",
    "group_norm_partial_stats",
    "group_norm_partial_stats_reference",
    "group_norm_stats",
    "group_norm_stats_reference",
    "group_norm_sum_partials",
    "group_norm_sum_partials_reference",
    "halo_conv2d",
    "halo_conv2d_reference",
    "halo_rows",
    "interior_rows",
    "mean_rstd",
    "merge_partial",
    "merge_partial_",
    "merge_partials",
    "stale_sums",
]
