"""ComfyUI for the ComfyUI integration's tests: a real ComfyUI tree, imported as ComfyUI runs on a
CPU, and a tiny SDXL-architecture model sampled through ``ModelPatcher`` -> ``comfy.sample.sample``.

Where the tree comes from (``comfyui_source``): ``COMFYUI_PATH`` (a folder holding a user's
``comfy/``), else the vendored archive (``DISTRIPY_COMFYUI_ARCHIVE``, else the project's
``../shared/vendor/comfyui-*.tar.gz`` beside the repository), unpacked into a temporary folder at
test time (it is GPL-3.0 ComfyUI code: never copied into the repository or a wheel). Neither
there: the tests skip, saying so.

Importing ComfyUI changes its process for good (a ``torchvision`` stub in ``sys.modules``, CPU
mode fixed at the first import of ``comfy.model_management``), so a test runs it in a process of
its own (``multirank.run_on_ranks(body, 1)``), and ``import_comfyui`` is called there. What the
vendored tree needs besides (``../shared/vendor/README.md``) is in the ``test`` extra.
"""

import glob
import os
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Optional, Tuple

PATH_VARIABLE = "COMFYUI_PATH"
ARCHIVE_VARIABLE = "DISTRIPY_COMFYUI_ARCHIVE"
REPOSITORY = Path(__file__).resolve().parent.parent
NEEDED = ("einops", "torchsde", "comfy_aimdo", "psutil", "safetensors", "scipy", "tqdm")


def comfyui_source() -> Tuple[Optional[Path], str]:
    """``(a ComfyUI folder or the archive, "")``, or ``(None, why not)``."""
    missing = [name for name in NEEDED if _absent(name)]
    if missing:
        return None, f"ComfyUI needs {', '.join(missing)} (pip install -e '.[test]')"
    folder = os.environ.get(PATH_VARIABLE)
    if folder:
        if not (Path(folder) / "comfy" / "model_patcher.py").is_file():
            return None, f"{PATH_VARIABLE}={folder} holds no comfy/model_patcher.py"
        return Path(folder), ""
    archive = os.environ.get(ARCHIVE_VARIABLE)
    candidates = [archive] if archive else sorted(glob.glob(str(REPOSITORY.parent / "shared" / "vendor" / "comfyui-*.tar.gz")))
    if not candidates or not Path(candidates[-1]).is_file():
        return None, (
            f"no ComfyUI: set {PATH_VARIABLE} to a ComfyUI folder, or {ARCHIVE_VARIABLE} to the vendored archive "
            "(../shared/vendor/comfyui-*.tar.gz beside the repository)"
        )
    return Path(candidates[-1]), ""


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def import_comfyui(source: Path, cpu: bool = True):
    """Import ComfyUI from ``source`` (a folder, or the archive, unpacked here), in CPU mode unless
    ``cpu`` is false (then on the GPU, as ComfyUI starts by default); returns the ``comfy`` package,
    checked to be that tree's (an installed package named ``comfy`` would otherwise win: ``comfy/``
    is a namespace package)."""
    if source.is_file():
        folder = Path(tempfile.mkdtemp(prefix="comfyui-"))
        with tarfile.open(source) as archive:
            archive.extractall(folder, filter="data")
        source = folder
    sys.path.insert(0, str(source))
    if "torchvision" not in sys.modules:  # only ComfyUI's cosmos, cascade and ace models use it
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops"):
            sys.modules[name] = types.ModuleType(name)
    argv = sys.argv
    sys.argv = [argv[0] if argv else "pytest"] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (CPU mode is decided here)
    finally:
        sys.argv = argv
    import comfy

    paths = [str(Path(p).resolve()) for p in comfy.__path__]
    expected = str((source / "comfy").resolve())
    if expected not in paths:
        raise AssertionError(f"comfy was imported from {paths}, not from the tree under test {expected}")
    import comfy.model_base  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401

    return comfy


TINY_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[0, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1], context_dim=64,
    use_linear_in_transformer=True, use_spatial_transformer=True, num_head_channels=16, adm_in_channels=64 + 6 * 256,
    num_classes="sequential", legacy=False,
)  # fmt: skip
"""A tiny SDXL-architecture UNet of ComfyUI (``openaimodel.UNetModel``): two levels, a transformer
on the second and in the middle, SDXL's label embedding (pooled text + six size embeddings)."""


def sdxl_patcher(config: dict, seed: int = 0, dtype=None, device=None, offload_device=None):
    """A ``ModelPatcher`` of ComfyUI's ``model_base.SDXL`` around the UNet ``config``
    (``openaimodel.UNetModel``'s arguments), its parameters filled with seeded random values
    (ComfyUI's ops leave them uninitialised), in ``dtype`` (fp32) on ``device`` (the CPU)."""
    import torch

    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base

    class RandomSDXL(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}
        latent_format = comfy.latent_formats.SDXL

        def get_model(self, state_dict=None, prefix="", device=None):
            return comfy.model_base.SDXL(self, device=device)

    device = torch.device("cpu" if device is None else device)
    model = RandomSDXL(dict(config, dtype=dtype or torch.float32)).get_model(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.diffusion_model.named_parameters()):
            scale = 0.02 if parameter.dim() > 1 else 0.01
            values = torch.randn(parameter.shape, generator=generator, device=device, dtype=torch.float32)
            parameter.copy_(values * scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload_device or device)


def tiny_sdxl_patcher(seed: int = 0):
    """``sdxl_patcher`` of ``TINY_UNET`` on the CPU, its output convolution scaled so that the noise
    prediction is of unit scale (a random UNet's is tiny, and the sampled latents would then be the
    noise's alone, whatever the model computes)."""
    import torch

    patcher = sdxl_patcher(TINY_UNET, seed)
    unet = patcher.model.diffusion_model
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        x, context = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 7, 64, generator=generator)
        y = torch.randn(2, TINY_UNET["adm_in_channels"], generator=generator)
        spread = unet(x, torch.tensor([500.0, 500.0]), context=context, y=y).std()
        unet.out[-1].weight.div_(spread)
        unet.out[-1].bias.div_(spread)
    return patcher


def conditioning(seed: int = 0, tokens: int = 7, width: int = 64, pooled: int = 64, image_size: int = 256):
    """``(positive, negative)`` as ComfyUI's CLIPTextEncode gives them for SDXL: ``[[embeddings,
    {"pooled_output": ..., "width": ..., "height": ...}]]``, seeded random, of ``tokens`` tokens of
    ``width`` channels (the UNet's ``context_dim``) and a pooled vector of ``pooled``, for an image
    of ``image_size`` pixels square. The defaults fit ``TINY_UNET``."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def cond():
        size = {"width": image_size, "height": image_size}
        extra = {"pooled_output": torch.randn(1, pooled, generator=generator), **size}
        return [[torch.randn(1, tokens, width, generator=generator), extra]]

    return cond(), cond()


def sample(patcher, steps: int = 4, cfg: float = 5.0, seed: int = 1, size: Tuple[int, int] = (32, 32), sampler="euler",
           batch: int = 1, prompts=None):  # fmt: skip
    """``comfy.sample.sample`` (KSampler: ``sampler``, the ``normal`` schedule) from seeded noise
    and an empty latent of ``batch`` images of ``size``, conditioned on ``prompts`` (``(positive,
    negative)``; ``conditioning()`` by default): the final latent."""
    import torch

    import comfy.sample

    positive, negative = conditioning() if prompts is None else prompts
    noise = torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(seed))
    latent = torch.zeros(batch, 4, *size)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, "normal", positive, negative, latent, seed=seed,
                               disable_pbar=True)  # fmt: skip
