"""The GPU kernels one UNet step launches, counted on the ``meta`` device (no GPU, no memory).

Under CUDA graphs a step costs its kernels' work plus a boundary per kernel, and on thin bands
(1024² on 8 GPUs) the boundaries are a large share of the step: the number of kernels is the
measure of the patch layer's overhead. This builds SDXL's UNet from its config on ``meta``, runs
one step of it, and maps every op the dispatcher sees to the kernels a GPU launches for it:

* the plain UNet (one device, diffusers' own forward);
* one rank's step of the patch-parallel UNet (a middle band of ``--ranks``; ``LoopbackComm``),
  without and with the CFG split, its synchronous first step, a synchronous steady step
  (``full_sync``) and the asynchronous steady step (``corrected_async_gn``), with the CUDA-graph
  persistent buffers (``static_buffers``) and the backends a GPU runs (``kernels.meta_as_gpu``:
  the Triton GroupNorm ops, the convolution's default CUDA path).

The op -> kernel map (an assumption about the GPU libraries, stated once here):

* 0: views, reshapes that are views, empties and other allocations, metadata ops (``VIEWS``);
* 2: ``aten.convolution`` with a bias (cuDNN's convolution, then ATen's bias add);
* 3: ``aten.native_group_norm`` (statistics, reduction, apply);
* 1: scaled-dot-product attention (counted where ``F.scaled_dot_product_attention`` is called: one
  fused kernel on a GPU, while on ``meta`` it decomposes into its math), every GEMM
  (``mm``/``addmm``/``bmm``), every elementwise, reduction, copy, cat and fill op, and every
  distripy op (``distripy::*``: one Triton kernel each, or the count ``CUSTOM_OPS`` gives).

Ops on host tensors (a timestep read on the CPU) launch nothing on the GPU and are not counted.
Transfers (what the ``LoopbackComm`` does for an all-gather, all-reduce or halo exchange; with
NCCL, one grouped launch per checkpoint) are counted apart. Each kernel is attributed to the source
line that issued it (the first frame outside torch and ``distripy/kernels/``), and copies (``copy_``,
``clone``, ``cat``, ``_to_copy``) record the bytes they move (read + write).

    python bench/kernel_count.py                 # SDXL, 1024² (latent 128), batch 2, rank of 8
    python bench/kernel_count.py --tiny          # the test suite's small UNet (seconds)

Writes ``bench/results/kernel-count-<time>.json`` (device, versions, command, every count by op
and by source line) and prints the table.
"""

import argparse
import collections
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from common import environment, results_path, write_json
from host_overhead import CountedComm
from sdxl import build_unet, inputs
from step_profile import middle_rank
from torch.utils._python_dispatch import TorchDispatchMode

REPOSITORY = Path(__file__).resolve().parent.parent
TORCH_DIR = os.path.realpath(Path(torch.__file__).parent)
KERNELS_DIR = os.path.realpath(REPOSITORY / "distripy" / "kernels")

VIEWS = frozenset(
    """view _unsafe_view _reshape_alias reshape transpose permute expand slice select unsqueeze squeeze
    t as_strided alias detach split split_with_sizes chunk unbind empty empty_like empty_strided
    new_empty new_empty_strided lift_fresh sym_size sym_stride sym_numel sym_storage_offset
    view_as unflatten flatten diagonal narrow""".split()
)
COPIES = frozenset("copy_ clone cat _to_copy contiguous".split())
CUSTOM_OPS: Dict[str, int] = {"group_norm_stats": 2}
"""Kernels of a ``distripy::`` op when not one: ``group_norm_stats`` is its partial sums' kernel
and torch's sum over the chunks (the patch GroupNorm uses ``group_norm_partial_stats`` instead)."""

TARGET_RATIO = 0.85
"""The target (docs/results.md): a band step launches at most this share of the plain UNet's kernels."""


def kernels_of(func, args, kwargs) -> int:
    """GPU kernels launched for one dispatched op (the map in the module docstring)."""
    name = func.overloadpacket.__name__
    if name in VIEWS:
        return 0
    if func.namespace == "distripy":
        return CUSTOM_OPS.get(name, 1)
    if name == "convolution":
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return 2 if bias is not None else 1
    if name == "native_group_norm":
        return 3
    return 1


def _issuer() -> str:
    """``file:line (function)`` of the first frame outside torch, this file and ``distripy/kernels/``."""
    frame = sys._getframe(2)
    here = os.path.realpath(__file__)
    while frame is not None:
        path = os.path.realpath(frame.f_code.co_filename)
        if not (path.startswith(TORCH_DIR) or path.startswith(KERNELS_DIR) or path == here):
            break
        frame = frame.f_back
    if frame is None:
        return "?"
    path = os.path.realpath(frame.f_code.co_filename)
    for marker in ("/distripy/", "/diffusers/", "/bench/"):
        if marker in path:
            path = path[path.rindex(marker) + 1 :]
            break
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"


