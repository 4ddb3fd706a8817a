"""``TransferQueue``: when an asynchronous step's transfers leave.

A synchronous exchange is issued and waited for where its module needs it. An asynchronous one is
queued (``defer``) and leaves with the others queued since the last checkpoint, as one
``Comm.group()``, at each checkpoint: the end of every block given to ``add_checkpoints`` (while
the next blocks compute) and the end of the step.
"""

from typing import Callable, Iterable, List

import torch

__all__ = ["TransferQueue"]


class TransferQueue:
    def __init__(self) -> None:
        self._pending: List[Callable[[], None]] = []

    def defer(self, issue: Callable[[], None]) -> None:
        """Queue a transfer for the next checkpoint."""
        self._pending.append(issue)

    def clear(self) -> None:
        """Drop what is queued (after an error: the step's exchanges are void)."""
        self._pending.clear()

    @torch.compiler.disable
    def flush(self, comm) -> None:
        """Issue the queued transfers through ``comm`` as one group. Under torch.compile this is
        where the compiled step breaks: the transfers run eagerly, one break per checkpoint."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        with comm.group():
            for issue in pending:
                issue()

    @staticmethod
    def add_checkpoints(blocks: Iterable[torch.nn.Module], checkpoint: Callable[[], None], active) -> List:
        """Call ``checkpoint`` at the end of each block while ``active()``; the hooks' handles."""

        def hook(module, inputs, output) -> None:
            if active():
                checkpoint()

        return [block.register_forward_hook(hook) for block in blocks]
