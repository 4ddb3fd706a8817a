"""The GPU acceptance plan in one command: everything a lent (or your own) GPU must show.

    python bench/gpu_acceptance.py --out DIR                 # on one GPU, ~25 minutes on an H100
    python bench/gpu_acceptance.py --out DIR --stages e2e comm   # some stages (a 10-minute slot)
    python bench/gpu_acceptance.py --out DIR --dry-run       # the same plan on CPU, tiny shapes

Stages, in order, each a subprocess with its own time limit (a failed or timed-out stage does not
stop the others; a stage that needs what the machine lacks is skipped, saying why):

1. ``cuda_tests``: ``bench/gpu_probe.py`` (which NCCL is loaded, the copy and matrix-product
   ceilings, the int32-offset probe), then the test suite's ``cuda`` tests (JUnit XML);
2. ``sanitizer``: compute-sanitizer memcheck and racecheck over the NCCL world-1 tests and one
   Triton kernel test (``--report-api-errors no``: NCCL probes kernel images it was not built
   for with ``cudaFuncGetAttributes`` and handles the errors; they are not memory errors);
3. ``kernels``: ``bench/kernel_speed.py --shapes all`` (the fused Triton convolution vs the cuDNN
   path, per shape; the GroupNorm kernels);
4. ``e2e``: ``bench/e2e.py`` at 1024², 2048², 3840² for N = 1, 2, 4, 8, eager and CUDA graphs;
   then one rank's step of 8 in ``exact``, ``full_sync`` and ``corrected_async_gn`` at 1024² and
   2048² (CUDA graphs; ``modes.json``: the compute cost of each mode's step);
5. ``comm``: ``bench/comm.py`` on one rank (host cost per op, single and grouped);
6. ``host_overhead``: ``bench/host_overhead.py`` (dispatcher ops per step, torch.compile);
7. ``demo``: ``distripy demo`` on one GPU;
8. ``generate``: ``distripy generate`` on one GPU from a tiny saved pipeline.

Then it writes ``summary.json`` and ``summary.txt`` (what passed, failed, was skipped or timed out,
and each measured figure next to its target from the performance targets in docs/results.md) and packs every
log and result into ``artifacts.tar.gz``: three files, because a lent machine returns at most eight.
``--dry-run`` runs the plan on CPU with tiny shapes, skipping what needs CUDA; CI runs it.
Exit status: 0 when no stage failed or timed out.
"""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from common import REPOSITORY, environment, write_json

PYTHON = sys.executable
TARGETS = {  # docs/results.md, the performance targets
    "efficiency_n8_1024": (">=", 0.60),
    "efficiency_n8_2048": (">=", 0.85),
    "efficiency_n8_3840": (">=", 0.92),
    "halo_conv_vs_cudnn_band": ("<=", 1.05),
    "gn_silu_vs_torch": ("<=", 0.60),
    "host_us_per_grouped_op": ("<=", 5.0),
    "async_ops_vs_plain": ("<=", 1.10),
}


@dataclasses.dataclass
class Stage:
    name: str
    commands: List[List[str]]
    limit_s: float
    needs_cuda: bool = False
    needs: Optional[Callable[[], Optional[str]]] = None  # why it cannot run here, or None
    results: List[str] = dataclasses.field(default_factory=list)  # files it writes, under DIR


def _sanitizer() -> Optional[str]:
    return None if shutil.which("compute-sanitizer") else "compute-sanitizer is not on PATH"


def _cuda_missing() -> Optional[str]:
    return None if torch.cuda.is_available() else "needs a CUDA GPU; torch sees none"


