"""The planner's scaling tables: speedup of N GPUs on a fabric, and the modes side by side.

A thin command over ``distripy.planning``, the one performance model (``distripy plan`` ranks one
machine's configurations; this prints the grid across machines). Every number is the planner's
``predict``: a rank's step is its compute (``GpuProfile``: fitted to distripy's H100 measurement,
to the DistriFusion paper's A100 latencies, or to your ``bench/e2e.py`` file) plus the
communication it cannot hide (the transfers of SDXL's UNet walked from its config, on a
``Fabric``: built in, or your ``bench/comm.py`` file). Nothing is cached: the tables are computed
in well under a second, and they are predictions, not measurements, so nothing is written under
``bench/results/`` (``--json`` prints them; ``--output`` writes them where you say).

Tables:

* the check: the DistriFusion paper's measured latencies (A100 NVLink, 50 steps, no CFG split)
  against the planner's predictions for the same configurations (target: within 15% per cell);
* speedup over one GPU for N = 2, 4, 8 at 1024², 2048², 3840², without and with the CFG split,
  per fabric (``corrected_async_gn`` with its warm-up);
* ``--modes``: ``full_sync``, ``exact`` and ``corrected_async_gn`` side by side on each GPU with its
  NVLink and its PCIe, and ``exact``'s time over ``corrected_async_gn``'s;
* ``--codecs``: the exchange codecs (``DistriConfig.compress``) side by side per fabric (default
  PCIe Gen4 and Gen5), resolution, N and CFG split: ``corrected_async_gn`` with the warm-up
  ``mode="auto"`` runs, and ``exact`` as a 4-step generation compressed after its first step;
  speedup, the bytes a rank sends per step after the warm-up, its predicted peak memory
  (``planning.memory``), and the uncompressed speedup over a free link (the compute's ceiling);
  ``--markdown`` writes them as tables.

    python bench/scaling.py                                  # the check, then H100 speedups
    python bench/scaling.py --gpu bench/results/e2e-h100-20261124T1950Z.json --fabric nvlink4 my-comm.json
    python bench/scaling.py --modes                          # exact vs full_sync vs corrected_async_gn
    python bench/scaling.py --eager --json                   # without CUDA graphs, as JSON
    python bench/scaling.py --codecs --markdown table.md      # the codecs over PCIe
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Sequence

from common import environment, write_json

from distripy.config import DEFAULT_WARMUP_STEPS, EXCHANGE_CODECS, DistriConfig
from distripy.errors import ConfigError
from distripy.parallel.policy import choose_mode
from distripy.planning import Fabric, GpuProfile, Prediction, predict, resolve_fabric, resolve_gpu
from distripy.planning.memory import GIB

STEPS = 50
WARMUP_STEPS = DEFAULT_WARMUP_STEPS  # synchronous steps, distripy's default
RESOLUTIONS = (1024, 2048, 3840)
WORLD_SIZES = (2, 4, 8)
VAE_SCALE = 8

# The DistriFusion paper (arXiv 2402.19481; SDXL, 50-step DDIM, A100 NVLink, no CFG split):
# seconds per image on N GPUs. 3840² on 2 and 4 GPUs from the speedups the authors' README gives
# (1.8x, 3.4x over its 140 s on one GPU).
PAPER = {
    (1024, 8): 1.77,
    (2048, 8): 4.81,
    (3840, 2): 140.0 / 1.8,
    (3840, 4): 140.0 / 3.4,
    (3840, 8): 22.9,
}
PAPER_MACHINE = ("a100", "nvlink3")

# The GPUs and fabrics of the modes table: each GPU with its NVLink and with its PCIe.
MODE_MACHINES = (("a100", "nvlink3"), ("a100", "pcie4"), ("h100", "nvlink4"), ("h100", "pcie5"))
TABLE_MODES = ("full_sync", "exact", "corrected_async_gn")

EXACT_STEPS = 4  # the codec table's exact generation: a few-step model's (SDXL-Lightning's 4 steps)
FREE_LINK = Fabric("a free link", 1e9, 1e9, 0.0, 0.0, "no transfer costs anything: the compute alone bounds the speedup")


def _predict(
    gpu: GpuProfile, fabric: Fabric, resolution: int, gpus: int, split: bool, mode: str, graphs: bool
) -> Prediction:
    latent = (resolution // VAE_SCALE, resolution // VAE_SCALE)
    warmup = WARMUP_STEPS if mode == "corrected_async_gn" else 0
    return predict(gpu, fabric, latent, STEPS, gpus, split, mode, warmup, graphs)


def paper_check() -> List[Dict]:
    """The planner against the paper's measured latencies, per (resolution, GPUs)."""
    gpu, fabric = resolve_gpu(PAPER_MACHINE[0]), resolve_fabric(PAPER_MACHINE[1])
    rows = []
    for (resolution, gpus), measured in PAPER.items():
        predicted = _predict(gpu, fabric, resolution, gpus, False, "corrected_async_gn", True).seconds
        rows.append(
            {
                "resolution": resolution,
                "gpus": gpus,
                "paper_s": measured,
                "predicted_s": predicted,
                "error": predicted / measured - 1.0,
            }
        )
    return rows


