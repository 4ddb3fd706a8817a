"""Small Stable Diffusion pipelines: seeded random weights built from configs, and the one the
project trained (no download either way).

For the demo and the tests: SDXL's and SD 1.x's architectures (two CLIP text encoders with a
projection / one; a UNet2DConditionModel; an AutoencoderKL) at sizes that run in seconds on a
CPU. The tokenizers are real ``CLIPTokenizer``s over a byte-level vocabulary written on the spot
(every byte a token, no merges), so prompts go through the pipeline's own text encoding.

``trained_sdxl_pipeline``: the tiny SDXL pipeline trained by ``bench/train_tiny.py`` on scenes of
one coloured shape on a two-colour gradient ("a red circle on a blue and yellow background"),
shipped with the package (``models/tiny-shapes``): a model whose activations change smoothly from
step to step, as a real one's do, for judging the asynchronous modes.
"""

import json
import tempfile
from pathlib import Path

import torch

from distripy.errors import InputError

__all__ = [
    "TINY_DOWNSAMPLINGS",
    "TINY_VAE_SCALE",
    "TRAINED_MODEL",
    "trained_sdxl_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_sdxl_unet_config",
]

TEXT_DIM = 32
TIME_EMBED_DIM = 8
# The UNets below downsample twice: latent heights must be multiples of 4 x bands.
TINY_DOWNSAMPLINGS = 2
# The VAE below has three blocks, two of them upsampling: 4 pixels per latent row.
TINY_VAE_SCALE = 4
TRAINED_MODEL = Path(__file__).resolve().parent / "models" / "tiny-shapes"
"""The trained pipeline's folder (``StableDiffusionXLPipeline.from_pretrained`` loads it)."""


def _bytes_to_unicode():
    """CLIP's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _tokenizer():
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"))
    tokenizer.model_max_length = 77
    return tokenizer


def _text_encoder(projection: bool, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    ).eval()


def tiny_sdxl_unet_config(cross_attention_dim: int, pooled_dim: int) -> dict:
    """SDXL's UNet architecture (DownBlock2D then two cross-attention down blocks, linear
    projections, two transformer layers in the deepest block, ``text_time`` added embeddings) at a
    size that runs in milliseconds on a CPU; two downsamplings."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=pooled_dim + 6 * TIME_EMBED_DIM,
    )


def tiny_sdxl_pipeline(seed: int = 0, torch_dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionXLPipeline`` (default size 128 x 128 pixels, a 32 x 32 latent)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    # prompt embeddings: the two text encoders' hidden states side by side
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config(2 * TEXT_DIM, TEXT_DIM)).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(False, len(tokenizer)),
        text_encoder_2=_text_encoder(True, len(tokenizer_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )
    return pipe.to(torch_dtype=torch_dtype)


def tiny_sd_pipeline(seed: int = 0, torch_dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` (SD 1.x's architecture; 128 x 128 pixels by default)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        attention_head_dim=2,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(False, len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(torch_dtype=torch_dtype)


def trained_sdxl_pipeline(torch_dtype: torch.dtype = torch.float32):
    """The trained tiny ``StableDiffusionXLPipeline`` (128 x 128 pixels, a 32 x 32 latent), loaded
    offline from ``TRAINED_MODEL``."""
    from diffusers import StableDiffusionXLPipeline

    if not (TRAINED_MODEL / "model_index.json").is_file():
        raise InputError(
            f"the trained tiny model is missing from {TRAINED_MODEL}; `python bench/train_tiny.py` makes it"
        )
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(TRAINED_MODEL), torch_dtype=torch_dtype, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
