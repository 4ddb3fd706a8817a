"""What every Triton kernel of ``distripy/kernels/`` compiles to on a GPU target, without a GPU.

Triton's compiler runs on a CPU-only machine for an explicit ``GPUTarget`` (``ptxas`` ships in the
triton wheel). Each kernel is compiled from the launch its op builds (``Launch``, on CPU tensors of
an SDXL band's shape), specialised the way Triton's JIT specialises a real launch (pointer
alignment, integers equal to 1 or divisible by 16: they decide vectorisation and whether loads are
pipelined), for every autotune configuration x dtype x target (sm_90a, sm_80) x layout. For each it
runs ``ptxas -v`` (the one Triton uses for the target) on the PTX and records: shared memory per
block (against the target's per-block limit), registers per thread, spill stores and loads, stack
frame, and whether the PTX uses warpgroup MMA (``wgmma``, Hopper) or ``mma.sync``. A kernel that
does not fit, or spills, runs slowly or not at all on the GPU: the autotuner skips configurations
that do not fit at launch, silently. ``tests/test_compile_targets.py`` asserts the same on a subset.

    python bench/compile_report.py                 # the full matrix, written as JSON
    python bench/compile_report.py --dtypes fp16   # fewer
    python bench/kernel_speed.py --compile-report       # the same

Writes ``bench/results/compile-report-<time>.json``.
"""

import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory one block may use
DTYPES = ("fp16", "bf16", "fp32")
LAYOUTS = ("nchw", "channels_last")
VARIANTS = ("prologue", "plain", "no_halo")


@dataclass
class Compiled:
    kernel: str
    variant: str
    config: str
    dtype: str
    capability: int
    layout: str = "nchw"
    shared_bytes: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    mma: str = "none"
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes <= SHARED_LIMIT[self.capability]

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass
class Job:
    """One compile: ``launch`` (a ``distripy.kernels._launch.Launch``) with ``overrides`` (an
    autotune configuration's meta-parameters, ``num_warps``, ``num_stages``) for ``record``'s
    target."""

    launch: Any
    record: Compiled
    overrides: Dict[str, Any] = field(default_factory=dict)


