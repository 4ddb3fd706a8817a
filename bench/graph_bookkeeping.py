"""Host time of one replayed CUDA-graph step of the patch-parallel UNet, without a GPU.

Under ``use_cuda_graph`` a step's GPU work is one ``graph.replay()``; what is left on the host is
the wrapper's bookkeeping around it: binding the arguments and recognising the generation
(``PatchUNetForward._begin``), this rank's share of the arguments (``_localize``), the graph's key
and static inputs, waiting for what is still in flight and putting back the exchanges the graph
leaves (``StepGraphs.run``), and the output gather (``_finish``). It runs before the replay while
the GPU may idle, so it counts in every step's time once the host no longer waits for the GPU.

Here the SDXL base UNet is built on ``meta`` (its ~156 patch states, nothing computed), made
patch-parallel as one middle rank of an N-way split on ``LoopbackComm``, and ``torch.cuda``'s
stream and graph entry points are replaced by fakes (a capture runs the step once, a replay does
nothing): what is timed is the host bookkeeping only. The timestep is what a diffusers loop passes,
an element of the scheduler's timesteps (on the CPU here: there is no GPU to read it from).

    python bench/graph_bookkeeping.py                 # SDXL, 1024² (latent 128), batch 2, N = 8
    python bench/graph_bookkeeping.py --ranks 4 --split
    python bench/graph_bookkeeping.py --tiny --ranks 2 --latent 32 --steps 20   # a quick check

Prints the median host time per replayed step, whole and by piece, against the target, and writes
``bench/results/graph-bookkeeping-<time>.json`` (device, versions, command, figures).

The output gather is a real collective and copy on a GPU; on ``meta`` its ops run torch's Python
meta kernels, which cost more host time than their CUDA launches, so it is reported apart.

Measured on the development machine (2 CPU cores shared with other jobs: ±40 % from run to run),
SDXL, N = 8, no split, median per replayed step: at commit 379eaf9 about 340 µs (bookkeeping
about 277 µs, output gather 64 µs); after the leaner bookkeeping about 95 µs (bookkeeping 47 µs,
output gather 48 µs). With the CFG split (rank 2 of 8; back to back on a busier machine): 661 µs
before, 239 µs after.
"""

import argparse
import contextlib
import statistics
import time
from typing import Any, Dict, List

import torch
from common import environment, results_path, write_json
from sdxl import build_unet, inputs
from step_profile import middle_rank

TARGET_US = 100.0  # host time per replayed step


class FakeCuda:
    """The parts of ``torch.cuda`` that ``StepGraphs`` touches: a capture runs the step once on
    the host, a replay does nothing."""

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    class CUDAGraph:
        def replay(self) -> None:
            pass

        def pool(self):
            return "pool"

        def reset(self) -> None:
            pass

    @staticmethod
    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode=None):
        yield

    @staticmethod
    def current_stream(device=None):
        return FakeCuda.Stream()

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()


@contextlib.contextmanager
def fake_cuda():
    names = ("Stream", "CUDAGraph", "graph", "current_stream", "stream")
    saved = {name: getattr(torch.cuda, name) for name in names}
    try:
        for name in names:
            setattr(torch.cuda, name, getattr(FakeCuda, name))
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


class Timed:
    """Wraps a bound method and adds up the time spent in it."""

    def __init__(self, owner, name: str, totals: Dict[str, float]) -> None:
        self.method = getattr(owner, name)
        self.owner, self.name, self.totals = owner, name, totals
        setattr(owner, name, self)

    def remove(self) -> None:
        delattr(self.owner, self.name)  # the class's method again

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.method(*args, **kwargs)
        finally:
            self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - start


