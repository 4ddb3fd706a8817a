"""Guards of the GPU path that a CPU can check: none of them can show on CPU through the tests
that run ranks over gloo or LoopbackComm, because they guard the NCCL runtime.

* ``NcclGroup`` (csrc/nccl_group.h) closes an NCCL group on every path: compiled here with g++
  against a stub ``nccl.h`` that counts the thread's group depth;
* a Work issued inside a CUDA-graph capture refuses ``wait`` outside a capture and
  ``synchronize`` always, naming the operation;
* ``NcclComm``'s device choice refuses a current device that is not the rank's LOCAL_RANK;
* the NCCL versions of distripy._C and torch are compared, with a message that names both.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from distripy.errors import CommError, StepError

REPOSITORY = Path(__file__).resolve().parents[1]

STUB_NCCL = """
#pragma once
typedef enum { ncclSuccess = 0, ncclInternalError = 3, ncclInProgress = 7 } ncclResult_t;
extern int stub_depth;
extern ncclResult_t stub_start_result;
inline ncclResult_t ncclGroupStart() {
  if (stub_start_result != ncclSuccess) return stub_start_result;
  ++stub_depth;
  return ncclSuccess;
}
inline ncclResult_t ncclGroupEnd() { --stub_depth; return ncclSuccess; }
"""

GUARD_PROGRAM = """
#include <cstdio>
#include <stdexcept>
#include "nccl_group.h"
int stub_depth = 0;
ncclResult_t stub_start_result = ncclSuccess;

static void issue(bool fail) {
  distripy::NcclGroup group;
  if (group.started() != ncclSuccess) throw std::runtime_error("start failed");
  if (fail) throw std::runtime_error("an NCCL call in the group failed");
  group.end();
}

int main() {
  issue(false);
  std::printf("after success %d\\n", stub_depth);
  try { issue(true); } catch (const std::exception&) {}
  std::printf("after exception %d\\n", stub_depth);
  stub_start_result = ncclInternalError;
  try { issue(false); } catch (const std::exception&) {}
  std::printf("after failed start %d\\n", stub_depth);
  stub_start_result = ncclSuccess;
  { distripy::NcclGroup group; group.end(); }  // ended once: the destructor must not end it again
  std::printf("end then destroy %d\\n", stub_depth);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_nccl_group_guard_closes_the_group_on_every_path(tmp_path):
    (tmp_path / "nccl.h").write_text(STUB_NCCL)
    (tmp_path / "main.cpp").write_text(GUARD_PROGRAM)
    binary = tmp_path / "guard"
    build = subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-I",
            str(tmp_path),
            "-I",
            str(REPOSITORY / "csrc"),
            str(tmp_path / "main.cpp"),
            "-o",
            str(binary),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    lines = subprocess.run(
        [str(binary)], capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    assert lines == ["after success 0", "after exception 0", "after failed start 0", "end then destroy 0"]


class _NativeWork:
    """What distripy._C.Work exposes, recording the calls that reach it."""

    def __init__(self, captured: bool) -> None:
        self.captured = captured
        self.op = "all_gather of 8 elements"
        self.calls = []

    def wait(self, stream) -> None:
        self.calls.append("wait")

    def synchronize(self, timeout_s) -> None:
        self.calls.append("synchronize")


def test_a_work_issued_in_a_capture_refuses_waits_outside_it(monkeypatch):
    from distripy.runtime import nccl_comm
    from distripy.runtime.health import CommHealth

    monkeypatch.setattr(nccl_comm, "native", lambda: None)

    class Stream:
        cuda_stream = 1234

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    capturing = {"now": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["now"])
    captured = _NativeWork(captured=True)
    work = nccl_comm.NcclWork(captured, 0, CommHealth())
    with pytest.raises(StepError, match="all_gather of 8 elements was issued inside a CUDA-graph capture"):
        work.wait()
    with pytest.raises(StepError, match="cannot be waited for outside that capture"):
        work.synchronize(1.0)
    assert captured.calls == []
    capturing["now"] = True  # inside a capture the graph may wait on its own node
    work.wait()
    assert captured.calls == ["wait"]
    ordinary = _NativeWork(captured=False)
    plain = nccl_comm.NcclWork(ordinary, 0, CommHealth())
    capturing["now"] = False
    plain.wait()
    plain.synchronize(1.0)
    assert ordinary.calls == ["wait", "synchronize"]


@pytest.mark.parametrize(
    "local_rank, current, visible, expected",
    [
        ("1", 1, 8, 1),  # distripy.init() set it
        ("3", 0, 1, 0),  # one visible GPU per process (CUDA_VISIBLE_DEVICES): device 0 is right
        (None, 0, 8, 0),  # not under a launcher
        ("2", 0, 8, "LOCAL_RANK=2 but its current CUDA device is 0 of 8 visible"),
    ],
)
def test_the_comm_device_must_be_the_local_rank(monkeypatch, local_rank, current, visible, expected):
    from distripy.runtime.nccl_comm import choose_device

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if isinstance(expected, str):
        with pytest.raises(CommError, match=expected):
            choose_device()
    else:
        assert choose_device() == expected
    assert choose_device(5) == 5  # an explicit device is taken as given


def test_nccl_versions_are_compared_by_major_and_minor():
    from distripy.runtime.loader import nccl_version_mismatch

    assert nccl_version_mismatch((2, 27, 3), (2, 27, 7)) is None
    assert nccl_version_mismatch((2, 27, 3), None) is None  # torch without NCCL (a CPU build)
    message = nccl_version_mismatch((2, 21, 5), (2, 27, 3))
    assert "NCCL 2.21.5" in message and "NCCL 2.27.3" in message and "nvidia-nccl-cu13" in message


def test_a_work_holds_its_tensors_until_waited_for_and_records_them_if_dropped(monkeypatch):
    """No record_stream per transfer: the Work keeps the buffers alive until a stream waits for it;
    one dropped in flight records them on the comm stream, so the allocator waits for the transfer."""
    import gc
    import weakref

    from distripy.runtime import nccl_comm
    from distripy.runtime.health import CommHealth

    class Stream:
        cuda_stream = 1

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    recorded = []

    class Buffer:
        def record_stream(self, stream):
            recorded.append(stream)

    comm_stream = object()
    waited = nccl_comm.NcclWork(_NativeWork(captured=False), 0, CommHealth(), [Buffer()], comm_stream)
    buffer = weakref.ref(waited._tensors[0])
    assert buffer() is not None
    waited.wait()
    gc.collect()
    assert buffer() is None and recorded == []  # released once waited for, nothing recorded
    dropped = nccl_comm.NcclWork(
        _NativeWork(captured=False), 0, CommHealth(), [Buffer(), Buffer()], comm_stream
    )
    dropped._work.done = lambda: False  # still in flight
    del dropped
    gc.collect()
    assert recorded == [comm_stream, comm_stream]
