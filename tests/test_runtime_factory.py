"""``runtime.factory``: the comm a config asks for, and CFG split's patch groups through
``Comm.subgroup`` -- on real gloo ranks and on ``LoopbackComm``."""

import pytest
import torch

from distripy.config import DistriConfig
from distripy.errors import ConfigError, DistripyError, InputError, InputTypeError
from distripy.runtime import LoopbackComm, TrafficLog
from distripy.runtime.factory import check_backends, comm_class, make_comms, patch_group_ranks


def test_the_comm_class_follows_the_backend_and_cuda_graphs():
    from distripy.runtime.nccl_comm import NcclComm
    from distripy.runtime.torch_comm import TorchComm

    assert comm_class(DistriConfig(comm_backend="torch")) is TorchComm
    assert comm_class(DistriConfig(comm_backend="auto")) is TorchComm
    assert comm_class(DistriConfig(comm_backend="nccl")) is NcclComm
    assert comm_class(DistriConfig(comm_backend="auto", use_cuda_graph=True)) is NcclComm


@pytest.mark.parametrize("native", [True, False])
def test_automatic_choices_follow_where_the_model_is(monkeypatch, native):
    """``use_cuda_graph=None`` and ``comm_backend='auto'`` become concrete at ``parallelize``: CUDA
    graphs and the C++ runtime for a CUDA model (when distripy._C loads), neither on CPU; explicit
    values are kept. (CUDA's presence is faked: only the decision is under test.)"""
    from distripy.runtime import factory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(factory, "native_available", lambda: native)
    auto = DistriConfig()
    assert auto.use_cuda_graph is None and auto.comm_backend == "auto"

    def chosen(config, comm=None, cuda_model=True):
        resolved = factory.resolve_defaults(config, comm, cuda_model)
        return resolved.comm_backend, resolved.use_cuda_graph

    assert chosen(auto) == (("nccl", True) if native else ("torch", False))
    assert chosen(auto, cuda_model=False) == ("torch", False)
    assert chosen(DistriConfig(use_cuda_graph=False)) == ("nccl" if native else "torch", False)
    assert chosen(DistriConfig(use_cuda_graph=True)) == ("nccl", True)  # check_backends refuses it without _C
    assert chosen(DistriConfig(comm_backend="torch")) == ("torch", False)
    assert chosen(DistriConfig(comm_backend="nccl"), cuda_model=False) == ("nccl", False)
    # a given comm: graphs when it can join a capture
    assert chosen(auto, LoopbackComm(0, 2))[1] is True
    assert chosen(auto, LoopbackComm(0, 2), cuda_model=False)[1] is False

    class NoGraphs(LoopbackComm):
        supports_cuda_graphs = False

    assert chosen(auto, NoGraphs(0, 2))[1] is False
    with pytest.raises(ConfigError, match=r"use_cuda_graph='yes' must be True, False or None \(automatic\)"):
        DistriConfig(use_cuda_graph="yes")


def test_on_cuda_reads_the_parameters_device():
    from distripy.runtime.factory import on_cuda

    assert not on_cuda(torch.nn.Linear(2, 2)) and not on_cuda(torch.nn.ReLU())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's answer")
