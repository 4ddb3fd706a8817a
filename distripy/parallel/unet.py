"""The UNet forward wrapper: bands in, the whole prediction out.

Each call is one denoising step. The wrapper

1. decides the split: with ``split_batch``, an even batch and an even number of ranks, the first
   half of the ranks takes the first half of the batch (classifier-free guidance's unconditional
   half) and the second half the rest; otherwise all ranks share the whole batch;
2. recognises the start of a generation (an explicit ``reset()``, a new input signature, or the
   timesteps starting over: ``_timestep_starts_generation``) without waiting for the GPU, and then,
   before any work, validates the input and checks that every rank was given the same input (a
   digest of every argument, ``parallel.digest``); a problem on any rank raises on every rank.
   With ``DistriConfig.check_every_step`` every step's latent and timestep are compared too. It
   also tells the step whether its conditioning may have changed since the previous step
   (``PatchContext.refresh_conditioning``: cross-attention keys and values are then computed
   again), from the conditioning tensors' identities and version counters, on the host;
3. cuts the latent and the spatial conditioning (ControlNet residuals) into this rank's band
   (the latent through ``PatchContext.cut_band``: every rank holds it whole, so the first
   convolution's halos are read from it, exact at every step), runs the model's own forward on
   it, sends the transfers still collected, and all-gathers the output bands so that every rank
   returns the full noise prediction.
"""

import functools
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from distripy.errors import BandGeometryError, DistripyError, InputError
from distripy.parallel.agreement import agree
from distripy.parallel.bands import (
    BandPlan,
    gather_bands,
    map_tensors,
    take_band,
    take_batch_half,
    tensors_in,
)
from distripy.parallel.context import PatchContext
from distripy.parallel.digest import digest_arguments
from distripy.parallel.policy import check_steps
from distripy.parallel.split import wants_split

__all__ = ["PatchUNetForward"]

# UNet2DConditionModel.forward arguments that hold per-resolution spatial maps, cut into bands.
_SPATIAL_ARGUMENTS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