def _ptxas_report(ptx: str, capability: int) -> Dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path  # the one Triton itself runs for this target
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", source, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-500:]}")

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def _compile(launch, kwargs: Dict[str, Any], record: Compiled):
    """``launch``'s kernel with ``kwargs`` compiled for ``record``'s target through Triton's own
    binder and argument packing (private Triton API: the only way to get the JIT's specialisation
    without a GPU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.kernel
    while not isinstance(fn, JITFunction):  # an Autotuner (or Heuristics) wraps the JITFunction
        fn = fn.fn
    target = GPUTarget("cuda", record.capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def compile_job(job: Job) -> Compiled:
    """Compile ``job`` as Triton's JIT would for a launch with these arguments on
    ``sm_<capability>`` (its binder and argument packing: the same signature, constexprs and
    alignment attributes), then ``ptxas -v`` the PTX. A failure is recorded, not raised."""
    record = job.record
    started = time.monotonic()
    try:
        kernel = _compile(job.launch, dict(job.launch.kwargs, **job.overrides), record)
        ptx = kernel.asm["ptx"]
        record.shared_bytes = int(kernel.metadata.shared)
        record.mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        for key, value in _ptxas_report(ptx, record.capability).items():
            setattr(record, key, value)
    except Exception as error:  # noqa: BLE001 - a failed compile is a result to report
        record.error = f"{type(error).__name__}: {str(error)[:300]}"
    record.seconds = round(time.monotonic() - started, 2)
    return record


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _band(shape, dtype: str, layout: str):
    """A CPU tensor laid out as a band of an image in ``layout`` (contents irrelevant)."""
    import torch

    x = torch.empty(shape, dtype=_torch_dtype(dtype))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def config_name(config) -> str:
    name = "BM{BLOCK_M}_BN{BLOCK_N}_BK{BLOCK_K}".format(**config.kwargs)
    return name + f"_w{config.num_warps}_s{config.num_stages}"


def halo_conv_launch(dtype: str, layout: str, variant: str, channels: int = 640, width: int = 64):
    """The launch ``halo_conv2d_triton`` builds for an SDXL band (batch 2, 8 rows) of a 3x3
    convolution: with its GroupNorm prologue and both halos (a middle rank's ResNet conv), plain
    with halos and bias, or at an image edge without halos (``no_halo``)."""
    import torch
    from distripy.kernels import halo_conv_triton

    x = _band((2, channels, 8, width), dtype, layout)
    halo = _band((2, channels, 1, width), dtype, layout) if variant != "no_halo" else None
    weight = torch.empty((channels, channels, 3, 3), dtype=_torch_dtype(dtype))
    bias = torch.empty(channels, dtype=_torch_dtype(dtype)) if variant != "no_halo" else None
    prologue = None
    if variant == "prologue":
        stats = torch.empty((2, 32))
        prologue = halo_conv_triton.GroupNormPrologue(stats, stats, bias, bias, 32, True)
    conv = halo_conv_triton.band_conv(x, halo, halo, weight, 1, 1, 1, prologue)
    launch, _ = halo_conv_triton._conv_launch(x, halo, halo, weight, bias, conv, prologue)
    kwargs = {k: v for k, v in launch.kwargs.items() if not k.startswith("BLOCK_")}
    return launch._replace(kernel=halo_conv_triton._halo_conv2d_kernel, kwargs=kwargs)


def halo_conv_jobs(dtypes, capabilities, variants=VARIANTS, layouts=LAYOUTS) -> Iterator[Job]:
    """The halo convolution: every autotune configuration of a dtype x target x variant x layout."""
    from distripy.kernels import halo_conv_triton

    for dtype in dtypes:
        for config in halo_conv_triton.autotune_configs(_torch_dtype(dtype)):
            for layout in layouts:
                for variant in variants:
                    launch = halo_conv_launch(dtype, layout, variant)
                    overrides = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                    for capability in capabilities:
                        record = Compiled(
                            "halo_conv2d", variant, config_name(config), dtype, capability, layout
                        )
                        yield Job(launch, record, overrides)


def group_norm_jobs(dtypes, capabilities, layouts=LAYOUTS) -> Iterator[Job]:
    """GroupNorm statistics (their partial sums per chunk: the patch GroupNorm's
    ``group_norm_partial_stats`` is the same launch), apply (+ affine + SiLU), apply into the interior
    rows of a halo-padded buffer, the combination of statistics into mean and rstd and the sum of
    partial sums into kept buffers, at SDXL's group sizes (32 groups of 10 to 40 channels: tiles of
    16 to 64 channels, 4096 / tile positions)."""
    import torch

    # the modules (the package exports functions of the same names)
    group_norm_apply = importlib.import_module("distripy.kernels.group_norm_apply")
    group_norm_stats = importlib.import_module("distripy.kernels.group_norm_stats")
    group_norm_mean_rstd = importlib.import_module("distripy.kernels.group_norm_mean_rstd")
    group_norm_sum_partials = importlib.import_module("distripy.kernels.group_norm_sum_partials")
    halo_pad = importlib.import_module("distripy.kernels.halo_pad")
    for dtype in dtypes:
        for channels in (320, 1280):
            for layout in layouts:
                x = _band((2, channels, 16, 64), dtype, layout)
                stats = torch.empty((2, 32))
                weight = torch.empty(channels, dtype=_torch_dtype(dtype))
                padded = _band((2, channels, 18, 64), dtype, layout)
                halo = _band((2, channels, 1, 64), dtype, layout)
                send = _band((2, channels, 1, 64), dtype, "nchw")
                prologue = halo_pad.GroupNormPrologue(stats, stats, weight, weight, 32, True)
                launches = {
                    ("group_norm_stats", ""): group_norm_stats.stats_launch(x, 32, chunks=4)[0],
                    # a ResNet convolution's input in a stale step: apply + SiLU, both halos, both sends
                    ("halo_pad", "prologue_sends"): halo_pad._halo_pad_launch(
                        x, halo, halo, 1, 1, prologue, (send, send)
                    )[0],
                    # a convolution without a GroupNorm before it, at the image's top edge
                    ("halo_pad", "copy"): halo_pad._halo_pad_launch(x, None, halo, 1, 1, None, (None, send))[0],
                    ("group_norm_apply", "silu"): group_norm_apply._apply_launch(
                        x, stats, stats, weight, weight, 32, True, torch.empty_like(x)
                    ),
                    ("group_norm_apply", "into_buffer"): group_norm_apply._apply_launch(
                        x, stats, stats, None, None, 32, False, padded[:, :, 1:17]
                    ),
                }
                for (kernel, variant), launch in launches.items():
                    name = "C{}_BC{BLOCK_C}_BS{BLOCK_S}".format(channels, **launch.kwargs)
                    for capability in capabilities:
                        yield Job(launch, Compiled(kernel, variant, name, dtype, capability, layout))
    # The combination of statistics: fp32 sums of (B, G) groups whatever the activations' dtype,
    # from (B, G, 2) sums (the image's, in a synchronous step) or from (B, G, chunks, 2) partial sums
    # writing the band's sums into the two kept buffers (an asynchronous step).
    sums = torch.empty((2, 32, 2))
    partials = torch.empty((2, 32, 9, 2))
    kept = (torch.empty((2, 32, 2)), torch.empty((2, 32, 2)))
    for mode in group_norm_mean_rstd.Combine:
        for variant, own, sums_out in (("", sums, (None, None)), ("_partials_out", partials, kept)):
            launch, _, _ = group_norm_mean_rstd._mean_rstd_launch(
                own, sums, sums, mode, 640, 8.0, 1e-5, *sums_out
            )
            for capability in capabilities:
                record = Compiled(
                    "group_norm_mean_rstd", mode.name.lower() + variant, "B2_G32", "fp32", capability, "-"
                )
                yield Job(launch, record)
    # The partial sums added into the kept buffers before a synchronous step's all-reduce.
    launch = group_norm_sum_partials._sum_partials_launch(partials, *kept)
    for capability in capabilities:
        record = Compiled("group_norm_sum_partials", "two_outputs", "B2_G32_K9", "fp32", capability, "-")
        yield Job(launch, record)


def codec_jobs(dtypes, capabilities, bits=(1, 2)) -> Iterator[Job]:
    """The residual exchange codec's three kernels (sums, encode, decode) and the receivers' fused
    step over fp8 baselines (``residual_fp8_decode``) on a band's keys and values at SDXL's 1024²
    middle level (1024 tokens x 2 x 640 channels)."""
    import torch

    from distripy.kernels import residual_codec, residual_fp8_decode
    from distripy.kernels.fp8_codec import fp8_layout

    rows, cols = 1024, 1280
    for dtype in dtypes:
        x, baseline = torch.empty((rows, cols), dtype=_torch_dtype(dtype)), torch.empty(
            (rows, cols), dtype=_torch_dtype(dtype)
        )
        for width in bits:
            packed = torch.empty(residual_codec.residual_layout(rows, cols, width).nbytes, dtype=torch.uint8)
            sums, _, encode = residual_codec.encode_launches(x, baseline, packed, width)
            decode = residual_codec.decode_launch(packed, baseline, width)
            store = torch.empty(fp8_layout(rows, cols).nbytes, dtype=torch.uint8)
            fused = residual_fp8_decode.decode_launch(packed, store, baseline, width)
            variants = (("sums", sums), ("encode", encode), ("decode", decode), ("decode_fp8_baseline", fused))
            for variant, launch in variants:
                for capability in capabilities:
                    record = Compiled("residual_codec", f"{variant}_{width}bit", f"R{rows}_C{cols}", dtype, capability, "-")
                    yield Job(launch, record)


def fp8_codec_jobs(dtypes, capabilities) -> Iterator[Job]:
    """The fp8 exchange codec's two kernels (encode, decode) on the same band's keys and values."""
    import torch

    from distripy.kernels import fp8_codec

    rows, cols = 1024, 1280
    for dtype in dtypes:
        x = torch.empty((rows, cols), dtype=_torch_dtype(dtype))
        packed = torch.empty(fp8_codec.fp8_layout(rows, cols).nbytes, dtype=torch.uint8)
        launches = (("encode", fp8_codec.encode_launch(x, packed)), ("decode", fp8_codec.decode_launch(packed, x)))
        for variant, launch in launches:
            for capability in capabilities:
                yield Job(launch, Compiled("fp8_codec", variant, f"R{rows}_C{cols}", dtype, capability, "-"))


def ci_jobs() -> List[Job]:
    """The subset CI compiles (``tests/test_compile_targets.py``, about a minute on 2 cores): every
    autotune configuration once per target in one representative dtype (fp16 on sm_90a, bf16 on
    sm_80; fp32 for the fp32 tiles), in the variants that need the most registers (the prologue in
    both layouts, the plain convolution channels-last), every GroupNorm kernel, the residual
    codec's three kernels and its fused step over fp8 baselines (2 bits on sm_90a, 1 bit on sm_80)
    and the fp8 codec's two (fp16 on sm_90a, bf16 on sm_80)."""
    from distripy.kernels import halo_conv_triton

    jobs = list(group_norm_jobs(["fp16"], [90]))
    jobs += list(group_norm_jobs(["bf16"], [80], layouts=["channels_last"]))
    jobs += list(codec_jobs(["fp16"], [90], bits=(2,))) + list(codec_jobs(["bf16"], [80], bits=(1,)))
    jobs += list(fp8_codec_jobs(["fp16"], [90])) + list(fp8_codec_jobs(["bf16"], [80]))
    for family in (halo_conv_triton._CONFIGS_16BIT, halo_conv_triton._CONFIGS_FP32):
        for capability, dtype in ((90, "fp16"), (80, "bf16")):
            if family is halo_conv_triton._CONFIGS_FP32:
                dtype = "fp32"
            for config in family:
                overrides = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                for layout, variant in (
                    ("nchw", "prologue"),
                    ("channels_last", "prologue"),
                    ("channels_last", "plain"),
                ):
                    record = Compiled("halo_conv2d", variant, config_name(config), dtype, capability, layout)
                    jobs.append(Job(halo_conv_launch(dtype, layout, variant), record, overrides))
    return jobs