def print_paper_check(rows: List[Dict]) -> None:
    print(
        f"DistriFusion paper, {resolve_gpu(PAPER_MACHINE[0]).name} on "
        f"{resolve_fabric(PAPER_MACHINE[1]).name}, {STEPS} steps: measured vs the planner"
    )
    print(f"{'size':>6} {'GPUs':>4} {'paper s':>8} {'model s':>8} {'error':>7}")
    for r in rows:
        print(
            f"{r['resolution']:>6} {r['gpus']:>4} {r['paper_s']:>8.2f} {r['predicted_s']:>8.2f} "
            f"{r['error'] * 100:>6.1f}%"
        )


def predictions(gpu: GpuProfile, fabrics: Sequence[Fabric], graphs: bool) -> List[Dict]:
    """Speedup over one GPU for each fabric, resolution and N, without and with the CFG split."""
    rows = []
    for fabric in fabrics:
        for resolution in RESOLUTIONS:
            for gpus in WORLD_SIZES:
                for split in (False, True):
                    result = _predict(gpu, fabric, resolution, gpus, split, "corrected_async_gn", graphs)
                    rows.append(
                        {
                            "fabric": fabric.name,
                            "resolution": resolution,
                            "gpus": gpus,
                            "split_batch": split,
                            "single_s": result.single_seconds,
                            "predicted_s": result.seconds,
                            "speedup": result.speedup,
                        }
                    )
    return rows


def print_predictions(gpu: str, rows: List[Dict], graphs: bool) -> None:
    fabrics = list(dict.fromkeys(r["fabric"] for r in rows))
    for name in fabrics:
        print(
            f"\npredicted speedup over one GPU, {gpu} on {name} "
            f"({'CUDA graphs' if graphs else 'eager'}, {STEPS} steps, {WARMUP_STEPS} warm-up steps):"
        )
        print(f"{'size':>6} {'GPUs':>4} {'speedup':>8} {'CFG split':>10}")
        mine = {(r["resolution"], r["gpus"], r["split_batch"]): r for r in rows if r["fabric"] == name}
        for resolution in RESOLUTIONS:
            for gpus in WORLD_SIZES:
                whole, split = mine[resolution, gpus, False], mine[resolution, gpus, True]
                print(f"{resolution:>6} {gpus:>4} {whole['speedup']:>7.2f}x {split['speedup']:>9.2f}x")


def mode_comparison(graphs: bool, machines=MODE_MACHINES) -> List[Dict]:
    """Speedup over one GPU of each mode, per GPU and fabric, resolution, N and CFG split."""
    rows = []
    for gpu_name, fabric_name in machines:
        gpu, fabric = resolve_gpu(gpu_name), resolve_fabric(fabric_name)
        for resolution in RESOLUTIONS:
            for gpus in WORLD_SIZES:
                for split in (False, True):
                    results = {
                        mode: _predict(gpu, fabric, resolution, gpus, split, mode, graphs) for mode in TABLE_MODES
                    }
                    seconds = {mode: r.seconds for mode, r in results.items()}
                    rows.append(
                        {
                            "gpu": gpu_name,
                            "fabric": fabric_name,
                            "resolution": resolution,
                            "gpus": gpus,
                            "split_batch": split,
                            "single_s": results["full_sync"].single_seconds,
                            "seconds": seconds,
                            "speedup": {mode: r.speedup for mode, r in results.items()},
                            "exact_over_corrected": seconds["exact"] / seconds["corrected_async_gn"],
                        }
                    )
    return rows


