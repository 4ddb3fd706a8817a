"""One rank's denoising step as the scaling model sees it.

A ``StepProfile`` holds a step's compute time and, for every transfer the rank issues in it, its
kind (``halo``, ``kv``, ``gn_stats``, ``output``), its bytes, the ``group()`` launch it belongs
to, where in the step it is issued and where it is waited for (as fractions of the step's compute;
``waited_next``: in the next step, at that fraction). Profiles come from a ``LoopbackComm``'s
``TrafficLog``, with one of two clocks:

* measured (``bench/e2e.py`` on a GPU): CUDA events recorded at every issue and wait;
* estimated (``roofline_profiles``, no GPU needed): the step runs on the ``meta`` device -- shapes
  only -- through the kernels a GPU runs (distripy's ``torch.library`` ops, whose fake
  implementations give their shapes), and a roofline clock advances by max(FLOPs / peak, bytes
  moved / bandwidth) per operation, with published peaks of a GPU. The positions are then what a
  roofline predicts; the step's absolute time is replaced by a measured one wherever one is known.
"""

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("halo", "kv", "gn_stats", "output")

# Dense fp16/bf16 tensor-core peak and HBM bandwidth, from NVIDIA's datasheets (A100 SXM4 80GB;
# H100 SXM5), and the fraction of each a large kernel reaches (an assumption: typical of cuBLAS
# GEMMs and of bandwidth-bound elementwise kernels).
GPU_PEAKS = {
    "a100": {"flops": 312e12, "bandwidth": 2.039e12, "source": "NVIDIA A100 datasheet (SXM4 80GB)"},
    "h100": {"flops": 989e12, "bandwidth": 3.35e12, "source": "NVIDIA H100 datasheet (SXM5)"},
}
ACHIEVED_FLOPS = 0.6
ACHIEVED_BANDWIDTH = 0.8


def kind_of(op: str, shape: Sequence[int]) -> str:
    """The UNet's transfers by operation: halos are exchanged only by convolutions, all-reduces
    only carry GroupNorm sums, shifts carry one band's attention keys/values (``exact``), and
    all-gathers carry attention keys/values (one batch item's band, (L, 2C)) or, once per step,
    the output bands (B, C, H, W)."""
    if op == "halo_exchange":
        return "halo"
    if op == "all_reduce":
        return "gn_stats"
    if op == "shift":
        return "kv"
    return "output" if len(shape) == 4 else "kv"


@dataclass
class ProfiledTransfer:
    kind: str
    op: str
    world_size: int
    sent: int
    received: int
    group: Optional[int]
    issued: float
    waited: Optional[float]
    waited_next: bool


@dataclass
class StepProfile:
    """One step of one rank: ``phase`` is ``sync`` (warm-up) or ``async``."""

    phase: str
    compute_s: float
    transfers: List[ProfiledTransfer] = field(default_factory=list)
    source: str = ""

    def bytes_sent(self) -> Dict[str, int]:
        totals = {kind: 0 for kind in KINDS}
        for t in self.transfers:
            totals[t.kind] += t.sent
        return totals

    def scaled(self, compute_s: float) -> "StepProfile":
        """The same step with another compute time (positions are fractions: they carry over)."""
        return StepProfile(self.phase, compute_s, list(self.transfers), self.source)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "StepProfile":
        transfers = [ProfiledTransfer(**t) for t in data["transfers"]]
        return StepProfile(data["phase"], data["compute_s"], transfers, data.get("source", ""))


def profiles_from_log(
    log, marks: Sequence[Tuple[Any, Any]], seconds: Callable[[Any, Any], float], phases: Sequence[str]
) -> List[StepProfile]:
    """A ``StepProfile`` per step from a ``TrafficLog`` whose ``step`` was set to each step's index
    and whose clock gave each transfer's marks. ``marks[i]``: the clock at step i's start and end;
    ``seconds(a, b)``: the time between two marks; the last step serves only to see where the
    previous step's transfers are waited for."""
    steps = []
    for index in range(len(marks) - 1):
        start, end = marks[index]
        compute = seconds(start, end)
        profile = StepProfile(phases[index], compute)
        for t in log.transfers:
            if t.step != index:
                continue
            waited, waited_next = None, False
            if t.waited_step == index:
                waited = seconds(start, t.waited_at) / compute
            elif t.waited_step == index + 1:
                next_start, next_end = marks[index + 1]
                waited, waited_next = seconds(next_start, t.waited_at) / seconds(next_start, next_end), True
            profile.transfers.append(
                ProfiledTransfer(
                    kind=kind_of(t.op, t.shape),
                    op=t.op,
                    world_size=t.world_size,
                    sent=t.sent,
                    received=t.received,
                    group=t.group,
                    issued=min(max(seconds(start, t.issued_at) / compute, 0.0), 1.0),
                    waited=None if waited is None else min(max(waited, 0.0), 1.0),
                    waited_next=waited_next,
                )
            )
        steps.append(profile)
    return steps


# -- the roofline clock ---------------------------------------------------------------------------


