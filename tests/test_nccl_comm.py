"""The C++ NCCL runtime (``distripy._C.Communicator``) and its ``NcclComm`` face.

On CPU (CI): it builds and imports, refuses to run without a GPU with a clear error, and validates
its arguments. On a GPU (``cuda`` marker; one GPU allows world size 1): every operation's data for
each dtype, a group of 100 operations, ordering after a producer on the compute stream, CUDA-graph
capture and replay, CuPy buffers, and the timeout of a communicator whose peer never comes.
"""

import time

import pytest
import torch

from distripy.runtime import native

C = native()


def test_unique_ids_are_128_distinct_bytes():
    first, second = C.Communicator.new_unique_id(), C.Communicator.new_unique_id()
    assert isinstance(first, bytes) and len(first) == 128 and first != second


@pytest.mark.parametrize(
    "args, message",
    [
        ((b"short", 0, 1, 0), "unique_id has 5 bytes, expected 128"),
        ((None, 2, 2, 0), r"rank 2 is not in \[0, world=2\)"),
        ((None, -1, 2, 0), r"rank -1 is not in \[0, world=2\)"),
        ((None, 0, 1, 0, 0.0), "timeout_s must be positive"),
    ],
)
def test_communicator_validates_its_arguments_before_touching_a_device(args, message):
    args = (args[0] or C.Communicator.new_unique_id(),) + args[1:]
    with pytest.raises(ValueError, match=message):
        C.Communicator(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's answer")
def test_communicator_without_a_gpu_raises_a_clear_error():
    with pytest.raises(C.CudaError, match="Communicator needs a CUDA GPU, and this machine has none usable"):
        C.Communicator(C.Communicator.new_unique_id(), 0, 1, 0)


def test_exception_classes():
    assert issubclass(C.CommTimeout, TimeoutError)
    assert issubclass(C.NcclError, RuntimeError) and issubclass(C.CudaError, RuntimeError)


def test_dtype_mapping_and_buffer_checks():
    from distripy.runtime.nccl_comm import as_cuda_tensor, nccl_dtype

    assert [nccl_dtype(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == [7, 6, 9]
    assert nccl_dtype(torch.float8_e4m3fn) == 10
    with pytest.raises(ValueError, match="NCCL has no data type for torch.complex64"):
        nccl_dtype(torch.complex64)
    with pytest.raises(ValueError, match="send is on cpu; NcclComm moves CUDA buffers only"):
        as_cuda_tensor(torch.zeros(2), "send")
    with pytest.raises(TypeError, match="recv: expected a CUDA tensor .* got list"):
        as_cuda_tensor([1, 2], "recv")


def _nccl_comm_without_gpu_body(rank, world_size):
    from distripy.errors import CommError
    from distripy.runtime.nccl_comm import NcclComm

    with pytest.raises(CommError, match="NcclComm needs a CUDA GPU; torch sees none"):
        NcclComm()
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's answer")
def test_nccl_comm_without_a_gpu_raises_a_clear_error(run_ranks):
    assert run_ranks(_nccl_comm_without_gpu_body, 2, timeout=60) == [True, True]


# -- on a GPU --------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


def _random(shape, dtype, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=generator).to(dtype)


def _gpu_ops_body(rank, world_size):
    from distripy.runtime.nccl_comm import NcclComm

    comm = NcclComm(timeout_s=60)
    for seed, dtype in enumerate(GPU_DTYPES):
        send = _random((3, 5), dtype, seed)
        recv = torch.full((1, 3, 5), float("nan"), device="cuda").to(dtype)
        comm.all_gather(send, recv).wait()
        assert torch.equal(recv[0].view(torch.uint8), send.view(torch.uint8)), dtype
        if dtype != torch.float8_e4m3fn:  # NCCL reduces fp8 only from 2.24 on; gathering is enough
            buf = _random((7,), dtype, seed + 10)
            expected = buf.clone()
            comm.all_reduce(buf).synchronize(30)
            assert torch.equal(buf, expected), dtype
    # world size 1: no neighbours, nothing to exchange
    assert comm.halo_exchange(None, None, None, None).done()
    # 100 operations in one group, each between its own buffers
    sends = [_random((i % 7 + 1, 3), torch.float32, 100 + i) for i in range(100)]
    recvs = [torch.full((1, i % 7 + 1, 3), float("nan"), device="cuda") for i in range(100)]
    with comm.group():
        works = [comm.all_gather(s, r) for s, r in zip(sends, recvs)]
    for work in works:
        work.wait()
    assert all(torch.equal(r[0], s) for s, r in zip(sends, recvs))
    # a producer on the compute stream, then a transfer: the transfer sees the producer's data
    a = _random((2048, 2048), torch.float32, 200)
    produced = torch.empty(2048, 2048, device="cuda")
    torch.matmul(a, a, out=produced)
    for _ in range(5):
        torch.matmul(produced, a, out=produced)
    gathered = torch.empty(1, 2048, 2048, device="cuda")
    comm.all_gather(produced, gathered).wait()
    assert torch.equal(gathered[0], produced)
    return True


@pytest.mark.cuda
def test_every_operation_on_one_gpu(run_ranks):
    assert run_ranks(_gpu_ops_body, 1, timeout=120) == [True]


def _graph_body(rank, world_size):
    from distripy.runtime.nccl_comm import NcclComm

    comm = NcclComm(timeout_s=60)
    static_in = torch.zeros(4, 6, device="cuda")
    recv = torch.zeros(1, 4, 6, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        doubled = static_in * 2  # warm-up outside the capture
        comm.all_gather(doubled, recv).wait()
        with torch.cuda.graph(graph, stream=stream):
            doubled = static_in * 2
            comm.all_gather(doubled, recv).wait()
            out = recv[0] + 1
            comm.join()
    torch.cuda.current_stream().wait_stream(stream)
    for i in range(100):
        static_in.copy_(torch.full((4, 6), float(i), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, torch.full((4, 6), 2.0 * i + 1, device="cuda")), i
    return True


@pytest.mark.cuda
def test_capture_in_a_cuda_graph_and_replay_100_times(run_ranks):
    assert run_ranks(_graph_body, 1, timeout=120) == [True]


def _cupy_body(rank, world_size):
    cupy = pytest.importorskip("cupy")
    from distripy.runtime.nccl_comm import NcclComm

    comm = NcclComm(timeout_s=60)
    send = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    recv = cupy.zeros((1, 3, 4), dtype=cupy.float32)
    comm.all_gather(send, recv).synchronize(30)
    assert bool((recv[0] == send).all())
    return True


@pytest.mark.cuda
def test_cupy_arrays_as_buffers(run_ranks):
    pytest.importorskip("cupy")
    assert run_ranks(_cupy_body, 1, timeout=120) == [True]


@pytest.mark.cuda
def test_a_peer_that_never_joins_times_out():
    stream = torch.cuda.Stream()
    start = time.monotonic()
    with pytest.raises(C.CommTimeout, match="did not complete within 2 s"):
        C.Communicator(C.Communicator.new_unique_id(), 0, 2, 0, 2.0, stream.cuda_stream)
    assert time.monotonic() - start < 30


@pytest.mark.cuda
def test_the_comm_stream_must_be_a_created_stream():
    with pytest.raises(ValueError, match="stream must be a created CUDA stream"):
        C.Communicator(C.Communicator.new_unique_id(), 0, 1, 0, 5.0, 0)


def _capture_rules_body(rank, world_size):
    from distripy.errors import StepError
    from distripy.runtime.nccl_comm import NcclComm

    comm = NcclComm(timeout_s=60)
    idle = comm.subgroup([0])  # does no work in the capture: joining it must not touch the graph
    assert comm._native.watched >= 0
    send = torch.ones(8, device="cuda")
    recv = torch.zeros(1, 8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        comm.all_gather(send, recv).wait()  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            captured = comm.all_gather(send * 2, recv)
            captured.wait()  # inside the capture: allowed
            comm.join()
            idle.join()
    torch.cuda.current_stream().wait_stream(stream)
    assert captured.captured
    with pytest.raises(StepError, match="inside a CUDA-graph capture"):
        captured.wait()
    with pytest.raises(StepError, match="inside a CUDA-graph capture"):
        captured.synchronize(5)
    graph.replay()
    comm.watch("a replay").synchronize(30)
    assert torch.equal(recv[0], send * 2)

    class Holder:
        released = False

        def release(self):
            Holder.released = True

    holder = Holder()
    comm.track_graphs(holder)
    start = time.monotonic()
    del graph  # what Holder.release does for StepGraphs
    comm.close(10)
    idle.close(10)
    assert Holder.released and time.monotonic() - start < 10
    from distripy.errors import CommError

    with pytest.raises(CommError, match="closed"):
        comm.all_gather(send, recv)
    return True


@pytest.mark.cuda
def test_capture_rules_join_watch_and_close(run_ranks):
    assert run_ranks(_capture_rules_body, 1, timeout=120) == [True]
