"""Small pipelines of every supported kind, with seeded random weights, and their add-ons saved to
disk the way they are published (a ControlNet folder, LoRA ``.safetensors``, an IP-Adapter with
its CLIP image encoder, a whole pipeline for ``AutoPipelineFor*``), so that the tests load them
through diffusers' and PEFT's own loading code.

``run_scenarios(folders, parallel)`` runs each scenario's calls (``SCENARIOS``) on one pipeline
made by ``parallel`` (``distripy.parallelize`` on every rank, or nothing for the single-device
reference) and returns what each call gave: images and latents, compared call by call.

Sizes: 64 x 32 pixels (16 x 8 latent rows and columns; the UNets downsample twice), so that 4
ranks without the CFG split hold bands of 4 latent rows, and 2 bands per CFG half with it.
"""

import os
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

HEIGHT, WIDTH = 64, 32
PROMPT = "a lighthouse on a cliff at dawn"
CONTROLNET_EMBEDDING = (8, 16, 16)  # two stride-2 convolutions: 4 pixels per latent row


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(seed: int = 0):
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    return _quiet(tiny_sdxl_pipeline(seed))


def sd(seed: int = 0):
    from distripy.pipelines.tiny import tiny_sd_pipeline

    return _quiet(tiny_sd_pipeline(seed))


def _randomise_zeros(model: torch.nn.Module, seed: int) -> None:
    """ControlNets start with their output layers zero (they add nothing until trained): give
    those random weights, so the residuals matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def make_controlnet(folder: str, unet, seed: int) -> None:
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING)
    _randomise_zeros(controlnet, seed)
    controlnet.save_pretrained(folder)


def make_lora(folder: str, targets: List[str], seed: int) -> None:
    """A random LoRA of the tiny SDXL UNet (``init_lora_weights=False``: both factors random),
    saved by the pipeline's own ``save_lora_weights``."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = sdxl().unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))


def make_ip_adapter(folder: str, seed: int) -> None:
    """A random IP-Adapter of the tiny SDXL UNet in the published layout: ``image_proj.*`` and
    ``ip_adapter.<n>.to_{k,v}_ip.weight`` in one ``.safetensors``, and a CLIP vision model with a
    projection in ``image_encoder/``."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = sdxl().unet
    torch.manual_seed(seed)
    image_dim = 16
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=image_dim,
    )
    CLIPVisionModelWithProjection(vision).save_pretrained(os.path.join(folder, "image_encoder"))
    cross = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * cross, image_dim) * 0.2,
        "image_proj.proj.bias": torch.randn(4 * cross) * 0.1,
        "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross),
        "image_proj.norm.bias": 0.1 * torch.randn(cross),
    }
    key = 1  # diffusers numbers the cross-attention processors 1, 3, 5, ... in processor order
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_k.weight.shape[0]
        for weight in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key}.{weight}.weight"] = torch.randn(hidden, cross) * cross**-0.5
        key += 2
    save_file(tensors, os.path.join(folder, "ip_adapter.safetensors"))


def make_folders(root: str) -> Dict[str, str]:
    """Every add-on the scenarios load, saved under ``root``."""
    folders = {
        name: os.path.join(root, name)
        for name in (
            "controlnet_sdxl",
            "controlnet_sd_a",
            "controlnet_sd_b",
            "lora_attn",
            "lora_conv",
            "lora_conv_2",
            "ip",
            "pipeline",
        )
    }
    make_controlnet(folders["controlnet_sdxl"], sdxl().unet, 1)
    make_controlnet(folders["controlnet_sd_a"], sd().unet, 2)
    make_controlnet(folders["controlnet_sd_b"], sd().unet, 3)
    make_lora(folders["lora_attn"], ["to_q", "to_k", "to_v", "to_out.0"], 4)
    # LoCon-style: the 3x3 convolutions too (each LoRA down-projection is a 3x3 convolution)
    locon = ["conv1", "conv2", "conv_in", "conv_out", "proj_in", "to_q"]
    make_lora(folders["lora_conv"], locon, 5)
    make_lora(folders["lora_conv_2"], locon, 7)  # the same layers: hot-swappable
    make_ip_adapter(folders["ip"], 6)
    sdxl().save_pretrained(folders["pipeline"])
    return folders


def _image(seed: int, height: int = HEIGHT, width: int = WIDTH, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(seed))


def _mask(seed: int) -> torch.Tensor:
    """A mask that crosses the band boundaries (a random blob, not a rectangle)."""
    return (_image(seed, channels=1) > 0.5).float()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


COMMON = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=5.0)


def _images(pipe, seed: int, **kwargs) -> np.ndarray:
    arguments = dict(COMMON, prompt=PROMPT, generator=_generator(seed), output_type="np")
    arguments.update(kwargs)
    return pipe(**arguments).images


def _latents(pipe, seed: int, **kwargs) -> np.ndarray:
    arguments = dict(COMMON, prompt=PROMPT, generator=_generator(seed), output_type="latent")
    arguments.update(kwargs)
    return pipe(**arguments).images.numpy()


Parallel = Optional[Callable]


def _apply(parallel: Parallel, pipe):
    return pipe if parallel is None else parallel(pipe)


def controlnet_sdxl(folders, parallel: Parallel, rows: Optional[list] = None) -> list:
    """SDXL ControlNet: text-to-image (images, latents, guess mode), then img2img and inpainting
    made from it with ``from_pipe`` and parallelised in turn."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    controlnet = ControlNetModel.from_pretrained(folders["controlnet_sdxl"])
    pipe = _apply(
        parallel, _quiet(StableDiffusionXLControlNetPipeline(**sdxl().components, controlnet=controlnet))
    )
    if rows is not None:  # the rows each ControlNet call of this rank saw
        pipe.controlnet.conv_in.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[2]))
    control = _image(10)
    out = [
        _images(pipe, 11, image=control),
        _latents(pipe, 12, image=control, controlnet_conditioning_scale=0.7),
        _images(pipe, 13, image=control, guess_mode=True),
    ]
    img2img = _apply(parallel, _quiet(StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(pipe)))
    out.append(_images(img2img, 14, image=_image(15), control_image=control, strength=0.7))
    inpaint = _apply(parallel, _quiet(StableDiffusionXLControlNetInpaintPipeline.from_pipe(pipe)))
    out.append(
        _images(inpaint, 16, image=_image(17), mask_image=_mask(18), control_image=control, strength=0.9)
    )
    return out


