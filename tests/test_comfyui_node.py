"""The ComfyUI node against the real ComfyUI tree (``comfyui_tree``): a tiny SDXL-architecture model
through ``ModelPatcher`` -> ``comfy.sample.sample`` (KSampler: euler; heun and dpmpp_sde, which call
the model twice per step or between the schedule's sigmas), unwrapped and through the node on 1 to
4 CPU workers (``ThreadedExecutor``, one thread per rank).

* ``full_sync`` and ``exact`` equal the unwrapped model's final latents to fp32 rounding, with the
  CFG halves batched in one call (cfg > 1) or in separate calls (ComfyUI short of memory), one call
  (cfg = 1), uneven bands (3 ranks, and 4 ranks of a height that does not split evenly), the CFG
  batch split over two groups of ranks; so does a LoRA-patched clone of the node's output (its
  replicas' weights follow the patches) and the plain clone sampled after it;
* the asynchronous modes stay close to it;
* the node's output is a clone: the input model, its options and its UNet are as they were;
* what cannot be split is refused with a clear error before or at the first step, and the next
  run after such an error works.

Each body runs ComfyUI in a process of its own (importing it changes the process for good).
The comparisons are relative to the latents' largest magnitude (the tiny random model's latents
are not O(1)): fp32 rounding of a different summation order is ~1e-7 of it.
"""

import importlib.metadata

import pytest
import torch

from comfyui_tree import comfyui_source
from multirank import run_on_ranks

from distripy.comfyui.parallel_unet import parse_gpus, resolve_devices
from distripy.errors import ConfigError

SOURCE, WHY_NOT = comfyui_source()
needs_comfyui = pytest.mark.skipif(SOURCE is None, reason=WHY_NOT)

EXACT = 1e-5  # fp32: equal up to rounding
CLOSE = 4e-2  # the asynchronous modes on a random model, 4 steps, 1 warm-up step