def _on_device(args, kwargs, out) -> bool:
    """Whether the op touches a tensor on the device the step stands in for (``meta``)."""
    flat = list(args) + list(kwargs.values()) + (list(out) if isinstance(out, (tuple, list)) else [out])
    for item in flat:
        if isinstance(item, (tuple, list)):
            flat.extend(item)
        elif isinstance(item, torch.Tensor) and item.is_meta:
            return True
    return False


class KernelCounter(TorchDispatchMode):
    """Counts the kernels of the dispatched ops (and the copies' bytes), by op and by issuing line;
    ops dispatched while ``transport`` is set are transfers, counted apart."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self.by_line: collections.Counter = collections.Counter()
        self.copy_bytes: collections.Counter = collections.Counter()
        self.transfer_kernels = 0
        self.transport = False
        self.suppressed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppressed:
            return out
        count = kernels_of(func, args, kwargs)
        if count == 0 or not _on_device(args, kwargs, out):
            return out  # a view, or host work (a CPU timestep read): no GPU kernel
        if self.transport:
            self.transfer_kernels += count
            return out
        name = str(func.overloadpacket).replace("aten.", "")
        line = _issuer()
        self.by_op[name] += count
        self.by_line[line] += count
        if func.overloadpacket.__name__ in COPIES:
            result = out if isinstance(out, torch.Tensor) else args[0]
            self.copy_bytes[line] += 2 * result.numel() * result.element_size()
        return out

    def count_fused(self, name: str, kernels: int = 1) -> None:
        """Kernels of a fused call whose dispatched ops are suppressed (attention)."""
        if self.transport:
            self.transfer_kernels += kernels
            return
        line = _issuer()
        self.by_op[name] += kernels
        self.by_line[line] += kernels

    @property
    def kernels(self) -> int:
        return sum(self.by_op.values())

    def summary(self) -> Dict[str, Any]:
        return {
            "kernels": self.kernels,
            "transfer_kernels": self.transfer_kernels,
            "copy_bytes": sum(self.copy_bytes.values()),
            "by_op": dict(self.by_op.most_common()),
            "by_line": dict(self.by_line.most_common()),
            "copy_bytes_by_line": dict(self.copy_bytes.most_common()),
        }


@contextlib.contextmanager
def fused_attention(counters: List[KernelCounter]):
    """``F.scaled_dot_product_attention`` counted as one kernel, its meta decomposition not."""
    original = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        counter = counters[-1] if counters else None
        if counter is None:
            return original(*args, **kwargs)
        counter.count_fused("scaled_dot_product_attention")
        counter.suppressed += 1
        try:
            # A GPU's fused attention writes (B, L, heads, d) and returns it as (B, heads, L, d):
            # the processors' transpose + reshape after it is a view there, as it is here.
            out = original(*args, **kwargs)
            return out.transpose(1, 2).contiguous().transpose(1, 2)
        finally:
            counter.suppressed -= 1

    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _call(unet, latents, timestep, conditioning) -> None:
    with torch.no_grad():
        unet(latents, torch.tensor(float(timestep)), **conditioning)


def count_plain(unet, latents, conditioning) -> Dict[str, Any]:
    """The plain UNet's step (diffusers' forward on the whole latent)."""
    counters: List[KernelCounter] = [KernelCounter()]
    with fused_attention(counters), counters[0]:
        _call(unet, latents, 999, conditioning)
    return counters[0].summary()


def count_band(
    build, latents, conditioning, ranks: int, split: bool, mode: str, steps: int = 3
) -> Dict[str, Any]:
    """One middle rank's steps 0 .. ``steps - 1`` (``warmup_steps=1``): each step's counts."""
    import distripy
    from distripy.kernels import meta_as_gpu
    from distripy.runtime import LoopbackComm

    unet = build()
    counters: List[KernelCounter] = []
    # transfers run with the active counter's ``transport`` flag set: counted apart
    comm = CountedComm(LoopbackComm(middle_rank(ranks, split), ranks), counters, [0])
    config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=split, use_cuda_graph=False)
    distripy.parallelize(unet, config, comm=comm)
    context = distripy.api.patch_context(unet)
    context.kernel_backend = "auto"
    context.static_buffers = True  # the CUDA-graph buffers (StepGraphs itself needs a GPU)
    results = []
    with meta_as_gpu(), fused_attention(counters):
        for step in range(steps):
            counter = KernelCounter()
            counters.append(counter)
            with counter:
                _call(unet, latents, 999 - step, conditioning)
            counters.pop()
            results.append(counter.summary())
    return {"ranks": ranks, "split_batch": split, "mode": mode, "steps": results}


def issued_for_keys_values(line: str) -> bool:
    """Whether an issuing line (``_issuer``) is the self-attention processor's or its projections'."""
    return "parallel/attention.py" in line or "parallel/projection.py" in line


def kv_copy_bytes(summary: Dict[str, Any]) -> int:
    """Copy bytes issued by the self-attention processor (keys and values)."""
    return sum(b for line, b in summary["copy_bytes_by_line"].items() if issued_for_keys_values(line))


def measure(tiny: bool, latent: int, batch: int, ranks: int, dtype=torch.float16) -> Dict[str, Any]:
    def build():
        return build_unet("meta", dtype, tiny=tiny)

    plain_unet = build()
    latents, conditioning = inputs(plain_unet, batch, (latent, latent), "meta", dtype)
    plain = count_plain(plain_unet, latents, conditioning)
    rows = []
    for split in (False, True):
        if split and (ranks % 2 or batch % 2):
            continue
        for mode in ("corrected_async_gn", "full_sync"):
            band = count_band(build, latents, conditioning, ranks, split, mode)
            first, steady = band["steps"][0], band["steps"][-1]
            rows.append(
                {
                    "ranks": ranks,
                    "split_batch": split,
                    "mode": mode,
                    "step": "async" if mode == "corrected_async_gn" else "sync",
                    "kernels": steady["kernels"],
                    "ratio": steady["kernels"] / plain["kernels"],
                    "transfer_kernels": steady["transfer_kernels"],
                    "copy_bytes": steady["copy_bytes"],
                    "kv_copy_bytes": kv_copy_bytes(steady),
                    "first_step_kernels": first["kernels"],
                    "steady": steady,
                }
            )
    return {"plain": plain, "rows": rows}


def headline(result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The row the target (docs/results.md) is about: asynchronous step, no CFG split."""
    return next((r for r in result["rows"] if r["step"] == "async" and not r["split_batch"]), None)


