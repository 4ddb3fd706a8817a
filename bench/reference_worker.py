"""DistriFusion's reference implementation on CPU ranks, for ``bench/reference_compare.py``.

Runs inside the reference's own virtual environment (``distrifuser==0.0.1b1`` with its pinned
``diffusers==0.24.0``), which ``reference_compare.py`` builds; it imports nothing of distripy. It
loads the UNet ``reference_compare.py`` saved (config + safetensors; ``load_unet``, which that
script uses too, in its own environment), wraps it in the reference's
``DistriUNetPP`` (or ``NaivePatchUNet`` for ``naive_patch``), prepares the communication buffers
the way the reference's pipeline does, and feeds it the saved inputs step by step; rank 0 saves the
noise predictions.

The reference's algorithm is untouched. Only its device-only calls are made harmless on a CPU
(``_shim_devices``): its ``init_process_group("nccl")`` (the gloo group is already up),
``check_env`` (it reads ``torch.version.cuda``), ``torch.cuda.set_device``, and its
``DistriConfig.device`` (set to the CPU); CUDA graphs are off.

With ``--align-variance`` its GroupNorms' unbiased variance becomes the biased one that
``torch.nn.GroupNorm`` (and distripy) computes, through the modules' parameters alone
(``_align_variance``): the one documented difference besides the warm-up count.

    python bench/reference_worker.py --workdir DIR --mode corrected_async_gn --warmup-steps 4 \
        --ranks 2 --output DIR/reference-corrected_async_gn.pt [--align-variance]
"""

import argparse
import json
import math
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REFERENCE_MODES = ("full_sync", "sync_gn", "corrected_async_gn", "stale_gn", "separate_gn", "naive_patch")


def _shim_devices() -> None:
    """The reference's device-only calls, made harmless on a CPU."""
    import distrifuser.utils as utils

    utils.check_env = lambda: None
    torch.cuda.set_device = lambda device: None
    dist.init_process_group = lambda *args, **kwargs: None  # already initialised, with gloo


def load_unet(workdir: Path):
    """The UNet ``reference_compare.py`` saved, in this environment's diffusers."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    config = json.loads((workdir / "unet_config.json").read_text())
    unet = UNet2DConditionModel(**config).eval()
    unet.load_state_dict(load_file(str(workdir / "unet.safetensors")), strict=True)
    return unet


def model_inputs(inputs, step: int):
    """The UNet's keyword arguments at ``step``."""
    return dict(
        sample=inputs["latents"][step],
        timestep=inputs["timesteps"][step],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
    )


def _align_variance(unet, inputs, bands: int):
    """Make the reference's GroupNorms compute the biased variance, by their parameters alone;
    returns the function that puts the original parameters back.

    Where the reference computes statistics itself (every mode's synchronous steps, ``sync_gn``,
    ``full_sync``, ``corrected_async_gn`` and ``stale_gn`` throughout) it normalises with
    ``(x - m) / sqrt(k var + eps) * w + b``, ``var`` biased and ``k = N / (N - 1)`` over the ``N``
    elements per group of the *band* it sees. With ``eps' = k eps`` and ``w' = sqrt(k) w`` that is
    ``(x - m) / sqrt(var + eps) * w + b``: torch's GroupNorm. ``N`` per module comes from one
    forward pass of the whole image (a band has ``1 / bands`` of its rows). Where it calls the
    module itself (``separate_gn`` after the warm-up, ``naive_patch``) the original parameters
    are the aligned ones."""
    elements = {}

    def record(module, args, output):
        n, c, h, w = args[0].shape
        if h % bands:
            raise ValueError(f"a GroupNorm input of {h} rows does not split into {bands} bands")
        elements[module] = (c // module.num_groups) * (h // bands) * w

    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    hooks = [m.register_forward_hook(record) for m in norms]
    with torch.no_grad():
        unet(**model_inputs(inputs, 0))
    for hook in hooks:
        hook.remove()
    originals = [(norm, norm.eps, norm.weight.detach().clone()) for norm in norms]
    with torch.no_grad():
        for norm in norms:
            if not norm.affine:
                raise ValueError("a GroupNorm without affine parameters cannot be aligned")
            k = elements[norm] / (elements[norm] - 1)
            norm.eps = norm.eps * k
            norm.weight.mul_(math.sqrt(k))

    def restore() -> None:
        with torch.no_grad():
            for norm, eps, weight in originals:
                norm.eps = eps
                norm.weight.copy_(weight)

    return restore


def _rank(rank: int, world_size: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _run(rank, args)
    finally:
        dist.destroy_process_group()


def _run(rank: int, args) -> None:
    _shim_devices()
    from distrifuser.models.distri_sdxl_unet_pp import DistriUNetPP
    from distrifuser.models.naive_patch_sdxl import NaivePatchUNet
    from distrifuser.utils import DistriConfig, PatchParallelismCommManager

    workdir = Path(args.workdir)
    inputs = torch.load(workdir / "inputs.pt")
    latent = inputs["latents"][0]
    naive = args.mode == "naive_patch"
    config = DistriConfig(
        comm_checkpoint=args.comm_checkpoint,
        height=latent.shape[2] * 8,
        width=latent.shape[3] * 8,
        do_classifier_free_guidance=False,
        split_batch=False,
        warmup_steps=args.warmup_steps,
        mode="corrected_async_gn" if naive else args.mode,
        use_cuda_graph=False,
        parallelism="naive_patch" if naive else "patch",
    )
    config.device = torch.device("cpu")
    unet = load_unet(workdir)
    restore = None
    if args.align_variance and not naive:  # naive_patch runs torch's own GroupNorm
        restore = _align_variance(unet, inputs, config.n_device_per_batch)
    model = (NaivePatchUNet if naive else DistriUNetPP)(unet, config)
    with torch.no_grad():
        # The reference pipeline's prepare(): a pass that registers the exchanged tensors, the
        # buffers, a pre-run; then its __call__: the counter back to 0, one UNet call per step.
        first = model_inputs(inputs, 0)
        comm = PatchParallelismCommManager(config)
        model.set_comm_manager(comm)
        model.set_counter(0)
        model(**first, return_dict=False, record=True)
        if comm.numel > 0:
            comm.create_buffer()
        model.set_counter(0)
        model(**first, return_dict=False, record=True)
        model.set_counter(0)
        predictions = []
        for step in range(len(inputs["latents"])):
            if restore is not None and args.mode == "separate_gn" and step == args.warmup_steps + 1:
                restore()  # from here on its GroupNorms are torch's own
            predictions.append(model(**model_inputs(inputs, step), return_dict=False)[0].clone())
        comm.clear()
    if rank == 0:
        partial = Path(args.output).with_suffix(".partial")
        torch.save(predictions, partial)
        partial.replace(args.output)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", required=True, choices=REFERENCE_MODES)
    parser.add_argument("--warmup-steps", type=int, required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--output", required=True)
    parser.add_argument("--align-variance", action="store_true")
    parser.add_argument("--comm-checkpoint", type=int, default=60, help="the reference's default")
    args = parser.parse_args()
    mp.spawn(_rank, args=(args.ranks, free_port(), args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
