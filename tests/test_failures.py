"""Never a hang past the timeout: a peer that stops (SIGSTOP) or dies (SIGKILL) between images or
in the middle of one makes the survivor raise a ``CommError`` within the timeout plus a little,
``distripy.reset`` then return at once, and the process exit soon after -- in the bare-UNet and the
pipeline paths. Each run is two plain processes (``tests/failure_peer.py``), so the test sees when
the survivor's process ends; the times compared are measured from the start of the failing
generation (CLOCK_MONOTONIC is system-wide), so the processes' start-up does not count."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PEER = Path(__file__).with_name("failure_peer.py")
TIMEOUT_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(path_kind: str, failure: str, fail_at: int):
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        PATH_KIND=path_kind,
        FAILURE=failure,
        FAIL_AT=str(fail_at),
        T=str(TIMEOUT_S),
        OMP_NUM_THREADS="1",
    )

    def start(rank: int) -> subprocess.Popen:
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        return subprocess.Popen(
            [sys.executable, str(PEER)],
            env=rank_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    peer, survivor = start(1), start(0)
    try:
        out, err = survivor.communicate(timeout=240)
        exited = time.monotonic()
    finally:
        for process in (survivor, peer):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.communicate()
    assert survivor.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    return report, exited - report["started"]


CASES = [
    ("unet", "stop", 1),  # mid-generation: a step's transfers never complete
    ("unet", "stop", -1),  # between images: the generation-start agreement never completes
    ("pipeline", "stop", 2),
    ("pipeline", "stop", -1),  # the pipeline call's agreement never completes
    ("unet", "kill", 1),
    ("pipeline", "kill", 2),
]


@pytest.mark.parametrize("path_kind, failure, fail_at", CASES)
def test_a_failed_peer_makes_the_survivor_raise_reset_and_exit_in_time(path_kind, failure, fail_at):
    report, exit_after = _run_pair(path_kind, failure, fail_at)
    print(
        f"{path_kind} {failure} at {fail_at}: exited {exit_after:.2f} s after the generation began; {report}"
    )
    assert "error" in report, report
    assert report["comm_error"], report  # a CommError (CommTimeoutError for a stopped peer)
    if failure == "stop":
        assert report["error"].startswith("CommTimeoutError"), report
        assert "not attempted" not in report["error"], report  # the first failure, not a later one
    assert report["raised_after_s"] <= TIMEOUT_S + 5, report
    assert report["reset_s"] < 1.0, report
    assert exit_after <= TIMEOUT_S + 10, (exit_after, report)