def print_table(result: Dict[str, Any], top: int = 12) -> None:
    plain = result["plain"]
    print(f"plain UNet: {plain['kernels']} kernels, {plain['copy_bytes'] / 1e9:.3f} GB copied")
    print(f"{'N':>2} {'split':>5} {'step':>5} | {'kernels':>7} {'x plain':>7} {'transfers':>9} "
          f"{'copy GB':>8} {'K/V copy GB':>11} {'first step':>10}")  # fmt: skip
    for r in result["rows"]:
        print(
            f"{r['ranks']:>2} {str(r['split_batch']):>5} {r['step']:>5} | {r['kernels']:>7} {r['ratio']:>7.3f} "
            f"{r['transfer_kernels']:>9} {r['copy_bytes'] / 1e9:>8.3f} {r['kv_copy_bytes'] / 1e9:>11.3f} "
            f"{r['first_step_kernels']:>10}"
        )
    row = headline(result)
    if row is not None:
        print(f"\nasync step, no split, by source line (top {top}):")
        for line, count in list(row["steady"]["by_line"].items())[:top]:
            print(f"  {count:>5}  {line}")


def markdown(result: Dict[str, Any]) -> str:
    """The table as Markdown (committed beside the JSON)."""
    plain = result["plain"]
    lines = [
        f"# Kernels of one UNet step ({result['unet']}, latent {result['latent']}², batch "
        f"{result['batch']}, a middle rank of {result['ranks']})",
        "",
        f"Plain UNet: **{plain['kernels']}** kernels. Counted on `meta` by `bench/kernel_count.py` "
        "(its docstring states the op -> kernel map); transfers apart.",
        "",
        "| split | step | kernels | x plain | transfers | copy GB | K/V copy GB | first step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {'yes' if r['split_batch'] else 'no'} | {r['step']} | {r['kernels']} | {r['ratio']:.3f} | "
            f"{r['transfer_kernels']} | {r['copy_bytes'] / 1e9:.3f} | {r['kv_copy_bytes'] / 1e9:.3f} | "
            f"{r['first_step_kernels']} |"
        )
    row = headline(result)
    if row is not None:
        lines += ["", "Asynchronous step, no split, kernels by source line:", "", "| kernels | line |", "|---|---|"]
        lines += [f"| {c} | `{line}` |" for line, c in row["steady"]["by_line"].items()]
        lines += ["", "Plain UNet, kernels by op:", "", "| kernels | op |", "|---|---|"]
        lines += [f"| {c} | `{op}` |" for op, c in plain["by_op"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--latent", type=int, default=128, help="latent side (128: a 1024² image)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the test suite's small UNet")
    parser.add_argument("--output", type=Path, help="JSON path (default: bench/results/)")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args(argv)
    latent = 16 if args.tiny else args.latent
    result: Dict[str, Any] = {
        "environment": environment(),
        "unet": "tiny" if args.tiny else "sdxl",
        "latent": latent,
        "batch": args.batch,
        "ranks": args.ranks,
        "target_ratio": TARGET_RATIO,
        **measure(args.tiny, latent, args.batch, args.ranks),
    }
    row = headline(result)
    result["ratio"] = None if row is None else row["ratio"]
    print_table(result)
    path = write_json(args.output or results_path("kernel-count"), result)
    print(f"wrote {path}")
    if args.markdown:
        args.markdown.write_text(markdown(result))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
