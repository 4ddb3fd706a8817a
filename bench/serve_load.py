"""A small load measurement of ``distripy serve``: requests per second and latency percentiles.

Starts ``distripy serve`` as a real process on 127.0.0.1 (by default the tiny SDXL pipeline of
``distripy.pipelines.tiny``, saved to a temporary folder, on 2 ranks), waits for ``/health``,
sends ``--requests`` generation requests from ``--concurrency`` clients, and writes
``bench/results/serve-load-<UTC time>.json``: throughput, p50/p95/max latency (client side,
queueing included), the statuses, and the command and environment. On a CPU the figures say how
much the service itself costs around tiny generations, nothing about GPU throughput.

    python bench/serve_load.py --nproc 2 --requests 64 --concurrency 8
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from common import environment, results_path, write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple:
    data = json.dumps(body).encode()
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.perf_counter() - started


def _percentile(values, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the tiny SDXL pipeline)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--policy", default="latency", choices=["latency", "throughput", "adaptive"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            from distripy.pipelines.tiny import tiny_sdxl_pipeline

            model = os.path.join(folder, "tiny-sdxl")
            tiny_sdxl_pipeline(seed=0).save_pretrained(model)
        port = _free_port()
        command = [
            sys.executable, "-m", "distripy.cli", "serve", "--model", model, "--nproc", str(args.nproc),
            "--port", str(port), "--queue-size", str(max(16, args.concurrency)), "--policy", args.policy,
        ]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("serve_load: the server did not start")
                time.sleep(0.2)
            body = dict(prompt="a red boat", size=args.size, steps=args.steps, guidance=5.0)
            _post(url + "/v1/images/generations", dict(body, seed=0))  # warm-up, not counted
            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(
                    pool.map(
                        lambda seed: _post(url + "/v1/images/generations", dict(body, seed=seed)),
                        range(1, args.requests + 1),
                    )
                )
            wall = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=60)
    latencies = [seconds for status, seconds in results if status == 200]
    statuses = {
        str(code): sum(1 for status, _ in results if status == code) for code in {s for s, _ in results}
    }
    record = {
        "environment": environment(command=" ".join(sys.argv)),
        "settings": vars(args),
        "requests_per_s": round(len(latencies) / wall, 3),
        "latency_s": {
            "p50": round(statistics.median(latencies), 4),
            "p95": round(_percentile(latencies, 0.95), 4),
            "max": round(max(latencies), 4),
        },
        "statuses": statuses,
        "wall_s": round(wall, 2),
    }
    path = write_json(args.output or results_path("serve-load", f"{args.nproc}ranks", args.policy), record)
    print(json.dumps({key: record[key] for key in ("requests_per_s", "latency_s", "statuses")}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
