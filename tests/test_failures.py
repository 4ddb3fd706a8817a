"""Never a hang past the timeout: a peer that stops (SIGSTOP) or dies (SIGKILL) between images or
in the middle of one makes the survivor raise a ``CommError`` within the timeout plus a little,
``distripy.reset`` then return at once, and the process exit soon after -- in the bare-UNet and the
pipeline paths. Each run is two processes of their own (``tests/failure_peer.py``, forked from the
suite's fork server, which has imported torch and diffusers once: ``tests/multirank.py``), so the
test sees when the survivor's process ends; the times compared are measured from the start of the
failing generation (CLOCK_MONOTONIC is system-wide), so the processes' start-up does not count."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distripy.serving.ranks import descendants

TIMEOUT_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(path_kind: str, failure: str, fail_at: int, logs: Path):
    import failure_peer
    from multirank import process_context

    environment = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        PATH_KIND=path_kind,
        FAILURE=failure,
        FAIL_AT=str(fail_at),
        T=str(TIMEOUT_S),
    )
    context = process_context()

    def start(rank: int):
        rank_environment = dict(environment, RANK=str(rank), LOCAL_RANK=str(rank))
        process = context.Process(
            target=failure_peer.run_forked, args=(rank_environment, str(logs / f"rank{rank}.log")), daemon=True
        )
        process.start()
        return process

    peer, survivor = start(1), start(0)
    try:
        survivor.join(240)
        exited = time.monotonic()
        hung = survivor.is_alive()
    finally:
        for process in (survivor, peer):
            if process.is_alive():
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.join()
    out = (logs / "rank0.log").read_text()
    assert not hung, f"rank 0 still ran after 240 s:\n{out[-3000:]}"
    assert survivor.exitcode == 0, f"rank 0 exit code {survivor.exitcode}:\n{out[-3000:]}"
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
def test_a_failed_peer_makes_the_survivor_raise_reset_and_exit_in_time(path_kind, failure, fail_at, tmp_path):
    report, exit_after = _run_pair(path_kind, failure, fail_at, tmp_path)
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


# -- the command ---------------------------------------------------------------------------------------


def _rank_of(pid: int):
    """The rank a process is: its name (``distripy-rank<N>``, what a rank forked from the
    launcher's server calls itself, ``runtime.distributed.run_python``), else ``RANK`` in the
    environment it was started with (a rank started as a fresh interpreter)."""
    try:
        name = (Path("/proc") / str(pid) / "comm").read_text().strip()
        environment = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    if name.startswith("distripy-rank"):
        return int(name[len("distripy-rank") :])
    ranks = [item[5:] for item in environment if item.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def _gone(pid: int) -> bool:
    """Exited (a zombie awaiting its parent counts as exited)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline(seed=3).save_pretrained(folder)
    return folder


def test_a_stopped_rank_under_the_command_makes_rank_0_fail_and_exit_in_time(tiny_model, tmp_path):
    """``distripy generate --nproc 2 --timeout 3``: once rank 0's progress bar moves, rank 1 is
    stopped; rank 0 must print its one-line error and its process end within the timeout + 10 s."""
    import threading

    output = tmp_path / "image.png"
    command = [
        sys.executable, "-m", "distripy.cli", "generate", "--model", str(tiny_model), "--prompt", "a boat",
        "--height", "64", "--width", "64", "--steps", "400", "--nproc", "2", "--no-split-batch",
        "--timeout", str(TIMEOUT_S), "--output", str(output),
    ]  # fmt: skip
    launcher = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    errors = bytearray()

    def read_errors() -> None:
        while chunk := launcher.stderr.read1(4096):
            errors.extend(chunk)

    reader = threading.Thread(target=read_errors, daemon=True)
    reader.start()
    stopped = []
    try:
        deadline = time.monotonic() + 180
        while b"it/s" not in errors and b"s/it" not in errors:  # rank 0's progress bar: generating
            assert launcher.poll() is None and time.monotonic() < deadline, errors.decode()[-3000:]
            time.sleep(0.05)
        ranks = {_rank_of(pid): pid for pid in descendants(launcher.pid)}
        assert {0, 1} <= set(ranks), ranks
        os.kill(ranks[1], signal.SIGSTOP)
        stopped.append(ranks[1])
        stopped_at = time.monotonic()
        while not _gone(ranks[0]):
            assert time.monotonic() - stopped_at < TIMEOUT_S + 60, "rank 0 still runs"
            time.sleep(0.05)
        rank0_exit = time.monotonic() - stopped_at
        os.kill(ranks[1], signal.SIGKILL)  # the stopped rank (the launcher would wait 30 s for it)
        launcher.wait(timeout=120)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    reader.join(timeout=10)
    text = errors.decode(errors="replace")
    print(
        f"rank 0 exited {rank0_exit:.2f} s after rank 1 stopped; the command returned {launcher.returncode}"
    )
    assert rank0_exit <= TIMEOUT_S + 10, rank0_exit
    assert launcher.returncode != 0 and not output.exists()
    lines = [line for line in text.splitlines() if line.startswith("distripy: error: ")]
    assert lines and "CommTimeoutError" in lines[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
