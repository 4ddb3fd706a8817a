"""distripy against DistriFusion's reference implementation, mode by mode and step by step.

The reference (``distrifuser==0.0.1b1`` from PyPI, frozen on ``diffusers==0.24.0``) runs in a
virtual environment of its own, which this script builds once (``--venv``): it and distripy
cannot share one diffusers. Both get the same seeded small SDXL-architecture UNet (saved as a config
and safetensors) and the same inputs at every step (teacher forcing): slowly varying latents
``x_k = cos(0.02 k) a + sin(0.02 k) b`` with the timestep falling by one per step, as adjacent
steps of a trained model's trajectory are alike. Each runs on ``--ranks`` CPU processes (gloo), one
band each, no CFG split; the single device is distripy's environment's plain UNet.

Per mode and step the table holds the relative error of the noise prediction against the single
device for distripy, the reference as it is, and the reference *aligned*, and distripy against the
aligned reference. Aligned: its GroupNorms compute the biased variance, as torch's and distripy's
do (``reference_worker._align_variance``, through their parameters). The warm-up is aligned for
every run: the reference's ``warmup_steps=W`` makes steps ``0..W`` synchronous, distripy's
``warmup_steps`` counts them, so distripy runs with ``W + 1`` (the defaults, 4 and 5, agree).

    python bench/reference_compare.py                       # 2 ranks, 12 steps, writes bench/results/
    python bench/reference_compare.py --ranks 4 --steps 20 --reference-warmup-steps 2

The reference's code is not part of this repository: pip installs it into ``--venv``.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Dict, List

import torch
from common import HERE, RESULTS, environment, write_json
from reference_worker import free_port, load_unet, model_inputs

REFERENCE_REQUIREMENTS = ("distrifuser==0.0.1b1", "diffusers==0.24.0", "huggingface_hub<0.26")
MODES = ("full_sync", "sync_gn", "corrected_async_gn", "stale_gn", "separate_gn", "naive_patch")
DEFAULT_VENV = Path.home() / ".cache" / "distripy" / "reference-venv"
TEXT_DIM = 32
TOKENS = 7
# The tiny SDXL-architecture UNet with SDXL's two ResNet layers per block and deeper transformer
# stacks, so that the reference exchanges more tensors per step than its ``comm_checkpoint`` (60)
# in every mode, as it does on SDXL. With fewer, its last group of a step leaves only when the
# first exchanged layer of the next step has already read its buffer, so that one layer's halos
# are two steps old (``sync_gn`` and ``separate_gn`` on the plain tiny UNet: 3e-3 apart).
MODEL_OVERRIDES = {"layers_per_block": 2, "transformer_layers_per_block": (1, 2, 4)}


# -- the reference's environment -------------------------------------------------------------------


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _reference_ready(path: Path) -> bool:
    python = _venv_python(path)
    if not python.exists():
        return False
    check = "import distrifuser, diffusers, torch; assert diffusers.__version__ == '0.24.0'"
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def build_reference_venv(path: Path, torch_requirement: str) -> Path:
    """The reference's virtual environment at ``path`` (built when missing): torch, the
    reference's pinned diffusers, and distrifuser itself without its other dependencies
    (transformers: the UNet needs no text encoder)."""
    if _reference_ready(path):
        return _venv_python(path)
    print(f"building the reference's environment in {path} ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    python = str(_venv_python(path))
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [torch_requirement], check=True)
    subprocess.run(pip + list(REFERENCE_REQUIREMENTS[1:]), check=True)
    subprocess.run(pip + ["--no-deps", REFERENCE_REQUIREMENTS[0]], check=True)
    if not _reference_ready(path):
        raise RuntimeError(
            f"{path}: the reference's environment does not import distrifuser and diffusers 0.24"
        )
    return _venv_python(path)


# -- model and inputs --------------------------------------------------------------------------------


def write_model_and_inputs(workdir: Path, steps: int, height: int, width: int, seed: int) -> None:
    """The UNet (config + safetensors) and every step's inputs, for both sides."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from distripy.pipelines.tiny import tiny_sdxl_unet_config

    config = dict(tiny_sdxl_unet_config(2 * TEXT_DIM, TEXT_DIM), **MODEL_OVERRIDES)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    (workdir / "unet_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(workdir / "unet.safetensors"))
    generator = torch.Generator().manual_seed(seed + 1)
    a, b = (torch.randn(1, 4, height, width, generator=generator) for _ in range(2))
    inputs = {
        "latents": [math.cos(0.02 * k) * a + math.sin(0.02 * k) * b for k in range(steps)],
        "timesteps": [700 - k for k in range(steps)],
        "encoder_hidden_states": torch.randn(1, TOKENS, 2 * TEXT_DIM, generator=generator),
        "text_embeds": torch.randn(1, TEXT_DIM, generator=generator),
        "time_ids": torch.tensor([[height * 8.0, width * 8.0, 0.0, 0.0, height * 8.0, width * 8.0]]),
    }
    torch.save(inputs, workdir / "inputs.pt")


def single_device(workdir: Path) -> List[torch.Tensor]:
    unet, inputs = load_unet(workdir), torch.load(workdir / "inputs.pt")
    with torch.no_grad():
        return [unet(**model_inputs(inputs, k)).sample for k in range(len(inputs["latents"]))]


# -- distripy's side ----------------------------------------------------------------------------------


def _distripy_rank(rank: int, world_size: int, port: int, workdir: Path, modes, warmup_steps: int) -> None:
    import torch.distributed as dist

    import distripy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        inputs = torch.load(workdir / "inputs.pt")
        for mode in modes:
            unet = load_unet(workdir)
            config = distripy.DistriConfig(mode=mode, warmup_steps=warmup_steps, split_batch=False)
            distripy.parallelize(unet, config)
            with torch.no_grad():
                predictions = [unet(**model_inputs(inputs, k)).sample for k in range(len(inputs["latents"]))]
            distripy.reset(unet)
            if rank == 0:
                torch.save(predictions, workdir / f"distripy-{mode}.pt")
    finally:
        dist.destroy_process_group()


def run_distripy(workdir: Path, modes, ranks: int, warmup_steps: int) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_distripy_rank, args=(ranks, free_port(), workdir, modes, warmup_steps), nprocs=ranks, join=True)


