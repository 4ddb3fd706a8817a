"""The prepared GPU check: one call, at most 8 minutes on an H200, one JSON back.

On the lent GPU machine, from the repository root, carrying ``.whl`` (made here by
``bash ../shared/gpu/fetch-wheels.sh``: the image has no diffusers), as one command:

    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TRITON_CACHE_DIR=/tmp/triton
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    (python3 -m pip install -q --no-build-isolation --no-deps -e . || DISTRIPY_SKIP_EXT=1 python3 -m pip install -q --no-build-isolation --no-deps -e .) > $OUT/build.log 2>&1
    timeout 450 python3 bench/gpu_check.py --output $OUT/gpu-check.json

(the native runtime is not needed here: ``LoopbackComm`` stands in for the ranks; without it the
install falls back to the pure-Python part). On CPU, the whole flow scaled down (CI runs it):

    python bench/gpu_check.py --dry-run --output /tmp/gpu-check.json

The parts, in this order, each under its own time limit within ``--budget-s`` (400 s: with the
install, the call stays under 8 minutes); the JSON is rewritten after every part, and on SIGTERM
(the outer ``timeout``) with what the running part had measured, so a stopped run still leaves it:

1. ``e2e-1024``, ``e2e-2048``, ``e2e-3840``: ``bench/e2e.py`` at that size, T1 and one rank's step
   of N = 4 and 8, without and with CFG split (``--split no yes``), CUDA graphs,
   ``corrected_async_gn``, skip 5 (the eager, warm-up and capture steps) and the median of 7;
   each row with its peak memory and the kernels of one replayed step (``e2e.py`` says how);
2. ``replay-1024`` (after ``e2e-1024``): the note's section 8 (b) (``/work/shared/notes/
   band-step-performance.md``): the plain UNet, the band step of rank 4 of 8 and the CFG-split
   band step (rank 2 of 8: a middle band of its group of 4) at 1024², all captured first, then
   one replayed step of each in a single ``torch.profiler`` session: kernel count, the histogram
   (under 3 µs, under 10 µs), the sum of kernel time against the step's wall time from CUDA events,
   the heaviest kernels. One session in a fresh process, because ``e2e.py``'s per-row counts open
   a session per row after new captures, and later CUPTI sessions of a process have been reported
   to record no kernels (tokenspeed #1348, CUDA 13.0, torch 2.13): this part is the cross-check;
3. ``exact`` (when at least 45 s of the budget is left): ``exact`` at 1024² and 2048², the same
   rows; its efficiencies are against its own T1, so the ratio to ``corrected_async_gn`` is a
   ratio of ratios measured side by side.

On a GPU each part runs in its own process (a hung step, a CUDA error or an out-of-memory ends that
part only; it is killed at its limit). ``--dry-run`` runs the same parts in this process (one
import of torch and diffusers, not five) on CPU: the tiny SDXL-architecture UNet, 256² images,
eager steps, no profiler CUDA events; the JSON has the same structure, the GPU-only figures
(memory, kernels) ``null``.

The JSON: ``environment`` (device, versions, command), ``parts`` (status, seconds, limit, command,
the end of its log), ``rows`` (the ``corrected_async_gn`` rows: what an ``e2e.py`` file holds, so
``distripy plan --gpu`` and ``bench/scaling.py --gpu`` read it), ``exact_rows``, ``replay``,
``efficiency_n8`` (each size's N = 8 efficiency without and with CFG split, next to the target and
the paper's) and ``complete``. A short table is printed last.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from common import HERE, REPOSITORY, environment, results_path, write_json

from distripy.config import KERNEL_BACKENDS

PYTHON = sys.executable
BUDGET_S = 400.0
REPLAY_LABEL = "gpu_check:"
# The CPU proxy's kernel counts of one step at 1024², rank 4 of 8 (the note's section 2, at 379eaf9).
PROXY_KERNELS = {"plain": 2009, "band": 2819, "source": "band-step-performance.md section 2 (meta, 379eaf9)"}


class Stopped(BaseException):
    """SIGTERM (the outer ``timeout``): stop the running part, keep what it measured. Not an
    ``Exception``: no handler of a part may swallow it."""


@dataclasses.dataclass
class Part:
    name: str
    kind: str  # "e2e" or "replay"
    argv: List[str]
    output: Path
    limit_s: float
    min_s: float = 0.0  # optional parts: run only with this much of the budget left
    optional: bool = False
    rows_key: str = "rows"  # where the record keeps an e2e part's rows


def plan(work: Path, dry_run: bool) -> List[Part]:
    """The parts and their limits (seconds on an H200; 340 s for the required ones)."""
    if dry_run:  # every size at 256² (N = 8 needs 32 latent rows), one timed step
        sizes = {1024: "256", 2048: "256", 3840: "256"}
        steps = ["--smoke", "--device", "cpu", "--skip", "1", "--repeats", "1"]
        replay_steps = steps
    else:  # steps 0-4: eager (synchronous, then asynchronous) and the two captures
        sizes = {1024: "1024", 2048: "2048", 3840: "3840"}
        steps = ["--skip", "5", "--repeats", "7"]
        replay_steps = ["--skip", "5", "--repeats", "3"]
    common = ["--gpus", "4", "8", "--split", "no", "yes", "--variants", "graphs"]
    common += ["--no-profiles", "--no-plot", *steps]

    def e2e(name, resolutions, mode, limit_s, **extra):
        output = work / f"{name}.json"
        argv = ["--resolutions", *dict.fromkeys(resolutions), "--modes", mode, *common]
        argv += ["--output", str(output)]
        return Part(name, "e2e", argv, output, limit_s, **extra)

    replay_output = work / "replay-1024.json"
    replay = ["replay", "--resolution", sizes[1024], "--gpus", "8", *replay_steps]
    replay += ["--output", str(replay_output)]
    return [
        e2e("e2e-1024", [sizes[1024]], "corrected_async_gn", 70),
        Part("replay-1024", "replay", replay, replay_output, 60),
        e2e("e2e-2048", [sizes[2048]], "corrected_async_gn", 80),
        e2e("e2e-3840", [sizes[3840]], "corrected_async_gn", 130),
        e2e("exact", [sizes[1024], sizes[2048]], "exact", 90, min_s=45, optional=True, rows_key="exact_rows"),
    ]


# -- the replay part ------------------------------------------------------------------------------


def split_by_marks(events, prefix: str = REPLAY_LABEL) -> Dict[str, list]:
    """The device events of one profiler session, by the labelled step (``record_function(prefix +
    name)``) each falls in: the last label that started before it. The steps are separated by a
    synchronisation and a pause, so a step's kernels start after its label and before the next."""
    from e2e import on_device

    marks = sorted(
        (e.time_range.start, e.name[len(prefix) :])
        for e in events
        if e.name.startswith(prefix) and getattr(e.device_type, "name", "") == "CPU"
    )
    groups: Dict[str, list] = {name: [] for _, name in marks}
    for event in events:
        if not on_device(event):
            continue
        owner = None
        for start, name in marks:
            if start <= event.time_range.start:
                owner = name
        if owner is not None:
            groups[owner].append(event)
    return groups