def multi_controlnet_sd(folders, parallel: Parallel) -> list:
    """SD 1.x with two ControlNets (``MultiControlNetModel``): text-to-image, guess mode, img2img."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetPipeline,
    )

    nets = [ControlNetModel.from_pretrained(folders[name]) for name in ("controlnet_sd_a", "controlnet_sd_b")]
    pipe = _apply(parallel, _quiet(StableDiffusionControlNetPipeline(**sd().components, controlnet=nets)))
    controls = [_image(20), _image(21)]
    out = [
        _images(pipe, 22, image=controls, controlnet_conditioning_scale=[0.6, 1.1]),
        _images(pipe, 23, image=controls, guess_mode=True),
    ]
    img2img = _apply(parallel, _quiet(StableDiffusionControlNetImg2ImgPipeline.from_pipe(pipe)))
    out.append(_images(img2img, 24, image=_image(25), control_image=controls, strength=0.8))
    return out


def inpaint(folders, parallel: Parallel) -> list:
    """Inpainting: SDXL with a 9-channel UNet (latent, mask, masked-image latents), SD 1.x with its
    4-channel UNet (the pipeline blends the known region back every step)."""
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )

    from distripy.pipelines.tiny import TEXT_DIM, tiny_sdxl_unet_config

    components = sdxl().components
    torch.manual_seed(30)
    config = dict(tiny_sdxl_unet_config(2 * TEXT_DIM, TEXT_DIM), in_channels=9)
    components["unet"] = UNet2DConditionModel(**config).eval()
    pipe = _apply(parallel, _quiet(StableDiffusionXLInpaintPipeline(**components)))
    out = [_images(pipe, 31, image=_image(32), mask_image=_mask(33), strength=0.99)]
    sd_pipe = _apply(parallel, _quiet(StableDiffusionInpaintPipeline(**sd().components)))
    out.append(_images(sd_pipe, 34, image=_image(35), mask_image=_mask(36), strength=0.8))
    return out


def refiner_pipeline(base):
    """An SDXL refiner of the tiny SDXL ``base`` (sharing its VAE, second text encoder and
    scheduler): ``StableDiffusionXLImg2ImgPipeline`` with one text encoder and a UNet conditioned
    on the aesthetic score."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from distripy.pipelines.tiny import TEXT_DIM, TIME_EMBED_DIM, tiny_sdxl_unet_config

    torch.manual_seed(40)
    config = tiny_sdxl_unet_config(TEXT_DIM, TEXT_DIM)
    config["projection_class_embeddings_input_dim"] = TEXT_DIM + 5 * TIME_EMBED_DIM  # + aesthetic score
    return _quiet(
        StableDiffusionXLImg2ImgPipeline(
            vae=base.vae,
            text_encoder=None,
            text_encoder_2=base.text_encoder_2,
            tokenizer=None,
            tokenizer_2=base.tokenizer_2,
            unet=UNet2DConditionModel(**config).eval(),
            scheduler=base.scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    )


def refiner(folders, parallel: Parallel) -> list:
    """SDXL base to refiner: the base denoises the first 60 % (``denoising_end``) and hands its
    latents to the refiner (``StableDiffusionXLImg2ImgPipeline`` with the refiner's UNet: one text
    encoder, aesthetic-score conditioning), which does the rest (``denoising_start``)."""
    base = sdxl()
    refiner_pipe = refiner_pipeline(base)
    base = _apply(parallel, base)
    refiner_pipe = _apply(parallel, refiner_pipe)
    steps = dict(num_inference_steps=5)
    latents = _latents(base, 41, denoising_end=0.6, **steps)
    image = _images(
        refiner_pipe, 42, image=torch.from_numpy(latents), denoising_start=0.6, aesthetic_score=7.0, **steps
    )
    return [latents, image]


def ip_adapter(folders, parallel: Parallel) -> list:
    """IP-Adapter loaded after ``parallelize`` (image encoder and projection from disk), its
    scale changed, then unloaded; and one loaded before ``parallelize``."""
    from PIL import Image

    pipe = _apply(parallel, sdxl())
    pixels = (np.random.default_rng(50).random((32, 32, 3)) * 255).astype(np.uint8)
    pipe.load_ip_adapter(
        folders["ip"],
        subfolder="",
        weight_name="ip_adapter.safetensors",
        image_encoder_folder="image_encoder",
    )
    out = [_images(pipe, 51, ip_adapter_image=Image.fromarray(pixels))]
    pipe.set_ip_adapter_scale(0.4)
    out.append(_images(pipe, 52, ip_adapter_image=Image.fromarray(pixels)))
    pipe.unload_ip_adapter()
    out.append(_images(pipe, 53))
    before = sdxl()  # loaded before parallelize
    before.load_ip_adapter(
        folders["ip"],
        subfolder="",
        weight_name="ip_adapter.safetensors",
        image_encoder_folder="image_encoder",
    )
    out.append(_images(_apply(parallel, before), 54, ip_adapter_image=Image.fromarray(pixels)))
    return out


def lora(folders, parallel: Parallel) -> list:
    """LoRA at any time: one loaded before ``parallelize``; a LoCon (3x3 convolutions) loaded
    after; both active with scales; fused; unfused and switched; hot-swapped; unloaded."""
    pipe = sdxl()
    pipe.load_lora_weights(folders["lora_attn"], adapter_name="attn")
    pipe = _apply(parallel, pipe)
    out = [_images(pipe, 60)]
    pipe.load_lora_weights(folders["lora_conv"], adapter_name="conv")
    pipe.set_adapters(["attn", "conv"], [0.8, 1.2])
    out.append(_images(pipe, 61))
    pipe.fuse_lora()
    out.append(_images(pipe, 61))
    pipe.unfuse_lora()
    pipe.set_adapters(["conv"])
    out.append(_images(pipe, 62))
    pipe.load_lora_weights(
        folders["lora_conv_2"], adapter_name="conv", hotswap=True
    )  # new weights, same name
    out.append(_images(pipe, 63))
    pipe.unload_lora_weights()
    out.append(_images(pipe, 64))
    return out


def auto_pipelines(folders, parallel: Parallel) -> list:
    """``AutoPipelineForText2Image.from_pretrained``, then ``AutoPipelineForInpainting.from_pipe``
    of it (sharing its parallelised models), each parallelised."""
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image

    pipe = _apply(parallel, _quiet(AutoPipelineForText2Image.from_pretrained(folders["pipeline"])))
    out = [_images(pipe, 70)]
    inpainting = _apply(parallel, _quiet(AutoPipelineForInpainting.from_pipe(pipe)))
    out.append(_images(inpainting, 71, image=_image(72), mask_image=_mask(73), strength=0.9))
    return out


SCENARIOS = {
    "controlnet_sdxl": controlnet_sdxl,
    "multi_controlnet_sd": multi_controlnet_sd,
    "inpaint": inpaint,
    "refiner": refiner,
    "ip_adapter": ip_adapter,
    "lora": lora,
    "auto_pipelines": auto_pipelines,
}


def run_scenarios(folders: Dict[str, str], parallel: Parallel, names=None) -> Dict[str, list]:
    return {name: SCENARIOS[name](folders, parallel) for name in (names or SCENARIOS)}
