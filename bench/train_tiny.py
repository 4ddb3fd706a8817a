"""Train distripy's own small text-to-image model on scenes this script draws itself.

No pretrained diffusion weights can be downloaded here, and a random-weight UNet says nothing about
the asynchronous modes (its activations change wholesale between steps). This trains the tiny
SDXL-architecture pipeline of ``distripy.pipelines.tiny`` (two small CLIP text encoders over a
byte vocabulary; a 4x AutoencoderKL; a UNet with
DownBlock2D + two cross-attention down blocks, ResNet blocks, GroupNorm, self- and
cross-attention, two down/upsamplings) on 128 x 128 scenes of one coloured shape (circle, square
or triangle) on a two-colour gradient, with prompts that name them
("a red circle on a blue and yellow background"):

1. the VAE: L1 + L2 reconstruction with a small KL term, on 64 x 64 crops (it is convolutional:
   4x cheaper per step, the same features); its ``scaling_factor`` is set from the latents' std;
2. the UNet with the text encoders (from scratch: a random encoder's embeddings of prompts that
   differ in a word or two are too alike to condition on): epsilon prediction on the DDPM
   schedule the pipeline samples with (scaled linear, 1000 steps), on a fixed set of pre-encoded
   scenes, 10% of prompts dropped to the zero embedding SDXL's pipeline uses for an empty negative
   prompt (so classifier-free guidance works), AdamW with warm-up and cosine decay, an EMA of the
   weights (what is saved).

Everything is seeded and counted in steps (not minutes), so the same command on the same torch
and thread count reproduces the weights. The pipeline is saved with ``save_pretrained``
(safetensors) and loads offline with ``distripy.pipelines.tiny.trained_sdxl_pipeline``; the loss
curve (JSON + plot) and a grid of samples go to ``bench/results/``.

    python bench/train_tiny.py          # ~30 minutes on 2 CPU cores; the committed model
    python bench/train_tiny.py --vae-steps 20 --unet-steps 20 --scenes 64 --out /tmp/t --results /tmp/t
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from common import REPOSITORY, environment, results_path, write_json

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 128  # pixels; the latent is 32 x 32 (the VAE downsamples 4x)
DEFAULT_OUT = REPOSITORY / "distripy" / "pipelines" / "models" / "tiny-shapes"


# -- the scenes ----------------------------------------------------------------------------------


def scene(rng: np.random.Generator, size: int = SIZE) -> Tuple[np.ndarray, str]:
    """One scene, ``(3, size, size)`` float32 in [-1, 1], and its prompt."""
    names = list(COLORS)
    first, second, shape_color = rng.choice(len(names), 3, replace=False)
    top, bottom = np.array(COLORS[names[first]], np.float32), np.array(COLORS[names[second]], np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    vertical = rng.random() < 0.5
    weight = ramp[:, None] if vertical else ramp[None, :]
    image = top[:, None, None] * (1 - weight) + bottom[:, None, None] * weight
    image = np.broadcast_to(image, (3, size, size)).copy()
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = rng.uniform(0.12, 0.28) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif shape == "square":
        mask = (np.abs(x - cx) <= radius * 0.85) & (np.abs(y - cy) <= radius * 0.85)
    else:  # an upright triangle inscribed in the circle
        apex = cy - radius
        base = cy + radius * 0.6
        half_width = (y - apex) / (base - apex) * radius * 0.95
        mask = (y >= apex) & (y <= base) & (np.abs(x - cx) <= half_width)
    image[:, mask] = np.array(COLORS[names[shape_color]], np.float32)[:, None]
    prompt = f"a {names[shape_color]} {shape} on a {names[first]} and {names[second]} background"
    return image / 127.5 - 1.0, prompt


def scenes(count: int, seed: int) -> Tuple[torch.Tensor, List[str]]:
    rng = np.random.default_rng(seed)
    images, prompts = zip(*(scene(rng) for _ in range(count)))
    return torch.from_numpy(np.stack(images)), list(prompts)


# -- training ------------------------------------------------------------------------------------


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae, steps: int, seed: int, log: List[Dict]) -> None:
    rng = np.random.default_rng(seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, 50))
    vae.train()
    crop = SIZE // 2
    for step in range(steps):
        batch = []
        for _ in range(16):
            image, _ = scene(rng)
            top, left = rng.integers(0, SIZE - crop + 1, 2)
            batch.append(image[:, top : top + crop, left : left + crop])
        images = torch.from_numpy(np.stack(batch))
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        log.append({"stage": "vae", "step": step, "loss": float(loss.detach())})
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}/{steps}: loss {float(loss):.4f}", flush=True)
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The posterior means of ``images``, scaled by the VAE's ``scaling_factor``."""
    latents = [vae.encode(chunk).latent_dist.mean for chunk in images.split(64)]
    return torch.cat(latents) * vae.config.scaling_factor


