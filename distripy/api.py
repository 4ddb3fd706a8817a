"""``parallelize``: make a diffusers model patch-parallel by swapping its modules in place.

For a ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL configurations) on more than one rank:

* ``Conv2d`` with a kernel taller than one row -> ``PatchConv2d`` (halo rows from the
  neighbouring bands); 1x1 convolutions, linear layers and embeddings stay as they are (local);
* ``GroupNorm`` -> ``PatchGroupNorm`` (statistics of the whole image);
* self-attention -> ``PatchSelfAttnProcessor`` through diffusers' processor API; cross-attention
  stays local;
* ``ResnetBlock2D.forward`` -> ``PatchResnetForward`` (each GroupNorm -> SiLU -> conv fused);
* ``forward`` -> ``PatchUNetForward`` (bands in, the whole prediction out).

The swapped modules share the original parameters. Before anything is changed the whole model is
checked, and a spatial module whose band-wise result would not be exact (a transposed
convolution, batch or instance statistics, reflect padding, FIR resampling, ...) is refused with
its module path. On a single rank ``parallelize`` returns the model untouched.
"""

import functools
from typing import Dict, List, Optional

import torch.nn as nn

from distripy.config import DistriConfig
from distripy.errors import UnsupportedModuleError
from distripy.parallel.attention import PatchSelfAttnProcessor
from distripy.parallel.context import PatchContext
from distripy.parallel.conv import PatchConv2d, check_conv, conv_needs_halo
from distripy.parallel.group_norm import PatchGroupNorm
from distripy.parallel.resnet import PatchResnetForward, resnet_fusable
from distripy.parallel.unet import PatchUNetForward

__all__ = ["parallelize", "reset", "patch_context", "swap_modules"]

_ATTRIBUTE = "_distripy_forward"

# Modules whose result on a band is not the band of their result on the image, by class name
# (diffusers' and torch's), with the reason given in the error.
_REFUSED = {
    "ConvTranspose1d": "a transposed convolution",
    "ConvTranspose2d": "a transposed convolution",
    "ConvTranspose3d": "a transposed convolution",
    "Conv3d": "a 3-D convolution",
    "BatchNorm2d": "batch statistics over the whole image",
    "SyncBatchNorm": "batch statistics over the whole image",
    "InstanceNorm2d": "instance statistics over the whole image",
    "LocalResponseNorm": "a cross-channel window norm",
    "AdaGroupNorm": "a GroupNorm computed outside nn.GroupNorm",
    "SpatialNorm": "a norm conditioned on an image-sized map",
    "FirUpsample2D": "FIR resampling",
    "FirDownsample2D": "FIR resampling",
    "KUpsample2D": "padded FIR resampling",
    "KDownsample2D": "padded FIR resampling",
    "GatedSelfAttentionDense": "GLIGEN self-attention over image and grounding tokens",
    "PatchEmbed": "patch embedding with absolute positions",
    "AdaptiveAvgPool2d": "pooling over the whole image",
    "AdaptiveMaxPool2d": "pooling over the whole image",
}


def _check_pool(module: nn.Module, path: str) -> None:
    kernel, stride, padding = module.kernel_size, module.stride, module.padding
    kernel = kernel if isinstance(kernel, int) else kernel[0]
    stride = stride if isinstance(stride, int) else stride[0]
    padding = padding if isinstance(padding, int) else padding[0]
    if kernel != stride or padding != 0:
        raise UnsupportedModuleError(
            f"{path}: {type(module).__name__}(kernel={kernel}, stride={stride}, padding={padding}); only "
            "non-overlapping unpadded pooling is band-exact"
        )


def _check_upsample(module: nn.Module, path: str) -> None:
    if module.mode != "nearest" or module.size is not None:
        raise UnsupportedModuleError(
            f"{path}: nn.Upsample(mode={module.mode!r}, size={module.size}); "
            "only nearest scaling is band-exact"
        )


def _check_resnet(module: nn.Module, path: str) -> None:
    for name in ("upsample", "downsample"):
        resample = getattr(module, name, None)
        if (
            isinstance(resample, functools.partial)
            and getattr(resample.func, "__name__", "") != "interpolate"
        ):
            raise UnsupportedModuleError(
                f"{path}.{name}: {resample.func.__name__} resampling is not band-exact"
            )


def _check_attention(module: nn.Module, path: str) -> bool:
    """Whether this Attention is a self-attention to patch (cross-attention stays local)."""
    if getattr(module, "added_kv_proj_dim", None) is not None:
        raise UnsupportedModuleError(f"{path}: attention with added key/value projections (joint self/cross)")
    if getattr(module, "spatial_norm", None) is not None:
        raise UnsupportedModuleError(f"{path}: attention with a spatial norm")
    if module.is_cross_attention:
        return False
    processor = type(module.processor).__name__
    if processor not in (
        "AttnProcessor",
        "AttnProcessor2_0",
        "FusedAttnProcessor2_0",
        "XFormersAttnProcessor",
    ):
        raise UnsupportedModuleError(
            f"{path}: self-attention with processor {processor}; patch parallelism replaces the standard "
            "processors only, so this one would be silently dropped"
        )
    return True


