"""A soak of the ``distripy`` command: the same multi-process ``generate`` run again and again.

Every run must exit 0 and write its image; a run that does not (a rank that aborts at shutdown, a
hang past ``--timeout``, a flaky rendezvous) is counted with its exit status and the last lines it
printed. The model is the demo's small SDXL-architecture pipeline, saved to a temporary folder
(no download); the JSON result goes to ``bench/results/``.

    python bench/cli_soak.py --runs 50 --nproc 2
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import environment, results_path, write_json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="the command's --timeout")
    args = parser.parse_args(argv)

    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="distripy-soak-") as folder:
        model = Path(folder) / "model"
        tiny_sdxl_pipeline(seed=3).save_pretrained(model)
        for run in range(args.runs):
            output = Path(folder) / f"image-{run}.png"
            command = [
                sys.executable, "-m", "distripy.cli", "generate", "--model", str(model),
                "--prompt", "a red boat", "--height", "64", "--width", "64", "--steps", "2",
                "--nproc", str(args.nproc), "--timeout", str(args.timeout), "--output", str(output),
            ]  # fmt: skip
            began = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout * 4 + 120)
            seconds = time.monotonic() - began
            ok = result.returncode == 0 and output.exists()
            outcomes.append(
                {
                    "run": run,
                    "exit": result.returncode,
                    "image": output.exists(),
                    "seconds": seconds,
                    **({} if ok else {"stderr_tail": result.stderr.strip().splitlines()[-5:]}),
                }
            )
            print(f"run {run}: exit {result.returncode}, {seconds:.1f} s", flush=True)
    failed = [o for o in outcomes if o["exit"] != 0 or not o["image"]]
    summary = {
        "runs": args.runs,
        "nproc": args.nproc,
        "failed": len(failed),
        "median_seconds": statistics.median(o["seconds"] for o in outcomes),
    }
    path = write_json(
        results_path("cli_soak", f"n{args.nproc}"),
        {"environment": environment(), "summary": summary, "runs": outcomes},
    )
    print(f"{summary['runs']} runs on {args.nproc} processes: {summary['failed']} failed; wrote {path}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