class PromptEncoder(torch.nn.Module):
    """The pipeline's two text encoders as ``StableDiffusionXLPipeline.encode_prompt`` uses them
    (each one's penultimate hidden states side by side; the second one's projected pooled output),
    trainable, over token ids made once per prompt."""

    def __init__(self, pipe, prompts: List[str]) -> None:
        super().__init__()
        self.first, self.second = pipe.text_encoder, pipe.text_encoder_2
        self.ids = {}
        for prompt in sorted(set(prompts)):
            self.ids[prompt] = tuple(
                tokenizer(
                    prompt,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
                for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)
            )

    def forward(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        first = torch.stack([self.ids[p][0] for p in prompts])
        second = torch.stack([self.ids[p][1] for p in prompts])
        hidden = self.first(first, output_hidden_states=True).hidden_states[-2]
        output = self.second(second, output_hidden_states=True)
        return torch.cat((hidden, output.hidden_states[-2]), dim=-1), output[0]


def train_unet(pipe, latents, prompts, steps: int, batch: int, seed: int, log: List[Dict]):
    """The UNet's training, the text encoders' with it; returns EMA copies of the three (what is
    saved)."""
    encoder = PromptEncoder(pipe, prompts)
    models = torch.nn.ModuleList([pipe.unet, pipe.text_encoder, pipe.text_encoder_2]).requires_grad_(True)
    generator = torch.Generator().manual_seed(seed + 2)
    optimizer = torch.optim.AdamW(models.parameters(), lr=6e-4, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, 100))
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    alphas = pipe.scheduler.alphas_cumprod.float()
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    models.train()
    for step in range(steps):
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        x0 = latents[index]
        embeds, pooled = encoder([prompts[i] for i in index.tolist()])
        dropped = torch.rand(batch, generator=generator) < 0.1  # the empty prompt: zeros
        embeds = torch.where(dropped[:, None, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(dropped[:, None], torch.zeros_like(pooled), pooled)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = pipe.unet(
            noisy,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)},
        ).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), models.parameters()):
                kept.lerp_(live, 1 - decay)
        log.append({"stage": "unet", "step": step, "loss": float(loss.detach())})
        if step % 50 == 0 or step == steps - 1:
            print(f"unet step {step}/{steps}: loss {float(loss):.4f}", flush=True)
    return ema


