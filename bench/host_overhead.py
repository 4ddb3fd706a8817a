"""Host overhead of the patch-parallel UNet: dispatcher ops and host time per step, vs the plain UNet.

On a GPU in eager mode every dispatched op costs host time whatever its size; at 1024² on 8 GPUs a
rank's step is ~20 ms of GPU work, so an eager step there is host-bound and every op the patch
layer adds is time. This counts, with a ``TorchDispatchMode``, the ops of one UNet call:

* the plain UNet (the single-device step, same batch and latent),
* one rank's (a middle band's) synchronous and asynchronous step of an N-way split, N = 2, 4, 8,
  with and without CFG split, with the Triton kernels (their ``torch.library`` ops, whose fake
  implementations run on ``meta``) and with the torch references,

through ``LoopbackComm``, whose transfers are local copies: those are counted apart as
*transport* (NCCL issues each transfer as one C++ call, no dispatcher op), and the ratio reported
is the patch layer's own ops over the plain UNet's (target <= 1.10 in the asynchronous step with
the Triton kernels at N = 8): the host's dispatch cost of an eager step. It counts views and misses
nothing a GPU would time; what a replayed (CUDA-graph) step costs is its kernels, which
``kernel_count.py`` counts and CI bounds. Host time per step is the median wall time of the call on
``meta`` (the host's share only: nothing is computed). ``--compile`` also runs the tiny UNet's
patch step under ``torch.compile`` (inductor, CPU) and reports graph breaks per step next to the
step's communication checkpoints, and whether the compiled step equals the eager one; and, for
``DistriConfig(compile=True)``, the kernels inductor generates for the steady asynchronous band
step and what that step launches, against the ops the same step dispatches eagerly.

    python bench/host_overhead.py                 # SDXL, 1024² (latent 128), batch 2
    python bench/host_overhead.py --tiny --ranks 2 --compile   # the test suite's scaled-down run

Writes ``bench/results/host-overhead-<time>.json`` (device, versions, command, rows).
"""

import argparse
import collections
import contextlib
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from common import environment, results_path, write_json
from sdxl import build_unet, inputs
from step_profile import middle_rank
from torch.utils._python_dispatch import TorchDispatchMode

TARGET_ASYNC_RATIO = 1.10  # patch-layer ops / plain ops, asynchronous step, Triton kernels, N = 8


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops by name; ops issued while ``transport`` is set are counted apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.transport_ops = 0
        self.transport = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.transport:
            self.transport_ops += 1
        else:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class CountedComm:
    """A comm whose transfers run with the active counter's ``transport`` flag set, and that counts
    the groups (communication checkpoints that issued something) per step."""

    def __init__(self, comm, counters: List[OpCounter], groups: List[int]) -> None:
        self._comm = comm
        self._counters = counters
        self._groups = groups

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    @contextlib.contextmanager
    def _transport(self):
        counter = self._counters[-1] if self._counters else None
        if counter is not None:
            counter.transport = True
        try:
            yield
        finally:
            if counter is not None:
                counter.transport = False

    def all_gather(self, send, recv):
        with self._transport():
            return self._comm.all_gather(send, recv)

    def all_reduce(self, buf, op: str = "sum"):
        with self._transport():
            return self._comm.all_reduce(buf)

    def halo_exchange(self, *buffers):
        with self._transport():
            return self._comm.halo_exchange(*buffers)

    def shift(self, send, recv, distance: int):
        with self._transport():
            return self._comm.shift(send, recv, distance)

    @contextlib.contextmanager
    def group(self):
        self._groups[0] += 1
        with self._comm.group():
            yield

    def subgroup(self, ranks):
        return CountedComm(self._comm.subgroup(ranks), self._counters, self._groups)


def _call(unet, latents, timestep, conditioning):
    with torch.no_grad():
        return unet(latents, torch.tensor(float(timestep)), **conditioning)


def count_plain(unet, latents, conditioning, repeats: int) -> Dict[str, Any]:
    counter = OpCounter()
    with counter:
        _call(unet, latents, 999, conditioning)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _call(unet, latents, 999, conditioning)
        times.append(time.perf_counter() - start)
    return {"ops": counter.total, "host_ms": 1e3 * statistics.median(times), "by_op": dict(counter.ops)}


