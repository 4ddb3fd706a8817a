"""``ThreadedComm`` beyond the protocol's common tests (``test_comm_protocol.py`` runs those on
threads too): what only ranks that are threads of one process can get wrong. Ranks that wait for
their operations in another order than they issued them; ranks that issue different operations
under one number, or shift by different distances (every rank raises, naming them, instead of
hanging); a rank whose thread raises (``multirank.run_on_threads``: the others' waits fail at once,
and the first error is the one raised); results every rank holds alike (a sum in rank order)."""

import time

import pytest
import torch

from distripy.errors import CommError, InputError
from distripy.runtime.threaded_comm import ThreadedWorld
from multirank import run_on_threads


def _data(rank, shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 100 + rank))


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_waits_in_any_order_and_every_rank_sums_alike(world_size):
    """Rank ``r`` waits for its shifts from the last issued to the first (others in issue order):
    no wait depends on another rank's, so nothing blocks; the all-reduce, against a float64 sum,
    is bit for bit the same tensor on every rank."""

    def body(comm):
        rank = comm.rank
        block = _data(rank, (3, 4), seed=1)
        received = [torch.full((3, 4), float("nan")) for _ in range(1, world_size)]
        works = [comm.shift(block, recv, d) for d, recv in enumerate(received, 1)]
        buf = _data(rank, (64,), seed=2)
        reduce = comm.all_reduce(buf)
        order = list(enumerate(works, 1))
        for distance, work in reversed(order) if rank % 2 else order:
            work.wait()
            torch.testing.assert_close(received[distance - 1], _data((rank - distance) % world_size, (3, 4), seed=1))
        reduce.synchronize(30)
        return buf

    sums = run_on_threads(body, world_size, timeout_s=30)
    expected = sum(_data(r, (64,), seed=2).double() for r in range(world_size))
    torch.testing.assert_close(sums[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(s, sums[0]) for s in sums)


def test_different_operations_under_one_number_fail_on_every_rank():
    """Rank 0 all-gathers where rank 1 all-reduces: both waits raise, naming the two; the world is
    broken afterwards (a later operation raises at once)."""

    def body(comm):
        if comm.rank == 0:
            work = comm.all_gather(torch.ones(2), torch.empty(2, 2))
        else:
            work = comm.all_reduce(torch.ones(2))
        start = time.monotonic()
        try:
            work.wait()
        except CommError as error:
            raised = str(error)
        with pytest.raises(CommError, match="not attempted: an earlier transfer failed"):
            comm.all_reduce(torch.ones(2))
        return raised, time.monotonic() - start

    for message, seconds in run_on_threads(body, 2, timeout_s=60):
        assert "all_gather" in message and "all_reduce" in message and "same order" in message, message
        assert seconds < 30, seconds  # raised when the second rank posted, not at the timeout


def test_shifts_by_different_distances_fail_on_every_rank():
    def body(comm):
        distance = 1 if comm.rank == 0 else 2
        work = comm.shift(torch.ones(2), torch.empty(2), distance)
        with pytest.raises(CommError, match=r"different distances: \{0: 1, 1: 2, 2: 2\}"):
            work.wait()
        return True

    assert run_on_threads(body, 3, timeout_s=60) == [True] * 3


def test_a_rank_that_raises_fails_the_others_at_once_and_its_error_is_raised():
    """Rank 1 raises before its all-gather; rank 0, waiting for it, raises ``CommError`` naming the
    abort long before its 60 s timeout; ``run_on_threads`` raises rank 1's own error."""
    waited = {}

    def body(comm):
        if comm.rank == 1:
            raise InputError("rank 1's band is too small")
        start = time.monotonic()
        try:
            comm.all_gather(torch.ones(2), torch.empty(2, 2)).wait()
        except CommError as error:
            waited["seconds"], waited["message"] = time.monotonic() - start, str(error)
        return None

    with pytest.raises(InputError, match="band is too small"):
        run_on_threads(body, 2, timeout_s=60)
    assert waited["seconds"] < 30 and "rank 1 of 2 aborted" in waited["message"], waited


def test_a_subgroup_numbers_its_ranks_and_keeps_its_operations_apart():
    """Two halves (the CFG split) all-gather at once, each among its own ranks; a subgroup that does
    not partition the ranks is refused on every rank."""

    def body(comm):
        half = comm.subgroup([0, 1] if comm.rank < 2 else [2, 3])
        recv = torch.empty(2, 1)
        half.all_gather(torch.tensor([float(comm.rank)]), recv).wait()
        return half.rank, half.world_size, recv.flatten().tolist()

    results = run_on_threads(body, 4, timeout_s=30)
    assert results == [(0, 2, [0.0, 1.0]), (1, 2, [0.0, 1.0]), (0, 2, [2.0, 3.0]), (1, 2, [2.0, 3.0])]

    def overlapping(comm):
        with pytest.raises(CommError, match="do not partition"):
            comm.subgroup([0, 1] if comm.rank == 0 else [1, 2])
        return True

    assert run_on_threads(overlapping, 3, timeout_s=30) == [True] * 3


def test_bad_settings_are_named():
    with pytest.raises(InputError, match="world_size must be a positive integer, got 0"):
        ThreadedWorld(0)
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds, got -1"):
        ThreadedWorld(2, timeout_s=-1)
    with pytest.raises(InputError, match=r"rank 2 is outside \[0, 2\)"):
        ThreadedWorld(2).comm(2)


@pytest.mark.parametrize(
    "world_size, split, mode",
    [(2, False, "full_sync"), (3, False, "exact"), (4, True, "full_sync"), (4, True, "exact")],
)
def test_a_parallelised_unet_on_thread_ranks_equals_one_device(world_size, split, mode):
    """Each thread parallelises its own replica of the tiny SDXL UNet over the threaded comm (every
    exchange kind: halos, GroupNorm sums, keys and values gathered or shifted, the output; with the
    CFG split, the two halves' subgroups): every rank's output is the single-device UNet's (3
    bands: uneven), and every rank holds the same."""
    import copy

    import distripy
    from unet_models import relative_error, sdxl_conditioning, tiny_sdxl_unet

    base = tiny_sdxl_unet(0)
    latents = torch.randn(2, 4, 32, 16, generator=torch.Generator().manual_seed(world_size))
    conditioning = sdxl_conditioning(2, 4)
    timesteps = (900.0, 850.0)
    with torch.no_grad():
        expected = [base(latents + 0.1 * s, torch.tensor(t), **conditioning).sample for s, t in enumerate(timesteps)]

    def body(comm):
        config = distripy.DistriConfig(mode=mode, split_batch=split, use_cuda_graph=False)
        unet = distripy.parallelize(copy.deepcopy(base), config, comm=comm)
        with torch.no_grad(), distripy.generation(unet, steps=len(timesteps)):
            return [unet(latents + 0.1 * s, torch.tensor(t), **conditioning).sample for s, t in enumerate(timesteps)]

    outputs = run_on_threads(body, world_size, timeout_s=120)
    for step, reference in enumerate(expected):
        assert relative_error(outputs[0][step], reference) < 1e-5, step
        assert all(torch.equal(rank[step], outputs[0][step]) for rank in outputs), step
