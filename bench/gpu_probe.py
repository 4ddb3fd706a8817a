"""What a GPU machine must confirm before anything is timed on it: one JSON record.

    python bench/gpu_probe.py --output probe.json

1. Which NCCL is loaded: distripy's build, its runtime version, torch's, and the libnccl files
   mapped into this process (exactly one is right: two copies of NCCL in one process can deadlock
   each other's proxy threads).
2. The device's two ceilings (METHOD: every kernel time is judged against them): a large
   device-to-device copy (bytes read + written per second) and a large bf16 matrix product.
3. The int32-offset probe: the Triton GroupNorm statistics over a 2x256x1920x3840 fp16 tensor
   (7.5 GB, more elements than an int32 can index) against a float64 reference computed per
   group another way; a kernel that indexes with int32 reads the wrong memory there.
"""

import argparse
import sys
from pathlib import Path

import torch
from common import environment, write_json


def nccl_record() -> dict:
    record = {"torch_nccl": None, "distripy": None, "mapped_libnccl": []}
    try:
        record["torch_nccl"] = list(torch.cuda.nccl.version())
    except Exception as error:  # noqa: BLE001 - a record, not a check
        record["torch_nccl"] = f"unavailable: {error}"
    try:
        from distripy.runtime import native

        C = native()
        record["distripy"] = {"nccl_version": list(C.nccl_version()), "build_info": C.build_info()}
    except Exception as error:  # noqa: BLE001
        record["distripy"] = f"unavailable: {type(error).__name__}: {error}"
    with open("/proc/self/maps") as maps:
        record["mapped_libnccl"] = sorted({line.split()[-1] for line in maps if "libnccl" in line})
    return record


def ceilings() -> dict:
    import triton.testing

    source = torch.randn(1 << 30, device="cuda", dtype=torch.float16)  # 2 GiB
    target = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {
        "copy_tb_per_s": 2 * (1 << 30) * 2 / copy_ms / 1e9,
        "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9,
    }


def int32_offset_probe() -> dict:
    from distripy.kernels import group_norm_stats

    groups = 32
    generator = torch.Generator(device="cuda").manual_seed(11)
    x = torch.empty(2, 256, 1920, 3840, device="cuda", dtype=torch.float16)
    for b in range(2):  # drawn per image to bound the temporary
        x[b] = (torch.randn(256, 1920, 3840, device="cuda", generator=generator) * 1.5 + 0.3).half()
    x = x.contiguous(memory_format=torch.channels_last)
    stats = group_norm_stats(x, groups, backend="triton").double()
    reference = torch.empty_like(stats)
    per_group = 256 // groups
    for b in range(2):
        for g in range(groups):
            block = x[b, g * per_group : (g + 1) * per_group].double()
            reference[b, g, 0] = block.sum()
            reference[b, g, 1] = (block * block).sum()
            del block
    error = float((stats - reference).norm() / reference.norm())
    worst = float(((stats - reference).abs() / reference.abs().clamp_min(1e-30)).max())
    return {
        "elements": x.numel(),
        "relative_error": error,
        "worst_entry_relative_error": worst,
        "passed": error <= 1e-5,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--skip-int32", action="store_true", help="skip the 7.5 GB probe")
    args = parser.parse_args(argv)
    record = {"environment": environment(), "nccl": nccl_record()}
    print("nccl:", record["nccl"], flush=True)
    if torch.cuda.is_available():
        record["ceilings"] = ceilings()
        print("ceilings:", record["ceilings"], flush=True)
        if not args.skip_int32:
            try:
                record["int32_offset"] = int32_offset_probe()
            except Exception as error:  # noqa: BLE001 - recorded, then the exit status says it
                record["int32_offset"] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
            print("int32 offset:", record["int32_offset"], flush=True)
    write_json(args.output, record)
    ok = (
        record.get("int32_offset", {"passed": True}).get("passed")
        and len(record["nccl"]["mapped_libnccl"]) <= 1
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
