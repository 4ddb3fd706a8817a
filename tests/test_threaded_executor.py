"""``ThreadedExecutor`` (``distripy.application.executor``): ranks as worker threads of one process,
on CPU devices. A parallelised tiny SDXL UNet per worker, each its own replica over the executor's
comms, equals one device step by step (full_sync, exact, the CFG split) and every rank holds the
same output; the workers are the same threads from call to call; the caller's grad mode holds on
them; a worker's error is raised (the others not left waiting); bad devices are refused, named."""

import copy
import threading

import pytest
import torch

from distripy.application.executor import ThreadedExecutor
from distripy.errors import ConfigError, InputError, StepError
from unet_models import relative_error, sdxl_conditioning, tiny_sdxl_unet


@pytest.mark.parametrize("world_size, split, mode", [(2, False, "exact"), (4, True, "full_sync")])
def test_replicas_on_the_workers_equal_one_device(world_size, split, mode):
    import distripy

    base = tiny_sdxl_unet(0)
    latents = torch.randn(2, 4, 32, 16, generator=torch.Generator().manual_seed(5))
    conditioning = sdxl_conditioning(2, 4)
    timesteps = (900.0, 850.0)
    with torch.no_grad():
        expected = [base(latents + 0.1 * s, torch.tensor(t), **conditioning).sample for s, t in enumerate(timesteps)]
    with ThreadedExecutor(["cpu"] * world_size, timeout_s=120) as executor:
        config = distripy.DistriConfig(mode=mode, split_batch=split, use_cuda_graph=False)
        replicas = executor.run(lambda rank: distripy.parallelize(copy.deepcopy(base), config, comm=executor.comm(rank)))
        executor.run(lambda rank: distripy.reset(replicas[rank], steps=len(timesteps)))
        for step, t in enumerate(timesteps):
            with torch.no_grad():  # held on the workers
                outputs = executor.run(lambda rank: replicas[rank](latents + 0.1 * step, torch.tensor(t), **conditioning).sample)
            assert not outputs[0].requires_grad
            assert relative_error(outputs[0], expected[step]) < 1e-5, step
            assert all(torch.equal(out, outputs[0]) for out in outputs), step


def test_the_workers_are_the_same_threads_and_a_failure_is_raised():
    with ThreadedExecutor(["cpu", "cpu", "cpu"], timeout_s=60) as executor:
        first = executor.run(lambda rank: threading.get_ident())
        assert executor.run(lambda rank: threading.get_ident()) == first and len(set(first)) == 3
        assert threading.get_ident() not in first

        def body(rank):
            if rank == 2:
                raise InputError("rank 2 cannot split its band")
            received = torch.empty(3, 1)
            executor.comm(rank).all_gather(torch.ones(1), received).wait()  # rank 2 never comes
            return received

        with pytest.raises(InputError, match="rank 2 cannot split its band"):
            executor.run(body)  # the others' waits raised at once: not after the 60 s timeout
        assert executor.broken
    with pytest.raises(StepError, match="closed"):
        executor.run(lambda rank: rank)


@pytest.mark.parametrize(
    "devices, message",
    [
        ([], "must be a non-empty list of devices"),
        ("cpu", "must be a non-empty list of devices"),
        (["cpu", "tpu9"], "device 'tpu9' is not a device"),
        (["cpu", "cuda:0"], "must be all CPU or all CUDA devices"),
        (["cuda:63"], "device cuda:63 asked for, but this machine has"),
    ],
)
def test_bad_devices_are_named(devices, message):
    with pytest.raises(ConfigError, match=message):
        ThreadedExecutor(devices)


@pytest.mark.cuda
def test_on_a_gpu_a_worker_per_gpu_makes_its_nccl_communicator():
    """One worker on the GPU (the lent machine has one): its NCCL communicator made in the
    process (no torch.distributed), a replica parallelised over it running its steps eagerly, then
    captured and replayed as CUDA graphs on the worker thread, equal to the plain UNet; a GPU named
    twice is refused."""
    import distripy

    with pytest.raises(ConfigError, match="name a GPU twice"):
        ThreadedExecutor(["cuda:0", "cuda:0"])
    base = tiny_sdxl_unet(0).cuda()
    latents = torch.randn(2, 4, 32, 16, generator=torch.Generator().manual_seed(5)).cuda()
    conditioning = {k: v.cuda() if torch.is_tensor(v) else {n: t.cuda() for n, t in v.items()}
                    for k, v in sdxl_conditioning(2, 4).items()}  # fmt: skip
    with torch.no_grad():
        expected = [base(latents + 0.1 * s, torch.tensor(900.0 - 50 * s).cuda(), **conditioning).sample for s in range(4)]
    with ThreadedExecutor(["cuda:0"], timeout_s=120) as executor:
        comm = executor.comm(0)
        assert type(comm).__name__ == "NcclComm" and comm.world_size == 1
        config = distripy.DistriConfig(mode="corrected_async_gn", warmup_steps=1)
        replica = executor.run(lambda rank: distripy.parallelize(copy.deepcopy(base), config, comm=executor.comm(rank)))[0]
        executor.run(lambda rank: distripy.reset(replica, steps=4))
        for step in range(4):  # eager, captured, replayed
            with torch.no_grad():
                out = executor.run(lambda rank: replica(latents + 0.1 * step, torch.tensor(900.0 - 50 * step).cuda(),
                                                        **conditioning).sample)[0]  # fmt: skip
            assert relative_error(out, expected[step]) < 1e-4, step