def _timestep_value(timestep) -> float:
    """The step's timestep as a number, to recognise a new generation (timesteps do not increase
    within one). For a tensor on a GPU this is a device-to-host copy that waits for all the work
    queued before it: ``_timestep_starts_generation`` calls it for such a timestep only when nothing
    else tells."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep if timestep.numel() == 1 else timestep.reshape(-1)[0])
    return float(timestep)


def _schedule_position(timestep: torch.Tensor) -> Optional[Tuple[int, int]]:
    """Where a timestep tensor sits in the schedule it is an element of: (the schedule's storage,
    the element's offset in it), or None when it is no view into a larger tensor. A diffusers loop
    iterates ``scheduler.timesteps``, so each ``t`` is a view of one element of the schedule's
    storage, one element further each step; a new schedule (``set_timesteps``, at every pipeline
    call) is a new storage. Read from the tensor's metadata only: nothing leaves the device."""
    storage = timestep.untyped_storage()
    span = 1 + sum((size - 1) * stride for size, stride in zip(timestep.shape, timestep.stride()))
    if timestep.numel() == 0 or span * timestep.element_size() >= storage.nbytes():
        return None  # all of its storage: a tensor of its own (torch.full((batch,), t), ...)
    return storage.data_ptr(), timestep.storage_offset()


class _ByIdentity:
    """In a conditioning fingerprint, an object compared by identity (its own ``==`` may not give
    a bool: an array's)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _fingerprint(value: Any, kept: list) -> Any:
    """What of ``value`` (an argument: tensors, numbers, dicts, lists, tuples) differs whenever its
    contents may differ, computed on the host: a tensor's memory, layout and version counter (bumped
    by every in-place change), a plain value itself, any other object by identity. The tensors and
    objects are appended to ``kept``, which the caller holds until the next comparison: alive, their
    memory cannot be reused by a new tensor that would then look the same. An inference tensor has
    no version counter: it counts as changed every time."""
    if isinstance(value, torch.Tensor):
        kept.append(value)
        version = _ByIdentity(object()) if value.is_inference() else value._version
        return (value.data_ptr(), value.shape, value.stride(), value.dtype, value.device, version)
    if isinstance(value, _PLAIN_VALUES):
        return (type(value), value)  # 1, 1.0 and True are equal, but not the same argument
    if type(value) in (dict, list, tuple):
        items = value.items() if type(value) is dict else enumerate(value)
        return (type(value), tuple((key, _fingerprint(item, kept)) for key, item in items))
    kept.append(value)
    return _ByIdentity(value)


def _map_arguments(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``map_tensors`` (``value`` with every tensor in it replaced by ``fn(tensor)``), walking the
    plain dicts, lists and tuples a call's arguments are made of itself: it runs every step, and
    torch's pytree costs more than the cut. Any other container goes through ``map_tensors``."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, _PLAIN_VALUES):
        return value
    kind = type(value)
    if kind is dict:
        return {key: _map_arguments(item, fn) for key, item in value.items()}
    if kind is list or kind is tuple:
        return kind(_map_arguments(item, fn) for item in value)
    return map_tensors(value, fn)


def _residual_is_whole(tensor, sample: torch.Tensor, plan: BandPlan) -> Optional[bool]:
    """Whether a spatial conditioning tensor (a ControlNet or adapter residual) is the whole map of
    its resolution (True) or this rank's band of it (False; what a patch-parallel ControlNet
    returns); None when it is neither, or cannot be cut into the plan's bands. Its resolution is
    found from its width (the latent's, halved ``k`` times, rounded up), which a band keeps."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        return None
    height, width = sample.shape[2], sample.shape[3]
    for _ in range(64):
        if tensor.shape[3] == width:
            break
        if width <= 1:
            return None
        height, width = -(-height // 2), -(-width // 2)
    else:
        return None
    layout = plan.layout
    if height < layout.total or height % layout.total:
        return None
    if tensor.shape[2] == height:
        return True
    start, stop = layout.rows(plan.band_index, height)
    return False if tensor.shape[2] == stop - start else None


class PatchUNetForward:
    """Replaces ``unet.forward``; the model's own forward runs inside on the band."""

    spatial_arguments = _SPATIAL_ARGUMENTS  # the forward's arguments cut into bands
    model_name = "UNet"  # in messages

    # What recognising generations and conditioning changes remembers between calls (class-level
    # defaults; each instance sets its own as it runs).
    _reset_declared = False  # the pending reset was asked for (reset()), not after a failure
    _declared = False  # the current generation began at an explicit reset()
    _previous_timestep: Any = None  # the last step's timestep (kept alive: see _schedule_position)
    _schedule: Optional[Tuple[int, int]] = None  # its place in a schedule on the GPU, if any
    _conditioning: Optional[Tuple[Any, list]] = None  # the last step's (fingerprint, objects kept)
    _binders: Optional[Dict[Tuple, Tuple]] = None  # call layout -> where each argument comes from
    _plans: Optional[Dict[Tuple, BandPlan]] = None  # (rank, world size, split, units) -> BandPlan

    def __init__(
        self,
        unet: torch.nn.Module,
        context: PatchContext,
        world_comm,
        patch_comms: Dict[bool, Any],
        levels: int,
    ) -> None:
        self.original_forward = unet.forward
        self.__signature__ = inspect.signature(self.original_forward)
        self.__doc__ = self.original_forward.__doc__
        self.context = context
        self.world_comm = world_comm
        self.patch_comms = patch_comms  # split_batch -> the Comm of this rank's patch group
        self.levels = levels
        self._parameter = next(unet.parameters())
        self._signature: Optional[Tuple] = None
        self._last_timestep: Optional[float] = None
        self._reset_requested = True
        self.steps: Optional[int] = None  # the generations' number of steps, when told (reset)
        self.graphs = None  # a StepGraphs with use_cuda_graph
        self._compiled_forward = None  # with DistriConfig.compile, made at the first step
        # Called at the start of every generation: swaps in what was loaded into the model since
        # (a LoRA's layers, re-created attention processors) and returns a digest of the model's
        # modules and adapters (``pipelines.swap.refresh_model``).
        self.refresh_modules: Optional[Callable[[], str]] = None
        self._model_state: Optional[str] = None
        # ``alone``: the next generations run on this rank by itself (the whole latent as one band,
        # no transfer, no cross-rank check; ``distripy.alone``), so that each rank can serve a
        # different request. A change of it starts a new generation (the plan is in the signature).
        self.alone = False
        self._alone_comm = None

    # -- generations -----------------------------------------------------------------------------

    def reset(self, steps: Optional[int] = None) -> None:
        """End the current generation: wait for its last transfers, forget its stale buffers; the
        next call starts a new generation. ``steps``: how many denoising steps the next generations
        take (what ``mode="auto"`` decides by), until the next reset; None: unknown.

        A generation begun by a reset is taken to last until the next reset (a parallelised
        pipeline resets at every call) unless the input signature or the timesteps say otherwise:
        a timestep on a GPU that is no element of a schedule is then not read to find out (see
        ``_timestep_starts_generation``). A loop passing such timesteps resets between images."""
        self.steps = check_steps(steps)
        self.context.drain()
        self._reset_requested = True
        # The caller says where generations begin (a pipeline resets at every call): until a new
        # generation is recognised otherwise, a timestep on the GPU is not read to find one.
        self._reset_declared = True

    def _timestep_starts_generation(self, timestep, declared: bool) -> bool:
        """Whether this step's timestep begins a new generation (timesteps do not increase within
        one), and remember it for the next step. Reads nothing from a GPU where it can:

        * a number or a tensor on the CPU: its value, against the last step's (free);
        * a GPU tensor that is an element of a schedule (``_schedule_position``): the generation
          goes on while it is the same schedule and the element does not move back, and a new
          one begins otherwise (its first step, or a new schedule);
        * any other GPU tensor, in a generation begun by ``reset()`` (``declared``): the caller
          resets between generations, nothing is read;
        * any other GPU tensor: its value, read from the device (``_timestep_value``), which waits
          for the work queued before it. The one synchronising read per step, and only there.

        A number, CPU tensor or schedule element after a timestep of another kind begins a
        generation: there is nothing to compare it with."""
        previous_schedule, self._schedule = self._schedule, None
        self._previous_timestep = timestep
        if not isinstance(timestep, torch.Tensor) or timestep.is_cpu:
            value = _timestep_value(timestep)
            new = self._last_timestep is None or value > self._last_timestep
            self._last_timestep = value
            return new
        position = _schedule_position(timestep)
        if position is not None:
            self._schedule, self._last_timestep = position, None
            return (
                previous_schedule is None
                or position[0] != previous_schedule[0]
                or position[1] < previous_schedule[1]
            )
        if declared:
            self._last_timestep = None
            return False
        value = _timestep_value(timestep)
        new = self._last_timestep is None or value > self._last_timestep
        self._last_timestep = value
        return new

    def _conditioning_changed(self, arguments: Dict[str, Any]) -> bool:
        """Whether any argument but the latent, the timestep and the spatial ones (ControlNet
        residuals change every step) may differ from the previous step's: a new tensor, one
        changed in place, another value. On the host, from metadata (``_fingerprint``)."""
        kept: list = []
        fingerprint = tuple(
            (name, _fingerprint(value, kept))
            for name, value in arguments.items()
            if name != "sample" and name != "timestep" and name not in self.spatial_arguments
        )
        previous, self._conditioning = self._conditioning, (fingerprint, kept)
        return previous is None or previous[0] != fingerprint

    def _units(self, sample: torch.Tensor) -> Optional[int]:
        """Rows at the deepest level, what bands are counted in (None: not whole rows)."""
        height, factor = sample.shape[2], 2**self.levels
        return height // factor if height % factor == 0 else None

    def _split_wanted(self, sample: torch.Tensor) -> bool:
        """``DistriConfig.split_batch``, or with ``"auto"`` the planner's choice for this size: for
        steps run as CUDA graphs whether or not they are (a ControlNet runs eagerly beside a graphed
        UNet, and both must split alike)."""
        config = self.context.config
        if config.split_batch != "auto":  # every step asks: no device query unless it matters
            return bool(config.split_batch)
        device = sample.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        return wants_split(
            config,
            tuple(sample.shape[2:]),
            self.world_comm.world_size,
            self.levels,
            self.steps,
            True,
            name,
        )

    def _plan(self, sample: torch.Tensor, arguments: Dict[str, Any]) -> BandPlan:
        world = self.world_comm.world_size
        split = world % 2 == 0 and sample.shape[0] % 2 == 0 and self._split_wanted(sample)
        key = (self.world_comm.rank, world, split, self._units(sample))
        if self._plans is None:
            self._plans = {}
        plan = self._plans.get(key)  # made once per split and height, not every step
        if plan is None:
            plan = self._plans[key] = BandPlan(*key[:3], units=key[3])
        return plan

    def _input_problem(self, sample, arguments: Dict[str, Any], plan: BandPlan) -> Optional[Tuple[type, str]]:
        """What is wrong with this rank's input, if anything, as (exception type, message)."""
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            return InputError, f"sample must be a (batch, channels, height, width) tensor, got {shape}"
        if sample.dtype != self._parameter.dtype:
            return (
                InputError,
                f"sample is {sample.dtype} but the {self.model_name}'s parameters are {self._parameter.dtype}",
            )
        if sample.device != self._parameter.device:
            return (
                InputError,
                f"sample is on {sample.device} but the {self.model_name}'s parameters are on {self._parameter.device}",
            )
        if self.graphs is not None and sample.device.type != "cuda":
            return (
                InputError,
                f"the {self.model_name} runs its steps as CUDA graphs (use_cuda_graph, on by default for a "
                f"model that was on CUDA at parallelize) and needs a CUDA device; it is on {sample.device} "
                "(parallelize a CPU model with DistriConfig(use_cuda_graph=False))",
            )
        height, factor, bands = sample.shape[2], 2**self.levels, plan.band_count
        if height % factor != 0:
            return BandGeometryError, (
                f"latent height {height} is not a multiple of {factor}: the {self.model_name}'s "
                f"{self.levels} downsamplings would leave partial rows, which diffusers resizes "
                "across the whole image and bands cannot; use a height that is a multiple of "
                f"{factor} latent rows"
            )
        if height // factor < bands:
            return BandGeometryError, (
                f"latent height {height} cannot be cut into {bands} bands: the {self.model_name}'s "
                f"deepest level ({self.levels} downsamplings) has {height // factor} rows, fewer than "
                f"the bands; the latent height must be at least {factor * bands} ({factor} x {bands} "
                "bands)"
            )
        for name in self.spatial_arguments:
            for tensor in tensors_in(arguments.get(name)):
                if _residual_is_whole(tensor, sample, plan) is None:
                    return BandGeometryError, (
                        f"{name}: a tensor of shape {tuple(tensor.shape)} is neither a whole map of the "
                        f"{tuple(sample.shape[2:])} latent's resolutions cut into {bands} bands of rows "
                        "nor this rank's band of one (a patch-parallel ControlNet's output). A "
                        "ControlNet with guess_mode on an odd batch without classifier-free guidance "
                        "splits differently from the UNet under split_batch: use split_batch=False"
                    )
        return None

    def _agreed_part(self, arguments: Dict[str, Any], plan: BandPlan) -> Dict[str, Any]:
        """The arguments every rank must be given alike: a residual of this rank's band or batch
        half (a patch-parallel ControlNet's, whose inputs were agreed on by its own call) by its
        shape only."""
        sample = arguments["sample"]

        def shape_of_band(tensor: torch.Tensor):
            whole = _residual_is_whole(tensor, sample, plan)
            if whole and tensor.shape[0] == sample.shape[0]:
                return tensor
            shape = tuple(tensor.shape)
            if whole is False:  # this rank's band: described by the whole map's shape, alike on
                # every rank whether or not the bands are of equal height
                rows = sum(plan.layout.sizes(shape[2], plan.band_index))
                shape = shape[:2] + (rows,) + shape[3:]
            return ("local", shape, str(tensor.dtype))

        return {
            name: map_tensors(value, shape_of_band) if name in self.spatial_arguments else value
            for name, value in arguments.items()
        }

    def _generation_comm(self, plan: BandPlan):
        """The comm this generation's modules exchange through: this rank's patch group's, or,
        alone, a one-rank loopback (every exchange is this rank's own data)."""
        if not self.alone:
            return self.patch_comms[plan.split_batch]
        if self._alone_comm is None:
            from distripy.runtime import LoopbackComm

            self._alone_comm = LoopbackComm(0, 1)
        return self._alone_comm

    def _start_generation(self, sample, arguments, plan: BandPlan, signature: Tuple) -> None:
        problem, state = None, None
        try:
            if self.refresh_modules is not None:
                state = self.refresh_modules()
        except DistripyError as error:  # e.g. a layer loaded since that cannot run on bands
            problem = (type(error), str(error))
        if state != self._model_state and self.graphs is not None:
            self.graphs.release()  # captured before an adapter was loaded, switched or fused
        self._model_state = state
        problem = problem or self._input_problem(sample, arguments, plan)
        # Every argument's digest (the latent, the timestep, the prompt embeddings, the added and
        # ControlNet conditions, LoRA scales in cross_attention_kwargs...) and the patch modules
        # in the model (a LoRA loaded on one rank only): ranks given different inputs raise here
        # instead of stitching a wrong image. One copy to the host per generation.
        description = None
        if self.alone:  # nothing to agree on: this rank's request is its own
            if problem is not None:
                raise problem[0](problem[1])
        elif problem is None:
            config = self.context.config
            description = dict(
                digest_arguments(self._agreed_part(arguments, plan)),
                layout=signature,
                modules=state,
                settings=(config.mode, config.warmup_steps, self.steps),
            )
        if not self.alone:
            agree(self.world_comm, description, problem)
        self.context.start_generation(
            self._generation_comm(plan),
            plan.band_index,
            plan.band_count,
            shape_key=signature,
            steps=self.steps,
            layout=plan.layout,
        )
        self._signature = signature

    # -- one step --------------------------------------------------------------------------------

    def _localize(self, arguments: Dict[str, Any], plan: BandPlan) -> Dict[str, Any]:
        """This rank's share of every argument: its batch half, then its band of rows of the spatial
        conditioning. The latent stays whole: ``_forward_band`` cuts it."""
        local = dict(arguments)
        if plan.cut_batch:
            batch = arguments["sample"].shape[0]
            local = _map_arguments(local, lambda t: take_batch_half(t, batch, plan.batch_index))

        sample = arguments["sample"]

        def band_of_whole(tensor: torch.Tensor) -> torch.Tensor:
            # A patch-parallel ControlNet's residuals are this rank's band already.
            if _residual_is_whole(tensor, sample, plan):
                return take_band(tensor, plan.layout, plan.band_index)
            return tensor

        for name in self.spatial_arguments:
            if local.get(name) is not None:
                local[name] = _map_arguments(local[name], band_of_whole)
        return local

    def _forward_band(self, local: Dict[str, Any]) -> torch.Tensor:
        """The model's own forward on this rank's band of the latent. Every rank holds the whole
        latent, so the band is cut through the context: ``conv_in`` reads its halo rows from it."""
        local = dict(local, sample=self.context.cut_band(local["sample"]))
        return self.original_forward(**local, return_dict=False)[0]

    def _run_local(self, local: Dict[str, Any]) -> torch.Tensor:
        """The model's own forward on this rank's share: eagerly or compiled, and either directly
        or as a CUDA graph (which captures and replays whichever it is given)."""
        forward = self._band_forward()
        if self.graphs is None:
            return forward(local)
        return self.graphs.run(forward, local)

    def _band_forward(self) -> Callable[[Dict[str, Any]], Any]:
        """``_forward_band``, or with ``DistriConfig.compile`` its ``torch.compile``d version, made
        once per model at its first step (inductor then compiles at the first call of each input
        shape and step kind, synchronous or asynchronous; replays of a captured step call nothing).

        Inductor's default mode: ``reduce-overhead`` would record CUDA graphs of its own inside
        ``StepGraphs``' capture. Static shapes: a new input shape compiles anew, as it is captured
        anew, instead of a dynamic-shape version of the step. Only the band's forward is compiled:
        ``_begin`` and ``_finish`` (generations, digests, the output gather) stay eager, and the
        step breaks only at the checkpoints (``PatchContext.checkpoint``), where transfers leave.
        Under an enclosing ``torch.compile(unet)`` the plain forward: that trace compiles it."""
        if not self.context.config.compile or torch.compiler.is_compiling():
            return self._forward_band
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self._forward_band, mode=None, dynamic=False)
        return self._run_compiled

    def _run_compiled(self, local: Dict[str, Any]) -> Any:
        """The compiled band forward on ``local``, arranged so that a step compiles only when its
        kind is new. A timestep given as a number becomes the tensor the model would make of it
        (int64 or float64): a number is a constant of the trace, and each step would compile
        anew. As a CUDA graph (``StepGraphs``): an eager step first completes the transfers in
        flight, as a capture does, so that both meet the same state (no ``Work`` handles) and the
        capture finds the eager step's compiled code. Inside a capture nothing compiles: inductor
        autotunes a new kernel by timing it, which synchronises the capturing stream. Nor does a
        region fall back to its eager code there: some modules take other paths under a trace
        (``torch.compiler.is_compiling()``), and a step may not mix the two."""
        timestep = local.get("timestep")
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            local = dict(local, timestep=torch.tensor(timestep, dtype=dtype, device=local["sample"].device))
        if self.graphs is None:
            return self._compiled_forward(local)
        if not self.context.capturing:
            self.context.complete_in_flight()
            return self._compiled_forward(local)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._compiled_forward(local)
        except RuntimeError as error:
            if "fail_on_recompile" not in str(error):
                raise
            from distripy.errors import StepError

            raise StepError(
                f"step {self.context.step}: the compiled {self.model_name} step captured as a CUDA "
                "graph needs code that its eager steps did not compile (a guard below failed), and "
                "nothing may compile inside a capture; run with DistriConfig(compile=False) or "
                "use_cuda_graph=False"
            ) from error

    # Under torch.compile (``torch.compile(unet)``) the host-side logic runs eagerly (generations,
    # digests, the timestep read, the output gather: ``_begin`` and ``_finish``, never traced) and
    # the band's forward between them (``_run_local``) is compiled, breaking at each checkpoint.
    @functools.partial(torch.compiler.disable, recursive=False)
    def __call__(self, *args, **kwargs):
        arguments, plan, return_dict = self._begin(args, kwargs)
        completed = False
        band = None
        try:
            band = self._run_local(self._localize(arguments, plan))
            completed = True
        finally:
            prediction = self._finish(band, plan, completed)
        return self._output(prediction, return_dict)

    def _output(self, prediction: torch.Tensor, return_dict: bool):
        """What the model's forward returns."""
        if not return_dict:
            return (prediction,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=prediction)

    @torch.compiler.disable
    def _begin(self, args, kwargs) -> Tuple[Dict[str, Any], BandPlan, bool]:
        """Bind the call's arguments, plan the split, recognise a new generation (and check the
        ranks agree on its input), and open the step."""
        arguments = self._bind(args, kwargs)
        sample = arguments["sample"]
        return_dict = arguments.pop("return_dict", True)
        plan = (
            self._plan(sample, arguments)
            if isinstance(sample, torch.Tensor) and sample.dim() == 4 and not self.alone
            else BandPlan(0, 1, False)
        )
        signature = (
            tuple(sample.shape) if isinstance(sample, torch.Tensor) else None,
            str(getattr(sample, "dtype", None)),
            str(getattr(sample, "device", None)),
            plan.key(),
            self.alone,
        )
        same_signature = signature == self._signature
        # Whether this step belongs to a generation begun by reset(): one asked for now, or the
        # current one if it goes on. (A new signature without a reset begins an undeclared one,
        # whose first step reads the timestep if nothing else tells.)
        if self._reset_requested:
            declared = self._reset_declared
        else:
            declared = self._declared and same_signature
        # Every detector runs every step, so that each remembers this step for the next.
        starts = self._timestep_starts_generation(arguments["timestep"], declared)
        changed = self._conditioning_changed(arguments)
        new_generation = self._reset_requested or not same_signature or starts
        if new_generation:
            self._signature = None
            self._start_generation(sample, arguments, plan, signature)
            self._declared = declared and self._reset_requested
            self._reset_requested = self._reset_declared = False
        elif self.context.config.check_every_step and not self.alone:
            step_input = {"sample": sample, "timestep": arguments["timestep"]}
            agree(self.world_comm, digest_arguments(step_input), None, what="step input")
        self.context.begin_step(refresh_conditioning=new_generation or changed)
        return arguments, plan, return_dict

    def _bind(self, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The call's arguments by name, in the forward's parameter order: what
        ``inspect.Signature.bind`` gives, which checks a layout of positional and keyword
        arguments the first time it is met; later calls of that layout are placed from it."""
        layout = (len(args), tuple(kwargs))
        if self._binders is None:
            self._binders = {}
        places = self._binders.get(layout)
        if places is None:
            arguments = self.__signature__.bind(*args, **kwargs).arguments
            parameters = self.__signature__.parameters
            variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            if any(parameters[name].kind in variadic for name in arguments):
                return arguments  # the forward's *args or **kwargs are used: bound every time
            positions = {name: index for index, name in enumerate(list(arguments)[: len(args)])}
            self._binders[layout] = tuple((name, positions.get(name)) for name in arguments)
            return arguments
        return {name: kwargs[name] if index is None else args[index] for name, index in places}

    @torch.compiler.disable
    def _finish(
        self, band: Optional[torch.Tensor], plan: BandPlan, completed: bool
    ) -> Optional[torch.Tensor]:
        """Close the step (send what is still queued) and gather the whole prediction."""
        self.context.end_step(issue_pending=completed)
        if not completed:
            # Some modules consumed their stale buffers and issued nothing for the next step:
            # the next call starts a new generation (not one declared by a reset).
            self._reset_requested = True
            self._reset_declared = False
            return None
        return self._assemble(band, plan)

    def _assemble(self, band, plan: BandPlan):
        """The whole output, on every rank, from this rank's band of it."""
        if self.alone:
            return band  # the whole latent was this rank's one band
        return gather_bands(self.world_comm, band, plan.layout, plan.halves)