@pytest.mark.parametrize(
    "config, message",
    [
        (DistriConfig(comm_backend="nccl"), "comm_backend='nccl' needs CUDA GPUs"),
        (DistriConfig(use_cuda_graph=True), "use_cuda_graph=True needs CUDA GPUs"),
        (DistriConfig(kernel_backend="triton"), "kernel_backend='triton' needs CUDA GPUs"),
    ],
)
def test_a_backend_this_machine_cannot_run_is_refused_as_a_config_error(config, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_backends(config)
    assert isinstance(error.value, DistripyError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("world_size", [2, 4, 6])
def test_patch_groups_are_the_two_halves(world_size):
    half = world_size // 2
    for rank in range(world_size):
        group = patch_group_ranks(rank, world_size)
        assert rank in group and len(group) == half
        assert list(group) == list(range(0, half) if rank < half else range(half, world_size))


@pytest.mark.parametrize("rank, world_size", [(0, 4), (3, 4), (4, 6)])
def test_a_given_comm_gets_its_patch_group_through_subgroup(rank, world_size):
    log = TrafficLog()
    world, patch = make_comms(DistriConfig(split_batch=True), LoopbackComm(rank, world_size, log=log))
    assert patch[False] is world
    assert (patch[True].rank, patch[True].world_size) == (rank % (world_size // 2), world_size // 2)
    assert patch[True].log is log
    _, unsplit = make_comms(DistriConfig(split_batch=False), LoopbackComm(rank, world_size))
    assert set(unsplit) == {False}


def test_a_comm_without_subgroup_is_refused_for_split_batch():
    class NoSubgroups:
        rank, world_size, timeout_s = 0, 2, 1.0

    with pytest.raises(InputTypeError, match="NoSubgroups to provide subgroup"):
        make_comms(DistriConfig(split_batch=True), NoSubgroups())


def _subgroup_body(rank, world_size):
    """Patch groups of a real world: each half exchanges within itself only."""
    from distripy.runtime.torch_comm import TorchComm

    world, patch = make_comms(DistriConfig(split_batch=True, comm_backend="torch"))
    assert isinstance(world, TorchComm) and world.world_size == world_size
    group = patch[True]
    send = torch.full((2,), float(rank), dtype=torch.float64)
    recv = torch.empty(group.world_size, 2, dtype=torch.float64)
    group.all_gather(send, recv).synchronize(30)
    total = torch.tensor([float(rank)])
    group.all_reduce(total).synchronize(30)
    return group.rank, group.world_size, recv[:, 0].tolist(), float(total), group.all_gather_object(rank)


@pytest.mark.parametrize("world_size", [2, 4])
def test_torch_comm_subgroups_exchange_within_their_half(run_ranks, world_size):
    half = world_size // 2
    for rank, (group_rank, group_size, gathered, total, objects) in enumerate(
        run_ranks(_subgroup_body, world_size, timeout=120)
    ):
        members = list(range(0, half) if rank < half else range(half, world_size))
        assert (group_rank, group_size) == (members.index(rank), half)
        assert gathered == [float(m) for m in members] and objects == members
        assert total == float(sum(members))


def _bad_partition_body(rank, world_size):
    from distripy.runtime.torch_comm import TorchComm

    comm = TorchComm(timeout_s=30)
    asked = [0, 1] if rank < 2 else [1, 2]  # rank 1 in two groups, rank 3 in none
    try:
        comm.subgroup(asked if rank in asked else [rank])
    except InputError as error:
        return str(error)
    return None


def test_groups_that_do_not_partition_the_ranks_fail_on_every_rank(run_ranks):
    messages = run_ranks(_bad_partition_body, 4, timeout=120)
    assert all(m is not None and "do not partition the 4 ranks" in m for m in messages), messages


def test_a_group_without_this_rank_is_refused():
    with pytest.raises(InputError, match="rank 1 is not in"):
        LoopbackComm(1, 4).subgroup([2, 3])


def _shared_seed_body(rank, world_size):
    from distripy.pipelines.pipeline import shared_seed
    from distripy.runtime.torch_comm import TorchComm

    comm = TorchComm(timeout_s=30)
    return [shared_seed(comm) for _ in range(3)]


def test_the_pipelines_seed_is_rank_zeros_on_every_rank(run_ranks):
    seeds = run_ranks(_shared_seed_body, 3, timeout=120)
    assert all(s == seeds[0] for s in seeds)
    assert len(set(seeds[0])) == 3  # a fresh draw per call


@pytest.mark.cuda
def test_nccl_comm_subgroup_splits_the_native_communicator(run_ranks):
    """One GPU: a world of one rank split into its only group (``ncclCommSplit``)."""
    results = run_ranks(_nccl_subgroup_body, 1, timeout=120)
    assert results == [(0, 1, [3.0])]


def _nccl_subgroup_body(rank, world_size):
    from distripy.runtime.nccl_comm import NcclComm

    torch.cuda.set_device(0)
    world = NcclComm(timeout_s=60)
    group = world.subgroup([0])
    buf = torch.full((1,), 3.0, device="cuda")
    group.all_reduce(buf).synchronize(30)
    return group.rank, group.world_size, buf.cpu().tolist()