def measure_replays(args) -> Dict:
    """The plain UNet, the band step and the CFG-split band step, each warmed up through its
    generation's first ``skip`` steps (eager, captures), timed over ``repeats`` steps, then one more
    step of each under one profiler session."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import e2e
    from sdxl import VAE_SCALE, build_unet, inputs

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float32 if args.smoke and not cuda else getattr(torch, args.dtype)
    base = build_unet(device, dtype, tiny=args.smoke)
    latent = args.resolution // VAE_SCALE
    latents, conditioning = inputs(base, 2, (latent, latent), device, dtype)
    clock = e2e.Clock(device)
    timesteps = e2e._timesteps(args.skip + args.repeats + 1)
    steps: Dict[str, Dict] = {}
    keep = []  # the parallelised copies live until every step is profiled
    with torch.no_grad():
        plain = e2e._single_step(base, latents, conditioning, cuda)
        steps["plain"] = {"call": plain, "rank": None, "split_batch": False}
        for name, split in (("band", False), ("band_split", True)):
            unet, call, rank = e2e.rank_step(
                base, latents, conditioning, args.gpus, split, cuda, "corrected_async_gn", args.kernel_backend
            )
            keep.append(unet)
            steps[name] = {"call": call, "rank": rank, "split_batch": split}
        for step in steps.values():
            step["step_ms"] = 1e3 * e2e._time_steps(step["call"], timesteps[:-1], args.skip, clock)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as profiler:
            for name, step in steps.items():
                if cuda:
                    torch.cuda.synchronize()
                time.sleep(0.02)
                with record_function(REPLAY_LABEL + name):
                    start = clock.mark()
                    step["call"](timesteps[-1])
                    end = clock.mark()
                    if cuda:
                        torch.cuda.synchronize()
                step["profiled_step_ms"] = 1e3 * clock.seconds(start, end)
        groups = split_by_marks(profiler.events())
    record = {
        "resolution": args.resolution,
        "gpus": args.gpus,
        "mode": "corrected_async_gn",
        "graphs": cuda,
        "skip": args.skip,
        "repeats": args.repeats,
        "proxy_kernels": PROXY_KERNELS,
        "steps": {},
    }
    for name, step in steps.items():
        kernels = e2e.kernel_summary(groups.get(name, []), step["profiled_step_ms"]) if cuda else None
        record["steps"][name] = {
            "gpus": 1 if step["rank"] is None else args.gpus,
            "rank": step["rank"],
            "split_batch": step["split_batch"],
            "step_ms": step["step_ms"],
            "profiled_step_ms": step["profiled_step_ms"],
            "kernels": kernels,
        }
    return record


def replay_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check.py replay", description=measure_replays.__doc__)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--skip", type=int, default=5, help="steps of each generation before the timed ones")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps before the profiled one")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--kernel-backend", default="auto", choices=KERNEL_BACKENDS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="the tiny UNet")
    parser.add_argument("--output", type=Path, required=True)
    return parser


def replay_main(argv) -> int:
    args = replay_parser().parse_args(argv)
    record = {"environment": environment(), "replay": measure_replays(args)}
    write_json(args.output, record)
    print_replay(record["replay"])
    return 0


# -- running the parts ----------------------------------------------------------------------------


def _load(path: Path) -> Optional[Dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _tail(text: str, limit: int = 3000) -> str:
    return text[-limit:]


def run_in_process(part: Part) -> Dict:
    """The dry run: the part's ``main`` called here, its output captured."""
    import e2e

    log = io.StringIO()
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = e2e.main(part.argv) if part.kind == "e2e" else replay_main(part.argv[1:])
        status = "passed" if code == 0 else f"failed (exit status {code})"
    except (Exception, SystemExit) as error:  # noqa: BLE001 - recorded; the next part runs
        status = f"failed ({type(error).__name__}: {error})"
    seconds = round(time.monotonic() - started, 1)
    return {"status": status, "seconds": seconds, "log_tail": _tail(log.getvalue())}