def count_patch(
    build, latents, conditioning, ranks: int, split: bool, backend: str, repeats: int
) -> Dict[str, Any]:
    """One rank's synchronous (step 0) and asynchronous (steps 1..) steps."""
    import distripy
    from distripy.runtime import LoopbackComm

    unet = build()
    counters: List[OpCounter] = []
    groups = [0]
    comm = CountedComm(LoopbackComm(middle_rank(ranks, split), ranks), counters, groups)
    config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1, split_batch=split)
    distripy.parallelize(unet, config, comm=comm)
    # The Triton kernels are chosen after the backend check (which wants CUDA): on meta their
    # torch.library ops run their fake implementations, as the dispatcher sees them on a GPU.
    distripy.api.patch_context(unet).kernel_backend = backend
    steps = []
    for step in range(2 + repeats):
        counter = OpCounter()
        counters.append(counter)
        groups[0] = 0
        with counter:
            _call(unet, latents, 999 - step, conditioning)
        counters.pop()
        steps.append({"ops": counter.total, "transport_ops": counter.transport_ops, "groups": groups[0],
                      "by_op": dict(counter.ops)})  # fmt: skip
    timed = []  # host time without the counter's own cost
    for step in range(2 + repeats, 2 + 2 * repeats):
        start = time.perf_counter()
        _call(unet, latents, 999 - step, conditioning)
        timed.append(time.perf_counter() - start)
    sync, steady = steps[0], steps[-1]
    return {
        "ranks": ranks,
        "split_batch": split,
        "kernel_backend": backend,
        "sync_ops": sync["ops"],
        "async_ops": steady["ops"],
        "sync_transport_ops": sync["transport_ops"],
        "async_transport_ops": steady["transport_ops"],
        "async_checkpoints": steady["groups"],
        "async_host_ms": 1e3 * statistics.median(timed),
        "async_by_op": steady["by_op"],
    }


_FUSED_CALL = re.compile(r"^\s*(cpp_fused_\w+|triton_\w+)(?:\.run)?\(")
_EXTERN_CALL = re.compile(r"\b(extern_kernels\.\w+|torch\.ops\.\w+\.\w+)(?:\.\w+)?\(")
_BAND = "distripy band forward"  # the profiler's name for the band forward of the measured step


def _call_lines(code: str) -> List[str]:
    """The body of the ``call`` function of inductor's generated module: the launches, in order
    (the kernels' own sources are strings elsewhere in the module)."""
    lines = code.splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith("def call("):
            indent = len(line) - len(line.lstrip())
            body = []
            for inner in lines[index + 1 :]:
                if inner.strip() and len(inner) - len(inner.lstrip()) <= indent:
                    break
                body.append(inner)
            return body
    return []


def generated_kernels(codes: List[str]) -> Dict[str, Any]:
    """The launches written in inductor's generated ``call`` functions: its own fused kernels
    (``cpp_fused_*`` on CPU, ``triton_*`` on CUDA) and the extern calls (GEMMs, convolutions,
    attention, fallback ops), each counted once per graph."""
    fused = 0
    extern: collections.Counter = collections.Counter()
    for code in codes:
        for line in _call_lines(code):
            if _FUSED_CALL.match(line):
                fused += 1
                continue
            match = _EXTERN_CALL.search(line)
            if match:
                extern[match.group(1)] += 1
    return {
        "graphs": len(codes),
        "fused": fused,
        "extern": sum(extern.values()),
        "total": fused + sum(extern.values()),
        "extern_by_call": dict(extern.most_common()),
    }


def _profiled_launches(prof) -> Dict[str, Any]:
    """What the profiled band forward launched: inductor's fused kernels (their profiler events,
    ``cpp.enable_kernel_profile``), the aten ops called inside a compiled graph (the extern calls
    and the graphs' runtime wrappers), and the aten ops dispatched eagerly outside every graph (the
    checkpoints' transfers and whatever dynamo left to Python). Nested aten calls are not
    counted: only the ones a caller issued."""

    def ancestors(event):
        parent = event.cpu_parent
        while parent is not None:
            yield parent
            parent = parent.cpu_parent

    fused = 0
    in_graphs: collections.Counter = collections.Counter()
    outside: collections.Counter = collections.Counter()
    for event in prof.events():
        above = [a.name for a in ancestors(event)]
        if _BAND not in above:
            continue
        if "cpp_fused_" in event.name or "triton_" in event.name:
            fused += 1
        elif event.name.startswith("aten::") and not any(n.startswith("aten::") for n in above):
            graph = any(n.startswith("## Call CompiledFxGraph") for n in above)
            (in_graphs if graph else outside)[event.name.replace("aten::", "")] += 1
    return {
        "fused": fused,
        "aten_in_graphs": sum(in_graphs.values()),
        "aten_outside_graphs": sum(outside.values()),
        "in_graphs_by_op": dict(in_graphs.most_common()),
        "outside_graphs_by_op": dict(outside.most_common()),
    }


