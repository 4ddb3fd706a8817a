"""Kernel benchmark: the Triton kernels of ``kernels/`` vs cuDNN / torch, at SDXL's shapes.

For latents of 1024², 2048² and 3840² images (128, 256, 480 rows) at each UNet level (320, 640,
1280 channels at 1, 1/2, 1/4 of the latent) and the band heights of N = 1, 2, 4, 8 ranks:

* halo conv (3x3, fp16, channels-last): the Triton kernel reading separate halo buffers, vs cuDNN
  on the same band with plain zero padding (the halo overhead; target <= 1.05x), vs ``torch.cat``
  of the halos + cuDNN (what the reference does);
* GroupNorm + SiLU: the Triton statistics + apply kernels vs ``F.group_norm`` + ``F.silu``
  (target <= 0.6x);
* a ResNet block's body (GroupNorm, SiLU, conv, GroupNorm, SiLU, conv): Triton path vs eager torch.

Ratios are measured side by side in one run, medians over repetitions (CUDA events). Prints a table
and writes ``bench/results/kernels-<host>-<time>.json`` with the device, versions and command.
Run: ``python bench/kernels.py`` on a GPU.
"""

import argparse
import datetime
import json
import platform
import socket
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from distripy.kernels import group_norm_apply, group_norm_stats, halo_conv2d, mean_rstd
from timing import cuda_time_ms

RESULTS = Path(__file__).resolve().parent / "results"
IMAGES = {1024: 128, 2048: 256, 3840: 480}  # image side -> latent rows
LEVELS = [(320, 1), (640, 2), (1280, 4)]  # (channels, downsampling) of SDXL's UNet levels
GROUPS = 32


def _time_ms(fn, repeats: int, iters: int = 10) -> float:
    fn()  # warm-up: compilation and autotuning
    return cuda_time_ms(fn, iters, repeats)


def _fused_group_norm_silu(x):
    stats = group_norm_stats(x, GROUPS, backend="triton")
    count = x[0].numel() // GROUPS
    mean, rstd = mean_rstd(stats, count, 1e-5)
    return group_norm_apply(x, mean, rstd, None, None, GROUPS, silu=True, backend="triton")


def measure(image: int, channels: int, down: int, ranks: int, repeats: int) -> dict:
    rows = IMAGES[image] // down // ranks
    width = IMAGES[image] // down
    x = torch.randn(1, channels, rows, width, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    top = torch.randn(1, channels, 1, width, device="cuda", dtype=torch.float16)
    bottom = torch.randn_like(top)
    weight = (
        torch.randn(channels, channels, 3, 3, device="cuda", dtype=torch.float16) / channels**0.5
    ).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, device="cuda", dtype=torch.float16)

    def conv_triton():
        return halo_conv2d(x, top, bottom, weight, bias, 1, 1, backend="triton")

    def conv_cudnn_band():
        return F.conv2d(x, weight, bias, 1, 1)

    def conv_cat_cudnn():
        return F.conv2d(torch.cat([top, x, bottom], 2), weight, bias, 1, (0, 1))

    def gn_torch():
        return F.silu(F.group_norm(x, GROUPS, eps=1e-5))

    def block_triton():
        h = conv_and(_fused_group_norm_silu(x))
        return conv_and(_fused_group_norm_silu(h))

    def conv_and(h):
        return halo_conv2d(h, top, bottom, weight, bias, 1, 1, backend="triton")

    def block_torch():
        h = F.conv2d(torch.cat([top, gn_torch(), bottom], 2), weight, bias, 1, (0, 1))
        h = F.silu(F.group_norm(h, GROUPS, eps=1e-5))
        return F.conv2d(torch.cat([top, h, bottom], 2), weight, bias, 1, (0, 1))

    variants = {
        "conv_triton": conv_triton,
        "conv_cudnn_band": conv_cudnn_band,
        "conv_cat_cudnn": conv_cat_cudnn,
        "gn_silu_triton": lambda: _fused_group_norm_silu(x),
        "gn_silu_torch": gn_torch,
        "block_triton": block_triton,
        "block_torch": block_torch,
    }
    t = {name: _time_ms(fn, repeats) for name, fn in variants.items()}
    fastest_conv = "triton" if t["conv_triton"] <= t["conv_cat_cudnn"] else "cat+cudnn"
    return {
        "image": image,
        "channels": channels,
        "level_down": down,
        "ranks": ranks,
        "band_rows": rows,
        "width": width,
        "ms": t,
        "conv_vs_cudnn_band": t["conv_triton"] / t["conv_cudnn_band"],
        "conv_vs_cat_cudnn": t["conv_triton"] / t["conv_cat_cudnn"],
        "cat_cudnn_vs_cudnn_band": t["conv_cat_cudnn"] / t["conv_cudnn_band"],
        "gn_silu_vs_torch": t["gn_silu_triton"] / t["gn_silu_torch"],
        "block_vs_torch": t["block_triton"] / t["block_torch"],
        "conv_fastest": fastest_conv,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, nargs="+", default=sorted(IMAGES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    columns = "conv/cudnn conv/cat+cudnn gn+silu/torch block/torch  fastest conv"
    print(f"{'image':>6} {'C':>5} {'N':>2} {'rows':>5} | {columns}")
    for image in args.images:
        for channels, down in LEVELS:
            for ranks in args.ranks:
                if IMAGES[image] // down % ranks:
                    continue
                row = measure(image, channels, down, ranks, args.repeats)
                rows.append(row)
                print(
                    f"{image:>6} {channels:>5} {ranks:>2} {row['band_rows']:>5} | "
                    f"{row['conv_vs_cudnn_band']:>10.2f} {row['conv_vs_cat_cudnn']:>15.2f} "
                    f"{row['gn_silu_vs_torch']:>13.2f} {row['block_vs_torch']:>11.2f}  {row['conv_fastest']}"
                )
    from distripy.runtime import native_available

    environment = {
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "native_runtime": native_available(),
        "command": " ".join([sys.executable] + sys.argv),
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.output or RESULTS / f"kernels-{socket.gethostname()}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
