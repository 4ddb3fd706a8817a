"""Scaling model: step latency and speedup of N GPUs on a fabric, from one GPU's measurements.

Inputs: one rank's compute time per step (``T_N``, measured with ``LoopbackComm`` by
``bench/e2e.py``, or given), the rank's transfers per step with their bytes, their ``group()``
launches and where in the step they are issued and waited for (``step_profile.py``), and a fabric
profile (latency and bus bandwidth of all-gather / all-reduce / neighbour send-receive, and the
share of SMs NCCL takes while it runs).

The runtime's overlap rules, as simulated here step by step:

* one link per rank, first come first served: a ``group()`` launch is one job (one latency plus
  the bandwidth time of each transfer in it), an operation outside a group is its own job;
* a warm-up (synchronous) step waits for every transfer where it is issued; an asynchronous step
  issues its transfers at the checkpoints and waits for them in the *next* step, where the module
  that issued them runs again; the output all-gather is waited for at the end of every step;
* with CUDA graphs, a step's transfers are joined at the end of that step (the graph boundary);
* while the link is busy, compute runs on the SMs NCCL leaves free.

``exact`` (``--modes``): every step is one ``exact`` step: each halo exchange is issued before its
convolution's interior rows and waited for before the boundary rows, each attention's shifts
before its own block and each waited for after the blocks received before it, each GroupNorm's
all-reduce waited for at once; so a transfer overlaps only the compute that does not need it.
The table prints it beside ``full_sync`` (every step synchronous) and ``corrected_async_gn``, per
GPU and fabric (A100 NVLink3 / PCIe Gen4, H100 NVLink4 / PCIe Gen5), N = 2/4/8, 1024² to 3840²,
with and without CFG split, every step's compute from the roofline of its own profile (the
``exact`` step computes more: split convolutions, one attention kernel per band, the merges).

Check: fed the DistriFusion paper's A100 latencies (single GPU, and "no communication" = one
rank's compute), the model must reproduce the paper's measured DistriFusion latencies (target:
within 15% per cell). Then it predicts our table for H100 NVLink and PCIe.

    python bench/scaling.py                      # the check, then the predictions
    python bench/scaling.py --measured bench/results/e2e-<device>.json   # predictions from T_N
    python bench/scaling.py --modes              # exact vs full_sync vs corrected_async_gn
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from common import RESULTS, environment, results_path, write_json
from step_profile import StepProfile, roofline_profiles

from distripy.planning.hardware import FABRIC_ALIASES, Fabric
from distripy.planning.hardware import FABRICS as PLANNER_FABRICS

PROFILE_CACHE = RESULTS / "profiles"
STEPS = 50
WARMUP_STEPS = 5  # synchronous steps: distripy's default (DistriConfig.warmup_steps)
RESOLUTIONS = (1024, 2048, 3840)
WORLD_SIZES = (2, 4, 8)


# The fabrics are the planner's (``distripy.planning.hardware``: link rates from the vendors'
# specifications, achieved fractions, latencies and SM shares assumed), under this script's names;
# replace them with bench/comm.py's measurements on yours (--fabric-json).
FABRICS = {name: PLANNER_FABRICS[short] for name, short in FABRIC_ALIASES.items()}


# The DistriFusion paper (arXiv 2402.19481; SDXL, 50-step DDIM, A100 NVLink, no CFG split):
# seconds per image. Single GPU and 8 GPUs as the paper reports them; 3840² on 2 and 4 GPUs from
# the speedups the authors' README gives (1.8x, 3.4x). The "no communication" latency (one rank's
# compute) is published for 8 GPUs only in these sources.
PAPER = {
    1024: {"single": 5.02, "no_comm": {8: 1.48}, "distrifusion": {8: 1.77}},
    2048: {"single": 23.7, "no_comm": {8: 4.14}, "distrifusion": {8: 4.81}},
    3840: {"single": 140.0, "no_comm": {8: 21.3}, "distrifusion": {2: 140.0 / 1.8, 4: 140.0 / 3.4, 8: 22.9}},
}


# -- the fabric's cost of a job ---------------------------------------------------------------------


def bandwidth_seconds(transfer, fabric: Fabric) -> float:
    n = transfer.world_size
    if transfer.op == "all_gather":  # algbw = n*send/t, busbw = algbw*(n-1)/n
        return transfer.sent * (n - 1) / (fabric.busbw_gbps * 1e9)
    if transfer.op == "all_reduce":  # busbw = algbw*2(n-1)/n
        return transfer.sent * 2 * (n - 1) / n / (fabric.busbw_gbps * 1e9)
    return max(transfer.sent, transfer.received) / (fabric.p2p_gbps * 1e9)


def _jobs(profile: StepProfile, fabric: Fabric) -> List[Tuple[float, float, List[int]]]:
    """(issue position, duration, transfer indices) of each link job of a step."""
    groups: Dict[object, List[int]] = {}
    for index, transfer in enumerate(profile.transfers):
        key = ("group", transfer.group) if transfer.group is not None else ("alone", index)
        groups.setdefault(key, []).append(index)
    jobs = []
    for members in groups.values():
        issued = min(profile.transfers[i].issued for i in members)
        duration = fabric.latency_us * 1e-6 + sum(
            bandwidth_seconds(profile.transfers[i], fabric) for i in members
        )
        jobs.append((issued, duration, members))
    return sorted(jobs, key=lambda job: job[0])


def simulate(
    profiles: Dict[str, StepProfile],
    fabric: Fabric,
    steps: int = STEPS,
    warmup_steps: int = WARMUP_STEPS,
    graphs: bool = False,
) -> List[float]:
    """Seconds of each step of one generation (see the module docstring for the rules)."""
    now, link_free = 0.0, 0.0
    carried: List[Tuple[float, float]] = []  # (position in this step, finish time) to wait for
    durations = []
    for step in range(steps):
        profile = profiles["sync" if step < max(1, warmup_steps) else "async"]
        compute = profile.compute_s
        finish: Dict[int, float] = {}
        events = [
            (issued, 0, ("issue", duration, members)) for issued, duration, members in _jobs(profile, fabric)
        ]
        for index, transfer in enumerate(profile.transfers):
            if transfer.waited is None:
                continue
            if not transfer.waited_next:
                events.append((transfer.waited, 1, ("wait", index)))
            elif graphs:
                events.append((1.0, 1, ("wait", index)))
        events += [(position, 1, ("carried", done)) for position, done in carried]
        events.sort(key=lambda e: (e[0], e[1]))
        t, progress, busy = now, 0.0, 0.0
        for position, _, (kind, *payload) in events:
            t += (position - progress) * compute
            progress = position
            if kind == "issue":
                duration, members = payload
                start = max(t, link_free)
                link_free = start + duration
                busy += duration
                for index in members:
                    finish[index] = link_free
            elif kind == "wait":
                t = max(t, finish[payload[0]])
            else:
                t = max(t, payload[0])
        t += (1.0 - progress) * compute
        t += fabric.comm_sm_share * min(busy, compute)  # compute shares the SMs with NCCL
        carried = (
            []
            if graphs
            else [(tr.waited, finish[i]) for i, tr in enumerate(profile.transfers) if tr.waited_next]
        )
        durations.append(t - now)
        now = t
    return durations


# -- profiles ----------------------------------------------------------------------------------------


def profiles_for(
    latent: int, world_size: int, split_batch: bool, gpu: str, mode: str = "corrected_async_gn"
) -> Dict[str, StepProfile]:
    """Roofline step profiles of a middle rank, cached as JSON under ``bench/results/profiles``:
    ``sync`` and ``async`` (``corrected_async_gn``), or ``exact``."""
    suffix = ("-split" if split_batch else "") + ("-exact" if mode == "exact" else "")
    path = PROFILE_CACHE / f"roofline-{gpu}-{latent}x{latent}-n{world_size}{suffix}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {phase: StepProfile.from_dict(p) for phase, p in data.items()}
    profiles = roofline_profiles((latent, latent), world_size, split_batch, gpu, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {phase: p.to_dict() for phase, p in profiles.items()})
    return profiles


def predict(
    profiles: Dict[str, StepProfile],
    step_compute_s: float,
    fabric: Fabric,
    graphs: bool = False,
    steps: int = STEPS,
    warmup_steps: int = WARMUP_STEPS,
) -> float:
    """Seconds of a ``steps``-step generation whose steps compute for ``step_compute_s`` each."""
    scaled = {phase: p.scaled(step_compute_s) for phase, p in profiles.items()}
    return sum(simulate(scaled, fabric, steps, warmup_steps, graphs))


# -- reports -----------------------------------------------------------------------------------------


def paper_check(gpu: str = "a100") -> List[Dict]:
    fabric = FABRICS["a100-nvlink3"]
    rows = []
    for resolution, paper in PAPER.items():
        latent = resolution // 8
        for n in WORLD_SIZES:
            measured = paper["distrifusion"].get(n)
            no_comm = paper["no_comm"].get(n)
            row = {"resolution": resolution, "gpus": n, "paper_s": measured, "no_comm_s": no_comm}
            if measured is not None and no_comm is not None:
                profiles = profiles_for(latent, n, False, gpu)
                predicted = predict(profiles, no_comm / STEPS, fabric)
                row.update(predicted_s=predicted, error=predicted / measured - 1.0)
            rows.append(row)
    return rows


def print_paper_check(rows: List[Dict]) -> None:
    print(
        "DistriFusion paper, A100 NVLink, 50 steps: "
        "predicted from the single-GPU and no-communication latencies"
    )
    print(f"{'size':>6} {'GPUs':>4} {'no comm s':>10} {'paper s':>8} {'model s':>8} {'error':>7}")
    for r in rows:
        if "predicted_s" in r:
            print(
                f"{r['resolution']:>6} {r['gpus']:>4} {r['no_comm_s']:>10.2f} {r['paper_s']:>8.2f} "
                f"{r['predicted_s']:>8.2f} {r['error'] * 100:>6.1f}%"
            )
        else:
            paper = "-" if r["paper_s"] is None else f"{r['paper_s']:.2f}"
            print(
                f"{r['resolution']:>6} {r['gpus']:>4} {'-':>10} {paper:>8} {'-':>8}"
                "   (no published no-comm input)"
            )


def _measured_compute(measured: Optional[Dict], resolution: int, n: int, split: bool, graphs: bool):
    """(T1, T_N) per step in seconds from an e2e.py result, or None."""
    if measured is None:
        return None
    variant = "graphs" if graphs else "eager"
    single = rank = None
    for row in measured["rows"]:
        if row["resolution"] != resolution or row["variant"] != variant:
            continue
        if row.get("mode") not in (None, "corrected_async_gn"):
            continue
        if row["gpus"] == 1:
            single = row["step_ms"] / 1e3
        elif row["gpus"] == n and row["split_batch"] == split:
            rank = row["step_ms"] / 1e3
    return None if single is None or rank is None else (single, rank)


def predictions(fabrics: List[str], gpu: str, measured: Optional[Dict], graphs: bool) -> List[Dict]:
    """Speedup over one GPU for each fabric, resolution and N, with and without CFG split."""
    rows = []
    for resolution in RESOLUTIONS:
        latent = resolution // 8
        single_profiles = None
        for n in WORLD_SIZES:
            for split in (False, True):
                profiles = profiles_for(latent, n, split, gpu)
                times = _measured_compute(measured, resolution, n, split, graphs)
                if times is None:
                    if single_profiles is None:
                        single_profiles = profiles_for(latent, 1, False, gpu)
                    times = (single_profiles["async"].compute_s, profiles["async"].compute_s)
                    source = f"roofline estimate ({gpu})"
                else:
                    source = "measured (e2e.py)"
                t1, tn = times
                for name in fabrics:
                    total = predict(profiles, tn, FABRICS[name], graphs)
                    rows.append(
                        {
                            "fabric": name,
                            "resolution": resolution,
                            "gpus": n,
                            "split_batch": split,
                            "single_step_s": t1,
                            "rank_step_s": tn,
                            "predicted_s": total,
                            "speedup": t1 * STEPS / total,
                            "compute": source,
                        }
                    )
    return rows


def print_predictions(rows: List[Dict]) -> None:
    fabrics = sorted({r["fabric"] for r in rows}, key=list(FABRICS).index)
    for name in fabrics:
        print(f"\npredicted speedup over one GPU, {FABRICS[name].name} ({rows[0]['compute']}):")
        print(f"{'size':>6} {'GPUs':>4} {'speedup':>8} {'CFG split':>10}")
        for r in rows:
            if r["fabric"] == name and not r["split_batch"]:
                split = next(
                    x
                    for x in rows
                    if x["fabric"] == name
                    and x["resolution"] == r["resolution"]
                    and x["gpus"] == r["gpus"]
                    and x["split_batch"]
                )
                print(f"{r['resolution']:>6} {r['gpus']:>4} {r['speedup']:>7.2f}x {split['speedup']:>9.2f}x")


# The GPUs and fabrics of the modes table: each GPU's roofline with its NVLink and its PCIe.
MODE_MACHINES = (
    ("a100", "a100-nvlink3"),
    ("a100", "pcie-gen4"),
    ("h100", "h100-nvlink4"),
    ("h100", "pcie-gen5"),
)
TABLE_MODES = ("full_sync", "exact", "corrected_async_gn")


def mode_seconds(mode: str, latent: int, n: int, split: bool, gpu: str, fabric: Fabric) -> float:
    """Seconds of a ``STEPS``-step generation in ``mode`` (see the module docstring)."""
    if mode == "exact":
        exact = profiles_for(latent, n, split, gpu, "exact")["exact"]
        return sum(simulate({"sync": exact, "async": exact}, fabric))
    profiles = profiles_for(latent, n, split, gpu)
    if mode == "full_sync":
        return sum(simulate({"sync": profiles["sync"], "async": profiles["sync"]}, fabric))
    return sum(simulate(profiles, fabric))


def mode_comparison(machines=MODE_MACHINES) -> List[Dict]:
    """Speedup over one GPU of each mode, per GPU and fabric, resolution, N and CFG split; and
    whether ``exact`` is within 10% of ``corrected_async_gn``'s time."""
    rows = []
    for gpu, fabric_name in machines:
        fabric = FABRICS[fabric_name]
        for resolution in RESOLUTIONS:
            latent = resolution // 8
            single = profiles_for(latent, 1, False, gpu)["async"].compute_s * STEPS
            for n in WORLD_SIZES:
                for split in (False, True):
                    seconds = {
                        mode: mode_seconds(mode, latent, n, split, gpu, fabric) for mode in TABLE_MODES
                    }
                    rows.append(
                        {
                            "gpu": gpu,
                            "fabric": fabric_name,
                            "resolution": resolution,
                            "gpus": n,
                            "split_batch": split,
                            "single_s": single,
                            "seconds": seconds,
                            "speedup": {mode: single / t for mode, t in seconds.items()},
                            "exact_over_corrected": seconds["exact"] / seconds["corrected_async_gn"],
                        }
                    )
    return rows


