"""``PatchParallelUNet``: what the node attaches to a ComfyUI model clone, as two of ComfyUI's
wrappers (``ModelPatcher.add_wrapper_with_key``), so that it composes with other nodes' wrappers
and leaves the ``model_function_wrapper`` slot to them:

* ``OUTER_SAMPLE`` (once per sampling run): the run's number of steps (``len(sigmas) - 1``, which
  ``mode="auto"`` chooses by) and its model patcher's ``patches_uuid``; every stream of calls begins
  a new generation at its first call of the run; at the end of the run the transfers still in
  flight are waited for and the stale buffers freed;
* ``DIFFUSION_MODEL`` (once per UNet call): the call goes to the ranks, one worker thread per
  device (``application.ThreadedExecutor``), each with its band step (``ComfyUNetForward``) of the
  retrofitted UNet (``retrofit``); rank 0 (on the model's device) returns the whole prediction.

Rank 0 computes with the very model ComfyUI loaded (a structural copy of it: its weights as
ComfyUI patched and casts them); every other rank has a replica on its device
(``retrofit.replica``) whose weights are set from the model's effective ones when a run's
``patches_uuid`` or the model differ from those they were last set for (a LoRA's strength changed,
another LoRA, another checkpoint).

Streams: ComfyUI calls the UNet with the conditional and unconditional halves batched
(``cond_or_uncond == [1, 0]``) or, when memory is short, one call each. An asynchronous step uses
what the previous call of its stream exchanged, so each ``cond_or_uncond`` pattern is a stream with
retrofitted copies and stale buffers of its own (the copies share every weight).

Calls outside a sampling run (no ``OUTER_SAMPLE`` around them) run unsplit, as the model would.
Transformer patches that would see only a band (``attn1`` replacements, block patches over the
whole map such as FreeU's or a deep-shrink's) are refused with their names instead of making a
wrong image.
"""

import dataclasses
import itertools
import threading
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch

from distripy.application.executor import ThreadedExecutor
from distripy.comfyui.forward import ComfyUNetForward
from distripy.comfyui.layers import casts_weights
from distripy.comfyui.retrofit import downsamplings, replica, retrofit, swap_plan, sync_weights, unet_blocks
from distripy.config import DistriConfig
from distripy.errors import ConfigError, UnsupportedModuleError
from distripy.parallel.band_inputs import map_arguments
from distripy.parallel.context import PatchContext
from distripy.parallel.generation import Generation
from distripy.parallel.split import machine_of
from distripy.runtime.factory import make_comms, resolve_defaults

__all__ = ["PatchParallelUNet", "parse_gpus", "resolve_devices"]

# Transformer patches that change the whole map of a block (not token by token): run on a band
# they would compute something else than on the image.
_SPATIAL_PATCHES = ("input_block_patch", "input_block_patch_after_skip", "output_block_patch")


def parse_gpus(gpus: Union[int, str, Sequence[int]]) -> Union[int, Tuple[int, ...]]:
    """``gpus`` as a count (``2``, ``"2"``) or a tuple of device indices (``"0,1,3"``, ``[0, 1]``)."""
    if isinstance(gpus, bool):
        raise ConfigError(f"gpus={gpus!r} must be a count or a list of GPU indices")
    if isinstance(gpus, int):
        count = gpus
    elif isinstance(gpus, str):
        text = gpus.strip()
        try:
            if "," not in text:
                count = int(text)
            else:
                return parse_gpus([int(part) for part in text.split(",") if part.strip()])
        except ValueError:
            raise ConfigError(f"gpus={gpus!r} must be a count (\"2\") or GPU indices (\"0,1,2\")") from None
    else:
        indices = tuple(gpus)
        if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ConfigError(f"gpus={gpus!r} must name GPU indices >= 0")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"gpus={gpus!r} names a GPU twice")
        return indices
    if count < 1:
        raise ConfigError(f"gpus={gpus!r} must be at least 1")
    return count


