"""Which CUDA path computes a halo convolution of a given shape: the fused Triton kernel or the
halo-padded buffer + cuDNN (see ``kernels.halo_conv``).

Neither wins everywhere: cuDNN's convolutions are hard to beat on large compute-bound bands, while
the Triton kernel saves the normalised activation's write and re-read and the halo copies, which
matter most on short bands and memory-bound shapes. ``bench/kernels.py --write-dispatch`` times both
paths side by side at SDXL's shapes on a GPU and writes the winners to ``halo_conv_paths.json``
beside this file, keyed by GPU name, dtype and shape. A shape in that table takes its measured
winner; any other shape takes cuDNN, the path that is never far from the best.
"""

import functools
import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from distripy.errors import InputError

__all__ = ["TABLE_PATH", "choose_halo_conv_path", "dispatch_key", "load_table"]

TABLE_PATH = Path(__file__).resolve().parent / "halo_conv_paths.json"
PATHS = ("triton", "cudnn")
DEFAULT_PATH = "cudnn"

Key = Tuple[str, str, int, int, int, int, int, int, int, int, int]


def dispatch_key(device_name: str, x: torch.Tensor, weight: torch.Tensor, stride) -> Key:
    """``(GPU, dtype, batch, in channels, out channels, kernel h, kernel w, stride h, stride w,
    band rows, width)`` of a convolution of the band ``x``."""
    return (device_name,) + _shape_key(x, weight, stride)


def _shape_key(x: torch.Tensor, weight: torch.Tensor, stride) -> Tuple:
    """``dispatch_key`` without the GPU."""
    stride_h, stride_w = (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))
    batch, channels, rows, width = x.shape
    return (
        str(x.dtype).replace("torch.", ""),
        int(batch),
        int(channels),
        int(weight.shape[0]),
        int(weight.shape[2]),
        int(weight.shape[3]),
        stride_h,
        stride_w,
        int(rows),
        int(width),
    )


def _entry_key(entry: dict) -> Key:
    return (
        entry["device"],
        entry["dtype"],
        entry["batch"],
        entry["in_channels"],
        entry["out_channels"],
        entry["kernel"][0],
        entry["kernel"][1],
        entry["stride"][0],
        entry["stride"][1],
        entry["rows"],
        entry["width"],
    )


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> Dict[Key, str]:
    """The measured winners, ``{key: path}``; empty when no table has been written. A table that
    does not parse, or names an unknown path, is an error (a wrong table must not pass silently)."""
    file = Path(path)
    if not file.exists():
        return {}
    data = json.loads(file.read_text(encoding="utf-8"))
    table = {}
    for entry in data.get("entries", []):
        if entry.get("path") not in PATHS:
            raise InputError(
                f"{file}: entry {entry} names path {entry.get('path')!r}, expected one of {PATHS}"
            )
        table[_entry_key(entry)] = entry["path"]
    return table


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


# Under torch.compile the lookup runs once, at trace time, and its answer is a constant of the
# graph: the table is read from a file (which dynamo cannot trace) and never changes in a process.
@torch.compiler.assume_constant_result
def _measured_path(index: int, shape_key: Tuple) -> str:
    return load_table().get((_device_name(index),) + shape_key, DEFAULT_PATH)


def choose_halo_conv_path(x: torch.Tensor, weight: torch.Tensor, stride=1, groups: int = 1) -> str:
    """``triton`` or ``cudnn`` for this CUDA convolution: the measured winner for its shape, else
    cuDNN. Grouped convolutions always take cuDNN (the kernel handles groups=1)."""
    if groups != 1:
        return "cudnn"
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _measured_path(index, _shape_key(x, weight, stride))
