"""Kernel benchmark: the Triton kernels of ``distripy/kernels/`` vs cuDNN / torch, at SDXL's shapes.

For latents of 1024², 2048² and 3840² images (128, 256, 480 rows) at SDXL's 3x3 convolutions (per
UNet level: 320, 640, 1280 channels at 1, 1/2, 1/4 of the latent; with ``--shapes all`` also the
down blocks' channel-raising convs, the up blocks' concatenated inputs and the stride-2
downsamplers) and the band heights of N = 1, 2, 4, 8 ranks, fp16, channels-last:

* halo conv: the experimental fused Triton kernel reading separate halo buffers vs cuDNN on the
  same band with plain zero padding (the halo overhead; target <= 1.05x) and vs the default
  ``cudnn`` path (the halo-padded buffer, ``kernels.halo_pad``, + cuDNN, without a prologue);
* GroupNorm + SiLU + halo conv (a ResNet block's half): the fused Triton kernel (prologue) vs the
  ``cudnn`` path (GroupNorm applied into the padded buffer by ``halo_pad``, then cuDNN) vs eager
  torch (``F.group_norm``, ``F.silu``, ``torch.cat``, cuDNN);
* GroupNorm + SiLU alone: the Triton statistics + apply kernels vs ``F.group_norm`` + ``F.silu``
  (target <= 0.6x);
* a ResNet block's body (GroupNorm, SiLU, conv, GroupNorm, SiLU, conv) as ``auto`` runs it vs eager
  torch.

Ratios are measured side by side in one run, medians over repetitions (CUDA events). Prints a table
(which path wins where: ``fused_conv_winner`` per shape) and writes
``bench/results/kernels-<host>-<time>.json`` with the device, versions and command. The cuDNN path
is the one default (``DistriConfig.halo_conv_backend``); a per-shape dispatch to the fused kernel
comes back only where this benchmark shows it winning.
Run: ``python bench/kernel_speed.py [--shapes all]`` on a GPU.
``python bench/kernel_speed.py --compile-report [compile_report options]`` needs no GPU: it runs
``bench/compile_report.py`` (every kernel x tile x dtype compiled for sm_90a and sm_80).
"""

import argparse
import socket
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cuda_time_ms, environment, results_path, write_json

from distripy.kernels import GroupNormPrologue, group_norm_apply, group_norm_stats, halo_conv2d, mean_rstd

IMAGES = {1024: 128, 2048: 256, 3840: 480}  # image side -> latent rows
GROUPS = 32
# (in channels, out channels, downsampling of the level, stride) of SDXL's 3x3 convolutions
CORE_SHAPES = [(320, 320, 1, 1), (640, 640, 2, 1), (1280, 1280, 4, 1)]
MORE_SHAPES = [
    (320, 640, 2, 1),  # first resnet of down block 1 (at its output's resolution)
    (640, 1280, 4, 1),
    (2560, 1280, 4, 1),  # up block 0: skip connection concatenated
    (1920, 1280, 4, 1),
    (1920, 640, 2, 1),  # up block 1
    (1280, 640, 2, 1),
    (960, 640, 2, 1),
    (960, 320, 1, 1),  # up block 2
    (640, 320, 1, 1),
    (320, 320, 1, 2),  # downsamplers (input resolution)
    (640, 640, 2, 2),
]


TIMING = "graph"  # --timing: "graph" (GPU time, as the CUDA-graph step runs them) or "eager"


def _time_ms(fn, repeats: int, iters: int = 10) -> float:
    """Median per-call time. ``graph``: ``iters`` calls captured in one CUDA graph and replayed,
    so the figure is the GPU's time without the host's launch cost (these bands take microseconds:
    timed eagerly, Python's launch path of a Triton kernel, ~20 us, would be most of it)."""
    fn()  # warm-up: compilation and autotuning
    if TIMING == "eager":
        return cuda_time_ms(fn, iters, repeats)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    return cuda_time_ms(graph.replay, 1, repeats) / iters