def _plan_swaps(model: nn.Module) -> Dict[str, List[str]]:
    """Check every module; return the paths of the convolutions, norms and self-attentions to swap."""
    from diffusers.models.attention_processor import Attention

    plan: Dict[str, List[str]] = {"conv": [], "norm": [], "attention": []}
    for path, module in model.named_modules():
        path = path or type(model).__name__
        kind = type(module).__name__
        if kind in _REFUSED:
            raise UnsupportedModuleError(f"{path}: {kind} ({_REFUSED[kind]}) cannot run on bands")
        if isinstance(module, nn.Conv2d):
            check_conv(module, path)
            if conv_needs_halo(module):
                plan["conv"].append(path)
        elif isinstance(module, nn.Conv1d):
            raise UnsupportedModuleError(f"{path}: Conv1d over a token sequence would need a halo")
        elif isinstance(module, nn.GroupNorm):
            plan["norm"].append(path)
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            _check_pool(module, path)
        elif isinstance(module, nn.Upsample):
            _check_upsample(module, path)
        elif kind in ("ResnetBlock2D",):
            _check_resnet(module, path)
        elif isinstance(module, Attention):
            if _check_attention(module, path):
                plan["attention"].append(path)
        elif kind == "Transformer2DModel" and not getattr(module, "is_input_continuous", True):
            raise UnsupportedModuleError(
                f"{path}: Transformer2DModel on patches or vectors (absolute positions)"
            )
    return plan


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _count_downsamplings(unet: nn.Module) -> int:
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def _resolve_backends(config: DistriConfig, comm=None) -> None:
    """Refuse, before any work, a backend this machine or build cannot run."""
    import torch

    from distripy.runtime import native_available, native_unavailable_reason

    cuda = torch.cuda.is_available()
    if comm is None and _wants_native(config):
        what = "comm_backend='nccl'" if config.comm_backend == "nccl" else "use_cuda_graph=True"
        if not cuda:
            raise ValueError(f"DistriConfig.{what} needs CUDA GPUs; torch sees none")
        if not native_available():
            raise ValueError(f"DistriConfig.{what} needs distripy._C: {native_unavailable_reason()}")
    if config.use_cuda_graph:
        if not cuda:
            raise ValueError("DistriConfig.use_cuda_graph=True needs CUDA GPUs; torch sees none")
        if comm is None and config.comm_backend == "torch":
            raise ValueError(
                "DistriConfig.use_cuda_graph=True needs the C++ runtime (comm_backend 'nccl' or 'auto'): "
                "torch.distributed's transfers are not captured into CUDA graphs here"
            )
        if comm is not None and not getattr(comm, "supports_cuda_graphs", False):
            raise ValueError(
                f"DistriConfig.use_cuda_graph=True: the given {type(comm).__name__} cannot be captured "
                "into a CUDA graph (use NcclComm or LoopbackComm)"
            )
    if config.kernel_backend == "triton" and not cuda:
        raise ValueError(
            "DistriConfig.kernel_backend='triton' needs CUDA GPUs; torch sees none (use 'torch' or 'auto')"
        )


def _wants_native(config: DistriConfig) -> bool:
    """The C++ runtime: asked for, or ``auto`` with CUDA graphs (which torch.distributed's transfers
    cannot join here)."""
    return config.comm_backend == "nccl" or (config.comm_backend == "auto" and config.use_cuda_graph)


def _kernel_backend(config: DistriConfig) -> str:
    """Passed to the kernels as it is: ``auto`` is decided per call by the tensors' device (the
    Triton kernels and the per-shape convolution path on CUDA, the references on CPU)."""
    return config.kernel_backend


def _comm_class(config: DistriConfig):
    """``nccl``, and ``auto`` with CUDA graphs: the C++ runtime. Otherwise torch.distributed (gloo on
    CPU, NCCL on GPUs)."""
    if _wants_native(config):
        from distripy.runtime.nccl_comm import NcclComm

        return NcclComm
    from distripy.runtime.torch_comm import TorchComm

    return TorchComm