def _past_int32(shape, dtype: str):
    """A CPU view of ``shape`` whose batch stride puts its last batch past 2^31 elements from its
    first element (3 batches 1.1e9 elements apart): the storage is reserved, never touched."""
    import torch

    batch_stride = 1_100_000_000
    inner = 1
    for size in shape[1:]:
        inner *= size
    storage = torch.empty((shape[0] - 1) * batch_stride + inner, dtype=_torch_dtype(dtype))
    return storage.as_strided(shape, (batch_stride,) + torch.empty(shape[1:]).stride())


def offset_report() -> List[Dict[str, Any]]:
    """Whether each kernel addresses a tensor past 2^31 elements with 64-bit offsets: compiles each
    op's launch on such a view (and on an ordinary tensor, for contrast) for sm_90a and counts the
    pointer arithmetic on fp16 data (the tensors that can be that large; statistics are fp32)
    done with 32-bit and with 64-bit offsets in the Triton IR. Triton's interpreter computes in
    64 bits whatever the kernel says, so only the compiled IR shows an overflow."""
    import torch

    group_norm_apply = importlib.import_module("distripy.kernels.group_norm_apply")
    group_norm_stats = importlib.import_module("distripy.kernels.group_norm_stats")
    halo_conv_triton = importlib.import_module("distripy.kernels.halo_conv_triton")
    halo_pad = importlib.import_module("distripy.kernels.halo_pad")
    shape = (3, 64, 6, 8)
    stats = torch.empty((3, 32))
    rows = []
    for size, x in (("past_int32", _past_int32(shape, "fp16")), ("small", _band(shape, "fp16", "nchw"))):
        out = torch.empty(shape, dtype=torch.float16)
        weight = torch.empty((64, 64, 3, 3), dtype=torch.float16)
        halo = torch.empty((3, 64, 1, 8), dtype=torch.float16)
        conv = halo_conv_triton.band_conv(x, halo, halo, weight, 1, 1, 1, None)
        conv_launch = halo_conv_triton._conv_launch(x, halo, halo, weight, None, conv, None)[0]
        launches = {
            "group_norm_stats": group_norm_stats.stats_launch(x, 32, chunks=2)[0],
            "group_norm_apply": group_norm_apply._apply_launch(x, stats, stats, None, None, 32, True, out),
            "halo_pad": halo_pad._halo_pad_launch(
                x, halo, halo, 1, 1, halo_pad.GroupNormPrologue(stats, stats, None, None, 32, True), (halo, halo)
            )[0],
            "halo_conv2d": conv_launch._replace(
                kernel=halo_conv_triton._halo_conv2d_kernel,
                kwargs=dict(conv_launch.kwargs, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
            ),
        }
        for kernel, launch in launches.items():
            ir = _compile_ir(launch, 90)
            offsets = re.findall(r"tt\.addptr [^:]*: (?:tensor<[^>]*!tt\.ptr<f16>>|!tt\.ptr<f16>), (\S+)", ir)
            rows.append(
                dict(
                    kernel=kernel,
                    tensor=size,
                    index_64=bool(launch.kwargs["INDEX_64"]),
                    offsets_32=sum(1 for o in offsets if o.endswith(("i32", "i32>"))),
                    offsets_64=sum(1 for o in offsets if o.endswith(("i64", "i64>"))),
                )
            )
    return rows


def _compile_ir(launch, capability: int) -> str:
    """The Triton IR of ``launch`` compiled for ``sm_<capability>``."""
    record = Compiled("", "", "", "fp16", capability)
    kernel = _compile(launch, launch.kwargs, record)
    return kernel.asm["ttir"]


_FORKED_JOBS: List[Job] = []


def _compile_forked(index: int) -> Compiled:
    return compile_job(_FORKED_JOBS[index])


def run(jobs: List[Job], workers: int = 1) -> List[Compiled]:
    """Compile ``jobs`` in ``workers`` forked processes (a launch holds tensors and kernels that do
    not pickle; forked workers inherit them); results in the jobs' order."""
    if workers <= 1 or len(jobs) <= 1:
        return [compile_job(job) for job in jobs]
    _FORKED_JOBS[:] = jobs
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_forked, range(len(jobs))))
    finally:
        _FORKED_JOBS.clear()


