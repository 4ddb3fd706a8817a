"""``DistriConfig`` validation and ``distripy.init`` outside torchrun."""

import dataclasses

import pytest
import torch

import distripy
from distripy.config import COMM_BACKENDS, COMPRESS_CHOICES, KERNEL_BACKENDS, MODES
from distripy.errors import ConfigError


def test_defaults():
    config = distripy.DistriConfig()
    assert (config.warmup_steps, config.mode, config.split_batch) == (5, "auto", True)
    assert (config.comm_backend, config.kernel_backend) == ("auto", "auto")
    assert config.compile is False  # until a GPU run confirms it pays
    assert config.compress == "none"  # until a GPU run shows the win
    assert (config.rank, config.world_size) == (0, 1)  # torch.distributed not initialised


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("mode", "async", MODES),
        ("comm_backend", "mpi", COMM_BACKENDS),
        ("kernel_backend", "cuda", KERNEL_BACKENDS),
        ("compress", "int4", COMPRESS_CHOICES),
    ],
)
def test_a_bad_choice_names_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as error:
        distripy.DistriConfig(**{field: value})
    message = str(error.value)
    assert f"DistriConfig.{field}={value!r}" in message
    assert all(repr(choice) in message for choice in allowed)


@pytest.mark.parametrize(
    "field, value",
    [
        ("warmup_steps", -1),
        ("warmup_steps", 2.5),
        ("warmup_steps", True),
        ("split_batch", 1),
        ("timeout_s", 0),
        ("compile", 1),
        ("compile", "inductor"),
        ("compile", None),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"DistriConfig.{field}={value!r}"):
        distripy.DistriConfig(**{field: value})


def test_compression_is_refused_only_where_nothing_is_exchanged():
    with pytest.raises(ConfigError, match="compress='fp8' with mode='naive_patch'"):
        distripy.DistriConfig(mode="naive_patch", compress="fp8")
    assert distripy.DistriConfig(mode="naive_patch", compress="none").compress == "none"
    for compress in COMPRESS_CHOICES:  # the stale exchanges, and the fresh ones of full_sync and exact
        for other in ("auto", "corrected_async_gn", "stale_gn", "full_sync", "exact"):
            assert distripy.DistriConfig(mode=other, compress=compress).compress == compress


def test_config_is_frozen():
    config = distripy.DistriConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "full_sync"
    assert dataclasses.replace(config, mode="full_sync").mode == "full_sync"
    with pytest.raises(ValueError, match="DistriConfig.mode='bad'"):
        dataclasses.replace(config, mode="bad")


def test_init_without_torchrun_is_a_single_process(monkeypatch):
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distripy.init() == (0, 1)
    assert not dist.is_initialized()


def test_init_with_part_of_torchrun_environment_says_what_is_missing(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="not MASTER_ADDR, MASTER_PORT"):
        distripy.init()


def _init_body(rank, world_size):
    # the harness initialised torch.distributed already: init() keeps it
    return distripy.init()


def test_init_keeps_an_existing_process_group(run_ranks):
    assert run_ranks(_init_body, 2, timeout=60) == [(0, 2), (1, 2)]


def test_parallelize_rejects_what_it_cannot_take():
    from unet_models import tiny_sdxl_unet

    with pytest.raises(
        TypeError, match="expected a diffusers UNet2DConditionModel, AutoencoderKL or pipeline, got Linear"
    ):
        distripy.parallelize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config must be a DistriConfig, got dict"):
        distripy.parallelize(tiny_sdxl_unet(), {"mode": "full_sync"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's answer")
def test_parallelize_refuses_the_nccl_runtime_without_gpus():
    from unet_models import tiny_sdxl_unet

    with pytest.raises(ValueError, match="comm_backend='nccl' needs CUDA GPUs; torch sees none"):
        distripy.parallelize(tiny_sdxl_unet(), distripy.DistriConfig(comm_backend="nccl"))
    with pytest.raises(ValueError, match="kernel_backend='triton' needs CUDA GPUs; torch sees none"):
        distripy.parallelize(tiny_sdxl_unet(), distripy.DistriConfig(kernel_backend="triton"))


def test_reconfigure_changes_the_mode_from_the_next_generation_and_checks_it_first():
    from unet_models import sdxl_conditioning, tiny_sdxl_unet

    from distripy.runtime import LoopbackComm

    unet = distripy.parallelize(
        tiny_sdxl_unet(), distripy.DistriConfig(mode="full_sync"), comm=LoopbackComm(0, 2)
    )
    context = distripy.patch_context(unet)
    distripy.reconfigure(unet, mode="exact", warmup_steps=2)
    assert (context.config.mode, context.config.warmup_steps) == ("exact", 2)
    assert context.config.split_batch is True  # the rest as parallelize set it
    with pytest.raises(distripy.errors.ConfigError, match="'fast' is not one of"):
        distripy.reconfigure(unet, mode="fast")
    assert context.config.mode == "exact"  # refused before anything changed
    with pytest.warns(distripy.QualityWarning):
        distripy.reconfigure(unet, mode="naive_patch")
    assert context.config.mode == "naive_patch"
    distripy.reconfigure(unet, mode="auto")
    distripy.reset(unet, steps=4)  # auto: exact below 8 steps
    with torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 900, **sdxl_conditioning(2, 1))
    assert context.mode == "exact"