def print_mode_comparison(rows: List[Dict]) -> None:
    print("\npredicted speedup over one GPU by mode (roofline compute, 50 steps, 5 warm-up steps)")
    header = f"{'GPU':>5} {'fabric':>13} {'size':>5} {'N':>2} {'CFG':>5}"
    header += "".join(f" {mode:>18}" for mode in TABLE_MODES) + f" {'exact/corrected':>16}"
    print(header)
    for r in rows:
        line = f"{r['gpu']:>5} {r['fabric']:>13} {r['resolution']:>5} {r['gpus']:>2} {'split' if r['split_batch'] else '-':>5}"
        line += "".join(f" {r['speedup'][mode]:>17.2f}x" for mode in TABLE_MODES)
        flag = "" if r["exact_over_corrected"] <= 1.10 else "  > 10%"
        print(line + f" {r['exact_over_corrected']:>15.3f}{flag}")


def _load_fabric(path: Path) -> Fabric:
    """A fabric from bench/comm.py's JSON: the largest all-gather's busbw, the smallest's time."""
    data = json.loads(path.read_text())
    rows = [r for r in data["bandwidth"] if r["op"] == "all_gather"]
    largest, smallest = max(rows, key=lambda r: r["size"]), min(rows, key=lambda r: r["size"])
    busbw, latency = largest["distripy"]["busbw"], smallest["distripy"]["time_us"]
    return Fabric(f"measured ({path.name})", busbw, busbw, latency, 0.12, f"bench/comm.py: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fabrics", nargs="+", default=["h100-nvlink4", "pcie-gen4", "pcie-gen5"], choices=sorted(FABRICS)
    )
    parser.add_argument("--fabric-json", type=Path, help="bench/comm.py result to add as a fabric")
    parser.add_argument("--measured", type=Path, help="bench/e2e.py result: T1 and T_N per step")
    parser.add_argument("--gpu", default="h100", choices=["a100", "h100"], help="roofline of the predictions")
    parser.add_argument("--graphs", action="store_true", help="steps run as CUDA graphs")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument(
        "--modes", action="store_true", help="only the table of exact vs full_sync vs corrected_async_gn"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    if args.modes:
        rows = mode_comparison()
        print_mode_comparison(rows)
        path = args.output or results_path("scaling-modes")
        write_json(
            path,
            {
                "environment": environment(),
                "steps": STEPS,
                "warmup_steps": WARMUP_STEPS,
                "fabrics": {name: asdict(FABRICS[name]) for _, name in MODE_MACHINES},
                "modes": rows,
            },
        )
        print(f"\nwrote {path}")
        return 0
    check = [] if args.skip_check else paper_check()
    if check:
        print_paper_check(check)
    fabrics = list(args.fabrics)
    if args.fabric_json:
        FABRICS["measured"] = _load_fabric(args.fabric_json)
        fabrics.append("measured")
    measured = json.loads(args.measured.read_text()) if args.measured else None
    rows = predictions(fabrics, args.gpu, measured, args.graphs)
    print_predictions(rows)
    path = args.output or results_path("scaling")
    write_json(
        path,
        {
            "environment": environment(),
            "steps": STEPS,
            "warmup_steps": WARMUP_STEPS,
            "graphs": args.graphs,
            "fabrics": {name: asdict(FABRICS[name]) for name in fabrics + ["a100-nvlink3"]},
            "paper_check": check,
            "predictions": rows,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
