"""What every Triton kernel of ``kernels/`` compiles to on a GPU target, without a GPU.

Triton's compiler runs on a CPU-only machine for an explicit ``GPUTarget`` (``ptxas`` ships in the
triton wheel). For each kernel x autotune configuration x dtype x target (sm_90a, sm_80) this
compiles the kernel, runs ``ptxas -v`` (the one Triton uses for the target) on its PTX and records: shared memory per block
(against the target's per-block limit), registers per thread, spill stores and loads, stack frame,
and whether the PTX uses warpgroup MMA (``wgmma``, Hopper) or ``mma.sync``. A kernel that does not
fit, or spills, runs slowly or not at all on the GPU: the autotuner skips configurations that do
not fit at launch, silently.

    python bench/compile_report.py                 # every kernel, every configuration, 3 dtypes
    python bench/compile_report.py --dtypes fp16   # fewer

Writes ``bench/results/compile-report-<time>.json``.
"""

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory one block may use
DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class Compiled:
    kernel: str
    variant: str
    config: str
    dtype: str
    capability: int
    shared_bytes: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    mma: str = "none"
    error: Optional[str] = None

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes <= SHARED_LIMIT[self.capability]

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


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


def compile_kernel(
    fn, signature, constexprs, num_warps, num_stages, capability, record: Compiled
) -> Compiled:
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<capability>`` and fill ``record``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    parameters = list(inspect.signature(fn.fn).parameters)
    source = ASTSource(
        fn=fn, signature=signature, constexprs={(parameters.index(k),): v for k, v in constexprs.items()}
    )
    try:
        kernel = triton.compile(
            source,
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
        ptx = kernel.asm["ptx"]
        record.shared_bytes = int(kernel.metadata.shared)
        record.mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        for key, value in _ptxas_report(ptx, capability).items():
            setattr(record, key, value)
    except Exception as error:  # noqa: BLE001 - a failed compile is a result to report
        record.error = f"{type(error).__name__}: {str(error)[:300]}"
    return record


def _signature(fn, dtype: str, fp32_pointers=()) -> Dict[str, str]:
    """Pointers of ``dtype`` (``fp32_pointers`` fp32), upper-case names constexpr, the rest i32."""
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_pointers else f"*{dtype}"
        else:
            signature[name] = "constexpr" if name.isupper() else "i32"
    return signature


def halo_conv_jobs(dtypes, capabilities, variants=("prologue", "plain")) -> Iterator[tuple]:
    """The halo convolution: every autotune configuration x dtype x target x variant."""
    halo_conv = importlib.import_module("distripy.kernels.halo_conv")
    fn = halo_conv._halo_conv2d_kernel
    for config in halo_conv._CONFIGS:
        for dtype in dtypes:
            for capability in capabilities:
                for variant in variants:
                    prologue = variant == "prologue"
                    constexprs = dict(
                        HAS_TOP=True, HAS_BOTTOM=True, HAS_BIAS=True, PROLOGUE=prologue,
                        HAS_NORM_WEIGHT=prologue, HAS_NORM_BIAS=prologue, SILU=prologue, KH=3, KW=3,
                        PRECISION="tf32" if dtype == "fp32" else "ieee", **config.kwargs,
                    )  # fmt: skip
                    name = "BM{BLOCK_M}_BN{BLOCK_N}_BK{BLOCK_K}".format(**config.kwargs)
                    name += f"_w{config.num_warps}_s{config.num_stages}"
                    signature = _signature(fn, dtype, fp32_pointers=("mean_ptr", "rstd_ptr"))
                    record = Compiled("halo_conv2d", variant, name, dtype, capability)
                    yield fn, signature, constexprs, config.num_warps, config.num_stages, capability, record


def group_norm_jobs(dtypes, capabilities) -> Iterator[tuple]:
    """GroupNorm statistics and apply (+ SiLU, affine) at SDXL's tile sizes (32 groups of 10-40
    channels: BLOCK_C 16 to 64, BLOCK_S = 4096 / BLOCK_C)."""
    group_norm_apply = importlib.import_module("distripy.kernels.group_norm_apply")
    group_norm_stats = importlib.import_module("distripy.kernels.group_norm_stats")  # modules, not the ops
    for block_c in (16, 64):
        block_s = 4096 // block_c
        for dtype in dtypes:
            for capability in capabilities:
                stats = group_norm_stats._group_norm_stats_kernel
                signature = _signature(stats, dtype, fp32_pointers=("out_ptr",))
                yield (
                    stats,
                    signature,
                    dict(BLOCK_C=block_c, BLOCK_S=block_s),
                    4,
                    1,
                    capability,
                    Compiled("group_norm_stats", "", f"BC{block_c}_BS{block_s}", dtype, capability),
                )
                apply = group_norm_apply._group_norm_apply_kernel
                signature = _signature(apply, dtype, fp32_pointers=("mean_ptr", "rstd_ptr"))
                constexprs = dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, BLOCK_C=block_c, BLOCK_S=block_s)
                yield (
                    apply,
                    signature,
                    constexprs,
                    4,
                    1,
                    capability,
                    Compiled("group_norm_apply", "silu", f"BC{block_c}_BS{block_s}", dtype, capability),
                )


def run(jobs) -> List[Compiled]:
    return [compile_kernel(*job) for job in jobs]


def main(argv=None) -> None:
    from common import environment, results_path, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--capabilities", nargs="+", type=int, default=[90, 80], choices=[90, 80])
    args = parser.parse_args(argv)
    started = time.monotonic()
    records = run(group_norm_jobs(args.dtypes, args.capabilities))
    records += run(halo_conv_jobs(args.dtypes, args.capabilities))
    rows = [dict(asdict(r), fits=r.fits, spills=r.spills) for r in records]
    path = write_json(results_path("compile-report"), {"environment": environment(), "kernels": rows})
    for r in rows:
        print(
            f"{r['kernel']:<17} {r['variant']:<8} {r['config']:<24} {r['dtype']} sm_{r['capability']}: "
            f"smem {r['shared_bytes'] / 1024:6.1f} KB{'' if r['fits'] else ' (TOO MUCH)'}, "
            f"{r['registers']} regs, spills {r['spill_stores']}/{r['spill_loads']} B, {r['mma']}"
            + (f"  ERROR {r['error']}" if r["error"] else "")
        )
    bad = sum(1 for r in rows if not r["fits"] or r["spills"])
    print(
        f"{len(rows)} compiled in {time.monotonic() - started:.0f} s; {bad} do not fit or spill; wrote {path}"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
