"""The UNet forward wrapper: bands in, the whole prediction out.

Each call is one denoising step. The wrapper

1. decides the split: with ``split_batch``, an even batch and an even number of ranks, the first
   half of the ranks takes the first half of the batch (classifier-free guidance's unconditional
   half) and the second half the rest; otherwise all ranks share the whole batch;
2. learns from its ``GenerationTracker`` whether the step begins a generation (the one the caller
   declared, or one recognised on the host) and whether its conditioning may have changed
   (``PatchContext.refresh_conditioning``: cross-attention keys and values are then computed
   again). At a generation's first step it checks its input (``band_inputs``) and, unless one round
   above already did (``Generation.agreed``) or the rank runs alone, that every rank was given the
   same input (a digest of every argument, ``parallel.digest``); a problem on any rank raises on
   every rank. With ``DistriConfig.check_every_step`` every step's latent and timestep are
   compared too;
3. cuts the latent and the spatial conditioning (ControlNet residuals) into this rank's band
   (the latent through ``PatchContext.cut_band``: every rank holds it whole, so the first
   convolution's halos are read from it, exact at every step), runs the model's own forward on
   it (eagerly, compiled, or as a CUDA graph), sends the transfers still collected, and
   all-gathers the output bands so that every rank returns the full noise prediction.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from distripy.errors import StepError
from distripy.geometry import BandGeometry
from distripy.parallel.agreement import agree
from distripy.parallel.band_inputs import agreed_part, input_problem, localize
from distripy.parallel.bands import BandPlan, gather_bands
from distripy.parallel.compiled import CompiledBandForward
from distripy.parallel.context import PatchContext
from distripy.parallel.digest import digest_arguments
from distripy.parallel.generation import Generation, GenerationTracker, LoadedState
from distripy.parallel.policy import ModeChoice, check_steps, choose_mode
from distripy.parallel.compress_choice import chosen_codec
from distripy.parallel.split import wants_split
from distripy.runtime.factory import alone_comm

__all__ = ["PatchUNetForward"]

# UNet2DConditionModel.forward arguments that hold per-resolution spatial maps, cut into bands.
_SPATIAL_ARGUMENTS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


class PatchUNetForward:
    """Replaces ``unet.forward``; the model's own forward runs inside on the band."""

    spatial_arguments = _SPATIAL_ARGUMENTS  # the forward's arguments cut into bands
    per_step_arguments: Tuple[str, ...] = ()  # arguments that change every step but are no conditioning
    model_name = "UNet"  # in messages

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
        self.geometry = BandGeometry(levels)
        self.tracker = GenerationTracker(self.model_name)
        self._parameter = next(unet.parameters())
        self.graphs = None  # a StepGraphs with use_cuda_graph
        self._compiled: Optional[CompiledBandForward] = None  # with DistriConfig.compile
        self._alone_comm = None
        self._binders: Dict[Tuple, Tuple] = {}  # call layout -> where each argument comes from
        self._plans: Dict[Tuple, BandPlan] = {}  # (rank, world size, split, units) -> BandPlan
        # A digest of the model's patch modules and adapters, given with each declared generation
        # by whoever took in what was loaded into the model since (``pipelines``); the ranks
        # compare it, and a CUDA graph captured before it changed must not replay.
        self.model_state: Optional[str] = None
        self._declared_problem: Optional[Tuple[type, str]] = None
        self.loaded: Optional[LoadedState] = None  # what the model had taken in (``pipelines``)
        self._choice: Optional[Tuple[Tuple, ModeChoice, Dict[Tuple, bool]]] = None

    # -- generations -----------------------------------------------------------------------------

    @property
    def generation(self) -> Generation:
        """The generation in force (or declared for the next call)."""
        return self.tracker.generation

    @property
    def steps(self) -> Optional[int]:
        """The generation's number of steps, when declared (what ``mode="auto"`` decides by)."""
        return self.generation.steps

    @property
    def alone(self) -> bool:
        """Whether this rank runs its generations by itself (``distripy.alone``)."""
        return self.generation.alone

    def declare(
        self, generation: Generation, model_state: Optional[str] = None, problem: Optional[Tuple[type, str]] = None
    ) -> None:
        """End the current generation (wait for its last transfers, forget its stale buffers) and
        begin ``generation`` at the next call. ``model_state``: the model's digest after taking in
        what was loaded since, when it was refreshed (None: unchanged); ``problem``: what was wrong
        with that, raised (on every rank) by the generation's first step."""
        self.context.drain()
        self._declared_problem = problem
        if model_state is not None and model_state != self.model_state:
            if self.graphs is not None:
                self.graphs.release()  # captured before an adapter was loaded, switched or fused
            self.model_state = model_state
        self.tracker.declare(generation)

    def reset(self, steps: Optional[int] = None) -> None:
        """End the current generation; the next call begins one of ``steps`` steps (None: unknown),
        with this rank's other settings (``alone``, the machine) kept, checked across ranks."""
        self.declare(dataclasses.replace(self.generation, steps=check_steps(steps), agreed=False, declared=True))

    def _mode_choice(self) -> Tuple[ModeChoice, Dict[Tuple, bool]]:
        """The mode the generation in force runs (``choose_mode``, once per generation and
        configuration) and its split decisions made so far, by latent size."""
        key = (self.generation, self.context.config)
        if self._choice is None or self._choice[0] != key:
            self._choice = (key, choose_mode(self.context.config, self.generation.steps), {})
        return self._choice[1], self._choice[2]

    def _split_wanted(self, sample: torch.Tensor) -> bool:
        """``DistriConfig.split_batch``, or with ``"auto"`` the choice for this size on the
        generation's machine (``parallel.split``), made once per generation and size: for steps
        run as CUDA graphs whether or not they are (a ControlNet runs eagerly beside a graphed
        UNet, and both must split alike)."""
        config = self.context.config
        if config.split_batch != "auto":
            return bool(config.split_batch)
        choice, decided = self._mode_choice()
        shape = tuple(sample.shape[2:])
        if shape not in decided:
            world, machine = self.world_comm.world_size, self.generation.machine
            decided[shape] = wants_split(config, shape, world, self.levels, self.steps, True, machine, choice)
        return decided[shape]

    def _units(self, sample: torch.Tensor) -> Optional[int]:
        """Rows at the deepest level, what bands are counted in (None: not whole rows)."""
        return self.geometry.deepest_rows(sample.shape[2])

    def _plan(self, sample: torch.Tensor, arguments: Dict[str, Any]) -> BandPlan:
        world = self.world_comm.world_size
        split = world % 2 == 0 and sample.shape[0] % 2 == 0 and self._split_wanted(sample)
        key = (self.world_comm.rank, world, split, self._units(sample))
        plan = self._plans.get(key)  # made once per split and height, not every step
        if plan is None:
            plan = self._plans[key] = BandPlan(*key[:3], units=key[3])
        return plan

    def _input_problem(self, sample, arguments: Dict[str, Any], plan: BandPlan) -> Optional[Tuple[type, str]]:
        """What is wrong with this rank's input, if anything, as (exception type, message)."""
        return input_problem(
            sample,
            arguments,
            plan,
            parameter=self._parameter,
            geometry=self.geometry,
            spatial_arguments=self.spatial_arguments,
            graphs=self.graphs is not None,
            model_name=self.model_name,
        )

    def _generation_comm(self, plan: BandPlan):
        """The comm this generation's modules exchange through: this rank's patch group's, or,
        alone, a one-rank loopback (every exchange is this rank's own data)."""
        if not self.alone:
            return self.patch_comms[plan.split_batch]
        if self._alone_comm is None:
            self._alone_comm = alone_comm(self.context.config.timeout_s)
        return self._alone_comm

    def _start_generation(self, sample, arguments, plan: BandPlan, signature: Tuple, generation: Generation) -> None:
        """Check the input, with every rank unless that was done above, and open the generation."""
        problem, self._declared_problem = self._declared_problem, None
        if problem is None and not generation.declared and self.loaded is not None and self.loaded.changed():
            problem = (
                StepError,
                f"adapters or attention processors were loaded into the {self.model_name} since its "
                "last declared generation, and a generation nobody declared cannot take them in: "
                "call distripy.reset(model, steps=n) before it (or use `with distripy.generation(...)`, "
                "or a parallelised pipeline)",
            )
        problem = problem or self._input_problem(sample, arguments, plan)
        if generation.alone or generation.agreed:
            # alone: this rank's request is its own; agreed: every rank was given the same call,
            # so every rank finds the same problem here and raises it by itself
            if problem is not None:
                raise problem[0](problem[1])
        else:
            # Every argument's digest (the latent, the timestep, the prompt embeddings, the added
            # and ControlNet conditions, LoRA scales in cross_attention_kwargs...) and the patch
            # modules in the model: ranks given different inputs raise here instead of stitching a
            # wrong image. One round per generation.
            description = None
            if problem is None:
                config = self.context.config
                description = dict(
                    digest_arguments(agreed_part(arguments, plan, self.spatial_arguments)),
                    layout=signature,
                    modules=self.model_state,
                    settings=(config.mode, config.warmup_steps, config.compress, generation.steps),
                )
            agree(self.world_comm, description, problem)
        choice = self._mode_choice()[0]
        self.context.start_generation(
            self._generation_comm(plan),
            plan.band_index,
            plan.band_count,
            shape_key=signature,
            steps=generation.steps,
            layout=plan.layout,
            choice=choice,
            compress=chosen_codec(
                self.context.config, tuple(sample.shape[2:]), self.world_comm.world_size, plan.split_batch,
                plan.band_count, generation.steps, self.graphs is not None, generation.machine, choice,
            ),
            device=sample.device,
        )  # fmt: skip

    # -- one step --------------------------------------------------------------------------------

    def _forward_band(self, local: Dict[str, Any]) -> torch.Tensor:
        """The model's own forward on this rank's band of the latent. Every rank holds the whole
        latent, so the band is cut through the context: ``conv_in`` reads its halo rows from it."""
        local = dict(local, sample=self.context.cut_band(local["sample"]))
        return self.original_forward(**local, return_dict=False)[0]

    def _band_forward(self) -> Callable[[Dict[str, Any]], Any]:
        """``_forward_band``, or with ``DistriConfig.compile`` its compiled version (``compiled``).
        Under an enclosing ``torch.compile(unet)`` the plain forward: that trace compiles it."""
        if not self.context.config.compile or torch.compiler.is_compiling():
            return self._forward_band
        if self._compiled is None:
            self._compiled = CompiledBandForward(self._forward_band, self.context, self.graphs, self.model_name)
        return self._compiled

    def _run_local(self, local: Dict[str, Any]) -> torch.Tensor:
        """The model's own forward on this rank's share: eagerly or compiled, and either directly
        or as a CUDA graph (which captures and replays whichever it is given)."""
        forward = self._band_forward()
        if self.graphs is None:
            return forward(local)
        return self.graphs.run(forward, local)

    # Under torch.compile (``torch.compile(unet)``) the host-side logic runs eagerly (generations,
    # digests, the output gather: ``_begin`` and ``_finish``, never traced) and the band's forward
    # between them (``_run_local``) is compiled, breaking at each checkpoint.
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

    def _localize(self, arguments: Dict[str, Any], plan: BandPlan) -> Dict[str, Any]:
        """This rank's share of the call's arguments (``band_inputs.localize``)."""
        return localize(arguments, plan, self.spatial_arguments)

    def _output(self, prediction: torch.Tensor, return_dict: bool):
        """What the model's forward returns."""
        if not return_dict:
            return (prediction,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=prediction)

    @torch.compiler.disable
    def _begin(self, args, kwargs) -> Tuple[Dict[str, Any], BandPlan, bool]:
        """Bind the call's arguments, plan the split, learn whether a generation begins (and check
        its input), and open the step."""
        arguments = self._bind(args, kwargs)
        sample = arguments["sample"]
        return_dict = arguments.pop("return_dict", True)
        alone = self.alone
        plan = (
            self._plan(sample, arguments)
            if isinstance(sample, torch.Tensor) and sample.dim() == 4 and not alone
            else BandPlan(0, 1, False)
        )
        signature = (
            tuple(sample.shape) if isinstance(sample, torch.Tensor) else None,
            str(getattr(sample, "dtype", None)),
            str(getattr(sample, "device", None)),
            plan.key(),
            alone,
        )
        skipped = ("sample", "timestep") + tuple(self.spatial_arguments) + tuple(self.per_step_arguments)
        start = self.tracker.begin_step(
            arguments["timestep"], signature, self.tracker.conditioning_of(arguments, skipped)
        )
        if start.new_generation:
            try:
                self._start_generation(sample, arguments, plan, signature, start.generation)
            except BaseException:
                self.tracker.fail()
                raise
        elif self.context.config.check_every_step and not alone:
            step_input = {"sample": sample, "timestep": arguments["timestep"]}
            agree(self.world_comm, digest_arguments(step_input), None, what="step input")
        self.context.begin_step(refresh_conditioning=start.refresh_conditioning)
        return arguments, plan, return_dict

    def _bind(self, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The call's arguments by name, in the forward's parameter order: what
        ``inspect.Signature.bind`` gives, which checks a layout of positional and keyword
        arguments the first time it is met; later calls of that layout are placed from it."""
        layout = (len(args), tuple(kwargs))
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
            # the next call starts a new generation (not one declared by the caller).
            self.tracker.fail()
            return None
        return self._assemble(band, plan)

    def check_nonfinite(self) -> None:
        """At the end of a generation (every rank together: the parallelised pipeline's call, or
        ``distripy.generation``'s block, having returned): raise, on every rank, if an exchange codec
        found non-finite keys or values in it on any rank. One small all-reduce (its wait bounded
        by ``timeout_s``) and one host read per generation whose keys and values were compressed."""
        count = self.context.nonfinite_count()
        if count is None or count.is_meta or self.context.compress == "none":  # the ranks agree on it
            return
        total = count.clone()
        count.zero_()  # checked: a later check without a compressed step finds nothing
        if not self.alone:
            self.world_comm.all_reduce(total).synchronize(self.context.config.timeout_s)
        rows = int(total)
        if rows:
            raise StepError(
                f"{self.model_name}: {rows} rows of self-attention keys and values were non-finite (inf "
                f"or nan) when compressed (compress={self.context.compress!r}) in this generation: the "
                "ranks kept them out of what they hold, but the model made non-finite activations and "
                "its output is not to be trusted"
            )

    def _assemble(self, band, plan: BandPlan):
        """The whole output, on every rank, from this rank's band of it."""
        if self.alone:
            return band  # the whole latent was this rank's one band
        return gather_bands(self.world_comm, band, plan.layout, plan.halves)
