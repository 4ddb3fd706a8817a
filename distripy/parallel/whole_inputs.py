"""Inputs every rank holds whole (the UNet's latent, the decoder's): no exchange for their halos.

The band wrapper cuts such an input with ``WholeInputs.cut``; the convolution that reads exactly
that band (the model's first) takes its halo rows from the whole tensor (``find``), exact in every
step.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

__all__ = ["WholeInput", "WholeInputs"]


@dataclass(frozen=True)
class WholeInput:
    """A ``(B, C, H, W)`` tensor every rank of the image holds whole, and ``band``, its rows
    ``[start, stop)`` that this rank computes on."""

    whole: torch.Tensor
    band: torch.Tensor
    start: int
    stop: int

    def halos(self, above: int, below: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The ``above`` rows over the band and the ``below`` rows under it, read from the whole
        tensor: the exact halos (``None`` at the image's top and bottom edges)."""
        top = None if self.start == 0 else self.whole[:, :, self.start - above : self.start]
        bottom = None if self.stop == self.whole.shape[2] else self.whole[:, :, self.stop : self.stop + below]
        return top, bottom


class WholeInputs:
    """This step's bands of inputs held whole."""

    def __init__(self) -> None:
        self._entries: List[WholeInput] = []

    def cut(self, whole: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        band = whole[:, :, start:stop]
        self._entries.append(WholeInput(whole, band, start, stop))
        return band

    def find(self, x: torch.Tensor) -> Optional[WholeInput]:
        """The ``WholeInput`` whose band ``x`` is (the same tensor object), if any."""
        for entry in self._entries:
            if entry.band is x:
                return entry
        return None

    def clear(self) -> None:
        self._entries.clear()