def run_reference(python: Path, workdir: Path, mode: str, ranks: int, warmup_steps: int, align: bool) -> Path:
    output = workdir / f"reference-{mode}{'-aligned' if align else ''}.pt"
    command = [
        str(python),
        str(HERE / "reference_worker.py"),
        "--workdir",
        str(workdir),
        "--mode",
        mode,
        "--warmup-steps",
        str(warmup_steps),
        "--ranks",
        str(ranks),
        "--output",
        str(output),
    ] + (["--align-variance"] if align else [])
    subprocess.run(command, check=True)
    return output


# -- the table -----------------------------------------------------------------------------------------


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def compare(workdir: Path, modes, single: List[torch.Tensor], synchronous_steps: int) -> Dict:
    table = {}
    for mode in modes:
        ours = torch.load(workdir / f"distripy-{mode}.pt")
        theirs = torch.load(workdir / f"reference-{mode}.pt")
        aligned = torch.load(workdir / f"reference-{mode}-aligned.pt")
        rows = {
            "distripy": [relative_error(p, s) for p, s in zip(ours, single)],
            "reference": [relative_error(p, s) for p, s in zip(theirs, single)],
            "reference_aligned": [relative_error(p, s) for p, s in zip(aligned, single)],
            "distripy_vs_reference_aligned": [relative_error(p, r) for p, r in zip(ours, aligned)],
        }
        asynchronous = slice(synchronous_steps, None)
        table[mode] = {
            "per_step": rows,
            "mean_async": {name: _mean(errors[asynchronous]) for name, errors in rows.items()},
            "max_all_steps": {name: max(errors) for name, errors in rows.items()},
        }
    return table


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def markdown(table: Dict, settings: Dict) -> str:
    lines = [
        "# distripy vs DistriFusion's reference implementation",
        "",
        f"Written by `{settings['command']}`. {settings['ranks']} ranks (CPU, gloo), {settings['steps']} "
        f"steps, teacher forcing on slowly varying inputs; synchronous steps: "
        f"{settings['synchronous_steps']} (reference `warmup_steps={settings['reference_warmup_steps']}`, "
        f"distripy `warmup_steps={settings['distripy_warmup_steps']}`). Relative error of the noise "
        "prediction; *aligned*: the reference with biased GroupNorm variance.",
        "",
        "| mode | distripy vs single | reference vs single | aligned reference vs single "
        "| distripy vs aligned reference (max, all steps) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, row in table.items():
        mean = row["mean_async"]
        lines.append(
            f"| `{mode}` | {mean['distripy']:.2e} | {mean['reference']:.2e} | "
            f"{mean['reference_aligned']:.2e} | {row['max_all_steps']['distripy_vs_reference_aligned']:.1e} |"
        )
    lines += ["", "Means over the asynchronous steps. Per step (distripy vs single device):", ""]
    steps = len(next(iter(table.values()))["per_step"]["distripy"])
    lines.append("| mode | " + " | ".join(str(k) for k in range(steps)) + " |")
    lines.append("| --- " * (steps + 1) + "|")
    for mode, row in table.items():
        lines.append(f"| `{mode}` | " + " | ".join(f"{e:.1e}" for e in row["per_step"]["distripy"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the reference's environment")
    parser.add_argument(
        "--torch-requirement",
        default=f"torch=={torch.__version__.split('+')[0]}",
        help="what pip installs as torch in the reference's environment (default: this torch's version)",
    )
    parser.add_argument("--ranks", type=int, default=2, help="a power of 2 (the reference's requirement)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--reference-warmup-steps", type=int, default=4, help="the reference's W: steps 0..W sync"
    )
    parser.add_argument("--height", type=int, default=32, help="latent rows")
    parser.add_argument("--width", type=int, default=32, help="latent columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--output", type=Path, default=RESULTS / "reference_compare.json")
    args = parser.parse_args(argv)
    if args.ranks < 2 or args.ranks & (args.ranks - 1):
        parser.error(f"--ranks {args.ranks}: the reference needs a power of 2, at least 2")
    if args.steps <= args.reference_warmup_steps + 1:
        parser.error(
            f"--steps {args.steps}: no asynchronous step after {args.reference_warmup_steps + 1} synchronous ones"
        )

    python = build_reference_venv(args.venv, args.torch_requirement)
    synchronous_steps = args.reference_warmup_steps + 1
    with tempfile.TemporaryDirectory(prefix="distripy-reference-") as folder:
        workdir = Path(folder)
        write_model_and_inputs(workdir, args.steps, args.height, args.width, args.seed)
        single = single_device(workdir)
        run_distripy(workdir, args.modes, args.ranks, synchronous_steps)
        for mode in args.modes:
            for align in (False, True):
                run_reference(python, workdir, mode, args.ranks, args.reference_warmup_steps, align)
        table = compare(workdir, args.modes, single, synchronous_steps)
        reference_versions = subprocess.run(
            [str(python), "-c", "import diffusers, torch; print(diffusers.__version__, torch.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    settings = {
        "command": " ".join(
            ["python", "bench/reference_compare.py"] + list(argv if argv is not None else sys.argv[1:])
        ),
        "ranks": args.ranks,
        "steps": args.steps,
        "synchronous_steps": synchronous_steps,
        "reference_warmup_steps": args.reference_warmup_steps,
        "distripy_warmup_steps": synchronous_steps,
        "latent": [args.height, args.width],
        "seed": args.seed,
        "reference": {
            "packages": list(REFERENCE_REQUIREMENTS),
            "diffusers": reference_versions[0],
            "torch": reference_versions[1],
        },
    }
    write_json(args.output, {"environment": environment(**settings), "modes": table})
    text = markdown(table, settings)
    partial = args.output.with_suffix(".md.partial")
    partial.write_text(text)
    partial.replace(args.output.with_suffix(".md"))
    print(text)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
