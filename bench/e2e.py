"""End to end on one GPU: the SDXL UNet's step on one device vs one rank's step of an N-way split.

For each resolution, the full SDXL UNet (its architecture, random fp16 weights) runs

* ``T1``: one step of the whole latent on one GPU (batch 2: classifier-free guidance);
* ``T_N``: one rank's steady asynchronous step for N = 2, 4, 8 (a middle band), alone, through
  ``LoopbackComm`` -- the transfers complete locally, so this is the rank's compute, the
  DistriFusion paper's "no communication" latency. ``--split no`` (default with ``yes``): the
  rank holds a band of the whole CFG batch 2. ``--split yes``: CFG split, the ranks are two groups
  of N / 2, each denoising batch 1 of the CFG batch 2 (``DistriConfig(split_batch=True)``), and
  the rank is a middle band of its group (``step_profile.middle_rank``);

eagerly and as CUDA graphs (``use_cuda_graph``), side by side in one run, as medians over steps,
in each mode of ``--modes`` (default ``corrected_async_gn``; ``exact`` and ``full_sync`` step the
same way every step: with ``LoopbackComm``, which completes every transfer at once, their times are
the compute cost of each mode's step -- the split convolutions, the blockwise attention and its
merges of ``exact`` -- not the cost of waiting for a link).

Each row records the per-rank compute efficiency ``T1 / (N * T_N)`` against the same ``T1`` (the
plain UNet at batch 2, with or without split: the work a rank stands in for is the same image),
next to the paper's (42% / 72% / 82% at 1024² / 2048² / 3840², N = 8); the bytes the rank sends per
step by kind (halo, K/V, GroupNorm statistics, output); on a GPU the peak memory of its steps
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, with the memory held when
its steps began: the base model and, for a rank, its parallelised copy) beside the planner's
estimate of a band step's activations (``planning.memory``); the bytes the rank's patch modules
keep across steps (its stale buffers, or under CUDA graphs every persistent buffer), measured and
as the planner predicts them; and with CUDA graphs the
kernels of one replayed step (``torch.profiler``'s CUDA events: count, durations, their sum against
the step's wall time from CUDA events). The JSON (device, versions, command, rows, and measured
step profiles: where each transfer is issued and waited for, ``step_profile.py``) is rewritten
after every row, so a run stopped at a time limit leaves what it measured; a plot goes next to it
at the end. ``distripy plan --gpu <this JSON>`` (and ``bench/scaling.py --gpu``) fit the planner's
GPU profile to its rows.

    python bench/e2e.py                          # on a GPU: 1024², 2048², 3840²; N = 2, 4, 8
    python bench/e2e.py --resolutions 1024 --gpus 8 --split no yes --variants graphs
    python bench/e2e.py --modes exact full_sync corrected_async_gn --variants graphs
    python bench/e2e.py --smoke --device cpu     # the test suite's scaled-down run
"""

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from common import environment, results_path, write_json
from sdxl import VAE_SCALE, build_unet, inputs
from step_profile import KINDS, kind_of, middle_rank, profiles_from_log

from distripy.config import KERNEL_BACKENDS, MODES

PAPER_EFFICIENCY_8 = {1024: 0.42, 2048: 0.72, 3840: 0.82}  # T1 / (8 * T_8, no communication)
TARGET_EFFICIENCY_8 = {1024: 0.60, 2048: 0.85, 3840: 0.92}  # the performance targets, H100, graphs + Triton
COPY_PREFIXES = ("Memcpy", "Memset")  # the profiler's names of copies and fills (not kernels)
COPY_ACTIVITIES = ("gpu_memcpy", "gpu_memset")


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


