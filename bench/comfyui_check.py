"""The ComfyUI node on a GPU: one worker on one GPU against the unwrapped model (one call, under
5 minutes on an H200, one JSON back).

What it checks, through ComfyUI's own ``comfy.sample.sample`` (KSampler, euler, cfg 5) on an
SDXL-sized ComfyUI UNet with seeded random weights (fp16, 1024², so a step has SDXL's kernels):

* the node with ``gpus=1`` runs through the whole threaded path: the ``ThreadedExecutor``'s
  worker thread, its rank's NCCL communicator made on the worker (``NcclComm`` bootstrapped through
  ``ThreadedComm``), the retrofitted structural copy, and CUDA graphs captured and replayed on that
  thread (``captures``: how many; with graphs off for the same run as the eager baseline);
* its latents against the unwrapped model's (``relative_error``: max |diff| / max |latent|; one
  band runs ComfyUI's own layers, so it should be 0 or fp16 rounding);
* the time of a whole sampling run, each variant's median over ``--repeats`` runs measured side by
  side, and each variant's ratio to the unwrapped model's (``speedup``: above 1 is faster).

Needs ComfyUI (``COMFYUI_PATH``, or the vendored archive: ``DISTRIPY_COMFYUI_ARCHIVE``) and what it
imports. On the lent GPU machine (no network, no ComfyUI), from the repository root, after, on
this machine:

    bash ../shared/gpu/fetch-wheels.sh einops torchsde trampoline comfy-aimdo tqdm psutil safetensors scipy
    mkdir -p .comfyui && cp ../shared/vendor/comfyui-*.tar.gz .comfyui/ && echo /.comfyui/ >> .git/info/exclude

one device command, carrying ``.whl`` and ``.comfyui``:

    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1
    DISTRIPY_COMFYUI_ARCHIVE=$(ls .comfyui/*.tar.gz) timeout 280 python3 bench/comfyui_check.py --output $OUT/comfyui-check.json

On CPU (``--dry-run``): the tiny UNet at 32x32 latents, the node on 1 and 2 CPU workers, eager.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from common import REPOSITORY, environment, results_path, write_json

sys.path.insert(0, str(REPOSITORY / "tests"))  # the ComfyUI fixture the tests use: comfyui_tree

SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048, use_linear_in_transformer=True,
    use_spatial_transformer=True, num_head_channels=64, adm_in_channels=2816, num_classes="sequential", legacy=False,
)  # fmt: skip
"""SDXL's UNet, as ComfyUI's ``supported_models.SDXL`` configures it."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny UNet on CPU workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    import comfyui_tree

    source, why_not = comfyui_tree.comfyui_source()
    if source is None:
        raise SystemExit(f"comfyui_check: {why_not}")
    comfyui_tree.import_comfyui(source, cpu=args.dry_run)
    from distripy.comfyui import parallel_unet_of, patch_parallel

    if args.dry_run:
        device, latent = torch.device("cpu"), 32
        base = comfyui_tree.tiny_sdxl_patcher(0)
        prompts = comfyui_tree.conditioning(seed=3, image_size=1024)
        variants = {"1 worker": dict(gpus=1), "2 workers": dict(gpus=2)}
    else:
        device, latent = torch.device("cuda", 0), 128
        base = comfyui_tree.sdxl_patcher(SDXL_UNET, 0, torch.float16, device, offload_device=torch.device("cpu"))
        prompts = comfyui_tree.conditioning(seed=3, tokens=77, width=2048, pooled=1280, image_size=1024)
        variants = {"1 worker, graphs": dict(gpus=1), "1 worker, eager": dict(gpus=1, graphs=False)}
    models = {"unwrapped": base}
    for name, options in variants.items():
        model = patch_parallel(base, gpus=options["gpus"], mode="full_sync", warmup=1, split_batch=False)
        if options.get("graphs") is False:  # the eager baseline of the same path
            parallel = parallel_unet_of(model)
            parallel.config = dataclasses.replace(parallel.config, use_cuda_graph=False)
        models[name] = model
    latents: Dict[str, torch.Tensor] = {}
    times: Dict[str, List[float]] = {name: [] for name in models}
    for name, model in models.items():  # a first run each: loads, tunes, captures
        latents[name] = comfyui_tree.sample(model, args.steps, size=(latent, latent), prompts=prompts)
    for _ in range(args.repeats):  # side by side: each variant once per round
        for name, model in models.items():
            _synchronize(device)
            start = time.perf_counter()
            latents[name] = comfyui_tree.sample(model, args.steps, size=(latent, latent), prompts=prompts)
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    reference = latents["unwrapped"].float()
    scale = float(reference.abs().max())
    rows = []
    for name in models:
        median = statistics.median(times[name])
        rows.append(
            dict(
                variant=name,
                run_s_median=median,
                step_s_median=median / args.steps,
                speedup=statistics.median(u / v for u, v in zip(times["unwrapped"], times[name])),
                relative_error=float((latents[name].float() - reference).abs().max()) / scale if scale else None,
                finite=bool(torch.isfinite(latents[name]).all()),
                captures=None if name == "unwrapped" else parallel_unet_of(models[name]).captures(),
            )
        )
    record = dict(
        environment=environment(comfyui=str(source.name), dry_run=args.dry_run),
        setting=dict(latent=latent, steps=args.steps, cfg=5.0, sampler="euler", mode="full_sync", repeats=args.repeats),
        rows=rows,
    )
    output = args.output or results_path("comfyui-check", "cpu" if args.dry_run else "gpu")
    write_json(output, record)
    for row in rows:
        print(f"{row['variant']:>18}: {row['run_s_median']:.3f} s/run, speedup {row['speedup']:.3f}, "
              f"error {row['relative_error']:.2e}, captures {row['captures']}")  # fmt: skip
    print(f"written: {output}")
    return record


if __name__ == "__main__":
    main()
