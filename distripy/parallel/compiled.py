"""``DistriConfig(compile=True)``: a band wrapper's forward on its band, compiled by inductor.

Made once per model at its first step; inductor then compiles at the first call of each input
shape and step kind (synchronous or asynchronous); replays of a captured step call nothing.

Inductor's default mode: ``reduce-overhead`` would record CUDA graphs of its own inside
``StepGraphs``' capture. Static shapes: a new input shape compiles anew, as it is captured anew,
instead of a dynamic-shape version of the step. Only the band's forward is compiled: the wrapper's
generation bookkeeping, digests and output gather stay eager, and the step breaks only at the
checkpoints (``PatchContext.checkpoint``), where transfers leave.
"""

from typing import Any, Callable, Dict

import torch

from distripy.errors import StepError

__all__ = ["CompiledBandForward"]


class CompiledBandForward:
    """``forward_band`` (a function of the localised arguments) compiled, run so that a step
    compiles only when its kind is new."""

    def __init__(self, forward_band: Callable[[Dict[str, Any]], Any], context, graphs, model_name: str) -> None:
        self.context = context
        self.graphs = graphs
        self.model_name = model_name
        self.compiled = torch.compile(forward_band, mode=None, dynamic=False)

    def __call__(self, local: Dict[str, Any]) -> Any:
        """The compiled band forward on ``local``. A timestep given as a number becomes the tensor
        the model would make of it (int64 or float64): a number is a constant of the trace, and each
        step would compile anew. As a CUDA graph (``StepGraphs``): an eager step first completes the
        transfers in flight, as a capture does, so that both meet the same state (no ``Work``
        handles) and the capture finds the eager step's compiled code. Inside a capture nothing
        compiles: inductor autotunes a new kernel by timing it, which synchronises the capturing
        stream. Nor does a region fall back to its eager code there: some modules take other paths
        under a trace (``torch.compiler.is_compiling()``), and a step may not mix the two."""
        timestep = local.get("timestep")
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            local = dict(local, timestep=torch.tensor(timestep, dtype=dtype, device=local["sample"].device))
        if self.graphs is None:
            return self.compiled(local)
        if not self.context.capturing:
            self.context.complete_in_flight()
            return self.compiled(local)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self.compiled(local)
        except RuntimeError as error:
            if "fail_on_recompile" not in str(error):
                raise
            raise StepError(
                f"step {self.context.step}: the compiled {self.model_name} step captured as a CUDA "
                "graph needs code that its eager steps did not compile (a guard below failed), and "
                "nothing may compile inside a capture; run with DistriConfig(compile=False) or "
                "use_cuda_graph=False"
            ) from error
