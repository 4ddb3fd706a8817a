"""Collective microbenchmark of distripy's communication layer, in nccl-tests' format.

Compares, side by side in one run, the C++ runtime (``NcclComm``), torch.distributed's NCCL backend
and CuPy's NCCL binding (when CuPy is installed) on:

1. bandwidth: all_gather and all_reduce over a size sweep; per row ``size`` (bytes), ``count``
   (elements), ``type``, ``time_us`` (median), ``algbw`` and ``busbw`` (GB/s; all_gather:
   busbw = algbw x (n-1)/n with size the gathered bytes; all_reduce: busbw = algbw x 2(n-1)/n);
2. host cost per operation: 60 small all_gathers (one UNet step's worth of per-layer transfers)
   issued one by one and as one group, host time of the issue alone;
3. overlap: a compute kernel and a transfer issued together vs each alone;
   efficiency = (t_compute + t_transfer - t_both) / min(t_compute, t_transfer) (1 = fully hidden).

Run one process per GPU:

    torchrun --nproc-per-node 8 bench/comm.py                      # NVLink (or whatever NCCL picks)
    NCCL_P2P_DISABLE=1 torchrun --nproc-per-node 8 bench/comm.py --tag no-p2p   # through host memory
    NCCL_SHM_DISABLE=1 NCCL_P2P_DISABLE=1 torchrun ... --tag no-p2p-no-shm       # through the network stack

Comparing the first two on an NVLink box gives the NVLink vs PCIe/host-memory ratio; ``nvidia-smi
topo -m`` (recorded in the JSON) shows which links the GPUs have. Rank 0 prints the tables and
writes ``bench/results/comm-<tag>-<host>-<time>.json`` with the device, topology, versions, NCCL
environment and the command.
"""

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import cuda_time_ms, environment, results_path, write_json


def _bus_factor(op: str, world: int) -> float:
    if op == "all_gather":
        return (world - 1) / world
    return 2 * (world - 1) / world


def _cuda_time_ms(fn, iters: int, repeats: int) -> float:
    return cuda_time_ms(fn, iters, repeats, before=dist.barrier)


