"""``PatchContext``: what every patch-parallel module of one model asks before it computes.

One context per parallelised model. It knows the current generation's band geometry (which band
this rank holds, of how many, and the ``Comm`` of the ranks sharing the image) and the step within
the generation, and gives each module what it needs from the jobs it delegates:

* what this step exchanges (``step_policy``): fresh and synchronous, stale (issued now, consumed
  next step), or absent (``ActivationExchange``, ``StatisticsExchange``);
* when transfers leave (``transfers.TransferQueue``): an asynchronous step's at each checkpoint;
* the buffers kept for the next step (``buffers.BufferPool``: persistent ones under CUDA graphs);
* inputs every rank holds whole (``whole_inputs``): the first convolution's exact halos.

What a module keeps for the next step is an ``Exchange`` (the transfers' ``Work`` handles and the
buffers they fill), held by its ``PatchState``.
"""

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch

from distripy.config import KERNEL_BACKENDS, DistriConfig
from distripy.errors import ConfigError, InputError, StepError
from distripy.parallel import step_policy
from distripy.parallel.bands import BandLayout
from distripy.parallel.buffers import BufferPool
from distripy.parallel.policy import ModeChoice, choose_mode
from distripy.parallel.step_policy import ActivationExchange, StatisticsExchange
from distripy.parallel.transfers import TransferQueue
from distripy.parallel.whole_inputs import WholeInput, WholeInputs

__all__ = ["ActivationExchange", "Exchange", "PatchContext", "PatchState", "StatisticsExchange", "WholeInput"]


@dataclass(frozen=True)
class Exchange:
    """What one module's exchange of a step leaves for the next step: the ``Work`` handles of the
    transfers and the buffers they fill, in the module's own order.

    A synchronous step keeps its handles too, already waited for (waiting again is free): the next
    step then meets the same structure after a synchronous step as after an asynchronous one, and a
    compiled stale step is traced once, not once more for the first stale step of a generation.
    Handles a CUDA graph captured are dropped after it (``completed``)."""

    works: Tuple = ()
    buffers: Tuple[Optional[torch.Tensor], ...] = ()

    def completed(self) -> "Exchange":
        """The same buffers, with no transfer left to wait for."""
        return Exchange((), self.buffers)


class PatchState:
    """Base of everything that keeps one step's exchange for the next step of a generation."""

    patch_context: "PatchContext"
    patch_path: str
    exchange: Optional[Exchange] = None

    @property
    def attached(self) -> bool:
        """Whether it belongs to a context (a module made by its class's plain constructor, as
        PEFT makes a LoRA's ``lora_A`` of its base layer's class, does not yet)."""
        return getattr(self, "patch_context", None) is not None

    def attach(self, context: "PatchContext", path: str) -> None:
        self.patch_context = context
        self.patch_path = path
        self.exchange = None
        context.register(self)

    def keep_exchange(self, works: Sequence, *buffers: Optional[torch.Tensor]) -> None:
        """Keep this step's exchange: ``buffers``, filled by ``works``, for the next step."""
        self.exchange = Exchange(tuple(works), buffers)

    def reset_state(self) -> None:
        """Forget the stale buffers (after ``in_flight`` has been waited for)."""
        self.exchange = None

    def in_flight(self) -> Sequence:
        """The ``Work`` handles of transfers issued for the next step."""
        return () if self.exchange is None else self.exchange.works

    def take_stale(self) -> Tuple[Optional[torch.Tensor], ...]:
        """The buffers the previous step's transfers filled, once they are complete."""
        if self.exchange is None:
            ctx = self.patch_context
            raise StepError(
                f"{self.patch_path}: step {ctx.step} of generation {ctx.generation} wants the previous "
                "step's exchange, but none was made (the module did not run in the previous step)"
            )
        for work in self.exchange.works:
            work.wait()
        return self.exchange.buffers


