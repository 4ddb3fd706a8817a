"""The VAE decoder's forward wrapper: every rank decodes one band of the latent, exactly.

At 4K the VAE decoder's last blocks hold 128-channel activations of 3840 x 3840 pixels per image:
decoding on every rank repeats that work N times and needs it to fit on one GPU. Here the decoder's
convolutions, GroupNorms and mid-block self-attention are the patch-parallel modules, run in a
context that is always ``exact`` (fresh halos, each hidden behind its convolution's interior rows;
whole-image statistics; the mid-block attention over every band's keys, merged block by block),
so the decoded bands are exactly the single-device decode's rows; one all-gather gives every rank
the whole image. Every rank holds the whole latent, so the band is cut through the context
(``PatchContext.cut_band``) and the decoder's first convolution reads its halo rows from it
instead of exchanging them.

The latent's rows are cut into bands that differ by at most one row (``BandLayout.split``), so
any number of ranks up to the latent's height decodes in parallel. A latent with fewer rows than
ranks (a thin edge tile of ``enable_vae_tiling``'s tiled decode can be one) is decoded whole on
every rank: the same result, without the speedup.
"""

import torch

from distripy.errors import InputError, UnsupportedModuleError
from distripy.parallel.agreement import agree
from distripy.parallel.bands import BandLayout, gather_bands
from distripy.parallel.context import PatchContext
from distripy.parallel.generation import Generation
from distripy.runtime.factory import alone_comm

__all__ = ["PatchDecoderForward"]


class PatchDecoderForward:
    """Replaces ``vae.decoder.forward``: bands in on every rank, the whole decoded image out."""

    def __init__(self, decoder: torch.nn.Module, context: PatchContext, comm) -> None:
        self.original_forward = decoder.forward
        self.context = context
        self.comm = comm
        self._parameter = next(decoder.parameters())
        # What the caller declared: ``alone`` (decode on this rank by itself: no transfer, no
        # check) and ``agreed`` (the pipeline call's round covered the latent to decode).
        self.generation = Generation(declared=False)

    @property
    def alone(self) -> bool:
        return self.generation.alone

    def declare(self, generation: Generation) -> None:
        """Decode under ``generation`` from now on."""
        self.generation = generation

    def _problem(self, sample, latent_embeds):
        if latent_embeds is not None:
            return (
                UnsupportedModuleError,
                "a decoder conditioned on latent_embeds (SpatialNorm) cannot decode bands",
            )
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            return (
                InputError,
                f"the decoder's input must be a (batch, channels, height, width) tensor, got {sample!r:.80}",
            )
        if sample.device != self._parameter.device:
            return (
                InputError,
                f"latent is on {sample.device} but the VAE's parameters are on {self._parameter.device}",
            )
        return None

    def __call__(self, sample: torch.Tensor, latent_embeds=None) -> torch.Tensor:
        comm, context = self.comm, self.context
        problem = self._problem(sample, latent_embeds)
        if self.alone or self.generation.agreed:
            # alone: this rank's own request; agreed: every rank decodes the same call's latent,
            # and finds the same problem in it
            if problem is not None:
                raise problem[0](problem[1])
        if self.alone:
            comm = alone_comm(context.config.timeout_s)  # the whole latent is this rank's one band
        elif not self.generation.agreed:
            description = (tuple(sample.shape), str(sample.dtype)) if problem is None else None
            agree(comm, description, problem, what="latent to decode")
        world, rank = comm.world_size, comm.rank
        if sample.shape[2] < world:
            return self.original_forward(sample, latent_embeds)
        layout = BandLayout.split(sample.shape[2], world)
        context.start_generation(comm, rank, world, layout=layout)
        context.begin_step()
        completed = False
        try:
            band = self.original_forward(context.cut_band(sample), latent_embeds)
            completed = True
        finally:
            context.end_step(issue_pending=completed)
        return gather_bands(comm, band, layout)