class PeakMemory:
    """The most memory a row's steps held (``max_memory_allocated`` since ``start``), and what was
    held when they began; ``None`` on CPU, where torch keeps no such count."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Optional[int]:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self) -> Optional[int]:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def release_memory(device: torch.device) -> None:
    """Free what the previous row left: its UNet copy and graphs sit in reference cycles, so a
    collection first, then the caching allocator's blocks (the next row's peak starts clean)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timesteps(count: int) -> List[int]:
    """Decreasing timesteps, as a sampler gives (a new generation starts when they rise)."""
    return [999 - (999 * i) // count for i in range(count)]


def _time_steps(call: Callable[[int], object], timesteps: Sequence[int], skip: int, clock: Clock) -> float:
    """Median seconds of one step over ``timesteps[skip:]``, after the first ``skip`` steps of
    the generation (warm-up, eager steps, captures)."""
    samples = []
    for index, timestep in enumerate(timesteps):
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


def rank_step(
    base, latents, conditioning, n: int, split: bool, graphs: bool, mode: str, kernel_backend: str, log=None
):
    """``(unet, step, rank)``: a copy of ``base`` parallelised as the middle band's rank of an
    ``n``-way split (``split``: CFG split, a middle band of its group of n / 2) through
    ``LoopbackComm``, and its step ``step(timestep)``. ``log``: a ``TrafficLog`` (its ``step`` is
    advanced by each call)."""
    import distripy
    from distripy.runtime import LoopbackComm

    unet = copy.deepcopy(base)
    config = distripy.DistriConfig(
        mode=mode, warmup_steps=1, split_batch=split, use_cuda_graph=graphs, kernel_backend=kernel_backend
    )
    rank = middle_rank(n, split)
    distripy.parallelize(unet, config, comm=LoopbackComm(rank, n, log=log))

    def step(t):
        if log is not None:
            log.step += 1
        return unet(latents, t, **conditioning, return_dict=False)

    return unet, step, rank


def on_device(event) -> bool:
    """A profiler event the GPU ran (a kernel, copy or fill); not the GPU-side span of a
    ``record_function`` label (a user annotation), which covers a whole range of them."""
    cuda = getattr(event.device_type, "name", str(event.device_type)).endswith("CUDA")
    activity = str(getattr(event, "activity_type", ""))
    annotation = getattr(event, "is_user_annotation", False) or "annotation" in activity
    return cuda and not annotation


def _is_copy(event) -> bool:
    return event.name.startswith(COPY_PREFIXES) or getattr(event, "activity_type", None) in COPY_ACTIVITIES


def kernel_summary(events, wall_ms: Optional[float], top: int = 12) -> Dict:
    """What a GPU ran in one step, from ``torch.profiler`` events (those on the CUDA device):
    kernels and copies (``Memcpy``/``Memset``) counted apart; the kernels' durations as a
    histogram (under 3 µs and under 10 µs: the kernels a step could lose, not the ones it must
    speed up), their sum and the span from the first start to the last end, against ``wall_ms``
    (CUDA events around the step): span minus sum is the time between kernels, wall minus span
    the host's share before the first and after the last; the ``top`` kernels by total time."""
    device = [e for e in events if on_device(e)]
    copies = [e for e in device if _is_copy(e)]
    kernels = [e for e in device if not _is_copy(e)]
    durations = sorted(e.time_range.elapsed_us() for e in kernels)
    span = max(e.time_range.end for e in device) - min(e.time_range.start for e in device) if device else 0.0
    by_name: Dict[str, List[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    heaviest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    kernel_us = float(sum(durations))
    return {
        "kernels": len(kernels),
        "copies": len(copies),
        "kernel_us": kernel_us,
        "copy_us": float(sum(e.time_range.elapsed_us() for e in copies)),
        "under_3us": sum(d < 3 for d in durations),
        "under_10us": sum(d < 10 for d in durations),
        "median_kernel_us": statistics.median(durations) if durations else None,
        "span_us": float(span),
        "wall_ms": wall_ms,
        "kernel_share_of_wall": kernel_us / (wall_ms * 1e3) if wall_ms else None,
        "top": [{"name": name[:160], "count": len(d), "total_us": float(sum(d))} for name, d in heaviest],
    }


def replay_kernels(call: Callable[[int], object], timestep: int) -> Dict:
    """One step under ``torch.profiler`` (CPU and CUDA activity: the CPU side keeps kineto's
    correlation working), timed by CUDA events around the call; its ``kernel_summary``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        start.record()
        call(timestep)
        end.record()
        torch.cuda.synchronize()
    return kernel_summary(profiler.events(), start.elapsed_time(end))


def _replay_record(call, timestep: int, wanted: bool) -> Optional[Dict]:
    """``replay_kernels`` when ``wanted`` (a GPU, CUDA graphs); an error is recorded, not raised:
    the row's timing stands without it."""
    if not wanted:
        return None
    try:
        return replay_kernels(call, timestep)
    except Exception as error:  # noqa: BLE001 - a record, the row's timing is already taken
        return {"error": f"{type(error).__name__}: {error}"}


def measure_resolution(base, latent: int, args, device, dtype, clock: Clock, on_row=None) -> Dict:
    """T1 and every T_N of one resolution, with bytes per step, peak memory, the kernels of one
    replayed step and measured profiles; ``on_row(row)`` is called as each row is measured."""
    rows, profiles = [], {}
    latents, conditioning = inputs(base, 2, (latent, latent), device, dtype)
    resolution = latent * VAE_SCALE
    memory = PeakMemory(device)
    timesteps = _timesteps(args.skip + args.repeats + 1)  # the last: the profiled step, same generation
    cuda = device.type == "cuda"

    def add(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    with torch.no_grad():
        for variant in args.variants:
            graphs = variant == "graphs"
            at_start = memory.start()
            step = _single_step(base, latents, conditioning, graphs)
            seconds = _time_steps(step, timesteps[:-1], args.skip, clock)
            replay = _replay_record(step, timesteps[-1], cuda and graphs and args.kernel_count)
            single = _row(resolution, 1, False, variant, seconds, None, None)
            add(dict(single, efficiency=1.0, **_extras(memory, at_start, replay)))
            del step
            release_memory(device)
            for n, split in _configurations(args, latent):
                for mode in args.modes:
                    row, profile = _measure_rank(
                        base, latents, conditioning, n, split, variant, mode, args, clock, timesteps, memory
                    )
                    row = dict(row, resolution=resolution)
                    row["efficiency"] = seconds / (n * row["step_ms"] / 1e3)  # the same T1, split or not
                    add(row)
                    if profile is not None:
                        profiles[f"{resolution}-n{n}{'-split' if split else ''}"] = profile
                    release_memory(device)
    return {"rows": rows, "profiles": profiles}


def _configurations(args, latent: int):
    """(N, split) of ``--gpus`` x ``--split`` whose bands cut the deepest level's rows (a quarter
    of the latent's) evenly; with split, N must be even (two groups of N / 2)."""
    for n in args.gpus:
        for split in args.split:
            bands = n // 2 if split else n
            if latent % (4 * bands) or (split and n % 2):
                print(f"skipped: N = {n}, split {split}: {latent} latent rows in {bands} bands")
                continue
            yield n, split


def _extras(memory: PeakMemory, at_start, replay) -> Dict:
    return {
        "peak_memory_bytes": memory.peak(),
        "memory_at_start_bytes": at_start,
        "kernels": None if replay is None else replay.get("kernels"),
        "replay": replay,
    }


def _measure_rank(
    base, latents, conditioning, n, split, variant, mode, args, clock: Clock, timesteps, memory: PeakMemory
):
    """One rank's median step of an N-way split in ``mode``, its bytes by kind, its peak memory and
    (CUDA graphs) the kernels of one replayed step, and (eager ``corrected_async_gn``) its measured
    step profiles (where each transfer is issued and waited for)."""
    import distripy
    from distripy.runtime import TrafficLog

    log = TrafficLog()
    graphs = variant == "graphs"
    unet, step, rank = rank_step(
        base, latents, conditioning, n, split, graphs, mode, args.kernel_backend, log
    )
    with torch.no_grad():
        at_start = memory.start()
        seconds = _time_steps(step, timesteps[:-1], args.skip, clock)
        last = log.step
        replay = _replay_record(step, timesteps[-1], clock.cuda and graphs and args.kernel_count)
        extras = _extras(memory, at_start, replay)
        extras.update(_kept(unet), **_predicted_memory(base, latents, n, split, mode, graphs, conditioning))
        sent = {kind: 0 for kind in KINDS}
        for transfer in log.transfers:
            if transfer.step == last:
                sent[kind_of(transfer.op, transfer.shape)] += transfer.sent
        distripy.reset(unet)
        profile = None
        if variant == "eager" and mode == "corrected_async_gn" and args.profiles:
            profile = _measured_profiles(unet, latents, conditioning, log, clock)
    row = _row(None, n, split, variant, seconds, sent if any(sent.values()) else None, rank)
    return dict(row, mode=mode, **extras), profile


def _kept(unet) -> Dict:
    """What the rank's patch modules keep across steps (before the generation ends)."""
    from distripy.pipelines.unet import installed_forward

    return {"kept_bytes": installed_forward(unet).context.kept_bytes()}


def _predicted_memory(base, latents, n: int, split: bool, mode: str, graphs: bool, conditioning) -> Dict:
    """The planner's kept bytes and band-step activations for this row's rank (``planning.memory``)."""
    from distripy.geometry import BandGeometry, bands_per_image
    from distripy.parallel.step_policy import keeps_activations, keeps_statistics
    from distripy.planning.memory import persistent_bytes, unet_activation_bytes
    from distripy.planning.traffic import band_units, step_traffic

    batch, _, height, width = latents.shape
    bands = bands_per_image(n, split)
    per_band = batch // 2 if split else batch
    units = band_units(BandGeometry.from_configs(base.config).deepest_rows(height), bands)
    index = middle_rank(n, split) % bands
    common = dict(dtype_bytes=latents.element_size(), halves=2 if split else 1)
    walk = step_traffic((height, width), per_band, units, index, base.config, exact=mode == "exact", **common)
    keeps = keeps_activations(mode), keeps_statistics(mode)
    tokens = conditioning["encoder_hidden_states"].shape[1]
    return {
        "predicted_kept_bytes": persistent_bytes([walk], graphs, *keeps, tokens),
        "predicted_step_bytes": unet_activation_bytes(
            (height, width), per_band, units, index, base.config, latents.element_size(), mode != "exact"
        ),
    }


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
        f" {'paper':>6} {'halo MB':>8} {'K/V MB':>8} {'GN kB':>7} {'peak GB':>8} {'kernels':>7}"
    )
    for r in rows:
        paper = PAPER_EFFICIENCY_8.get(r["resolution"]) if r["gpus"] == 8 and not r["split_batch"] else None
        sent = r["sent_bytes"] or {}
        peak = r.get("peak_memory_bytes")
        kernels = r.get("kernels")
        print(
            f"{r['resolution']:>6} {r['gpus']:>4} {str(r['split_batch']):>5} {r['mode'] or '-':>18} "
            f"{r['variant']:>7} "
            f"{r['step_ms']:>9.2f} {r['efficiency'] * 100:>9.1f}% "
            f"{'' if paper is None else f'{paper * 100:.0f}%':>6} "
            f"{sent.get('halo', 0) / 1e6:>8.2f} {sent.get('kv', 0) / 1e6:>8.2f} "
            f"{sent.get('gn_stats', 0) / 1e3:>7.1f} "
            f"{'-' if peak is None else f'{peak / 2**30:.2f}':>8} {'-' if kernels is None else kernels:>7}"
        )


def plot(rows: List[Dict], path: Path) -> Optional[Path]:
    """Efficiency vs N per resolution, variant and split, with the paper's N = 8 points."""
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
            for split in (False, True):
                points = sorted(
                    (r["gpus"], r["efficiency"])
                    for r in rows
                    if r["resolution"] == resolution
                    and r["variant"] == variant
                    and (r["split_batch"] == split or r["gpus"] == 1)
                    and r["mode"] in (None, "corrected_async_gn")
                )
                if len(points) > 1:
                    label = f"{resolution}² {variant}{' split' if split else ''}"
                    axis.plot(*zip(*points), marker="o", linestyle="--" if split else "-", label=label)
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


def _yes_no(text: str) -> bool:
    if text not in ("yes", "no"):
        raise argparse.ArgumentTypeError(f"{text!r}: yes or no")
    return text == "yes"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048, 3840])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--variants", nargs="+", default=["eager", "graphs"], choices=["eager", "graphs"])
    parser.add_argument(
        "--split",
        type=_yes_no,
        nargs="+",
        default=[False, True],
        metavar="yes|no",
        help="CFG split settings to measure (default: no yes)",
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
        "--no-kernel-count",
        dest="kernel_count",
        action="store_false",
        help="do not profile one replayed step per CUDA-graph row",
    )
    parser.add_argument(
        "--no-profiles",
        dest="profiles",
        action="store_false",
        help="skip the measured step profiles of the eager corrected_async_gn rows (3 steps each)",
    )
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write no plot")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="scaled down (the test suite's UNet, small latents): checks the machinery",
    )
    parser.add_argument("--output", type=Path, help="JSON path (the plot goes next to it)")
    return parser


def main(argv=None) -> int:
    arguments = parser()
    args = arguments.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        arguments.error("--device cuda: torch sees no GPU (use --smoke --device cpu)")
    if device.type != "cuda" and "graphs" in args.variants:
        args.variants = [v for v in args.variants if v != "graphs"] or ["eager"]
        print("CUDA graphs need a GPU: measuring eager steps only")
    for resolution in args.resolutions:
        if resolution % (VAE_SCALE * 4):
            arguments.error(f"--resolutions: {resolution} is not a multiple of {VAE_SCALE * 4}")
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        dtype = torch.float32 if device.type == "cpu" else dtype
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = args.output or results_path("e2e", "smoke" if args.smoke else "", device_name)
    base = build_unet(device, dtype, tiny=args.smoke)
    settings = {"dtype": args.dtype, "kernel_backend": args.kernel_backend, "run_on": str(device)}
    results = {"environment": environment(**settings), "complete": False, "rows": [], "profiles": {}}
    clock = Clock(device)

    def on_row(row):  # what is measured is kept, even if the run is stopped
        results["rows"].append(row)
        write_json(path, results)

    for resolution in args.resolutions:
        measured = measure_resolution(base, resolution // VAE_SCALE, args, device, dtype, clock, on_row)
        results["profiles"].update(measured["profiles"])
    results["complete"] = True
    print_rows(results["rows"])
    write_json(path, results)
    print(f"wrote {path}")
    figure = plot(results["rows"], path.with_suffix(".png")) if args.plot else None
    if figure:
        print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
