"""Small diffusers UNets with seeded random weights, and their inputs, for the tests.

``tiny_sdxl_unet`` has SDXL's architecture (DownBlock2D + two cross-attention down blocks,
linear projections, several transformer layers in the deepest block, ``text_time`` added
embeddings) at a size that runs in milliseconds on a CPU: two downsamplings, so a latent of
height 32 gives bands of whole rows for 2 and 4 ranks down to the deepest level.
``tiny_sd15_unet`` has SD 1.x's (three cross-attention down blocks then a DownBlock2D, 1x1
convolution projections, no added embeddings; three downsamplings).
"""

from typing import Dict

import torch

TEXT_DIM = 32
POOLED_DIM = 32


def tiny_sdxl_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    from distripy.pipelines.tiny import tiny_sdxl_unet_config

    config = tiny_sdxl_unet_config(TEXT_DIM, POOLED_DIM)
    config.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def tiny_sd15_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        attention_head_dim=2,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
        use_linear_projection=False,
    ).eval()


def sd15_conditioning(batch: int, seed: int, text_tokens: int = 7) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, text_tokens, TEXT_DIM, generator=generator)}


def sdxl_conditioning(batch: int, seed: int, text_tokens: int = 7) -> Dict[str, torch.Tensor]:
    """Random prompt embeddings and SDXL's added conditions for a batch."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, text_tokens, TEXT_DIM, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, POOLED_DIM, generator=generator),
            "time_ids": torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]]).repeat(batch, 1),
        },
    }


def ddim_loop(
    unet, latents: torch.Tensor, conditioning, steps: int = 10, guidance: float = 0.0, **unet_kwargs
):
    """A DDIM denoising loop; with ``guidance`` > 0, classifier-free guidance over a batch whose
    first half is the unconditional one. Returns the final latents (float64 copies of every
    step's noise prediction are not kept: the latents carry every step's error)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if guidance > 0 else latents
        with torch.no_grad():
            noise = unet(model_input, t, **conditioning, **unet_kwargs).sample
        if guidance > 0:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())
