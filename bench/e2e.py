"""End to end on one GPU: the SDXL UNet's step on one device vs one rank's step of an N-way split.

For each resolution, the full SDXL UNet (its architecture, random fp16 weights) runs

* ``T1``: one step of the whole latent on one GPU (batch 2: classifier-free guidance);
* ``T_N``: one rank's steady asynchronous step for N = 2, 4, 8 (a middle band; with and without
  CFG split), alone, through ``LoopbackComm`` -- the transfers complete locally, so this is the
  rank's compute, the DistriFusion paper's "no communication" latency;

eagerly and as CUDA graphs (``use_cuda_graph``), side by side in one run, as medians over steps,
in each mode of ``--modes`` (default ``corrected_async_gn``; ``exact`` and ``full_sync`` step the
same way every step: with ``LoopbackComm``, which completes every transfer at once, their times are
the compute cost of each mode's step -- the split convolutions, the blockwise attention and its
merges of ``exact`` -- not the cost of waiting for a link).
It prints the per-rank compute efficiency ``T1 / (N * T_N)`` next to the paper's (42% / 72% / 82%
at 1024² / 2048² / 3840², N = 8), the bytes each rank sends per step by kind (halo, K/V, GroupNorm
statistics, output), writes JSON (device, versions, command, rows, and measured step profiles for
``bench/scaling.py``) and a plot under ``bench/results/``.

    python bench/e2e.py                          # on a GPU: 1024², 2048², 3840²; N = 2, 4, 8
    python bench/e2e.py --modes exact full_sync corrected_async_gn --variants graphs
    python bench/e2e.py --smoke --device cpu     # the test suite's scaled-down run
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from common import environment, results_path, write_json
from sdxl import VAE_SCALE, build_unet, inputs
from step_profile import KINDS, kind_of, middle_rank, profiles_from_log

from distripy.config import KERNEL_BACKENDS, MODES

PAPER_EFFICIENCY_8 = {1024: 0.42, 2048: 0.72, 3840: 0.82}  # T1 / (8 * T_8, no communication)
TARGET_EFFICIENCY_8 = {1024: 0.60, 2048: 0.85, 3840: 0.92}  # the performance targets, H100, graphs + Triton


class Clock:
    """Per-step time: CUDA events on a GPU, the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _timesteps(count: int) -> List[int]:
    """Decreasing timesteps, as a sampler gives (a new generation starts when they rise)."""
    return [999 - (999 * i) // count for i in range(count)]


def _time_steps(call: Callable[[int], object], skip: int, repeats: int, clock: Clock) -> float:
    """Median seconds of one step over ``repeats`` steps after ``skip`` steps of one generation."""
    samples = []
    for index, timestep in enumerate(_timesteps(skip + repeats)):
        start = clock.mark()
        call(timestep)
        end = clock.mark()
        if index >= skip:
            samples.append(clock.seconds(start, end))
    return statistics.median(samples)


def _single_step(unet, latents, conditioning, graphs: bool) -> Callable[[int], object]:
    """One device's step; with ``graphs`` a captured graph replayed with each timestep."""
    if not graphs:
        return lambda t: unet(latents, t, **conditioning, return_dict=False)
    timestep = torch.tensor(999, device=latents.device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            unet(latents, timestep, **conditioning, return_dict=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        unet(latents, timestep, **conditioning, return_dict=False)

    def replay(t: int) -> None:
        timestep.fill_(t)
        graph.replay()

    return replay


def measure_resolution(base, latent: int, args, device, dtype, clock: Clock) -> Dict:
    """T1 and every T_N of one resolution, with bytes per step and measured profiles."""
    rows, profiles = [], {}
    latents, conditioning = inputs(base, 2, (latent, latent), device, dtype)
    resolution = latent * VAE_SCALE
    with torch.no_grad():
        for variant in args.variants:
            step = _single_step(base, latents, conditioning, variant == "graphs")
            seconds = _time_steps(step, args.skip, args.repeats, clock)
            rows.append(_row(resolution, 1, False, variant, seconds, None, None))
            del step
            for n in args.gpus:
                for split in args.split:
                    bands = n // 2 if split else n
                    if latent % (4 * bands) or (split and n % 2):
                        continue
                    for mode in args.modes:
                        row, profile = _measure_rank(
                            base, latents, conditioning, n, split, variant, mode, args, clock
                        )
                        rows.append(dict(row, resolution=resolution))
                        if profile is not None:
                            profiles[f"{resolution}-n{n}{'-split' if split else ''}"] = profile
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
    single = {r["variant"]: r["step_ms"] for r in rows if r["gpus"] == 1}
    for r in rows:
        r["efficiency"] = single[r["variant"]] / (r["gpus"] * r["step_ms"])
    return {"rows": rows, "profiles": profiles}


def _measure_rank(base, latents, conditioning, n, split, variant, mode, args, clock: Clock):
    """One rank's median step of an N-way split in ``mode``, its bytes by kind, and (eager
    ``corrected_async_gn``) its measured step profiles for the scaling model."""
    import distripy
    from distripy.runtime import LoopbackComm, TrafficLog

    unet = copy.deepcopy(base)
    log = TrafficLog()
    config = distripy.DistriConfig(
        mode=mode,
        warmup_steps=1,
        split_batch=split,
        use_cuda_graph=variant == "graphs",
        kernel_backend=args.kernel_backend,
    )
    rank = middle_rank(n, split)
    distripy.parallelize(unet, config, comm=LoopbackComm(rank, n, log=log))

    def rank_step(t):
        log.step += 1
        return unet(latents, t, **conditioning, return_dict=False)

    with torch.no_grad():
        seconds = _time_steps(rank_step, args.skip, args.repeats, clock)
        last = log.step
        sent = {kind: 0 for kind in KINDS}
        for transfer in log.transfers:
            if transfer.step == last:
                sent[kind_of(transfer.op, transfer.shape)] += transfer.sent
        distripy.reset(unet)
        profile = None
        if variant == "eager" and mode == "corrected_async_gn":
            profile = _measured_profiles(unet, latents, conditioning, log, clock)
    row = _row(None, n, split, variant, seconds, sent if any(sent.values()) else None, rank)
    return dict(row, mode=mode), profile


def _measured_profiles(unet, latents, conditioning, log, clock: Clock) -> Dict:
    """The sync and async steps of a fresh generation, with the clock at every issue and wait."""
    import distripy

    log.clear()
    log.clock = clock.mark
    marks = []
    for index, timestep in enumerate(_timesteps(3)):
        log.step = index
        start = clock.mark()
        unet(latents, timestep, **conditioning, return_dict=False)
        marks.append((start, clock.mark()))
    distripy.reset(unet)
    log.clock = None
    steps = profiles_from_log(log, marks, clock.seconds, ("sync", "async", "async"))
    for profile in steps:
        profile.source = "measured (e2e.py, eager)"
    return {"sync": steps[0].to_dict(), "async": steps[1].to_dict()}


def _row(resolution, gpus, split, variant, seconds, sent, rank) -> Dict:
    return {
        "resolution": resolution,
        "mode": None,  # one device: no mode
        "gpus": gpus,
        "split_batch": split,
        "variant": variant,
        "rank": rank,
        "step_ms": seconds * 1e3,
        "sent_bytes": sent,
    }


def print_rows(rows: List[Dict]) -> None:
    print(
        f"{'size':>6} {'GPUs':>4} {'split':>5} {'mode':>18} {'variant':>7} {'step ms':>9} {'efficiency':>10}"
        f" {'paper':>6} {'halo MB':>8} {'K/V MB':>8} {'GN kB':>7}"
    )
    for r in rows:
        paper = PAPER_EFFICIENCY_8.get(r["resolution"]) if r["gpus"] == 8 and not r["split_batch"] else None
        sent = r["sent_bytes"] or {}
        print(
            f"{r['resolution']:>6} {r['gpus']:>4} {str(r['split_batch']):>5} {r['mode'] or '-':>18} {r['variant']:>7} "
            f"{r['step_ms']:>9.2f} {r['efficiency'] * 100:>9.1f}% "
            f"{'' if paper is None else f'{paper * 100:.0f}%':>6} "
            f"{sent.get('halo', 0) / 1e6:>8.2f} {sent.get('kv', 0) / 1e6:>8.2f} "
            f"{sent.get('gn_stats', 0) / 1e3:>7.1f}"
        )


def plot(rows: List[Dict], path: Path) -> Optional[Path]:
    """Efficiency vs N per resolution and variant, with the paper's N = 8 points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for resolution in sorted({r["resolution"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows}):
            points = sorted(
                (r["gpus"], r["efficiency"])
                for r in rows
                if r["resolution"] == resolution
                and r["variant"] == variant
                and not r["split_batch"]
                and r["mode"] in (None, "corrected_async_gn")
            )
            if points:
                axis.plot(*zip(*points), marker="o", label=f"{resolution}² {variant}")
        if resolution in PAPER_EFFICIENCY_8:
            axis.scatter([8], [PAPER_EFFICIENCY_8[resolution]], marker="x", color="black")
    axis.set_xlabel("GPUs (N)")
    axis.set_ylabel("per-rank compute efficiency T1 / (N T_N)")
    axis.set_ylim(0, 1.1)
    axis.legend(fontsize=7)
    axis.set_title("one rank's compute (LoopbackComm); x: DistriFusion paper, A100")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048, 3840])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--variants", nargs="+", default=["eager", "graphs"], choices=["eager", "graphs"])
    parser.add_argument(
        "--split",
        type=lambda s: s == "yes",
        nargs="+",
        default=[False, True],
        metavar="yes|no",
        help="CFG split settings to measure",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["corrected_async_gn"], choices=MODES, help="the N-way steps' modes"
    )
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--kernel-backend", default="auto", choices=KERNEL_BACKENDS)
    parser.add_argument("--skip", type=int, default=6, help="steps of each generation not timed")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps; the median is reported")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="scaled down (the test suite's UNet, small latents): checks the machinery",
    )
    parser.add_argument("--output", type=Path, help="JSON path (the plot goes next to it)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (use --smoke --device cpu)")
    if device.type != "cuda" and "graphs" in args.variants:
        args.variants = [v for v in args.variants if v != "graphs"]
        print("CUDA graphs need a GPU: measuring eager steps only")
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        dtype = torch.float32 if device.type == "cpu" else dtype
    base = build_unet(device, dtype, tiny=args.smoke)
    settings = {"dtype": args.dtype, "kernel_backend": args.kernel_backend, "run_on": str(device)}
    results = {"environment": environment(**settings), "rows": [], "profiles": {}}
    clock = Clock(device)
    for resolution in args.resolutions:
        if resolution % (VAE_SCALE * 4):
            parser.error(f"--resolutions: {resolution} is not a multiple of {VAE_SCALE * 4}")
        measured = measure_resolution(base, resolution // VAE_SCALE, args, device, dtype, clock)
        results["rows"] += measured["rows"]
        results["profiles"].update(measured["profiles"])
    print_rows(results["rows"])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = args.output or results_path("e2e", "smoke" if args.smoke else "", device_name)
    write_json(path, results)
    print(f"wrote {path}")
    figure = plot(results["rows"], path.with_suffix(".png"))
    if figure:
        print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