def inductor_launches(tiny_seed: int = 0) -> Dict[str, Any]:
    """``DistriConfig(compile=True)`` on inductor's CPU backend: the tiny UNet's steady asynchronous
    band step (rank 0 of 2, ``LoopbackComm``), against the same step eager.

    * eager: the ops the band forward dispatches (``OpCounter``, the transfers apart), and the
      kernels a GPU would launch for them (``kernel_count.kernels_of``: none for views and
      allocations);
    * generated: the launches in inductor's code for the step (``run_and_get_code`` on a step
      compiled afresh), each graph once;
    * launched: the next steady step, profiled (no compile): inductor's kernels run, the aten ops
      inside its graphs, and the aten ops still dispatched eagerly outside them.
    """
    import distripy
    from distripy.pipelines.unet import installed_forward
    from distripy.runtime import LoopbackComm
    from kernel_count import kernels_of
    from torch._dynamo.utils import counters as dynamo_counters
    from torch._inductor.utils import run_and_get_code

    class KernelOps(OpCounter):
        """``OpCounter`` that also sums the kernels a GPU would launch for the ops."""

        def __init__(self) -> None:
            super().__init__()
            self.kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.transport:
                self.kernels += kernels_of(func, args, kwargs or {})
            return super().__torch_dispatch__(func, types, args, kwargs)

    def build(compile: bool):
        unet = build_unet("cpu", torch.float32, tiny=True, seed=tiny_seed)
        active: List[OpCounter] = []
        comm = CountedComm(LoopbackComm(0, 2), active, [0])
        config = distripy.DistriConfig(
            warmup_steps=1, split_batch=False, compile=compile, use_cuda_graph=False
        )
        distripy.parallelize(unet, config, comm=comm)
        return unet, installed_forward(unet), active

    latents, conditioning = inputs(
        build_unet("meta", torch.float32, tiny=True), 2, (16, 16), "cpu", torch.float32
    )

    eager, eager_forward, active = build(False)
    for timestep in (999, 998):  # the synchronous step, the first asynchronous one
        _call(eager, latents, timestep, conditioning)
    counter = KernelOps()
    band = eager_forward._forward_band

    def counted(local):
        active.append(counter)
        try:
            with counter:
                return band(local)
        finally:
            active.pop()

    eager_forward._forward_band = counted
    _call(eager, latents, 997, conditioning)

    compiled, compiled_forward, _ = build(True)
    with torch.compiler.set_stance("force_eager"):  # the steps before: not compiled
        for timestep in (999, 998):
            _call(compiled, latents, timestep, conditioning)
    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        _, codes = run_and_get_code(_call, compiled, latents, 997, conditioning)
    run_local = compiled_forward._run_local

    def profiled(local):
        with torch.profiler.record_function(_BAND):
            return run_local(local)

    compiled_forward._run_local = profiled
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _call(compiled, latents, 996, conditioning)
    return {
        "step": "steady asynchronous band step, rank 0 of 2, tiny UNet, latent 16x16, batch 2",
        "eager_ops": counter.total,
        "eager_kernels": counter.kernels,
        "eager_transport_ops": counter.transport_ops,
        "eager_by_op": dict(counter.ops.most_common()),
        "generated": generated_kernels(codes),
        "launched": _profiled_launches(prof),
        "recompiled_in_steady_step": dynamo_counters["stats"]["unique_graphs"] != graphs_before,
    }