def measure(
    ranks: int, split: bool, latent: int, steps: int, repeats: int, tiny: bool = False
) -> Dict[str, Any]:
    import distripy
    from distripy.parallel.graphs import StepGraphs
    from distripy.pipelines.unet import require_installed_forward
    from distripy.runtime import LoopbackComm

    unet = build_unet("meta", torch.float16, tiny=tiny)
    latents, conditioning = inputs(unet, 2, (latent, latent), "meta", torch.float16)
    config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1, split_batch=split)
    distripy.parallelize(unet, config, comm=LoopbackComm(middle_rank(ranks, split), ranks))
    forward = require_installed_forward(unet)
    context = forward.context
    # What parallelize installs with use_cuda_graph on a CUDA model (it refuses one on meta).
    context.static_buffers = True
    forward.graphs = StepGraphs(context, list(forward.patch_comms.values()))
    forward._input_problem = lambda sample, arguments, plan: None  # the CUDA-device check
    schedule = torch.linspace(999, 0, 5 + steps * (repeats + 1))  # the scheduler's timesteps
    timesteps = iter(schedule)

    def call():  # as a pipeline calls it
        forward(latents, next(timesteps), return_dict=False, **conditioning)

    with fake_cuda(), torch.no_grad():
        # step 0 synchronous (eager); 1, 2 asynchronous eager (one key per parity); 3, 4 captured
        for _ in range(5):
            call()
        assert forward.graphs.captures == 2, forward.graphs.captures
        whole: List[float] = []
        for _ in range(steps):
            start = time.perf_counter()
            call()
            whole.append(time.perf_counter() - start)
        # By piece, in separate steps (the wrappers cost a little each).
        pieces: Dict[str, List[float]] = {}
        for _ in range(repeats):
            totals: Dict[str, float] = {}
            wrapped = [
                Timed(forward, "_begin", totals),
                Timed(forward, "_localize", totals),
                Timed(forward, "_finish", totals),
                Timed(forward, "_assemble", totals),
                Timed(forward.graphs, "run", totals),
            ]
            for _ in range(steps // repeats or 1):
                before = dict(totals)
                call()
                for name, value in totals.items():
                    pieces.setdefault(name, []).append(value - before.get(name, 0.0))
            for timed in wrapped:
                timed.remove()
        assert forward.graphs.replays >= steps, forward.graphs.replays
    distripy.reset(unet)
    step_us = 1e6 * statistics.median(whole)
    pieces_us = {name: 1e6 * statistics.median(values) for name, values in pieces.items()}
    return {
        "model": "tiny SDXL architecture" if tiny else "SDXL",
        "ranks": ranks,
        "rank": middle_rank(ranks, split),
        "split_batch": split,
        "latent": latent,
        "patch_states": len(context.states),
        "steps_timed": steps,
        "replayed_step_us": step_us,
        "output_gather_us": pieces_us["_assemble"],
        "bookkeeping_us": step_us - pieces_us["_assemble"],
        "pieces_us": pieces_us,
        "target_us": TARGET_US,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--split", action="store_true", help="CFG split (split_batch=True)")
    parser.add_argument("--latent", type=int, default=128, help="latent side (128: 1024² pixels)")
    parser.add_argument("--steps", type=int, default=400, help="replayed steps timed")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny SDXL-architecture UNet")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    result = measure(args.ranks, args.split, args.latent, args.steps, args.repeats, args.tiny)
    print(
        f"{result['model']} band model, {result['patch_states']} patch states, rank {result['rank']} of "
        f"{args.ranks}{' (CFG split)' if args.split else ''}, per replayed step: "
        f"{result['replayed_step_us']:.0f} µs, of which the output gather "
        f"{result['output_gather_us']:.0f} µs; bookkeeping {result['bookkeeping_us']:.0f} µs "
        f"(target <= {TARGET_US:.0f} µs)"
    )
    for name, value in result["pieces_us"].items():
        print(f"  {name:10s} {value:7.1f} µs")
    path = args.output or results_path("graph-bookkeeping", f"n{args.ranks}", "split" if args.split else "")
    write_json(path, {"environment": environment(), **result})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