def _halo_conv_flops(x_shape, top_shape, bottom_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """2 * outputs * (input channels per group) * kernel area: distripy's halo convolution."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


def _halo_conv_rows_flops(
    x_shape, top_shape, bottom_shape, weight_shape, *args, out_shape=None, **kwargs
) -> int:
    """The same for the output rows ``[row_begin, row_end)`` it writes into ``out`` (its last three
    arguments: out, row_begin, row_end)."""
    out, row_begin, row_end = args[-3:]
    batch, _, _, width = out
    return 2 * batch * weight_shape[0] * (row_end - row_begin) * width * math.prod(weight_shape[1:])


@functools.lru_cache(maxsize=None)
def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    import distripy.kernels  # noqa: F401  (registers the ops)

    register_flop_formula(torch.ops.distripy.halo_conv2d, get_raw=False)(_halo_conv_flops)
    register_flop_formula(torch.ops.distripy.halo_conv2d_rows_, get_raw=False)(_halo_conv_rows_flops)


def _rows_bytes(args) -> int:
    """Bytes an output-row range of a halo convolution moves: the input rows it reads (with its
    halo), the weight, and the output rows it writes -- not the whole band it is given."""
    x, weight, stride = args[0], args[3], args[5]
    out, row_begin, row_end = args[-3:]
    rows = row_end - row_begin
    batch, channels, height, width = x.shape
    read = min(height, rows * stride[0] + weight.shape[2] - 1) * batch * channels * width
    written = rows * out.shape[0] * out.shape[1] * out.shape[3]
    return (read + written) * x.element_size() + weight.numel() * weight.element_size()


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _tensor_bytes(tree) -> int:
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class RooflineClock:
    """Seconds a GPU would take for the operations run inside ``with clock:``; one operation costs
    max(FLOPs / peak, bytes of its inputs and outputs / bandwidth). Scaled-dot-product attention
    is costed as one fused kernel (its ``meta`` decomposition would materialise the scores)."""

    def __init__(self, peak_flops: float, bandwidth: float) -> None:
        self.peak_flops = peak_flops
        self.bandwidth = bandwidth
        self.seconds = 0.0
        self._inside_attention = 0
        clock = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if not clock._inside_attention and not _is_view(func):
                    clock._charge(func, args, kwargs, out)
                return out

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is not F.scaled_dot_product_attention:
                    return func(*args, **kwargs)
                query, key, value = args[:3]
                flops = 4 * query.shape[:-1].numel() * key.shape[-2] * query.shape[-1]
                moved = _tensor_bytes((query, key, value)) + _tensor_bytes(query)
                clock.seconds += max(flops / clock.peak_flops, moved / clock.bandwidth)
                clock._inside_attention += 1
                try:
                    return func(*args, **kwargs)
                finally:
                    clock._inside_attention -= 1

        self._modes = (Functions(), Dispatch())

    def _charge(self, func, args, kwargs, out) -> None:
        from torch.utils.flop_counter import flop_registry

        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        if func.namespace == "distripy" and packet.__name__ == "halo_conv2d_rows_":  # no import needed
            moved = _rows_bytes(args)
        else:
            moved = _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        self.seconds += max(flops / self.peak_flops, moved / self.bandwidth)

    def now(self) -> float:
        return self.seconds

    def __enter__(self) -> "RooflineClock":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def middle_rank(world_size: int, split_batch: bool) -> int:
    """A rank holding a middle band (halos on both sides when there are three bands or more)."""
    bands = world_size // 2 if split_batch else world_size
    return bands // 2


@functools.lru_cache(maxsize=None)
def roofline_profiles(
    latent_size: Tuple[int, int],
    world_size: int,
    split_batch: bool,
    gpu: str = "a100",
    batch: int = 2,
    tiny: bool = False,
    mode: str = "corrected_async_gn",
) -> Dict[str, StepProfile]:
    """The ``sync`` and ``async`` steps of a middle rank of ``world_size`` (``corrected_async_gn``,
    fp16), estimated on the meta device with ``gpu``'s roofline; with ``mode='exact'`` the
    ``exact`` step (every step is one)."""
    import distripy
    from distripy.runtime import LoopbackComm, TrafficLog

    from sdxl import build_unet, inputs

    _register_flop_formulas()
    peaks = GPU_PEAKS[gpu]
    clock = RooflineClock(peaks["flops"] * ACHIEVED_FLOPS, peaks["bandwidth"] * ACHIEVED_BANDWIDTH)
    log = TrafficLog(clock=clock.now)
    unet = build_unet("meta", torch.float16, tiny=tiny)
    comm = LoopbackComm(middle_rank(world_size, split_batch), world_size, log=log)
    config = distripy.DistriConfig(mode=mode, warmup_steps=1, split_batch=split_batch)
    distripy.parallelize(unet, config, comm=comm)
    if world_size > 1:
        # The GPU's kernels (their fake implementations on meta), not the references' many ops.
        distripy.api.patch_context(unet).kernel_backend = "triton"
    latents, conditioning = inputs(unet, batch, latent_size, "meta", torch.float16)
    marks = []
    with torch.no_grad(), clock:
        for step, timestep in enumerate((900, 800, 700)):
            log.step = step
            start = clock.now()
            unet(latents, timestep, **conditioning)
            marks.append((start, clock.now()))
    distripy.reset(unet)
    source = f"roofline on meta ({gpu}: {peaks['source']})"
    if mode == "exact":
        first, second = profiles_from_log(log, marks, lambda a, b: b - a, ("exact", "exact", "exact"))
        second.source = source
        return {"exact": second}
    sync, asynchronous = profiles_from_log(log, marks, lambda a, b: b - a, ("sync", "async", "async"))
    sync.source = asynchronous.source = source
    return {"sync": sync, "async": asynchronous}