def problems(record: Compiled) -> List[str]:
    """What is wrong with one compiled kernel, in words (empty: nothing)."""
    found = []
    if record.error:
        found.append(f"does not compile: {record.error}")
    elif record.shared_bytes > SHARED_LIMIT[record.capability]:
        found.append(f"{record.shared_bytes} B of shared memory > {SHARED_LIMIT[record.capability]}")
    if record.spills:
        found.append(f"spills {record.spill_stores}/{record.spill_loads} B (stores/loads)")
    if (
        record.kernel == "halo_conv2d"
        and record.capability == 90
        and record.config.startswith(("BM64", "BM128", "BM256"))
        and record.mma != "wgmma"
        and not record.error
    ):
        found.append(f"a tile of 64+ rows uses {record.mma}, not wgmma")
    return found


def main(argv=None) -> int:
    from common import environment, results_path, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--capabilities", nargs="+", type=int, default=[90, 80], choices=[90, 80])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ci", action="store_true", help="only the subset CI compiles (ci_jobs)")
    parser.add_argument("--out", type=Path, help="the JSON file to write (default: bench/results/)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 replaces the kernels by their interpreter; unset it")
    started = time.monotonic()
    if args.ci:
        jobs = ci_jobs()
    else:
        jobs = list(group_norm_jobs(args.dtypes, args.capabilities, args.layouts))
        jobs += list(halo_conv_jobs(args.dtypes, args.capabilities, layouts=args.layouts))
        jobs += list(codec_jobs(args.dtypes, args.capabilities))
        jobs += list(fp8_codec_jobs(args.dtypes, args.capabilities))
    records = run(jobs, args.workers)
    rows = [dict(asdict(r), fits=r.fits, spills=r.spills, problems=problems(r)) for r in records]
    report = {"environment": environment(), "kernels": rows, "offsets": offset_report()}
    path = write_json(args.out or results_path("compile-report"), report)
    for r in rows:
        print(
            f"{r['kernel']:<17} {r['variant']:<11} {r['config']:<22} {r['dtype']} {r['layout']:<13} "
            f"sm_{r['capability']}: smem {r['shared_bytes'] / 1024:6.1f} KB, {r['registers']} regs, "
            f"spills {r['spill_stores']}/{r['spill_loads']} B, {r['mma']}"
            + (f"  PROBLEM: {'; '.join(r['problems'])}" if r["problems"] else "")
        )
    for r in report["offsets"]:
        print(
            f"{r['kernel']:<17} on a {r['tensor']} tensor: INDEX_64={r['index_64']}, pointer offsets "
            f"{r['offsets_32']} x 32-bit, {r['offsets_64']} x 64-bit"
        )
    bad = sum(1 for r in rows if r["problems"])
    bad += sum(1 for r in report["offsets"] if r["tensor"] == "past_int32" and r["offsets_32"])
    print(f"{len(rows)} compiled in {time.monotonic() - started:.0f} s; {bad} with problems; wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
