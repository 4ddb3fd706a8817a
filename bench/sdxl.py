"""The SDXL base UNet's architecture (from its published ``unet/config.json``) and its inputs,
built with random weights: the end-to-end benchmark and the step profiles need its shapes and
its work, not its weights. ``tiny=True`` gives the test suite's small SDXL-architecture UNet."""

from typing import Dict, Tuple

import torch

from distripy.planning import SDXL_UNET

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: the architecture the planner reads
# (``distripy.planning.SDXL_UNET``) and what diffusers needs besides to build it.
SDXL_UNET_CONFIG = {
    **SDXL_UNET,
    "sample_size": 128,
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
TEXT_TOKENS = 77
VAE_SCALE = 8  # image pixels per latent pixel


def unet_config(tiny: bool = False) -> Dict:
    if not tiny:
        return dict(SDXL_UNET_CONFIG)
    from distripy.pipelines.tiny import tiny_sdxl_unet_config

    return tiny_sdxl_unet_config(32, 32)


def build_unet(device="cpu", dtype=torch.float16, tiny: bool = False, seed: int = 0):
    """The UNet with seeded random weights (on ``meta``: shapes only, nothing allocated)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(tiny))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # .to(dtype) warns about modules to keep in float32: SDXL has none
    try:
        return unet.to(dtype).eval()
    finally:
        logging.set_verbosity(verbosity)


def inputs(
    unet, batch: int, latent_size: Tuple[int, int], device, dtype, seed: int = 0
) -> Tuple[torch.Tensor, Dict]:
    """A latent and SDXL's conditioning (prompt embeddings, pooled embeddings, size ids)."""
    config = unet.config
    height, width = latent_size
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def random(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        generator = torch.Generator().manual_seed(seed + len(shape) + shape[-1])
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    image = [height * VAE_SCALE, width * VAE_SCALE]
    time_ids = torch.tensor([image + [0, 0] + image] * batch, dtype=dtype)
    conditioning = {
        "encoder_hidden_states": random(batch, TEXT_TOKENS, config.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": random(batch, pooled),
            "time_ids": time_ids.to(device) if torch.device(device).type != "meta" else random(batch, 6),
        },
    }
    return random(batch, config.in_channels, height, width), conditioning
