"""The ComfyUI tree the ComfyUI integration is tested against (``comfyui_tree``), and the hooks
the integration relies on, as that tree behaves: through ``ModelPatcher`` -> ``comfy.sample.sample``
a model function wrapper (``set_model_unet_function_wrapper``) is called once per model call with
``cond_or_uncond`` ([uncond, cond] batched at cfg > 1 on a roomy device, one call at cfg = 1) and the
whole schedule in ``transformer_options["sample_sigmas"]`` (steps + 1 values ending in 0); its
result is the step's; a clone carries it while the model it was cloned from is untouched; the tiny
model samples deterministically. Each test runs ComfyUI in a process of its own."""

import pytest
import torch

from comfyui_tree import comfyui_source
from multirank import run_on_ranks

SOURCE, WHY_NOT = comfyui_source()
pytestmark = pytest.mark.skipif(SOURCE is None, reason=WHY_NOT)


def _hooks_body(rank, world_size, source):
    import comfyui_tree

    comfyui_tree.import_comfyui(source)
    base = comfyui_tree.tiny_sdxl_patcher(0)
    plain = comfyui_tree.sample(base, steps=4, cfg=5.0)
    seen = []

    def wrapper(apply_model, args):
        options = args["c"]["transformer_options"]
        seen.append((tuple(args["input"].shape), list(args["cond_or_uncond"]), options["sample_sigmas"].tolist(),
                     float(args["timestep"][0])))  # fmt: skip
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapped = base.clone()
    wrapped.set_model_unet_function_wrapper(wrapper)
    results = {
        "plain": plain,
        "again": comfyui_tree.sample(base, steps=4, cfg=5.0),
        "wrapped": comfyui_tree.sample(wrapped, steps=4, cfg=5.0),
        "base_untouched": "model_function_wrapper" not in base.model_options,
    }
    calls_cfg = list(seen)
    seen.clear()
    comfyui_tree.sample(wrapped, steps=3, cfg=1.0)
    results["calls_cfg"], results["calls_cfg1"] = calls_cfg, list(seen)
    return results


def test_the_model_wrapper_sees_each_call_and_the_schedule():
    (result,) = run_on_ranks(_hooks_body, 1, SOURCE, timeout=300)
    assert torch.equal(result["plain"], result["again"])  # deterministic
    assert torch.isfinite(result["plain"]).all() and result["plain"].abs().mean() > 0
    assert torch.equal(result["wrapped"], result["plain"])  # the wrapper's result is the step's
    assert result["base_untouched"]
    calls = result["calls_cfg"]
    assert len(calls) == 4 and all(shape == (2, 4, 32, 32) and which == [1, 0] for shape, which, _, _ in calls)
    sigmas = calls[0][2]
    assert len(sigmas) == 5 and sigmas[-1] == 0 and all(call[2] == sigmas for call in calls)
    # the step index is where the call's sigma sits in the schedule
    assert [sigmas.index(min(sigmas, key=lambda s: abs(s - sigma))) for _, _, _, sigma in calls] == [0, 1, 2, 3]
    single = result["calls_cfg1"]
    assert len(single) == 3 and all(shape == (1, 4, 32, 32) and which == [0] for shape, which, _, _ in single)
