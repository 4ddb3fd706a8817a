"""Patch-parallel VAE decode: every rank decodes one band of the latent, exactly.

At 4K the VAE decoder's last blocks hold 128-channel activations of 3840 x 3840 pixels per image:
decoding on every rank repeats that work N times and needs it to fit on one GPU. Here the decoder's
convolutions, GroupNorms and mid-block self-attention are the patch-parallel modules, run in a
context that is always synchronous (``full_sync``: fresh halos, whole-image statistics and keys),
so the decoded bands are exactly the single-device decode's rows; one all-gather gives every rank
the whole image.

A latent whose height does not split into whole bands (an edge tile of ``enable_vae_tiling``'s
tiled decode can be one) is decoded whole on every rank: the same result, without the speedup.
"""

import dataclasses

import torch

from distripy.config import DistriConfig
from distripy.errors import UnsupportedModuleError
from distripy.parallel.agreement import agree
from distripy.parallel.context import PatchContext

__all__ = ["PatchDecoderForward", "parallelize_vae"]

_ATTRIBUTE = "_distripy_decoder_forward"


class PatchDecoderForward:
    """Replaces ``vae.decoder.forward``: bands in on every rank, the whole decoded image out."""

    def __init__(self, decoder: torch.nn.Module, context: PatchContext, comm) -> None:
        self.original_forward = decoder.forward
        self.context = context
        self.comm = comm
        self._parameter = next(decoder.parameters())

    def _problem(self, sample, latent_embeds):
        if latent_embeds is not None:
            return (
                UnsupportedModuleError,
                "a decoder conditioned on latent_embeds (SpatialNorm) cannot decode bands",
            )
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            return (
                ValueError,
                f"the decoder's input must be a (batch, channels, height, width) tensor, got {sample!r:.80}",
            )
        if sample.device != self._parameter.device:
            return (
                ValueError,
                f"latent is on {sample.device} but the VAE's parameters are on {self._parameter.device}",
            )
        return None

    def __call__(self, sample: torch.Tensor, latent_embeds=None) -> torch.Tensor:
        comm, context = self.comm, self.context
        problem = self._problem(sample, latent_embeds)
        description = (tuple(sample.shape), str(sample.dtype)) if problem is None else None
        agree(comm, description, problem, what="latent to decode")
        world, rank = comm.world_size, comm.rank
        rows = sample.shape[2]
        if rows % world != 0:
            return self.original_forward(sample, latent_embeds)
        band_rows = rows // world
        context.start_generation(comm, rank, world)
        context.begin_step()
        completed = False
        try:
            band = self.original_forward(
                sample[:, :, rank * band_rows : (rank + 1) * band_rows], latent_embeds
            )
            completed = True
        finally:
            context.end_step(issue_pending=completed)
        gathered = band.new_empty((world,) + tuple(band.shape))
        comm.all_gather(band.contiguous(), gathered).wait()
        batch, channels, out_rows, width = band.shape
        return gathered.permute(1, 2, 0, 3, 4).reshape(batch, channels, world * out_rows, width)


def parallelize_vae(vae, config: DistriConfig, comm=None):
    """Make ``vae``'s decoder decode bands on the ranks of torch.distributed (in place; returns
    ``vae``). ``comm``: the ``Comm`` of all ranks to use (a parallelised pipeline shares its UNet's);
    by default one is made from ``config.comm_backend``. The encoder is left as it is."""
    from distripy.api import _comm_class, _kernel_backend, _resolve_backends, swap_modules

    if hasattr(vae, _ATTRIBUTE):
        raise ValueError("parallelize: this VAE is already patch-parallel")
    _resolve_backends(config)
    if config.world_size == 1:
        return vae
    decode_config = dataclasses.replace(config, mode="full_sync", split_batch=False)
    context = PatchContext(decode_config, kernel_backend=_kernel_backend(config))
    swap_modules(vae.decoder, context)
    if comm is None:
        comm = _comm_class(config)(None, config.timeout_s)
    forward = PatchDecoderForward(vae.decoder, context, comm)
    vae.decoder.forward = forward
    setattr(vae, _ATTRIBUTE, forward)
    return vae