def part_command(part: Part) -> List[str]:
    """The part's process: ``bench/e2e.py`` or this script's ``replay``."""
    script = HERE / ("e2e.py" if part.kind == "e2e" else "gpu_check.py")
    return [PYTHON, str(script), *part.argv]


def run_subprocess(name: str, command: List[str], limit_s: float, work: Path) -> Dict:
    """``command`` in its own process group (killed whole at ``limit_s``, or on SIGTERM), its
    output in ``work/<name>.log``; the status, the seconds and the end of the log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    log_path = work / f"{name}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPOSITORY, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = process.wait(timeout=max(1.0, limit_s))
            status = "passed" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit_s:.0f} s"
        except Stopped:
            status = "stopped (SIGTERM)"
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return {
        "status": status,
        "seconds": round(time.monotonic() - started, 1),
        "log_tail": _tail(log_path.read_text(errors="replace")),
    }


def merge(record: Dict, part: Part) -> None:
    """What the part wrote (all of it, or up to where it was stopped) into the record."""
    data = _load(part.output)
    if not data:
        return
    if part.kind == "replay":
        record["replay"] = data.get("replay")
        return
    rows = [dict(row, part=part.name) for row in data.get("rows", [])]
    record[part.rows_key].extend(rows)
    record["profiles"].update(data.get("profiles", {}))
    part_record = next(p for p in record["parts"] if p["name"] == part.name)
    part_record["complete"] = data.get("complete", False)


def figures(rows: List[Dict]) -> Dict[str, Dict]:
    """Each size's N = 8 efficiency (CUDA graphs, ``corrected_async_gn``) without and with CFG
    split, next to the target and the paper's figure."""
    import e2e

    found: Dict[str, Dict] = {}
    for row in rows:
        if row["gpus"] == 8 and row.get("mode") == "corrected_async_gn":
            entry = found.setdefault(
                str(row["resolution"]),
                {
                    "variant": row["variant"],
                    "target": e2e.TARGET_EFFICIENCY_8.get(row["resolution"]),
                    "paper": e2e.PAPER_EFFICIENCY_8.get(row["resolution"]),
                },
            )
            entry["split" if row["split_batch"] else "no_split"] = row["efficiency"]
    return found


def print_replay(replay: Optional[Dict]) -> None:
    if not replay:
        print("replay: not measured")
        return
    print(
        f"replay {replay['resolution']}², one step of each ({'graphs' if replay['graphs'] else 'eager'}):\n"
        f"{'step':>11} {'rank':>4} {'step ms':>8} {'profiled':>8} {'kernels':>7} {'copies':>6} "
        f"{'<3us':>5} {'<10us':>5} {'kernel ms':>9} {'span ms':>8} {'share':>6}"
    )
    for name, step in replay["steps"].items():
        k = step["kernels"] or {}
        kernel_ms = f"{k['kernel_us'] / 1e3:.2f}" if "kernel_us" in k else "-"
        span_ms = f"{k['span_us'] / 1e3:.2f}" if "span_us" in k else "-"
        share = k.get("kernel_share_of_wall")
        print(
            f"{name:>11} {'-' if step['rank'] is None else step['rank']:>4} {step['step_ms']:>8.2f} "
            f"{step['profiled_step_ms']:>8.2f} {k.get('kernels', '-'):>7} {k.get('copies', '-'):>6} "
            f"{k.get('under_3us', '-'):>5} {k.get('under_10us', '-'):>5} {kernel_ms:>9} {span_ms:>8} "
            f"{'-' if share is None else f'{share * 100:.0f}%':>6}"
        )