def resolve_devices(gpus: Union[int, Tuple[int, ...]], load_device: torch.device) -> List[torch.device]:
    """The ranks' devices, rank 0 on ``load_device`` (the model's, where ComfyUI wants the result).
    On a CPU (ComfyUI's ``--cpu``) a count of workers, all on the CPU (for tests)."""
    load_device = torch.device(load_device)
    count = gpus if isinstance(gpus, int) else len(gpus)
    if load_device.type == "cpu":
        return [load_device] * count
    if load_device.type != "cuda":
        raise ConfigError(f"patch parallelism runs on CUDA GPUs (or CPU workers); the model is on {load_device}")
    visible = torch.cuda.device_count()
    first = load_device.index if load_device.index is not None else torch.cuda.current_device()
    if isinstance(gpus, int):
        if gpus > visible:
            raise ConfigError(f"gpus={gpus}: this machine has {visible} GPU{'s' if visible != 1 else ''}")
        others = [index for index in range(visible) if index != first][: gpus - 1]
        return [torch.device("cuda", index) for index in [first] + others]
    missing = [index for index in gpus if index >= visible]
    if missing:
        raise ConfigError(f"gpus={list(gpus)}: this machine has {visible} GPUs, so GPU {missing} does not exist")
    if first not in gpus:
        raise ConfigError(
            f"gpus={list(gpus)} leaves out cuda:{first}, where ComfyUI loaded the model: rank 0 runs there"
        )
    return [torch.device("cuda", index) for index in [first] + [i for i in gpus if i != first]]


@dataclasses.dataclass
class _Run:
    """One sampling run (one ``OUTER_SAMPLE`` call)."""

    number: int
    steps: Optional[int]
    patches: Any  # the model patcher's patches_uuid


class _Rank:
    """One rank: its model (ComfyUI's, or its replica), comms, and a band step per stream."""

    def __init__(self, device: torch.device, unet: torch.nn.Module) -> None:
        self.device = device
        self.unet = unet
        self.comms = None  # (world, {split: patch group})
        self.streams: Dict[Hashable, Tuple[ComfyUNetForward, int]] = {}  # -> (forward, run declared)

    def forward_for(self, stream, config: DistriConfig) -> ComfyUNetForward:
        """The band step of ``stream`` (``(cond_or_uncond, graphs)``), made at its first call."""
        entry = self.streams.get(stream)
        if entry is None:
            context = PatchContext(config)
            model = retrofit(self.unet, context)
            world, patch = self.comms
            forward = ComfyUNetForward(model, context, world, patch, downsamplings(self.unet))
            if stream[1]:
                from distripy.parallel.graphs import StepGraphs

                context.static_buffers = True
                forward.graphs = StepGraphs(context, list(patch.values()))
            context.add_checkpoints(unet_blocks(model))
            entry = self.streams[stream] = (forward, -1)
        return entry[0]

    def drain(self) -> None:
        for forward, _ in self.streams.values():
            forward.context.drain()

    def forget_streams(self) -> None:
        """Drop every band step (their CUDA graphs read weight tensors ComfyUI may have replaced)."""
        self.drain()
        for forward, _ in self.streams.values():
            if forward.graphs is not None:
                forward.graphs.release()
        self.streams.clear()


