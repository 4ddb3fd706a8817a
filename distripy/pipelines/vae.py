"""Making a diffusers ``AutoencoderKL``'s decoder decode bands (``parallel.vae.PatchDecoderForward``).

Its decoder's modules are swapped for the patch-parallel ones in a context that is always
``exact`` (no CFG split): the decoded image is exactly the single-device one, and each halo
exchange hides behind its convolution's interior rows.
The encoder is left as it is.
"""

import dataclasses

from distripy.config import DistriConfig
from distripy.errors import InputError
from distripy.parallel.context import PatchContext
from distripy.parallel.vae import PatchDecoderForward
from distripy.pipelines.registry import install, record_of
from distripy.pipelines.swap import Surgery, swap_modules
from distripy.runtime.factory import check_backends, make_world_comm, on_cuda, resolve_defaults

__all__ = ["decoder_forward", "parallelize_vae", "vae_is_parallel"]

def parallelize_vae(vae, config: DistriConfig, comm=None):
    """Make ``vae``'s decoder decode bands on the ranks of torch.distributed (in place; returns
    ``vae``). ``comm``: the ``Comm`` of all ranks to use (a parallelised pipeline shares its UNet's);
    by default one is made from ``config.comm_backend``."""
    if record_of(vae) is not None:
        raise InputError("parallelize: this VAE is already patch-parallel")
    config = resolve_defaults(config, comm, on_cuda(vae))
    check_backends(config, comm)
    if config.world_size == 1:
        return vae
    # the decode runs once per image with fresh exchanges: no stale steps, nothing to compress
    decode_config = dataclasses.replace(config, mode="exact", split_batch=False, use_cuda_graph=False, compress="none")
    context = PatchContext(decode_config)
    surgery = Surgery()
    swap_modules(vae.decoder, context, surgery)
    if comm is None:
        comm = make_world_comm(config)
    install(vae, vae.decoder, vae.decoder, PatchDecoderForward(vae.decoder, context, comm), context, surgery)
    return vae


def vae_is_parallel(vae) -> bool:
    """Whether ``vae``'s decoder decodes bands already."""
    return decoder_forward(vae) is not None


def decoder_forward(vae):
    """The ``PatchDecoderForward`` of a parallelised VAE, or None."""
    record = record_of(vae)
    return record.wrapper if record is not None and isinstance(record.wrapper, PatchDecoderForward) else None