class PatchContext:
    def __init__(self, config: DistriConfig, kernel_backend: Optional[str] = None) -> None:
        """``kernel_backend``: the kernels' backend, ``config.kernel_backend`` unless given."""
        kernel_backend = config.kernel_backend if kernel_backend is None else kernel_backend
        if kernel_backend not in KERNEL_BACKENDS:
            raise ConfigError(f"kernel_backend {kernel_backend!r} is not one of {KERNEL_BACKENDS}")
        self.config = config
        self.kernel_backend = kernel_backend
        self.choice: ModeChoice = choose_mode(config, None)  # the current generation's
        self.comm = None
        self.band_index = 0
        self.band_count = 1
        self.layout = BandLayout((1,))
        self.generation = 0
        self.step = -1
        self.active = False
        self._synchronous = True
        self._compressed = False
        self._states: List[PatchState] = []
        self._seen: dict = {}
        self.shape_key: Hashable = None  # the current generation's input signature
        self.buffers = BufferPool()
        self.transfers = TransferQueue()
        self.whole_inputs = WholeInputs()  # this step's bands of inputs held whole
        # Whether this step's conditioning (the prompt embeddings and what else the step is given
        # besides the latent and the timestep) may differ from the previous step's: the values
        # computed from it alone (cross-attention keys and values) are then computed again.
        self.refresh_conditioning = True
        self.parity = 0  # the current step's parity (``begin_step``)
        # How this generation's asynchronous steps send keys and values (``parallel.compression``):
        # the configured codec, or what ``compress="auto"`` chose for it (``start_generation``).
        self.compress = "none" if config.compress == "auto" else config.compress
        # Rows the exchange codecs found non-finite in this generation, counted on the device
        # (``count_nonfinite``); made at the start of the first compressed generation (or at the
        # first count), and zeroed in place at each generation's start so that captured graphs
        # and compiled steps keep adding into the same tensor.
        self._nonfinite: Optional[torch.Tensor] = None

    @property
    def kernel_backend(self) -> str:
        """The backend of the patch layer's kernels (GroupNorm, halo convolution, attention merge):
        the one configured, except ``"torch"`` while torch.compile traces a step. The references
        are plain torch ops that inductor fuses with their neighbours; the Triton kernels are
        opaque custom ops to it. Decided here, once, for every module."""
        if torch.compiler.is_compiling():
            return "torch"
        return self._kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, backend: str) -> None:
        self._kernel_backend = backend

    @property
    def static_buffers(self) -> bool:
        """Buffers kept for the next step are persistent (CUDA graphs)."""
        return self.buffers.static

    @static_buffers.setter
    def static_buffers(self, static: bool) -> None:
        self.buffers.static = static

    @property
    def capturing(self) -> bool:
        """A CUDA-graph capture is running: no new persistent buffer may appear."""
        return self.buffers.capturing

    @capturing.setter
    def capturing(self, capturing: bool) -> None:
        self.buffers.capturing = capturing

    # -- lifecycle -------------------------------------------------------------------------------

    def register(self, state: PatchState) -> None:
        self._states.append(state)

    def retain(self, states: Iterable[PatchState]) -> None:
        """Forget every registered module that is not in ``states``: it has left the model (the
        layers of an unloaded LoRA, a replaced attention processor). Between generations only."""
        live = {id(state) for state in states}
        self._states = [state for state in self._states if id(state) in live]

    @property
    def states(self) -> List[PatchState]:
        """Every module of this model that keeps an exchange for the next step."""
        return list(self._states)

    def in_flight(self) -> List:
        """The ``Work`` handles of every transfer issued for a next step."""
        return [work for state in self._states for work in state.in_flight()]

    def drain(self) -> None:
        """Wait (on the host, bounded by the timeout) for the transfers the last step issued for a
        next step, and forget every stale buffer. After this no transfer of this model is in flight,
        so its process group may be torn down. After a failed transfer (a ``broken`` comm) it does
        not wait: the peers may be gone, and the first failure is the error to report."""
        self.transfers.clear()
        if self.comm is None or not self.comm.broken:
            for work in self.in_flight():
                work.synchronize(self.config.timeout_s)
        for state in self._states:
            state.reset_state()

    def start_generation(
        self,
        comm,
        band_index: int,
        band_count: int,
        shape_key: Hashable = None,
        steps: Optional[int] = None,
        layout: Optional[BandLayout] = None,
        choice: Optional[ModeChoice] = None,
        compress: Optional[str] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        """Forget every stale buffer: the next step is the first of a new generation. ``shape_key``
        names the generation's input signature (it selects the persistent buffers); ``steps``, its
        number of denoising steps when known, picks the mode and warm-up of ``mode="auto"``;
        ``layout``, how the rows are cut into the ``band_count`` bands (equal bands if not given);
        ``choice``: the mode the generation runs, when its wrapper chose it already; ``compress``:
        the codec of its asynchronous steps' keys and values (``config.compress``'s unless given;
        ``"auto"`` without one compresses nothing); ``device``: where its steps run (the count of
        non-finite rows a codec finds is made there, before any step is traced or captured)."""
        if not 0 <= band_index < band_count:
            raise InputError(f"band_index {band_index} is outside [0, {band_count})")
        layout = BandLayout((1,) * band_count) if layout is None else layout
        if layout.count != band_count:
            raise InputError(f"a layout of {layout.count} bands for {band_count} bands")
        choice = choose_mode(self.config, steps) if choice is None else choice
        self.drain()
        self.choice = choice
        if compress is None:
            compress = "none" if self.config.compress == "auto" else self.config.compress
        self.compress = compress
        if self._nonfinite is not None:
            self._nonfinite.zero_()
        elif compress != "none" and device is not None:
            self._nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.comm = comm
        self.band_index = band_index
        self.band_count = band_count
        self.layout = layout
        self.shape_key = shape_key
        self.generation += 1
        self.step = -1
        self._seen.clear()

    def begin_step(self, refresh_conditioning: bool = True) -> None:
        """Open the next step. ``refresh_conditioning``: whether the step's conditioning may have
        changed since the previous step (always at a generation's first step); when it has not,
        what was computed from it alone is reused (CUDA graphs read it from persistent buffers)."""
        self.step += 1
        # Which set of persistent buffers this step writes: stored, not computed from the step
        # where a buffer is asked for, so that torch.compile guards on the parity, not the step.
        self.parity = self.step % 2
        self.refresh_conditioning = bool(refresh_conditioning) or self.step == 0
        self._seen.clear()
        self.active = True
        # Read by every module: a stored bool, not a comparison with the step number, so that
        # torch.compile specialises a step on sync vs async only (not on each step's number).
        self._synchronous = step_policy.synchronous(self.mode, self.choice.warmup_steps, self.step)
        self._compressed = self.compress != "none" and step_policy.compressed(
            self.mode, self.choice.warmup_steps, self.step
        )

    def end_step(self, issue_pending: bool) -> None:
        """Close the step: send the transfers still queued (or drop them after an error)."""
        self.active = False
        self.whole_inputs.clear()
        if issue_pending:
            self.checkpoint()
        else:
            self.transfers.clear()

    # -- CUDA-graph steps: the exchanges as plain data -------------------------------------------

    def complete_in_flight(self) -> None:
        """Wait on the host for every transfer issued for the next step and keep its buffers without
        the handles (a ``Work`` of a transfer issued outside a CUDA graph cannot be waited for
        inside one)."""
        for work in self.in_flight():
            work.synchronize(self.config.timeout_s)
        self.restore_exchanges(self.exchanges())

    def exchanges(self) -> List[Tuple[PatchState, Optional[Exchange]]]:
        """Every module's exchange for the next step, without its handles: what a replayed graph
        leaves behind (its transfers are joined into the step's stream before it ends)."""
        return [(s, None if s.exchange is None else s.exchange.completed()) for s in self._states]

    def restore_exchanges(self, exchanges: Iterable[Tuple[PatchState, Optional[Exchange]]]) -> None:
        """Set the modules' exchanges to what ``exchanges`` recorded."""
        for state, exchange in exchanges:
            state.exchange = exchange

    # -- buffers kept for the next step ----------------------------------------------------------

    def new_buffer(
        self,
        owner: PatchState,
        name: str,
        shape,
        like: torch.Tensor,
        per_parity: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """An uninitialised tensor (``like``'s device, ``dtype`` or ``like``'s) that ``owner`` keeps
        for the next step: fresh, or with ``static_buffers`` this step parity's persistent one
        (``per_parity`` false: one persistent tensor for every step of the input signature, per
        shape and dtype, for what stays the same across steps)."""
        return self.buffers.new(
            owner.patch_path, name, shape, like, self.shape_key, self.parity, per_parity=per_parity, dtype=dtype
        )

    def keep(self, owner: PatchState, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself, or with ``static_buffers`` a copy in this step parity's persistent one."""
        if not self.static_buffers:
            return tensor
        return self.new_buffer(owner, name, tensor.shape, tensor).copy_(tensor)

    def release_static(self, shape_key: Hashable) -> None:
        """Forget the persistent buffers of one input signature (its graphs are gone)."""
        self.buffers.release(shape_key)

    # -- what this step does ---------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The current generation's mode (``DistriConfig.mode``, or what ``"auto"`` chose)."""
        return self.choice.mode

    @property
    def warmup_steps(self) -> int:
        """The current generation's synchronous steps at its start."""
        return self.choice.warmup_steps

    @property
    def synchronous_step(self) -> bool:
        """Fresh exchanges this step: ``full_sync``, ``exact``, or a warm-up step (the first step
        always is: there is nothing stale to use yet)."""
        return self._synchronous

    @property
    def compressed_step(self) -> bool:
        """This step sends the self-attention's keys and values under the generation's codec
        (``compress``): every step after the warm-up (``step_policy.compressed``)."""
        return self._compressed

    @property
    def activation_exchange(self) -> ActivationExchange:
        return step_policy.activation_exchange(self.mode, self._synchronous)

    @property
    def statistics_exchange(self) -> StatisticsExchange:
        return step_policy.statistics_exchange(self.mode, self._synchronous)

    @property
    def keeps_activations(self) -> bool:
        """Whether a synchronous step keeps its exchanged activations (``step_policy``)."""
        return step_policy.keeps_activations(self.mode)

    @property
    def keeps_statistics(self) -> bool:
        """Whether a synchronous step keeps its GroupNorm sums (``step_policy``)."""
        return step_policy.keeps_statistics(self.mode)

    @property
    def has_neighbours(self) -> bool:
        return self.active and self.band_count > 1

    def band_sizes(self, own: int) -> Tuple[int, ...]:
        """Every band's size (rows, tokens or elements of one resolution) where this band's is
        ``own``: equal unless the rows do not split evenly (``BandLayout``)."""
        return self.layout.sizes(own, self.band_index)

    def image_size(self, own: int) -> int:
        """The whole image's size (rows, tokens or elements of one resolution) where this band's is
        ``own``."""
        return sum(self.band_sizes(own))

    def enter(self, module: object, path: str) -> None:
        """Record that ``module`` runs in this step; a second call in the same step would consume
        its stale buffers twice, so it is refused. (Not checked inside torch.compile's trace: a
        compiled step is the eager step's code, which was checked when it first ran eagerly.)"""
        if torch.compiler.is_compiling():
            return
        key = id(module)
        if key in self._seen:
            raise StepError(
                f"{path} ran twice in one UNet call; patch-parallel modules keep one set of stale "
                "buffers per module and step, so a module may run only once per call"
            )
        self._seen[key] = path

    def kept_bytes(self) -> int:
        """The bytes the patch modules keep across steps for the current input signature: with
        ``static_buffers`` (CUDA graphs) its persistent buffers, otherwise the buffers of the
        exchanges they hold for the next step (``planning.memory.persistent_bytes`` predicts it)."""
        if self.static_buffers:
            return self.buffers.nbytes(self.shape_key)
        held = (t for state in self.states if state.exchange is not None for t in state.exchange.buffers)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # -- what the exchange codecs found -----------------------------------------------------------

    def count_nonfinite(self, rows: torch.Tensor) -> None:
        """Add ``rows``, a 0-d count on the device (``kernels.residual_codec.nonfinite_rows``), to the
        generation's non-finite rows: no host read."""
        if self._nonfinite is None:
            self._nonfinite = torch.zeros((), dtype=torch.int64, device=rows.device)
        self._nonfinite += rows

    def nonfinite_count(self) -> Optional[torch.Tensor]:
        """The generation's count of non-finite rows (``count_nonfinite``; None: nothing counted)."""
        return self._nonfinite

    # -- inputs every rank holds whole ------------------------------------------------------------

    def cut_band(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's band of ``whole``, a ``(B, C, H, W)`` tensor every rank of the image holds
        whole. For the rest of the step, a convolution whose input is exactly this band (the model's
        first convolution) reads its halo rows from ``whole``: no exchange, exact at every step."""
        start, stop = self.layout.rows(self.band_index, whole.shape[2])
        return self.whole_inputs.cut(whole, start, stop)

    def whole_input_of(self, x: torch.Tensor) -> Optional[WholeInput]:
        """The ``WholeInput`` whose band ``x`` is (the same tensor object), if any, in this step."""
        return self.whole_inputs.find(x)

    # -- transfers of asynchronous steps ---------------------------------------------------------

    def defer(self, issue: Callable[[], None]) -> None:
        """Queue a transfer for the next checkpoint (``transfers``)."""
        self.transfers.defer(issue)

    @torch.compiler.disable
    def checkpoint(self) -> None:
        """Issue the queued transfers as one group. Under torch.compile this is where the compiled
        step breaks: the transfers run eagerly, one break per checkpoint."""
        self.transfers.flush(self.comm)

    def add_checkpoints(self, blocks: Iterable[torch.nn.Module]) -> List:
        """Make the end of each block (during a step) a checkpoint: an asynchronous step's transfers
        leave as the blocks that queued them finish, while the next blocks compute. Returns the
        hooks' handles (``remove()`` takes them off)."""
        return TransferQueue.add_checkpoints(blocks, self.checkpoint, lambda: self.active)