class PatchParallelUNet:
    """One node's patch parallelism (module docstring): ``gpus`` (a count or device indices), and
    the ``DistriConfig`` the bands run with (mode, warm-up, split)."""

    def __init__(self, gpus, config: DistriConfig) -> None:
        self.gpus = parse_gpus(gpus)
        self.config = config
        self._executor: Optional[ThreadedExecutor] = None
        self._ranks: List[_Rank] = []
        self._model = None  # the UNet the ranks were made for (ComfyUI's)
        self._synced: Any = None  # (patches_uuid, dtype) the replicas' weights are, for self._model
        self._casting = False  # whether ComfyUI casts or patches weights on the fly (no CUDA graphs then)
        self._replicas: List[torch.nn.Module] = []  # the model's copies on ranks 1.. (kept across executors)
        self._run: Optional[_Run] = None
        self._runs = itertools.count()
        self._lock = threading.RLock()

    def chosen_modes(self) -> List[Tuple[str, int]]:
        """``(mode, warm-up steps)`` of each stream's last generation (what ``mode="auto"`` chose
        for the run's step count), in the order the streams first ran."""
        ranks = self._ranks[:1]
        return [(f.context.mode, f.context.warmup_steps) for rank in ranks for f, _ in rank.streams.values()]

    def captures(self) -> int:
        """How many CUDA graphs the ranks' band steps have captured (0 when eager)."""
        return sum(
            forward.graphs.captures
            for rank in self._ranks
            for forward, _ in rank.streams.values()
            if forward.graphs is not None
        )

    # -- ComfyUI's wrappers -----------------------------------------------------------------------

    def outer_sample(self, chain, noise, latent_image, sampler, sigmas, *args, **kwargs):
        """``WrappersMP.OUTER_SAMPLE``: the run's steps and patches; the stale state freed after."""
        patcher = getattr(chain.class_obj, "model_patcher", None)
        steps = int(sigmas.shape[-1]) - 1 if isinstance(sigmas, torch.Tensor) else None
        run = _Run(next(self._runs), steps if steps and steps > 0 else None, getattr(patcher, "patches_uuid", None))
        with self._lock:
            outer, self._run = self._run, run
        try:
            result = chain(noise, latent_image, sampler, sigmas, *args, **kwargs)
        except BaseException:
            self._finish_run(outer, failed=True)
            raise
        self._finish_run(outer, failed=False)
        return result

    def diffusion_model(self, chain, x, timesteps, context, y, control, transformer_options, **kwargs):
        """``WrappersMP.DIFFUSION_MODEL``: one UNet call, on the ranks' bands."""
        run = self._run
        if run is None:
            return chain(x, timesteps, context, y, control, transformer_options, **kwargs)
        _refuse_band_blind_patches(transformer_options)
        unet = chain.class_obj
        with self._lock:
            self._prepare(unet, x, run)
            graphs = bool(self.config.use_cuda_graph) and not self._casting and not _has_patches(transformer_options)
            stream = (tuple(transformer_options.get("cond_or_uncond") or ()), graphs)
            wrappers, index = list(chain.wrappers), chain.idx + 1
            arguments = dict(
                sample=x, timestep=timesteps, context=context, y=y, control=control, **kwargs
            )  # fmt: skip

            def step(rank: int) -> torch.Tensor:
                state = self._ranks[rank]
                forward = state.forward_for(stream, self.config)
                local = arguments if rank == 0 else map_arguments(arguments, lambda t: t.to(state.device))
                _, declared = state.streams[stream]
                if declared != run.number:  # the stream's first call of this run
                    forward.declare(Generation(steps=run.steps, agreed=True, machine=self._machine(state.device)))
                    state.streams[stream] = (forward, run.number)
                forward.next_wrappers = (wrappers, index)
                # each rank's own copy of the options is made in ComfyUNetForward._localize
                return forward(**local, transformer_options=transformer_options)

            try:
                outputs = self._executor.run(step)
            except BaseException:
                if self._executor.broken:
                    self._discard(replicas=False)
                raise
            return outputs[0]

    # -- ranks ------------------------------------------------------------------------------------

    def _prepare(self, unet: torch.nn.Module, x: torch.Tensor, run: _Run) -> None:
        """Make (or remake) the executor and the ranks for ``unet`` on ``x``'s device, and set the
        replicas' weights when they may differ from the model's."""
        if self._model is not unet or (self._ranks and self._ranks[0].device != x.device):
            self._discard(replicas=True)  # another model, or the model moved to another device
        elif self._executor is not None and self._executor.broken:
            self._discard(replicas=False)  # a failed call (an interrupt, an error): new comms only
        if self._executor is None:
            swap_plan(unet)  # refuse before making anything
            devices = resolve_devices(self.gpus, x.device)
            cuda = devices[0].type == "cuda"
            executor = ThreadedExecutor(devices, self.config.timeout_s)
            try:
                config = resolve_defaults(self.config, executor.comm(0), cuda)
                comms = executor.run(lambda rank: make_comms(config, executor.comm(rank)))
            except BaseException:
                executor.close()
                raise
            self.config = config
            self._executor, self._model = executor, unet
            if not self._replicas:
                self._replicas = [replica(unet, device) for device in devices[1:]]
                self._synced = None
            self._ranks = [_Rank(device, model) for device, model in zip(devices, [unet] + self._replicas)]
            for state, comm in zip(self._ranks, comms):
                state.comms = comm
        patches = run.patches if run.patches is not None else ("unknown: once per run", run.number)
        synced = (patches, x.dtype)  # another model discarded the replicas above
        if synced != self._synced:
            # The weights may have changed (and ComfyUI replaces a parameter it patches): the
            # replicas take the model's, and no band step captured before may replay.
            self._executor.run(lambda rank: self._ranks[rank].forget_streams())
            for state in self._ranks[1:]:
                sync_weights(unet, state.unet, x.dtype)
            self._casting = any(casts_weights(module) for module in unet.modules())
            self._synced = synced

    def _machine(self, device: torch.device):
        return machine_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def _finish_run(self, outer: Optional[_Run], failed: bool) -> None:
        """Wait for the transfers still in flight and free every stale buffer: between runs the
        memory is ComfyUI's (the VAE decode comes next). After a failed run a failure here is not
        the one to report: the executor is dropped instead."""
        with self._lock:
            self._run = outer
            if self._executor is None or self._executor.broken:
                return
            try:
                self._executor.run(lambda rank: self._ranks[rank].drain())
            except BaseException:
                self._discard(replicas=False)
                if not failed:
                    raise

    def _discard(self, replicas: bool = True) -> None:
        """Drop the executor and the ranks' band steps (after a failed call), and with ``replicas``
        the other devices' copies of the model too (another model, closing)."""
        executor, self._executor = self._executor, None
        self._ranks = []
        if replicas:
            self._replicas, self._model, self._synced = [], None, None
        if executor is not None:
            executor.close()

    def __copy__(self) -> "PatchParallelUNet":
        return self  # a handle on devices and threads: ComfyUI's copies of model options share it

    def __deepcopy__(self, memo) -> "PatchParallelUNet":
        return self

    def close(self) -> None:
        with self._lock:
            self._discard()

    def __del__(self) -> None:
        try:
            self._discard()
        except Exception:  # noqa: BLE001 - nothing to report to at interpreter exit
            pass


def _has_patches(transformer_options: Dict[str, Any]) -> bool:
    """Whether the call carries transformer patches: Python that a CUDA graph would run once, at
    its capture (a patch may depend on the step), so such calls run eagerly."""
    return any(transformer_options.get(name) for name in ("patches", "patches_replace"))


def _refuse_band_blind_patches(transformer_options: Dict[str, Any]) -> None:
    """Refuse transformer patches that would see one band as if it were the image."""
    replace = (transformer_options.get("patches_replace") or {}).get("attn1") or {}
    if replace:
        raise UnsupportedModuleError(
            f"an attn1 replacement patch (on blocks {sorted(map(str, replace))}) computes self-attention "
            "from the band's keys and values only; patch parallelism cannot run it (remove the node that "
            "adds it, or the patch-parallel node)"
        )
    patches = transformer_options.get("patches") or {}
    spatial = [name for name in _SPATIAL_PATCHES if patches.get(name)]
    if spatial:
        raise UnsupportedModuleError(
            f"transformer patches {spatial} change whole feature maps (FreeU, deep shrink...); on a band they "
            "would compute another image, so patch parallelism refuses them"
        )
