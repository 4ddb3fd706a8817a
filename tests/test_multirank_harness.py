"""The multi-rank harness itself: results, and that no failure mode can hang the suite."""

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from multirank import RankFailure, RankTimeout


def _random_rank_tensor(seed: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(3, 17, generator=generator, dtype=torch.float64)


def all_reduce_random(rank, world_size, seed):
    tensor = _random_rank_tensor(seed, rank)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return rank, dist.get_rank(), dist.get_world_size(), tensor


def raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # rank 0 would wait here for rank 1 forever


def raise_on_the_last_rank_after_a_collective(rank, world_size):
    """Every rank but the last blocks in an all-reduce the last one never joins; they fail only
    when its teardown closes their connections (or, for a late one, the store's)."""
    dist.barrier()
    if rank == world_size - 1:
        raise KeyError("planted failure on the last rank")
    dist.all_reduce(torch.ones(3))


def sleep_forever_on_rank_one(rank, world_size, pid_dir, ignore_sigterm):
    with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as handle:
        handle.write(str(os.getpid()))
    if rank == 1:
        if ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    dist.barrier()


def exit_hard_on_rank_one(rank, world_size):
    if rank == 1:
        os._exit(7)
    dist.barrier()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sums_every_rank(run_ranks, world_size):
    seed = int.from_bytes(os.urandom(4), "little")
    results = run_ranks(all_reduce_random, world_size, seed, timeout=120)
    expected = sum(_random_rank_tensor(seed, rank) for rank in range(world_size))
    assert len(results) == world_size
    for rank, (fn_rank, dist_rank, dist_world, tensor) in enumerate(results):
        assert (fn_rank, dist_rank, dist_world) == (rank, rank, world_size)
        torch.testing.assert_close(tensor, expected, rtol=1e-12, atol=1e-12)


def test_a_raising_rank_fails_fast_with_its_traceback(run_ranks):
    timeout = 120
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_ranks(raise_on_rank_one, 2, timeout=timeout)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "rank 1 of 2 raised" in message
    assert "ValueError: planted failure on rank 1" in message
    assert "Traceback" in message
    assert elapsed < timeout / 2, f"failure took {elapsed:.1f} s; it should not wait for the timeout"
    # The cause leads, whichever rank's report the parent read first.
    assert message.startswith("rank 1 of 2 raised in raise_on_rank_one:"), message[:200]
    assert failure.value.failures[0].rank == 1


@pytest.mark.parametrize("world_size", [3, 4])
def test_the_root_cause_leads_and_the_consequences_follow(run_ranks, world_size):
    with pytest.raises(RankFailure) as failure:
        run_ranks(raise_on_the_last_rank_after_a_collective, world_size, timeout=120)
    message = str(failure.value)
    last = world_size - 1
    assert message.startswith(f"rank {last} of {world_size} raised"), message[:200]
    assert "KeyError: 'planted failure on the last rank'" in message.split("-- then, as consequences --")[0]
    failures = failure.value.failures
    assert failures[0].rank == last
    # Every consequence was stamped after the cause, and is listed after it.
    assert all(f.at >= failures[0].at for f in failures[1:])
    for consequence in failures[1:]:
        assert message.index(f"rank {consequence.rank} of {world_size} raised") > message.index(
            "-- then, as consequences --"
        )


@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["sigterm", "needs-sigkill"])
def test_a_hung_rank_is_killed_at_the_timeout(run_ranks, tmp_path, ignore_sigterm):
    timeout = 6
    start = time.monotonic()
    with pytest.raises(RankTimeout) as failure:
        run_ranks(sleep_forever_on_rank_one, 2, str(tmp_path), ignore_sigterm, timeout=timeout)
    elapsed = time.monotonic() - start
    assert "did not finish within 6 s" in str(failure.value)
    assert "[0, 1]" in str(failure.value)  # rank 0 waits in the barrier, rank 1 sleeps
    assert timeout <= elapsed < timeout + 20
    pids = [int((tmp_path / f"rank{rank}.pid").read_text()) for rank in range(2)]
    assert not any(_process_exists(pid) for pid in pids)


def test_a_rank_that_dies_without_reporting_fails_the_run(run_ranks):
    with pytest.raises(RankFailure, match=r"rank 1 of 2 died without reporting \(exit code 7\)") as failure:
        run_ranks(exit_hard_on_rank_one, 2, timeout=120)
    assert str(failure.value).startswith("rank 1 of 2 died without reporting")


def test_invalid_arguments_are_rejected(run_ranks):
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        run_ranks(all_reduce_random, 0, 1)
    with pytest.raises(ValueError, match="timeout must be positive seconds, got -1"):
        run_ranks(all_reduce_random, 2, 1, timeout=-1)


def test_cuda_marker_skips_without_a_gpu(pytester):
    conftest = os.path.join(os.path.dirname(__file__), "conftest.py")
    with open(conftest) as handle:
        pytester.makeconftest(handle.read())
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.cuda
        def test_needs_gpu():
            import torch
            assert torch.cuda.is_available()

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