def summary(record: Dict) -> None:
    """The short table printed last (the device tool returns the end of the output)."""
    import e2e

    rows = record["rows"] + record["exact_rows"]
    if rows:
        e2e.print_rows(rows)
    print_replay(record["replay"])
    for size, entry in record["efficiency_n8"].items():
        shown = {k: "-" if v is None else f"{v * 100:.1f}%" for k, v in entry.items() if k != "variant"}
        print(f"N = 8 at {size}² ({entry['variant']}): " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    for p in record["parts"]:
        print(f"{p['name']:<12} {p['status']:<28} {p['seconds']:>6.1f} s (limit {p['limit_s']:.0f} s)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["replay"]:
        return replay_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", type=Path, help="the JSON (default: bench/results/gpu-check-<device>-<time>.json)"
    )
    parser.add_argument("--dry-run", action="store_true", help="on CPU, tiny UNet, in this process")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--parts", nargs="+", help="run only these parts (e.g. to rerun one)")
    parser.add_argument(
        "--work", type=Path, help="folder for the parts' own JSON and logs (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("torch sees no GPU: run it on the GPU machine, or --dry-run here")
    if args.dry_run:
        output = args.output or Path(tempfile.gettempdir()) / "gpu-check-dry-run.json"
    else:
        output = args.output or results_path("gpu-check", torch.cuda.get_device_name())
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = plan(work, args.dry_run)
    if args.parts:
        unknown = sorted(set(args.parts) - {p.name for p in parts})
        if unknown:
            parser.error(f"unknown parts {unknown}; the parts are {[p.name for p in parts]}")
        parts = [p for p in parts if p.name in args.parts]
    record = {
        "environment": environment(dry_run=args.dry_run, budget_s=args.budget_s, work=str(work)),
        "complete": False,
        "parts": [],
        "rows": [],
        "exact_rows": [],
        "profiles": {},
        "replay": None,
        "efficiency_n8": {},
    }

    def save() -> None:
        record["efficiency_n8"] = figures(record["rows"])
        write_json(output, record)

    def stop(signum, frame):
        # ``timeout`` signals this process and then its group: the second one must not interrupt
        # the handling of the first (killing the part, keeping what it wrote).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    threads = torch.get_num_threads()
    if args.dry_run:  # it checks the machinery, not speed; on a shared CPU a thread pool spinning
        torch.set_num_threads(1)  # against other processes made the tiny UNet's steps 5-10x slower
    started = time.monotonic()
    stopped = False
    current = None
    try:
        for part in parts:
            left = args.budget_s - (time.monotonic() - started)
            limit = min(part.limit_s, left)
            entry = {"name": part.name, "limit_s": round(limit, 1), "command": part.argv}
            entry.update(status="", seconds=0.0)
            record["parts"].append(entry)
            if stopped or left < (part.min_s if part.optional else 10.0):
                entry["status"] = "skipped (stopped)" if stopped else "skipped (no time left)"
            else:
                print(f"{part.name}: up to {limit:.0f} s", flush=True)
                current = (part, entry, time.monotonic())
                entry["status"] = "running"
                part.output.unlink(missing_ok=True)  # a stale file of an earlier run is not this run's
                if args.dry_run:
                    entry.update(run_in_process(part))
                else:
                    entry.update(run_subprocess(part.name, part_command(part), limit, work))
                current = None
                stopped = entry["status"].startswith("stopped")
                merge(record, part)
                print(f"{part.name}: {entry['status']} ({entry['seconds']} s)", flush=True)
            save()
    except Stopped:  # between parts, or in the dry run's part: keep what was measured
        stopped = True
        if current is not None:
            part, entry, part_started = current
            entry.update(status="stopped (SIGTERM)", seconds=round(time.monotonic() - part_started, 1))
            merge(record, part)
    finally:
        signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)
    for part in parts[len(record["parts"]) :]:
        record["parts"].append({"name": part.name, "limit_s": 0.0, "command": part.argv})
        record["parts"][-1].update(status="skipped (stopped)", seconds=0.0)
    record["complete"] = not stopped
    record["seconds"] = round(time.monotonic() - started, 1)
    save()
    summary(record)
    print(f"wrote {output}")
    required = [p for p, part in zip(record["parts"], parts) if not part.optional]
    return 0 if all(p["status"] == "passed" for p in required) else 1


if __name__ == "__main__":
    sys.exit(main())