def print_mode_comparison(rows: List[Dict], graphs: bool) -> None:
    print(
        f"\npredicted speedup over one GPU by mode ({'CUDA graphs' if graphs else 'eager'}, {STEPS} steps, "
        f"{WARMUP_STEPS} warm-up steps for corrected_async_gn)"
    )
    header = f"{'GPU':>5} {'fabric':>8} {'size':>5} {'N':>2} {'CFG':>5}"
    header += "".join(f" {mode:>18}" for mode in TABLE_MODES) + f" {'exact/corrected':>16}"
    print(header)
    for r in rows:
        split = "split" if r["split_batch"] else "-"
        line = f"{r['gpu']:>5} {r['fabric']:>8} {r['resolution']:>5} {r['gpus']:>2} {split:>5}"
        line += "".join(f" {r['speedup'][mode]:>17.2f}x" for mode in TABLE_MODES)
        flag = "" if r["exact_over_corrected"] <= 1.10 else "  > 10%"
        print(line + f" {r['exact_over_corrected']:>15.3f}{flag}")


def codec_comparison(
    gpu: GpuProfile, fabrics: Sequence[Fabric], graphs: bool, mode: str = "corrected_async_gn"
) -> List[Dict]:
    """Each codec's predicted generation, per fabric, resolution, N and CFG split: speedup, bytes
    sent per step after the warm-up, peak memory of the fullest GPU, and ``ceiling``: the
    uncompressed speedup over a link that costs nothing (``FREE_LINK``: the compute alone bounds
    it). ``corrected_async_gn`` at ``mode="auto"``'s warm-up for ``STEPS``; ``exact`` as a few-step
    generation runs it compressed (``EXACT_STEPS``, only the first at full precision)."""
    steps = STEPS if mode != "exact" else EXACT_STEPS
    warmup = choose_mode(DistriConfig(), STEPS).warmup_steps if mode != "exact" else 1
    rows = []
    for fabric in fabrics:
        for resolution in RESOLUTIONS:
            latent = (resolution // VAE_SCALE, resolution // VAE_SCALE)
            for gpus in WORLD_SIZES:
                for split in (False, True):
                    common = dict(latent=latent, steps=steps, gpus=gpus, split_batch=split, mode=mode)
                    results = {
                        codec: predict(gpu, fabric, **common, warmup_steps=warmup, graphs=graphs, compress=codec)
                        for codec in EXCHANGE_CODECS
                    }
                    ceiling = predict(gpu, FREE_LINK, **common, warmup_steps=warmup, graphs=graphs)
                    rows.append(
                        {
                            "fabric": fabric.name,
                            "mode": mode,
                            "steps": steps,
                            "resolution": resolution,
                            "gpus": gpus,
                            "split_batch": split,
                            "warmup_steps": warmup,
                            "single_s": results["none"].single_seconds,
                            "speedup": {codec: r.speedup for codec, r in results.items()},
                            "ceiling": ceiling.speedup,
                            "sent_mb_per_step": {codec: r.sent_bytes / 1e6 for codec, r in results.items()},
                            "peak_gib": {codec: r.memory.peak / GIB for codec, r in results.items()},
                        }
                    )
    return rows


def print_codec_comparison(rows: List[Dict], graphs: bool) -> None:
    print(codec_lines(rows, graphs, markdown=False))


def codec_lines(rows: List[Dict], graphs: bool, markdown: bool) -> str:
    """The codec tables as text, or as markdown (one table per mode and fabric)."""
    out = []
    for mode, name in dict.fromkeys((r["mode"], r["fabric"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["fabric"]) == (mode, name)]
        first = mine[0]
        warmup = (
            f"{first['warmup_steps']} warm-up steps"
            if mode != "exact"
            else f"the first step at full precision, the rest compressed ({mode})"
        )
        title = (
            f"predicted speedup over one GPU (peak GiB per GPU), {name}, {mode}, "
            f"{'CUDA graphs' if graphs else 'eager'}, {first['steps']} steps, {warmup}"
        )
        cells = ["size", "GPUs", "CFG split", *EXCHANGE_CODECS, "free link", "MB sent per step, none -> residual2"]
        if markdown:
            out += [f"### {title}", "", "| " + " | ".join(cells) + " |", "|" + " --- |" * len(cells)]
        else:
            out += ["", title, " ".join(f"{c:>14}" for c in cells)]
        for r in mine:
            values = [str(r["resolution"]), str(r["gpus"]), "yes" if r["split_batch"] else "no"]
            values += [f"{r['speedup'][codec]:.2f}x ({r['peak_gib'][codec]:.1f})" for codec in EXCHANGE_CODECS]
            values.append(f"{r['ceiling']:.2f}x")
            values.append(f"{r['sent_mb_per_step']['none']:.0f} -> {r['sent_mb_per_step']['residual2']:.0f}")
            out.append("| " + " | ".join(values) + " |" if markdown else " ".join(f"{v:>14}" for v in values))
        out.append("")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--gpu",
        default="h100",
        help="h100, a100, l40, or a bench/e2e.py (or gpu_check.py) JSON file to fit (default h100)",
    )
    p.add_argument(
        "--fabric",
        nargs="+",
        default=["nvlink4", "pcie4", "pcie5"],
        help="nvlink4, nvlink3, pcie5, pcie4, or bench/comm.py JSON files (default: nvlink4 pcie4 pcie5)",
    )
    p.add_argument("--eager", action="store_true", help="steps without CUDA graphs (bound by the host)")
    p.add_argument("--modes", action="store_true", help="only the table of the modes side by side")
    p.add_argument("--codecs", action="store_true", help="only the table of the exchange codecs (default: PCIe)")
    p.add_argument("--markdown", type=Path, help="with --codecs: also write its table as markdown to this file")
    p.add_argument("--skip-check", action="store_true", help="without the paper check")
    p.add_argument("--json", action="store_true", help="print the tables as JSON instead")
    p.add_argument("--output", type=Path, help="also write the tables as JSON to this file")
    return p


def tables(args: argparse.Namespace) -> Dict:
    """What ``main`` prints, as data (the planner's profiles beside it)."""
    graphs = not args.eager
    settings = {"steps": STEPS, "warmup_steps": WARMUP_STEPS, "cuda_graphs": graphs}
    if args.codecs:
        gpu = resolve_gpu(args.gpu)
        names = args.fabric if args.fabric != parser().get_default("fabric") else ["pcie4", "pcie5"]
        fabrics = [resolve_fabric(name) for name in names]
        codecs = codec_comparison(gpu, fabrics, graphs) + codec_comparison(gpu, fabrics, graphs, mode="exact")
        return dict(settings, gpu=asdict(gpu), fabrics=[asdict(f) for f in fabrics], codecs=codecs)
    if args.modes:
        machines = [
            {"gpu": asdict(resolve_gpu(gpu)), "fabric": asdict(resolve_fabric(fabric))}
            for gpu, fabric in MODE_MACHINES
        ]
        return dict(settings, machines=machines, modes=mode_comparison(graphs))
    gpu = resolve_gpu(args.gpu)
    fabrics = [resolve_fabric(name) for name in args.fabric]
    return dict(
        settings,
        gpu=asdict(gpu),
        fabrics=[asdict(fabric) for fabric in fabrics],
        paper_check=[] if args.skip_check else paper_check(),
        predictions=predictions(gpu, fabrics, graphs),
    )


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        data = tables(args)
    except ConfigError as error:  # a GPU or fabric the planner does not know, or a bad file
        print(f"bench/scaling.py: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.codecs:
        print_codec_comparison(data["codecs"], data["cuda_graphs"])
    elif args.modes:
        print_mode_comparison(data["modes"], data["cuda_graphs"])
    else:
        if data["paper_check"]:
            print_paper_check(data["paper_check"])
        print_predictions(data["gpu"]["name"], data["predictions"], data["cuda_graphs"])
    if args.markdown and args.codecs:
        command = "python bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = f"<!-- {command} -->\n\n" + codec_lines(data["codecs"], data["cuda_graphs"], markdown=True)
        partial = args.markdown.with_name(args.markdown.name + ".partial")
        partial.write_text(text)
        partial.replace(args.markdown)
    if args.output:
        write_json(args.output, dict(data, environment=environment()))
        print(f"\nwrote {args.output}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