def plan(out: Path, dry_run: bool) -> List[Stage]:
    """The stages, their commands and time limits (about 25 minutes in all on one H100)."""
    bench = REPOSITORY / "bench"
    pytest = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    tiny_model = out / "work" / "tiny-pipeline"
    save_tiny = [
        PYTHON, "-c",
        "import sys; from distripy.pipelines.tiny import tiny_sdxl_pipeline; "
        "tiny_sdxl_pipeline(0).save_pretrained(sys.argv[1])", str(tiny_model),
    ]  # fmt: skip
    if dry_run:
        return [
            Stage("cuda_tests", [pytest + ["-m", "cuda", "tests/test_nccl_comm.py", "--junitxml", str(out / "cuda-tests.xml")]], 120, results=["cuda-tests.xml"]),
            Stage("sanitizer", [], 60, needs_cuda=True, needs=_sanitizer),
            Stage("kernels", [], 60, needs_cuda=True),
            Stage("e2e", [[PYTHON, str(bench / "e2e.py"), "--smoke", "--device", "cpu", "--resolutions", "128", "--gpus", "2", "--skip", "1", "--repeats", "1", "--output", str(out / "e2e.json")]], 240, results=["e2e.json"]),
            Stage("comm", [], 60, needs_cuda=True),
            Stage("host_overhead", [[PYTHON, str(bench / "host_overhead.py"), "--tiny", "--ranks", "2", "--backends", "triton", "--repeats", "1", "--output", str(out / "host_overhead.json")]], 240, results=["host_overhead.json"]),
            Stage("demo", [[PYTHON, "-m", "distripy.cli", "demo", "--nproc", "1", "--height", "64", "--width", "64", "--steps", "3", "--output-dir", str(out / "demo")]], 240),
            Stage("generate", [save_tiny, [PYTHON, "-m", "distripy.cli", "generate", "--model", str(tiny_model), "--prompt", "a red boat", "--height", "64", "--width", "64", "--steps", "3", "--nproc", "1", "--output", str(out / "generate.png")]], 240),
        ]  # fmt: skip
    sanitized = ["tests/test_nccl_comm.py::test_every_operation_on_one_gpu", "tests/test_triton_ops.py"]
    return [
        Stage("cuda_tests", [[PYTHON, str(bench / "gpu_probe.py"), "--output", str(out / "probe.json")], pytest + ["-m", "cuda", "--junitxml", str(out / "cuda-tests.xml")]], 270, needs_cuda=True, results=["probe.json", "cuda-tests.xml"]),
        Stage("sanitizer", [["compute-sanitizer", "--tool", tool, "--target-processes", "all", "--report-api-errors", "no", "--error-exitcode", "99", "--log-file", str(out / f"sanitizer-{tool}.log")] + pytest + ["-m", "cuda"] + sanitized for tool in ("memcheck", "racecheck")], 140, needs_cuda=True, needs=_sanitizer, results=["sanitizer-memcheck.log", "sanitizer-racecheck.log"]),
        Stage("kernels", [[PYTHON, str(bench / "kernel_speed.py"), "--shapes", "all", "--output", str(out / "kernels.json")]], 240, needs_cuda=True, results=["kernels.json"]),
        Stage("e2e", [[PYTHON, str(bench / "e2e.py"), "--resolutions", "1024", "2048", "3840", "--gpus", "2", "4", "8", "--variants", "eager", "graphs", "--output", str(out / "e2e.json")], [PYTHON, str(bench / "e2e.py"), "--resolutions", "1024", "2048", "--gpus", "8", "--split", "no", "--variants", "graphs", "--modes", "exact", "full_sync", "corrected_async_gn", "--skip", "3", "--repeats", "7", "--output", str(out / "modes.json")]], 420, needs_cuda=True, results=["e2e.json", "modes.json"]),
        Stage("comm", [[PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(bench / "comm.py"), "--max-bytes", str(1 << 26), "--output", str(out / "comm.json")]], 90, needs_cuda=True, results=["comm.json"]),
        Stage("host_overhead", [[PYTHON, str(bench / "host_overhead.py"), "--ranks", "8", "--repeats", "1", "--compile", "--output", str(out / "host_overhead.json")]], 160, results=["host_overhead.json"]),
        Stage("demo", [[PYTHON, "-m", "distripy.cli", "demo", "--nproc", "1", "--output-dir", str(out / "demo")]], 90, needs_cuda=True),
        Stage("generate", [save_tiny, [PYTHON, "-m", "distripy.cli", "generate", "--model", str(tiny_model), "--prompt", "a red boat", "--height", "256", "--width", "256", "--nproc", "1", "--output", str(out / "generate.png")]], 90, needs_cuda=True),
    ]  # fmt: skip