def _fused_statistics(x):
    stats = group_norm_stats(x, GROUPS, backend="triton")
    return mean_rstd(stats, x[0].numel() // GROUPS, 1e-5)


def _fused_group_norm_silu(x):
    mean, rstd = _fused_statistics(x)
    return group_norm_apply(x, mean, rstd, None, None, GROUPS, silu=True, backend="triton")


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def measure(image: int, shape, ranks: int, batch: int, repeats: int) -> dict:
    in_channels, out_channels, down, stride = shape
    rows = IMAGES[image] // down // ranks
    width = IMAGES[image] // down
    kw = dict(device="cuda", dtype=torch.float16)
    x = _channels_last(torch.randn(batch, in_channels, rows, width, **kw))
    top = _channels_last(torch.randn(batch, in_channels, 1, width, **kw))
    bottom = _channels_last(torch.randn(batch, in_channels, 1 if stride == 1 else 0, width, **kw))
    bottom = bottom if stride == 1 else None
    weight = _channels_last(torch.randn(out_channels, in_channels, 3, 3, **kw) / (9 * in_channels) ** 0.5)
    bias = torch.randn(out_channels, **kw)
    square = in_channels == out_channels and stride == 1
    mean, rstd = _fused_statistics(x)
    prologue = GroupNormPrologue(mean, rstd, None, None, GROUPS, True)

    def conv(backend, with_prologue=False):
        p = prologue if with_prologue else None
        return lambda: halo_conv2d(x, top, bottom, weight, bias, stride, 1, prologue=p, backend=backend)

    def eager_norm_conv():
        h = F.silu(F.group_norm(x, GROUPS, eps=1e-5))
        parts = [top, h] + ([bottom] if bottom is not None else [])
        return F.conv2d(torch.cat(parts, 2), weight, bias, stride, (0, 1))

    variants = {
        "conv_triton": conv("triton"),
        "conv_cudnn_path": conv("cudnn"),
        "conv_cudnn_band": lambda: F.conv2d(x, weight, bias, stride, 1),
        "norm_conv_triton": conv("triton", True),
        "norm_conv_cudnn_path": conv("cudnn", True),
        "norm_conv_eager": eager_norm_conv,
        "gn_silu_triton": lambda: _fused_group_norm_silu(x),
        "gn_silu_torch": lambda: F.silu(F.group_norm(x, GROUPS, eps=1e-5)),
    }
    if square:

        def block(backend):
            def run():
                mean, rstd = _fused_statistics(x)
                p = GroupNormPrologue(mean, rstd, None, None, GROUPS, True)
                h = halo_conv2d(x, top, bottom, weight, bias, 1, 1, prologue=p, backend=backend)
                mean, rstd = _fused_statistics(h)
                p = GroupNormPrologue(mean, rstd, None, None, GROUPS, True)
                return halo_conv2d(h, top, bottom, weight, bias, 1, 1, prologue=p, backend=backend)

            return run

        def block_eager():
            h = F.conv2d(
                torch.cat([top, F.silu(F.group_norm(x, GROUPS)), bottom], 2), weight, bias, 1, (0, 1)
            )
            return F.conv2d(
                torch.cat([top, F.silu(F.group_norm(h, GROUPS)), bottom], 2), weight, bias, 1, (0, 1)
            )

        variants.update(block_auto=block("auto"), block_triton=block("triton"), block_eager=block_eager)
    t = {name: _time_ms(fn, repeats) for name, fn in variants.items()}
    winner = "triton" if t["norm_conv_triton"] <= t["norm_conv_cudnn_path"] else "cudnn"
    row = {
        "image": image,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "stride": stride,
        "level_down": down,
        "ranks": ranks,
        "batch": batch,
        "band_rows": rows,
        "width": width,
        "ms": t,
        "conv_vs_cudnn_band": t["conv_triton"] / t["conv_cudnn_band"],
        "cudnn_path_vs_cudnn_band": t["conv_cudnn_path"] / t["conv_cudnn_band"],
        "norm_conv_triton_vs_eager": t["norm_conv_triton"] / t["norm_conv_eager"],
        "norm_conv_cudnn_path_vs_eager": t["norm_conv_cudnn_path"] / t["norm_conv_eager"],
        "gn_silu_vs_torch": t["gn_silu_triton"] / t["gn_silu_torch"],
        "fused_conv_winner": winner,
    }
    if square:
        row["block_auto_vs_eager"] = t["block_auto"] / t["block_eager"]
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compile-report" in argv:
        import compile_report

        argv.remove("--compile-report")
        return compile_report.main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, nargs="+", default=sorted(IMAGES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="per-rank batch (1: CFG split)")
    parser.add_argument("--shapes", choices=["core", "all"], default="core")
    parser.add_argument(
        "--timing",
        choices=["graph", "eager"],
        default="graph",
        help="GPU time (graph replays) or with launches",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    global TIMING
    TIMING = args.timing
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from distripy.kernels.halo_conv_triton import autotuned_tiles
    from distripy.runtime import native_available

    record = environment(native_runtime=native_available(), timing=args.timing)
    path = args.output or results_path("kernels", socket.gethostname())

    def save(complete: bool) -> None:
        """The results so far, whole or not at all: a run stopped at its time limit keeps them."""
        write_json(
            path,
            {"environment": record, "rows": rows, "triton_tiles": autotuned_tiles(), "complete": complete},
        )

    rows = []
    shapes = CORE_SHAPES + (MORE_SHAPES if args.shapes == "all" else [])
    header = "conv/band cudnn-path/band norm+conv: triton/eager cudnn/eager  gn+silu/torch block/eager winner"
    print(f"{'image':>6} {'Cin':>5} {'Cout':>5} {'s':>1} {'N':>2} {'B':>1} {'rows':>5} | {header}")
    for image in args.images:
        for shape in shapes:
            for ranks in args.ranks:
                rows_at_level = IMAGES[image] // shape[2]
                if rows_at_level % ranks or (rows_at_level // ranks) % shape[3]:
                    continue
                for batch in args.batch:
                    row = measure(image, shape, ranks, batch, args.repeats)
                    rows.append(row)
                    block = (
                        f"{row['block_auto_vs_eager']:>11.2f}"
                        if "block_auto_vs_eager" in row
                        else f"{'':>11}"
                    )
                    print(
                        f"{image:>6} {shape[0]:>5} {shape[1]:>5} {shape[3]:>1} {ranks:>2} {batch:>1} "
                        f"{row['band_rows']:>5} | {row['conv_vs_cudnn_band']:>9.2f} "
                        f"{row['cudnn_path_vs_cudnn_band']:>15.2f} {row['norm_conv_triton_vs_eager']:>20.2f} "
                        f"{row['norm_conv_cudnn_path_vs_eager']:>12.2f} {row['gn_silu_vs_torch']:>14.2f} "
                        f"{block} {row['fused_conv_winner']}"
                    )
                    save(complete=False)
    save(complete=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
