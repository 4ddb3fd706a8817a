"""Every Triton kernel compiles for the GPUs distripy targets, checked on a CPU.

``bench/compile_report.py --ci`` (a subprocess: the kernels must not be replaced by Triton's
interpreter, which the rest of the suite turns on) compiles each kernel from the launch its op
builds, specialised as Triton's JIT would, for sm_90a and sm_80, and runs ``ptxas -v`` on the PTX.
This test reads the numbers and asserts, per kernel x autotune configuration x target: the compile
succeeded, no register spills, shared memory within the target's per-block limit, warpgroup MMA
for convolution tiles of 64+ rows on Hopper; and that a tensor past 2^31 elements is addressed
with 64-bit offsets only. Also on CPU: the autotuner's pruning keeps each dtype to its own tiles,
and the 64-bit path computes what the reference does (under the interpreter).
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_LIMIT_BYTES = {90: 227 * 1024, 80: 163 * 1024}

halo_conv = importlib.import_module("distripy.kernels.halo_conv_triton")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "compile_report.py"), "--ci", "--out", str(out)],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), f"compile_report wrote nothing:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def _name(config) -> str:
    return "BM{BLOCK_M}_BN{BLOCK_N}_BK{BLOCK_K}".format(**config.kwargs) + (
        f"_w{config.num_warps}_s{config.num_stages}"
    )


def test_every_kernel_and_configuration_was_compiled_for_both_targets(report):
    seen = {(r["kernel"], r["variant"], r["config"], r["capability"]) for r in report["kernels"]}
    for kernel, variant in (
        ("group_norm_stats", ""),
        ("group_norm_apply", "silu"),
        ("group_norm_apply", "into_buffer"),
        ("group_norm_sum_partials", "two_outputs"),
        ("halo_pad", "prologue_sends"),
        ("halo_pad", "copy"),
        *(
            ("group_norm_mean_rstd", mode + variant)
            for mode in ("local", "corrected", "stale")
            for variant in ("", "_partials_out")
        ),
    ):
        for capability in (90, 80):
            assert any(k == kernel and v == variant and c == capability for k, v, _, c in seen), (
                kernel,
                variant,
            )
    for config in halo_conv._CONFIGS_16BIT + halo_conv._CONFIGS_FP32:
        for capability in (90, 80):
            for variant in ("prologue", "plain"):
                assert ("halo_conv2d", variant, _name(config), capability) in seen, (
                    _name(config),
                    capability,
                )
    for variant, capability in (("2bit", 90), ("1bit", 80)):
        for kernel_part in ("sums", "encode", "decode", "decode_fp8_baseline"):
            assert any(
                k == "residual_codec" and v == f"{kernel_part}_{variant}" and c == capability for k, v, _, c in seen
            ), (kernel_part, variant, capability)
    for variant in ("encode", "decode"):
        for capability in (90, 80):  # fp8 in integer arithmetic: sm_80 has no fp8 type
            assert any(k == "fp8_codec" and v == variant and c == capability for k, v, _, c in seen), (
                variant,
                capability,
            )
    dtypes = {r["dtype"] for r in report["kernels"] if r["kernel"] == "halo_conv2d"}
    assert dtypes == {"fp16", "bf16", "fp32"}


def test_every_compiled_kernel_fits_does_not_spill_and_uses_the_right_mma(report):
    failures = []
    for r in report["kernels"]:
        where = f"{r['kernel']} {r['variant']} {r['config']} {r['dtype']} {r['layout']} sm_{r['capability']}"
        if r["error"]:
            failures.append(f"{where}: {r['error']}")
            continue
        if r["shared_bytes"] > SHARED_LIMIT_BYTES[r["capability"]]:
            failures.append(f"{where}: {r['shared_bytes']} B of shared memory")
        if r["spill_stores"] or r["spill_loads"]:
            failures.append(f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B")
        if r["registers"] <= 0 or r["registers"] > 255:
            failures.append(f"{where}: {r['registers']} registers (ptxas -v not parsed?)")
        if r["kernel"] == "halo_conv2d":
            rows = int(r["config"].split("_")[0][2:])
            if r["capability"] == 90 and rows >= 64 and r["mma"] != "wgmma":
                failures.append(f"{where}: {r['mma']} instead of wgmma")
            if r["mma"] == "none":
                failures.append(f"{where}: no tensor-core MMA at all")
    assert not failures, "\n".join(failures)


def test_tensors_past_int32_are_addressed_with_64_bit_offsets(report):
    rows = {(r["kernel"], r["tensor"]): r for r in report["offsets"]}
    for kernel in ("group_norm_stats", "group_norm_apply", "halo_conv2d", "halo_pad"):
        big, small = rows[(kernel, "past_int32")], rows[(kernel, "small")]
        assert big["index_64"] and big["offsets_32"] == 0 and big["offsets_64"] > 0, big
        # the count distinguishes: ordinary tensors keep the faster 32-bit offsets
        assert not small["index_64"] and small["offsets_32"] > 0 and small["offsets_64"] == 0, small


def test_pruning_keeps_each_dtype_to_its_own_tiles():
    for dtype, own in ((torch.float16, halo_conv._CONFIGS_16BIT), (torch.float32, halo_conv._CONFIGS_FP32)):
        args = {"x_ptr": torch.empty(1, dtype=dtype), "out_rows": 64, "out_width": 64, "out_channels": 1280}
        kept = halo_conv._prune_configs(halo_conv._CONFIGS, args)
        assert kept and all(any(c is o for o in own) for c in kept)
        assert len(kept) == len(own)  # a large band keeps them all
    tiny = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "out_rows": 4, "out_width": 8, "out_channels": 32}
    kept = halo_conv._prune_configs(halo_conv._CONFIGS, tiny)
    assert [c.kwargs["BLOCK_M"] for c in kept] == [32] * len(kept) and kept


def test_needs_64_bit_offsets_counts_the_furthest_element():
    from distripy.kernels._layout import needs_64_bit_offsets

    base = torch.empty(0, dtype=torch.float16, device="meta")  # strides without storage
    assert not needs_64_bit_offsets(torch.empty(4, 5), None)
    # extent, not numel: a 2-element view whose second element is 2^31 elements away
    assert needs_64_bit_offsets(base.as_strided((2,), (2**31,)))
    assert not needs_64_bit_offsets(base.as_strided((2,), (2**31 - 1,)))
    assert needs_64_bit_offsets(base.as_strided((2**31,), (0,)))  # many elements, one address
    assert not needs_64_bit_offsets(base.as_strided((0, 3), (2**40, 1)))  # empty


def _reserved_view(shape, batch_stride=1_100_000_000):
    """A view whose last batch lies past 2^31 elements: the storage is reserved, and only the
    view's own elements are ever touched."""
    inner = torch.empty(shape[1:]).stride()
    storage = torch.empty((shape[0] - 1) * batch_stride + torch.Size(shape[1:]).numel(), dtype=torch.float16)
    view = storage.as_strided(shape, (batch_stride,) + inner)
    view.copy_(torch.randn(shape, dtype=torch.float64).to(torch.float16))
    return view


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in Triton's interpreter"
)
def test_the_64_bit_path_computes_what_the_references_do():
    from distripy.kernels.group_norm_apply import group_norm_apply_triton
    from distripy.kernels.group_norm_stats import group_norm_stats_triton

    x = _reserved_view((3, 64, 4, 8))
    x64 = x.double()
    stats = group_norm_stats_triton(x, 32)
    grouped = x64.reshape(3, 32, -1)
    torch.testing.assert_close(stats.double()[..., 0], grouped.sum(-1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.double()[..., 1], grouped.square().sum(-1), rtol=1e-5, atol=1e-3)
    mean, rstd = torch.randn(3, 32), torch.rand(3, 32) + 0.5
    y = group_norm_apply_triton(x, mean, rstd, None, None, 32, silu=True)
    expected = (grouped - mean.double()[..., None]) * rstd.double()[..., None]
    expected = torch.nn.functional.silu(expected).reshape(x.shape)
    torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=1e-2)
    weight = torch.randn(16, 64, 3, 3, dtype=torch.float16)
    top = torch.randn(3, 64, 1, 8, dtype=torch.float16)
    out = halo_conv.halo_conv2d_triton(x, top, None, weight, None, padding=1)
    padded = torch.cat((top.double(), x64, torch.zeros(3, 64, 1, 8, dtype=torch.float64)), dim=2)
    expected = torch.nn.functional.conv2d(padded, weight.double(), padding=(0, 1))
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=5e-2)