class Backends:
    """The same transfer through each implementation; each call is stream-ordered on the current stream."""

    def __init__(self, timeout_s: float):
        from distripy.runtime.nccl_comm import NcclComm

        self.world = dist.get_world_size()
        self.names = ["distripy", "torch"]
        self.nccl_comm = NcclComm(timeout_s=timeout_s)
        self.cupy_comm = None
        try:
            import cupy
            from cupy.cuda import nccl as cupy_nccl

            uid = [cupy_nccl.get_unique_id() if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(uid, src=0)
            self.cupy = cupy
            self.cupy_nccl = cupy_nccl
            self.cupy_comm = cupy_nccl.NcclCommunicator(self.world, uid[0], dist.get_rank())
            self.names.append("cupy")
        except Exception as error:  # noqa: BLE001 - CuPy is optional
            if dist.get_rank() == 0:
                print(f"# CuPy NCCL skipped: {type(error).__name__}: {error}")

    def all_gather(self, name, send, recv):
        if name == "distripy":
            return lambda: self.nccl_comm.all_gather(send, recv).wait()
        if name == "torch":
            flat = recv.view(-1)
            return lambda: dist.all_gather_into_tensor(flat, send.view(-1))
        dtype = {torch.float16: self.cupy_nccl.NCCL_FLOAT16, torch.float32: self.cupy_nccl.NCCL_FLOAT32}[
            send.dtype
        ]
        return lambda: self.cupy_comm.allGather(
            send.data_ptr(), recv.data_ptr(), send.numel(), dtype, torch.cuda.current_stream().cuda_stream
        )

    def all_reduce(self, name, buf):
        if name == "distripy":
            return lambda: self.nccl_comm.all_reduce(buf).wait()
        if name == "torch":
            return lambda: dist.all_reduce(buf)
        dtype = {torch.float16: self.cupy_nccl.NCCL_FLOAT16, torch.float32: self.cupy_nccl.NCCL_FLOAT32}[
            buf.dtype
        ]
        return lambda: self.cupy_comm.allReduce(
            buf.data_ptr(),
            buf.data_ptr(),
            buf.numel(),
            dtype,
            self.cupy_nccl.NCCL_SUM,
            torch.cuda.current_stream().cuda_stream,
        )


def bandwidth(backends: Backends, dtype, sizes, repeats) -> list:
    world, rows = backends.world, []
    element = torch.tensor([], dtype=dtype).element_size()
    for op in ("all_gather", "all_reduce"):
        for size in sizes:  # bytes moved per rank's result: the gathered / reduced buffer
            count = max(1, size // element // world) if op == "all_gather" else max(1, size // element)
            iters = 20 if size <= (1 << 24) else 5
            row = {
                "op": op,
                "size": count * element * (world if op == "all_gather" else 1),
                "count": count,
                "type": str(dtype).replace("torch.", ""),
            }
            for name in backends.names:
                if op == "all_gather":
                    send = torch.randn(count, device="cuda").to(dtype)
                    recv = torch.empty(world, count, device="cuda", dtype=dtype)
                    fn = backends.all_gather(name, send, recv)
                else:
                    fn = backends.all_reduce(name, torch.randn(count, device="cuda").to(dtype))
                fn()  # warm-up (and NCCL's lazy connection set-up)
                ms = _cuda_time_ms(fn, iters, repeats)
                algbw = row["size"] / (ms * 1e-3) / 1e9
                row[name] = {"time_us": ms * 1e3, "algbw": algbw, "busbw": algbw * _bus_factor(op, world)}
            rows.append(row)
    return rows


def host_cost(backends: Backends, repeats: int, ops: int = 60, count: int = 16384) -> dict:
    """Host microseconds per issued operation (the issue alone; completion is waited for after)."""
    world = backends.world
    sends = [torch.randn(count, device="cuda", dtype=torch.float16) for _ in range(ops)]
    recvs = [torch.empty(world, count, device="cuda", dtype=torch.float16) for _ in range(ops)]
    comm = backends.nccl_comm

    def distripy_single():
        return [comm.all_gather(s, r) for s, r in zip(sends, recvs)]

    def distripy_grouped():
        with comm.group():
            return [comm.all_gather(s, r) for s, r in zip(sends, recvs)]

    def torch_single():
        return [dist.all_gather_into_tensor(r.view(-1), s, async_op=True) for s, r in zip(sends, recvs)]

    def torch_coalesced():
        with dist._coalescing_manager(async_ops=True) as manager:
            for s, r in zip(sends, recvs):
                dist.all_gather_into_tensor(r.view(-1), s)
        return [manager]

    variants = {
        "distripy_single": distripy_single,
        "distripy_grouped": distripy_grouped,
        "torch_single": torch_single,
        "torch_coalesced": torch_coalesced,
    }
    if not hasattr(dist, "_coalescing_manager"):  # private in torch; absent in some versions
        del variants["torch_coalesced"]
    result = {}
    for name, issue in variants.items():
        samples = []
        for _ in range(repeats + 1):
            dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            works = issue()
            samples.append((time.perf_counter() - start) / ops * 1e6)
            for work in works:
                work.wait()
            torch.cuda.synchronize()
        result[name] = statistics.median(samples[1:])  # the first issue includes set-up
    result["grouped_vs_torch"] = result["distripy_grouped"] / result["torch_single"]
    return result


def overlap(backends: Backends, repeats: int, matmul_n: int = 4096, transfer_bytes: int = 64 << 20) -> dict:
    """Compute on the current stream, a transfer on the comm stream, alone and together."""
    world = backends.world
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.float16)
    out = torch.empty_like(a)
    count = transfer_bytes // 2 // world
    send = torch.randn(count, device="cuda", dtype=torch.float16)
    recv = torch.empty(world, count, device="cuda", dtype=torch.float16)
    comm = backends.nccl_comm

    def compute():
        for _ in range(8):
            torch.matmul(a, a, out=out)

    def transfer():
        comm.all_gather(send, recv).wait()

    def both():
        work = comm.all_gather(send, recv)  # on the comm stream, after what the current stream did
        compute()
        work.wait()

    compute(), transfer(), both()
    t_compute = _cuda_time_ms(compute, 3, repeats)
    t_transfer = _cuda_time_ms(transfer, 3, repeats)
    t_both = _cuda_time_ms(both, 3, repeats)
    hidden = (t_compute + t_transfer - t_both) / min(t_compute, t_transfer)
    return {
        "compute_ms": t_compute,
        "transfer_ms": t_transfer,
        "both_ms": t_both,
        "overlap_efficiency": hidden,
        "matmul_n": matmul_n,
        "transfer_bytes": transfer_bytes,
    }


def comm_environment() -> dict:
    """The shared record plus what a collective's numbers depend on: the world, NCCL's settings,
    CuPy, and the topology."""
    info = environment(
        world_size=dist.get_world_size(),
        nccl_env={k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
    )
    with contextlib.suppress(Exception):
        import cupy

        info["versions"]["cupy"] = cupy.__version__
    with contextlib.suppress(Exception):
        info["topology"] = subprocess.run(
            ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30
        ).stdout
    return info


def _print_bandwidth(rows, names):
    header = f"{'op':>10} {'size':>12} {'count':>11} {'type':>8}" + "".join(
        f" | {n + ' time_us':>18} {'algbw':>7} {'busbw':>7}" for n in names
    )
    print(header)
    for row in rows:
        line = f"{row['op']:>10} {row['size']:>12} {row['count']:>11} {row['type']:>8}"
        for n in names:
            cell = row[n]
            line += f" | {cell['time_us']:>18.1f} {cell['algbw']:>7.2f} {cell['busbw']:>7.2f}"
        print(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-bytes", type=int, default=1 << 10)
    parser.add_argument("--max-bytes", type=int, default=1 << 28)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions; medians are reported")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--tag", default="default", help="names the run in the JSON file (e.g. no-p2p)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    import distripy

    distripy.init(backend="nccl")
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29512", rank=0, world_size=1)
        torch.cuda.set_device(0)
    rank = dist.get_rank()
    backends = Backends(args.timeout)
    sizes, size = [], args.min_bytes
    while size <= args.max_bytes:
        sizes.append(size)
        size *= 4
    dtype = getattr(torch, args.dtype)
    rows = bandwidth(backends, dtype, sizes, args.repeats)
    host = host_cost(backends, args.repeats)
    overlapped = overlap(backends, args.repeats)
    if rank == 0:
        _print_bandwidth(rows, backends.names)
        print("host us per op:", json.dumps({k: round(v, 3) for k, v in host.items()}))
        print("overlap:", json.dumps({k: round(v, 3) for k, v in overlapped.items()}))
        path = args.output or results_path("comm", args.tag, socket.gethostname())
        write_json(
            path,
            {
                "environment": comm_environment(),
                "tag": args.tag,
                "bandwidth": rows,
                "host_cost_us": host,
                "overlap": overlapped,
            },
        )
        print(f"wrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