def _relative(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


def _separate_calls(model):
    """ComfyUI short of memory: it calls the UNet once for the positive and once for the negative."""
    model.get_free_memory = lambda device: 0
    return model


def _equality_body(rank, world_size, source):
    import comfyui_tree

    comfyui_tree.import_comfyui(source)
    from distripy.comfyui import NODE_CLASS_MAPPINGS, parallel_unet_of, patch_parallel

    base = comfyui_tree.tiny_sdxl_patcher(0)
    references = {}

    def reference(cfg, size, control, batch=1, sampler="euler"):
        key = (cfg, size, control, batch, sampler)
        if key not in references:
            model = _with_control(base.clone()) if control else base
            references[key] = comfyui_tree.sample(model, cfg=cfg, size=size, batch=batch, sampler=sampler)
        return references[key]

    errors, calls = {}, {}
    cases = [
        (gpus, mode, dict(split=False))
        for gpus in (2, 3, 4)
        for mode in ("full_sync", "exact")
    ] + [
        (1, "full_sync", dict(split=False)),
        (2, "exact", dict(split=False, separate=True)),
        (3, "full_sync", dict(split=False, separate=True)),
        (2, "full_sync", dict(split=False, cfg=1.0)),
        (3, "exact", dict(split=False, cfg=1.0)),
        (4, "exact", dict(split=False, size=(36, 28))),  # 18 rows at the deepest level: 5, 5, 4, 4
        (4, "full_sync", dict(split=True)),  # two groups of two ranks, one CFG half each
        (2, "exact", dict(split=True, separate=True)),  # separate calls of one image: no split
        (3, "exact", dict(split=False, control=True)),  # ControlNet residuals, cut into the bands
        (4, "full_sync", dict(split=True, control=True, size=(36, 28))),
        (4, "exact", dict(split=True, batch=2)),  # two images: [uncond x2, cond x2], one call
        (3, "corrected_async_gn", dict(split=False, inference=True, exact=False)),  # as ComfyUI runs a prompt
        (2, "full_sync", dict(split=False, inference=True)),
        (3, "exact", dict(split=False, sampler="heun")),  # two calls per step
        (2, "exact", dict(split=False, sampler="dpmpp_sde")),  # calls between the schedule's sigmas
    ]
    for gpus, mode, options in cases:
        cfg, size, batch = options.get("cfg", 5.0), options.get("size", (32, 32)), options.get("batch", 1)
        sampler = options.get("sampler", "euler")
        whole, bands = [], []  # what the UNet is called with, and what each rank runs
        recorded = base.clone()  # a wrapper before distripy's sees the call, one after it a band
        if options.get("control"):
            _with_control(recorded)
        recorded.add_wrapper_with_key("diffusion_model", "test.before", _recorder(whole))
        model = patch_parallel(recorded, gpus=gpus, mode=mode, warmup=1, split_batch=options["split"])
        model.add_wrapper_with_key("diffusion_model", "test.after", _recorder(bands))
        if options.get("separate"):
            _separate_calls(model)
        key = (gpus, mode, tuple(sorted(options.items())))
        expected = reference(cfg, size, bool(options.get("control")), batch, sampler)
        with torch.inference_mode(options.get("inference", False)):
            result = comfyui_tree.sample(model, cfg=cfg, size=size, batch=batch, sampler=sampler)
            errors[key] = _relative(result, expected)
        calls[key] = (whole, bands)
    node = NODE_CLASS_MAPPINGS["DistripyPatchParallel"]()
    (model,) = node.patch(base, "2", "exact", 1, "enable")
    errors["node"] = _relative(comfyui_tree.sample(model), reference(5.0, (32, 32), False))
    (model,) = node.patch(base, "3", "auto", 1, "disable")  # 4 steps: auto runs exact
    errors["auto, 4 steps"] = _relative(comfyui_tree.sample(model), reference(5.0, (32, 32), False))
    errors["auto, 4 steps: chosen"] = parallel_unet_of(model).chosen_modes()
    control_matters = _relative(reference(5.0, (32, 32), True), reference(5.0, (32, 32), False))
    return errors, calls, node.INPUT_TYPES()["required"]["mode"][0], control_matters


def _with_control(model):
    """``model`` given ControlNet-like residuals at every call, as ComfyUI passes a ControlNet's:
    ``control = {"input": [...], "middle": [...]}``, the input list applied from its end (block 0
    first), each a whole map of its block's resolution; the same seeded values at every call."""

    def wrapper(chain, x, timesteps, context, y, control, options, **kwargs):
        batch, _, height, width = x.shape
        generator = torch.Generator().manual_seed(11)
        # the tiny UNet's input blocks: 32 channels at full size (conv, resblock), then the
        # downsample to half size, then 64 channels there; the middle block 64 at half size
        half = (-(-height // 2), -(-width // 2))
        shapes = [(32, height, width), (32, height, width), (32, *half), (64, *half)]
        residual = [torch.randn(batch, *shape, generator=generator).to(x) * 0.3 for shape in shapes]
        middle = torch.randn(batch, 64, *half, generator=generator).to(x) * 0.3
        return chain(x, timesteps, context, y, {"input": residual[::-1], "middle": [middle], "output": []}, options, **kwargs)

    model.add_wrapper_with_key("diffusion_model", "test.control", wrapper)
    return model


def _recorder(seen):
    def wrapper(chain, x, *args, **kwargs):  # args: timesteps, context, y, control, transformer_options
        seen.append((tuple(x.shape), list(args[4].get("cond_or_uncond", ()))))
        return chain(x, *args, **kwargs)

    return wrapper


@needs_comfyui
def test_full_sync_and_exact_equal_the_unwrapped_model():
    ((errors, calls, modes, control_matters),) = run_on_ranks(_equality_body, 1, SOURCE, timeout=600)
    assert "exact" in modes and "auto" in modes
    assert control_matters > 1e-2  # the residuals change the image: cut wrongly, they would show
    assert errors.pop("auto, 4 steps: chosen") == [("exact", 4)]
    for key, error in errors.items():
        assert error <= (EXACT if dict(key[2] if isinstance(key, tuple) else ()).get("exact", True) else CLOSE), (key, error)
    for (gpus, mode, options), (whole, bands) in calls.items():
        options = dict(options)
        height = options.get("size", (32, 32))[0]
        assert whole and all(shape[2] == height for shape, _ in whole)
        if options.get("separate"):  # the halves one call each
            assert sorted(which for _, which in whole[:2]) == [[0], [1]], whole
        elif options.get("cfg") == 1.0:
            assert all(which == [0] for _, which in whole), whole
        else:
            assert all(which == [1, 0] for _, which in whole), whole
        assert len(bands) == gpus * len(whole)  # every rank runs every call
        split = options["split"] and not options.get("separate") and options.get("cfg") != 1.0
        groups = 2 if split else 1
        tallest = -(-height // 2 // (gpus // groups)) * 2  # rows of the deepest level, 2 latent rows each
        assert all(shape[2] <= tallest for shape, _ in bands), (tallest, bands)
        if split:  # each group of ranks runs one CFG half, and its transformer options say which
            assert all(shape[0] == whole[0][0][0] // 2 for shape, _ in bands), bands
            assert sorted(which for _, which in bands[: gpus]) == [[0]] * (gpus // 2) + [[1]] * (gpus // 2), bands


def _lora_and_async_body(rank, world_size, source):
    import copy

    import comfyui_tree

    comfyui_tree.import_comfyui(source)
    from distripy.comfyui import parallel_unet_of, patch_parallel

    base = comfyui_tree.tiny_sdxl_patcher(0)
    unet = base.model.diffusion_model
    before = {
        "options": copy.deepcopy(base.model_options),
        "wrappers": copy.deepcopy(base.wrappers),
        "modules": [(name, type(module)) for name, module in unet.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()),
        "state": {k: v.clone() for k, v in unet.state_dict().items()},
    }
    plain = comfyui_tree.sample(base)

    # A LoRA-like patch on 3x3 convolutions (patch layers), GroupNorms and attention projections.
    generator = torch.Generator().manual_seed(5)
    names = [n for n, p in unet.named_parameters() if n.endswith("weight") and ("in_layers" in n or "to_k" in n or "to_q" in n)]
    patches = {f"diffusion_model.{n}": (torch.randn(unet.get_parameter(n).shape, generator=generator) * 0.2,) for n in names}
    reference_lora = base.clone()
    reference_lora.add_patches(patches, 0.7)
    lora_plain = comfyui_tree.sample(reference_lora)

    results = {"lora_changes_the_image": _relative(lora_plain, plain)}
    for gpus, mode in ((3, "exact"), (2, "full_sync")):
        parallel = patch_parallel(base, gpus=gpus, mode=mode, warmup=1, split_batch=False)
        lora = parallel.clone()
        lora.add_patches(patches, 0.7)
        results[f"lora {gpus} {mode}"] = _relative(comfyui_tree.sample(lora), lora_plain)
        results[f"base after lora {gpus} {mode}"] = _relative(comfyui_tree.sample(parallel), plain)
        stronger = parallel.clone()
        stronger.add_patches(patches, 1.0)
        reference_stronger = base.clone()
        reference_stronger.add_patches(patches, 1.0)
        results[f"stronger lora {gpus} {mode}"] = _relative(
            comfyui_tree.sample(stronger), comfyui_tree.sample(reference_stronger)
        )
    # Weights ComfyUI computes on the fly (low-VRAM mode, a LoRA applied per call, a manual cast):
    # weight_function / bias_function / comfy_cast_weights on a 3x3 convolution, a GroupNorm and
    # an attention projection of the model; the patch layers and the replicas must use the weights
    # its forward would (comfy.ops.cast_bias_weight).
    on_the_fly = {
        "input_blocks.1.0.in_layers.2": ("weight_function", [lambda w: w * 1.5]),
        "input_blocks.1.0.out_layers.0": ("weight_function", [lambda w: w + 0.5]),
        "input_blocks.3.1.transformer_blocks.0.attn1.to_k": ("weight_function", [lambda w: -w]),
        "output_blocks.0.0.in_layers.2": ("bias_function", [lambda b: b + 0.2]),
        "middle_block.0.out_layers.3": ("comfy_cast_weights", True),
    }

    def set_on_the_fly(chain, *args, **kwargs):  # after ComfyUI's load, which resets them
        for path, (name, value) in on_the_fly.items():
            setattr(chain.class_obj.get_submodule(path), name, value)
        return chain(*args, **kwargs)

    casting = base.clone()
    casting.add_wrapper_with_key("diffusion_model", "test.on_the_fly", set_on_the_fly)
    casting_plain = comfyui_tree.sample(casting)
    results["on-the-fly weights change the image"] = _relative(casting_plain, plain)
    for gpus, mode in ((3, "exact"), (2, "full_sync")):
        parallel = patch_parallel(casting, gpus=gpus, mode=mode, warmup=1, split_batch=False)
        results[f"on-the-fly weights {gpus} {mode}"] = _relative(comfyui_tree.sample(parallel), casting_plain)
    for path, (name, _) in on_the_fly.items():
        delattr(unet.get_submodule(path), name)

    close = {}
    for mode in ("corrected_async_gn", "sync_gn", "stale_gn", "separate_gn", "naive_patch"):
        for gpus in (2, 3):
            parallel = patch_parallel(base, gpus=gpus, mode=mode, warmup=1, split_batch=False)
            close[mode, gpus] = _relative(comfyui_tree.sample(parallel), plain)
    separate = _separate_calls(patch_parallel(base, gpus=3, mode="corrected_async_gn", warmup=1, split_batch=False))
    close["corrected_async_gn", "3, separate calls"] = _relative(comfyui_tree.sample(separate), plain)
    automatic = patch_parallel(base, gpus=2, mode="auto", split_batch=False)  # 12 steps: asynchronous
    close["auto", "2, 12 steps"] = _relative(comfyui_tree.sample(automatic, steps=12), comfyui_tree.sample(base, steps=12))
    close["auto: chosen"] = parallel_unet_of(automatic).chosen_modes()
    after = {
        "options": base.model_options,
        "wrappers": base.wrappers,
        "modules": [(name, type(module)) for name, module in unet.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()),
        "state_equal": all(torch.equal(v, before["state"][k]) for k, v in unet.state_dict().items()),
    }
    unchanged = {
        "options": repr(after["options"]) == repr(before["options"]),
        "wrappers": repr(after["wrappers"]) == repr(before["wrappers"]),
        "modules": after["modules"] == before["modules"],
        "hooks": after["hooks"] == before["hooks"] == 0,
        "weights": after["state_equal"],
    }
    return results, close, unchanged


@needs_comfyui
def test_lora_clones_async_modes_and_an_untouched_input_model():
    ((results, close, unchanged),) = run_on_ranks(_lora_and_async_body, 1, SOURCE, timeout=600)
    assert results.pop("lora_changes_the_image") > 1e-3  # the patches matter
    assert results.pop("on-the-fly weights change the image") > 1e-3
    for key, error in results.items():
        assert error <= EXACT, (key, error)
    # the asynchronous modes close to it (DistriFusion's default much closer), all far closer than
    # bands that exchange nothing
    assert close.pop("auto: chosen") == [("corrected_async_gn", 3)]  # a quarter of 12 steps synchronous
    naive = min(close.pop(("naive_patch", gpus)) for gpus in (2, 3))
    assert all(error <= CLOSE for error in close.values()), close
    assert all(error <= CLOSE / 4 for (mode, _), error in close.items() if mode == "corrected_async_gn"), close
    assert naive > 4 * max(close.values()), (naive, close)
    assert all(unchanged.values()), unchanged


def _refusals_body(rank, world_size, source):
    import comfyui_tree

    comfyui_tree.import_comfyui(source)
    from distripy.comfyui import patch_parallel

    base = comfyui_tree.tiny_sdxl_patcher(0)
    outcomes = {}

    def outcome(name, fn):
        try:
            fn()
            outcomes[name] = None
        except Exception as error:  # noqa: BLE001 - the test reports which error, and its message
            outcomes[name] = (type(error).__name__, str(error))

    parallel = patch_parallel(base, gpus=4, mode="full_sync", warmup=1, split_batch=False)
    outcome("too few rows", lambda: comfyui_tree.sample(parallel, size=(4, 32)))  # 2 deepest rows, 4 bands
    outcome("odd height", lambda: comfyui_tree.sample(parallel, size=(33, 32)))
    plain = comfyui_tree.sample(base)
    recovered = comfyui_tree.sample(parallel)  # the failed runs leave nothing behind
    outcomes["recovered"] = _relative(recovered, plain)

    replaced = parallel.clone()
    replaced.set_model_attn1_replace(lambda q, k, v, extra: q, "input", 1)
    outcome("attn1 replace", lambda: comfyui_tree.sample(replaced))
    shrunk = parallel.clone()
    shrunk.set_model_input_block_patch(lambda h, options: h)
    outcome("input block patch", lambda: comfyui_tree.sample(shrunk))

    other = base.clone()
    other.add_object_patch("diffusion_model", torch.nn.Linear(4, 4))
    outcome("not a UNet", lambda: patch_parallel(other, gpus=2))
    outcome("no such GPUs", lambda: patch_parallel(_on_cuda(base), gpus=2))
    outcome("bad gpus", lambda: patch_parallel(base, gpus="two"))
    outcome("bad mode", lambda: patch_parallel(base, gpus=2, mode="fast"))

    # The retrofitted copy fuses every ResBlock's GroupNorm -> SiLU -> conv (in and out) and the
    # output head's; the model itself keeps its plain sequences.
    from distripy.comfyui.layers import FusedNormConv
    from distripy.comfyui.retrofit import retrofit
    from distripy.config import DistriConfig
    from distripy.parallel.context import PatchContext

    unet = base.model.diffusion_model
    copy = retrofit(unet, PatchContext(DistriConfig()))
    resblocks = sum(1 for m in unet.modules() if type(m).__name__ == "ResBlock")
    fused = sum(1 for m in copy.modules() if isinstance(m.__dict__.get("forward"), FusedNormConv))
    untouched = not any("forward" in m.__dict__ for m in unet.modules())
    outcomes["fused"] = (fused, 2 * resblocks + 1, untouched)
    return outcomes


def _on_cuda(patcher):
    clone = patcher.clone()
    clone.load_device = torch.device("cuda", 0)
    return clone


@needs_comfyui
def test_what_cannot_be_split_is_refused_clearly():
    (outcomes,) = run_on_ranks(_refusals_body, 1, SOURCE, timeout=600)
    assert outcomes.pop("recovered") <= EXACT
    fused, expected_fused, untouched = outcomes.pop("fused")
    assert fused == expected_fused > 0 and untouched
    expected = {
        "too few rows": ("BandGeometryError", ""),
        "odd height": ("BandGeometryError", ""),
        "attn1 replace": ("UnsupportedModuleError", "attn1 replacement"),
        "input block patch": ("UnsupportedModuleError", "input_block_patch"),
        "not a UNet": ("UnsupportedModuleError", "Linear"),
        "no such GPUs": ("ConfigError", "gpus=2"),
        "bad gpus": ("ConfigError", "'two'"),
        "bad mode": ("ConfigError", "fast"),
    }
    for name, (kind, words) in expected.items():
        assert outcomes[name] is not None, name
        assert outcomes[name][0] == kind and words in outcomes[name][1], (name, outcomes[name])


def test_gpus_are_a_count_or_indices():
    assert parse_gpus(3) == 3 and parse_gpus("4") == 4 and parse_gpus(" 2 ") == 2
    assert parse_gpus("0,2,3") == (0, 2, 3) and parse_gpus([1, 0]) == (1, 0)
    for bad in (0, "0", -1, "x", "0,0", [0, -1], True, [], "1.5"):
        with pytest.raises(ConfigError, match="gpus"):
            parse_gpus(bad)
    cpu = torch.device("cpu")
    assert resolve_devices(3, cpu) == [cpu] * 3 and resolve_devices((0, 1), cpu) == [cpu] * 2
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"has {visible} GPU"):
        resolve_devices(visible + 1, torch.device("cuda", 0))
    if visible < 8:
        with pytest.raises(ConfigError, match=r"GPU \[.*7\] does not exist"):
            resolve_devices((0, 7), torch.device("cuda", 0))


def test_the_nodes_are_an_entry_point_of_comfyui_custom_nodes():
    points = [p for p in importlib.metadata.entry_points(group="comfyui.custom_nodes") if p.name == "distripy"]
    assert len(points) == 1, points
    module = points[0].load()
    assert module.NODE_DISPLAY_NAME_MAPPINGS["DistripyPatchParallel"] == "Patch-parallel (distripy)"
    node = module.NODE_CLASS_MAPPINGS["DistripyPatchParallel"]
    assert node.RETURN_TYPES == ("MODEL",) and callable(getattr(node, node.FUNCTION))
    assert set(node.INPUT_TYPES()["required"]) == {"model", "gpus", "mode", "warmup", "split_batch"}


def test_the_example_workflow_feeds_the_node_what_it_takes():
    import json
    from pathlib import Path

    from distripy.comfyui import NODE_CLASS_MAPPINGS

    workflow = json.loads((Path(__file__).resolve().parent.parent / "docs" / "comfyui-workflow-api.json").read_text())
    (node_id,) = [key for key, node in workflow.items() if node["class_type"] == "DistripyPatchParallel"]
    node = NODE_CLASS_MAPPINGS["DistripyPatchParallel"]
    required = node.INPUT_TYPES()["required"]
    inputs = workflow[node_id]["inputs"]
    assert set(inputs) == set(required)
    assert inputs["mode"] in required["mode"][0] and inputs["split_batch"] in required["split_batch"][0]
    parse_gpus(inputs["gpus"])
    samplers = [n for n in workflow.values() if n["class_type"] == "KSampler"]
    assert [s["inputs"]["model"] for s in samplers] == [[node_id, 0]]  # the sampler takes the node's model


@needs_comfyui
def test_the_prepared_gpu_check_dry_runs_on_cpu(tmp_path):
    """``bench/comfyui_check.py`` (the node on a GPU, for a session lent one), scaled down to the
    tiny UNet on CPU workers, in a Python where diffusers and PEFT cannot be imported (a ComfyUI
    environment need not have them): it runs, writes its JSON, and the node's latents equal the
    model's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repository = Path(__file__).resolve().parent.parent
    output = tmp_path / "check.json"
    command = [sys.executable, str(repository / "bench" / "comfyui_check.py"), "--dry-run", "--repeats", "1",
               "--steps", "2", "--output", str(output)]  # fmt: skip
    environment = dict(os.environ, DISTRIPY_COMFYUI_ARCHIVE=str(SOURCE)) if SOURCE.is_file() else dict(os.environ)
    # As in a ComfyUI environment, which need not have diffusers or PEFT: importing them fails there.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_WITHOUT_DIFFUSERS)
    environment["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site")] + [environment.get("PYTHONPATH", "")])
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(output.read_text())
    assert record["environment"]["dry_run"] is True
    rows = {row["variant"]: row for row in record["rows"]}
    assert set(rows) == {"unwrapped", "1 worker", "2 workers"}
    assert all(row["finite"] and row["relative_error"] <= EXACT and row["run_s_median"] > 0 for row in rows.values())
    assert "diffusers" not in record["environment"]["versions"]  # it ran without


_WITHOUT_DIFFUSERS = """
import sys


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "peft"):
            raise ImportError(name + " is not installed in this ComfyUI environment")
        return None


sys.meta_path.insert(0, _Absent())
"""