def _make_comms(config: DistriConfig, world_size: int, rank: int, comm=None):
    """The Comm of all ranks, and per split choice the Comm of this rank's patch group."""
    if comm is not None:
        world = comm
        patch = {False: world}
        if config.split_batch and world_size % 2 == 0:
            if not hasattr(comm, "subgroup"):
                raise TypeError(
                    f"parallelize: split_batch needs the given {type(comm).__name__} to provide "
                    "subgroup(ranks); or set DistriConfig(split_batch=False)"
                )
            half = world_size // 2
            first = rank // half * half
            patch[True] = comm.subgroup(range(first, first + half))
        return world, patch

    import torch.distributed as dist

    comm_class = _comm_class(config)
    world = comm_class(None, config.timeout_s)
    patch = {False: world}
    if config.split_batch and world_size % 2 == 0:
        half = world_size // 2
        # new_group is collective: every rank creates both halves, in the same order.
        groups = [dist.new_group(list(range(i * half, (i + 1) * half))) for i in range(2)]
        patch[True] = comm_class(groups[rank // half], config.timeout_s)
    return world, patch


def swap_modules(model: nn.Module, context: PatchContext) -> None:
    """Check every module of ``model``, then swap its convolutions, GroupNorms and self-attention
    processors for the patch-parallel ones of ``context`` and fuse its ResNet blocks."""
    plan = _plan_swaps(model)
    for path in plan["conv"]:
        _set_submodule(model, path, PatchConv2d.from_conv(model.get_submodule(path), context, path))
    for path in plan["norm"]:
        _set_submodule(model, path, PatchGroupNorm.from_group_norm(model.get_submodule(path), context, path))
    for path in plan["attention"]:
        model.get_submodule(path).set_processor(PatchSelfAttnProcessor(context, path))
    # ResNet blocks: GroupNorm -> SiLU -> conv fused (the same result, the activation read once).
    for module in model.modules():
        if resnet_fusable(module):
            module.forward = PatchResnetForward(module, context)


def parallelize(model, config: Optional[DistriConfig] = None, *, comm=None):
    """Make ``model`` patch-parallel over the ranks of torch.distributed, in place, and return it.
    Every rank must call this, in the same order.

    ``comm``: for a UNet, a ``Comm`` of all ranks to use instead of torch.distributed's, e.g.
    ``LoopbackComm(rank, world_size)`` to run one rank's share of an N-way split in this process
    alone (what ``bench/e2e.py`` measures); with ``split_batch`` it must provide ``subgroup``.

    ``model``: a diffusers ``UNet2DConditionModel``; an ``AutoencoderKL`` (its decoder decodes
    bands, exactly); or a pipeline holding them (``StableDiffusionXLPipeline``,
    ``StableDiffusionPipeline`` and their img2img variants), whose calls then give every rank the
    same images (see ``distripy.pipelines``)."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    config = DistriConfig() if config is None else config
    if not isinstance(config, DistriConfig):
        raise TypeError(f"parallelize: config must be a DistriConfig, got {type(config).__name__}")
    if comm is not None and not isinstance(model, UNet2DConditionModel):
        raise TypeError(
            f"parallelize: comm= is accepted for a UNet2DConditionModel only, got {type(model).__name__}"
        )
    if isinstance(model, DiffusionPipeline):
        from distripy.pipelines import parallelize_pipeline

        return parallelize_pipeline(model, config)
    if isinstance(model, AutoencoderKL):
        from distripy.pipelines import parallelize_vae

        return parallelize_vae(model, config)
    if not isinstance(model, UNet2DConditionModel):
        raise TypeError(
            "parallelize: expected a diffusers UNet2DConditionModel, AutoencoderKL or pipeline, "
            f"got {type(model).__name__}"
        )
    if hasattr(model, _ATTRIBUTE):
        raise ValueError("parallelize: this model is already patch-parallel")
    if model.config.addition_embed_type == "image_hint":
        raise UnsupportedModuleError(
            "UNet2DConditionModel with addition_embed_type='image_hint' (a spatial hint)"
        )
    _resolve_backends(config, comm)
    if comm is not None:
        world_size, rank = comm.world_size, comm.rank
    else:
        world_size, rank = config.world_size, config.rank
    if world_size == 1:
        return model
    _plan_swaps(model)  # refuse before creating communicators

    world_comm, patch_comms = _make_comms(config, world_size, rank, comm)
    context = PatchContext(config, kernel_backend=_kernel_backend(config))
    swap_modules(model, context)

    # Checkpoints: an asynchronous step's transfers leave as each block finishes.
    def checkpoint(module, inputs, output) -> None:
        if context.active:
            context.flush()

    for block in list(model.down_blocks) + [model.mid_block] + list(model.up_blocks):
        if block is not None:
            block.register_forward_hook(checkpoint)

    forward = PatchUNetForward(model, context, world_comm, patch_comms, _count_downsamplings(model))
    if config.use_cuda_graph:
        from distripy.parallel.graphs import StepGraphs

        context.static_buffers = True
        forward.graphs = StepGraphs(context, list(patch_comms.values()))
    model.forward = forward
    setattr(model, _ATTRIBUTE, forward)
    return model


def _forward_of(model) -> PatchUNetForward:
    forward = getattr(model, _ATTRIBUTE, None)
    if forward is None:
        raise ValueError(f"{type(model).__name__} is not patch-parallel (parallelize it first)")
    return forward


def reset(model) -> None:
    """End the current generation: wait for the transfers its last step issued and forget every
    stale buffer, so that the next call starts a new generation. Call it between images (a new
    generation is also recognised by itself; a parallelised pipeline does it at every call) and
    before tearing down torch.distributed. A single-rank model (returned untouched by
    ``parallelize``) has nothing to reset; a pipeline resets its UNet."""
    unet = getattr(model, "unet", None)
    if unet is not None and not isinstance(model, nn.Module):
        model = unet
    forward = getattr(model, _ATTRIBUTE, None)
    if forward is not None:
        forward.reset()


def patch_context(model) -> PatchContext:
    """The ``PatchContext`` of a parallelised model (its step, band geometry and mode)."""
    return _forward_of(model).context