def compile_report(tiny_seed: int = 0) -> Dict[str, Any]:
    """The tiny UNet's patch step (2 ranks of LoopbackComm, the asynchronous step) under
    torch.compile: graph breaks and their reasons (``torch._dynamo.explain``), the checkpoints of
    the step, and the compiled step against the eager one on identical inputs."""
    import distripy
    from distripy.runtime import LoopbackComm

    def build():
        unet = build_unet("cpu", torch.float32, tiny=True, seed=tiny_seed)
        groups = [0]
        comm = CountedComm(LoopbackComm(0, 2), [], groups)
        distripy.parallelize(unet, distripy.DistriConfig(warmup_steps=1, split_batch=False), comm=comm)
        return unet, groups

    latents, conditioning = inputs(
        build_unet("meta", torch.float32, tiny=True), 2, (16, 16), "cpu", torch.float32
    )
    eager, _ = build()
    compiled_unet, groups = build()
    for unet in (eager, compiled_unet):
        _call(unet, latents, 999, conditioning)  # the synchronous step
    torch._dynamo.reset()
    groups[0] = 0
    with torch.no_grad():  # inference, as every other step here
        explanation = torch._dynamo.explain(compiled_unet)(latents, torch.tensor(998.0), **conditioning)
    checkpoints = groups[0]
    expected = _call(eager, latents, 998, conditioning).sample  # the step explain traced, on eager
    eager_async = _call(eager, latents, 997, conditioning).sample
    compiled = torch.compile(compiled_unet, backend="inductor")
    got = None
    error = None
    try:
        with torch.no_grad():
            got = compiled(latents, torch.tensor(997.0), **conditioning).sample
    except Exception as exc:  # noqa: BLE001 - reported
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return {
        "graph_breaks": explanation.graph_break_count,
        "graphs": explanation.graph_count,
        "break_reasons": [str(r.reason)[:200] for r in explanation.break_reasons[:20]],
        "checkpoints_per_step": checkpoints,
        "equals_eager": None if got is None else bool(torch.allclose(got, eager_async, rtol=1e-4, atol=1e-5)),
        "max_abs_difference": None if got is None else float((got - eager_async).abs().max()),
        "error": error,
        "expected_shape": list(expected.shape),
        "inductor_launches": inductor_launches(tiny_seed),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--latent", type=int, default=128, help="latent side (128: a 1024² image)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    parser.add_argument("--tiny", action="store_true", help="the test suite's small UNet (scaled down)")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile report (CPU)")
    parser.add_argument("--output", type=Path, help="JSON path (default: bench/results/)")
    args = parser.parse_args(argv)

    dtype = torch.float16
    latent = 16 if args.tiny else args.latent

    def build():
        return build_unet("meta", dtype, tiny=args.tiny)

    plain_unet = build()
    latents, conditioning = inputs(plain_unet, args.batch, (latent, latent), "meta", dtype)
    plain = count_plain(plain_unet, latents, conditioning, args.repeats)
    print(f"plain UNet: {plain['ops']} ops, {plain['host_ms']:.1f} ms host per step (meta)")
    rows = []
    print(f"{'N':>2} {'split':>5} {'kernels':>7} | {'sync ops':>8} {'async ops':>9} {'x plain':>7} "
          f"{'transport':>9} {'ckpts':>5} {'host ms':>7} {'x plain':>7}")  # fmt: skip
    for backend in args.backends:
        for ranks in args.ranks:
            for split in (False, True):
                if split and (ranks % 2 or args.batch % 2):
                    continue
                row = count_patch(build, latents, conditioning, ranks, split, backend, args.repeats)
                row["async_ratio"] = row["async_ops"] / plain["ops"]
                row["sync_ratio"] = row["sync_ops"] / plain["ops"]
                row["host_ratio"] = row["async_host_ms"] / plain["host_ms"]
                rows.append(row)
                print(
                    f"{ranks:>2} {str(split):>5} {backend:>7} | {row['sync_ops']:>8} {row['async_ops']:>9} "
                    f"{row['async_ratio']:>7.3f} {row['async_transport_ops']:>9} {row['async_checkpoints']:>5} "
                    f"{row['async_host_ms']:>7.1f} {row['host_ratio']:>7.3f}"
                )
    result: Dict[str, Any] = {
        "environment": environment(),
        "unet": "tiny" if args.tiny else "sdxl",
        "latent": latent,
        "batch": args.batch,
        "plain": plain,
        "rows": rows,
        "target_async_ratio": TARGET_ASYNC_RATIO,
    }
    headline: Optional[dict] = next(
        (
            r
            for r in rows
            if r["ranks"] == max(args.ranks) and not r["split_batch"] and r["kernel_backend"] == "triton"
        ),
        None,
    )
    if headline is not None:
        result["async_ratio_triton_max_ranks"] = headline["async_ratio"]
        print(f"asynchronous step, Triton kernels, N = {headline['ranks']}: {headline['async_ratio']:.3f}x the "
              f"plain UNet's ops (target <= {TARGET_ASYNC_RATIO})")  # fmt: skip
    if args.compile:
        result["compile"] = compile_report()
        c = result["compile"]
        print(f"torch.compile (tiny UNet, 2 ranks, asynchronous step): {c['graph_breaks']} graph breaks, "
              f"{c['checkpoints_per_step']} checkpoints; equals eager: {c['equals_eager']}"
              + (f"; error: {c['error']}" if c["error"] else ""))  # fmt: skip
        k = c["inductor_launches"]
        g, launched = k["generated"], k["launched"]
        print(f"DistriConfig(compile=True), inductor CPU, steady asynchronous band step: eager "
              f"{k['eager_ops']} dispatched ops ({k['eager_kernels']} kernels by kernel_count's map); "
              f"inductor generated {g['total']} launches in {g['graphs']} graphs ({g['fused']} fused + "
              f"{g['extern']} extern); the step ran {launched['fused']} fused kernels + "
              f"{launched['aten_in_graphs']} aten ops in graphs + {launched['aten_outside_graphs']} aten "
              "ops outside them (the transfers' among them)")  # fmt: skip
    path = write_json(args.output or results_path("host-overhead"), result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