def plot_losses(log: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for axis, stage in zip(axes, ("vae", "unet")):
        losses = np.array([r["loss"] for r in log if r["stage"] == stage])
        if len(losses) == 0:
            continue
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(losses, alpha=0.3, label="per step")
        axis.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"mean of {window}")
        axis.set_title(f"{stage} loss")
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@torch.no_grad()
def sample_grid(pipe, path: Path, seed: int, steps: int = 20) -> List[str]:
    """Four prompts, two seeds each, ``steps`` Euler steps with guidance 5: the model's samples."""
    from PIL import Image

    prompts = [
        "a red circle on a blue and yellow background",
        "a white square on a black and green background",
        "a yellow triangle on a purple and orange background",
        "a blue circle on a white and red background",
    ]
    rows = []
    for prompt in prompts:
        images = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=5.0,
            num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
        rows.append(np.concatenate(list(images), axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(grid).save(path)
    return prompts


def model_card(record: Dict) -> str:
    """The trained folder's README: what it is, and the command, seed and versions that made it."""
    env, settings = record["environment"], record["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    return (
        "# tiny-shapes: distripy's own small text-to-image model\n\n"
        "An SDXL-architecture pipeline (`StableDiffusionXLPipeline`: two CLIP text encoders, a UNet "
        "with ResNet blocks, GroupNorm, self- and cross-attention, an AutoencoderKL) trained by "
        "`bench/train_tiny.py` on 128 x 128 scenes it draws itself: one coloured shape (circle, "
        "square, triangle) on a two-colour gradient, prompted as "
        '"a red circle on a blue and yellow background". Colours: '
        f"{', '.join(COLORS)}. It is what distripy's demo, quality study and tests judge the "
        "asynchronous modes on; it is not a general image model.\n\n"
        "Made with (the same torch and thread count make the same weights):\n\n"
        f"    python bench/train_tiny.py --seed {settings['seed']} --vae-steps {settings['vae_steps']} "
        f"--unet-steps {settings['unet_steps']} --batch {settings['batch']} --scenes {settings['scenes']} "
        f"--threads {settings['threads']}\n\n"
        f"{record['minutes']:.1f} minutes on {env.get('device', 'a CPU')} ({versions}); the loss curve, "
        "its JSON and sample grid are `bench/results/train-tiny-*`.\n\n"
        "Load it offline with `distripy.pipelines.tiny.trained_sdxl_pipeline()`.\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=6000, help="pre-encoded scenes the UNet learns from")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (part of reproducing the weights)"
    )
    parser.add_argument("--results", type=Path, default=None, help="where the loss curve and samples go")
    parser.add_argument("--sample-steps", type=int, default=20, help="denoising steps of the sample grid")
    args = parser.parse_args(argv)

    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.monotonic()
    pipe = tiny_sdxl_pipeline(args.seed)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)
    log: List[Dict] = []

    train_vae(pipe.vae, args.vae_steps, args.seed, log)
    images, prompts = scenes(args.scenes, args.seed + 3)
    pipe.vae.register_to_config(scaling_factor=1.0)
    raw = encode_latents(pipe.vae, images[:512])
    scaling = float(1.0 / raw.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    latents = encode_latents(pipe.vae, images)
    vae_seconds = time.monotonic() - started
    print(f"vae trained in {vae_seconds:.0f} s; scaling_factor {scaling:.4f}", flush=True)

    unet, text_encoder, text_encoder_2 = train_unet(
        pipe, latents, prompts, args.unet_steps, args.batch, args.seed, log
    )
    pipe.register_modules(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    seconds = time.monotonic() - started
    print(f"trained in {seconds / 60:.1f} minutes", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    stem = results_path("train-tiny")
    if args.results is not None:
        stem = args.results / stem.name
    plot_losses(log, stem.with_suffix(".png"))
    samples = stem.with_name(stem.stem + "-samples.png")
    sample_prompts = sample_grid(pipe, samples, args.seed, args.sample_steps)
    record = write_json(
        stem,
        {
            "environment": environment(threads=args.threads),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "minutes": seconds / 60,
            "vae_minutes": vae_seconds / 60,
            "model_bytes": size,
            "scaling_factor": scaling,
            "distinct_prompts": len(set(prompts)),
            "sample_prompts": sample_prompts,
            "loss": log,
        },
    )
    (args.out / "README.md").write_text(model_card(__import__("json").loads(record.read_text())))
    print(f"wrote {args.out} ({size / 1e6:.1f} MB), {stem}, {stem.with_suffix('.png')}, {samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