def _run(command: List[str], log, limit_s: float, env: Dict[str, str]) -> str:
    """Run one command (its own process group, killed whole on timeout); its status."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(
        command, cwd=REPOSITORY, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        code = process.wait(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.write(f"\n[timed out after {limit_s:.0f} s]\n")
        return "timed out"
    log.write(f"\n[exit status {code}]\n")
    return "passed" if code == 0 else f"failed (exit status {code})"


def run_stage(stage: Stage, out: Path, dry_run: bool, env: Dict[str, str]) -> Dict[str, Any]:
    reason = _cuda_missing() if stage.needs_cuda else None
    if reason is None and stage.needs is not None:
        reason = stage.needs()
    if reason is not None or not stage.commands:
        why = reason or "nothing to run on this machine"
        if dry_run and stage.needs_cuda:
            why = f"{why} (dry run)"
        return {"stage": stage.name, "status": "skipped", "why": why, "seconds": 0.0}
    started = time.monotonic()
    status = "passed"
    with open(out / "logs" / f"{stage.name}.log", "w") as log:
        for command in stage.commands:
            left = stage.limit_s - (time.monotonic() - started)
            status = _run(command, log, left, env)
            if status != "passed":
                break
    return {"stage": stage.name, "status": status, "seconds": round(time.monotonic() - started, 1)}


def _load(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def figures(out: Path) -> Dict[str, Any]:
    """The measured figures the targets name, from the stages' results (None: not measured)."""
    found: Dict[str, Any] = {}
    e2e = _load(out / "e2e.json")
    if e2e:
        for row in e2e.get("rows", []):
            if row.get("gpus") == 8 and not row.get("split_batch") and row.get("variant") == "graphs":
                found[f"efficiency_n8_{row['resolution']}"] = row.get("efficiency")
    modes = _load(out / "modes.json")
    if modes:  # exact's step over corrected_async_gn's, one rank of 8 (compute only: LoopbackComm)
        steps = {(r["resolution"], r.get("mode")): r["step_ms"] for r in modes.get("rows", [])}
        for resolution in (1024, 2048):
            exact, corrected = steps.get((resolution, "exact")), steps.get((resolution, "corrected_async_gn"))
            if exact and corrected:
                found[f"exact_over_corrected_n8_{resolution}"] = exact / corrected
    kernels = _load(out / "kernels.json")
    if kernels and kernels.get("rows"):
        rows = kernels["rows"]
        for name, key in (
            ("halo_conv_vs_cudnn_band", "conv_vs_cudnn_band"),
            ("gn_silu_vs_torch", "gn_silu_vs_torch"),
        ):
            values = sorted(r[key] for r in rows if r.get(key) is not None)
            if values:
                found[name] = values[len(values) // 2]  # the median over shapes
    comm = _load(out / "comm.json")
    if comm and comm.get("host_cost_us"):
        found["host_us_per_grouped_op"] = comm["host_cost_us"].get("distripy_grouped")
    host = _load(out / "host_overhead.json")
    if host and host.get("async_ratio_triton_max_ranks") is not None:
        found["async_ops_vs_plain"] = host["async_ratio_triton_max_ranks"]
    if host and host.get("compile"):
        found["compile_graph_breaks"] = host["compile"].get("graph_breaks")
        found["compile_checkpoints"] = host["compile"].get("checkpoints_per_step")
        found["compile_equals_eager"] = host["compile"].get("equals_eager")
    tests = out / "cuda-tests.xml"
    if tests.exists():
        try:
            suite = ElementTree.parse(tests).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            found["cuda_tests"] = {
                k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
            }
        except (ElementTree.ParseError, AttributeError):
            found["cuda_tests"] = None
    return found


def verdicts(found: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for name, (relation, target) in TARGETS.items():
        value = found.get(name)
        met = None if value is None else (value >= target if relation == ">=" else value <= target)
        rows.append({"figure": name, "value": value, "target": f"{relation} {target}", "met": met})
    return rows


def summary_text(stages: List[Dict[str, Any]], rows: List[Dict[str, Any]], found: Dict[str, Any]) -> str:
    lines = ["stage           status                      seconds  note"]
    for s in stages:
        lines.append(f"{s['stage']:<15} {s['status']:<27} {s['seconds']:>7.1f}  {s.get('why', '')}")
    lines += ["", "figure                      measured    target    met"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        met = {True: "yes", False: "NO", None: "not measured"}[r["met"]]
        lines.append(f"{r['figure']:<27} {value:>9}   {r['target']:<9} {met}")
    extra = {k: v for k, v in found.items() if k not in TARGETS}
    if extra:
        lines += ["", "also: " + json.dumps(extra)]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def pack(out: Path, keep: List[str]) -> Path:
    """Every file under ``out`` except ``keep`` into ``artifacts.tar.gz`` (written whole or not at all)."""
    archive = out / "artifacts.tar.gz"
    partial = out / "artifacts.tar.gz.tmp"
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.name not in keep and path not in (archive, partial):
                tar.add(path, arcname=str(path.relative_to(out)))
    os.replace(partial, archive)
    for path in sorted(out.iterdir()):
        if path.name not in keep + [archive.name]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return archive


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the summary and the archive")
    parser.add_argument(
        "--dry-run", action="store_true", help="on CPU with tiny shapes; skips what needs CUDA"
    )
    parser.add_argument("--stages", nargs="+", help="run only these stages (default: all, in order)")
    parser.add_argument("--keep-files", action="store_true", help="leave the results unpacked too")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "work").mkdir(exist_ok=True)
    stages = plan(out, args.dry_run)
    names = [s.name for s in stages]
    if args.stages:
        unknown = sorted(set(args.stages) - set(names))
        if unknown:
            parser.error(f"unknown stages {unknown}; the stages are {names}")
        stages = [s for s in stages if s.name in args.stages]
    env = dict(os.environ)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same plan as a CPU-only machine runs it
    env.pop("TRITON_INTERPRET", None)
    started = time.monotonic()
    results = []
    for stage in stages:
        result = run_stage(stage, out, args.dry_run, env)
        results.append(result)
        print(
            f"{stage.name}: {result['status']} ({result['seconds']} s){'; ' + result['why'] if 'why' in result else ''}",
            flush=True,
        )
    found = figures(out)
    rows = verdicts(found)
    summary = {
        "environment": environment(dry_run=args.dry_run),
        "stages": results,
        "figures": found,
        "targets": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    write_json(out / "summary.json", summary)
    text = summary_text(results, rows, found)
    _write_text(out / "summary.txt", text)
    if not args.keep_files:
        pack(out, ["summary.json", "summary.txt"])
    print(text, end="")
    bad = [r["stage"] for r in results if r["status"] not in ("passed", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
