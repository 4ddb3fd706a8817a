"""``distripy.Engine``: 2 gloo rank processes driven from this process (the tiny SDXL pipeline).
Its images equal the single-device pipeline's in ``full_sync``; size, steps, guidance,
scheduler, LoRA and mode change between calls without a restart; progress reaches the caller; a
bad argument is the pipeline's error, a size the bands cannot take a ``BandGeometryError`` (the
ranks' error, whole), and the ranks serve on; a rank stopped (SIGSTOP) mid-request fails that
request at its deadline and every process the engine started is gone; the next request restarts
the ranks, and a ``CommTimeoutError`` the ranks raise arrives as one and has them restarted (a
rank killed with SIGKILL, and the next request on restarted ranks: ``tests/test_serve.py``,
through HTTP); a closed engine refuses requests."""

import functools
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import pipeline_variants
import serving_pipelines
from distripy.pipelines.tiny import tiny_sdxl_pipeline

SEED = 3
CALLS = [
    # (arguments, scheduler, with the LoRA)
    (dict(height=64, width=32, num_inference_steps=3, guidance_scale=5.0), None, False),
    (dict(height=32, width=64, num_inference_steps=2, guidance_scale=1.0), "ddim", True),
]


def _reference(arguments, scheduler, lora_file, seed):
    import diffusers

    pipe = tiny_sdxl_pipeline(SEED)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    if lora_file is not None:
        pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=os.path.basename(lora_file))
        pipe.set_adapters(["default_0"], [0.8])
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red boat", generator=generator, **arguments).images[0]


def _pixels(image):
    return np.asarray(image, dtype=np.float64)


def _assert_same_image(image, expected):
    """Equal up to the rounding to 8 bits of values that agree to ~1e-6 (full_sync vs one
    device): a pixel may differ by one level, rarely."""
    assert image.size == expected.size
    difference = np.abs(_pixels(image) - _pixels(expected))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (
        difference.max(),
        (difference > 0).mean(),
    )


def test_the_engine_serves_single_device_images_and_survives_a_stuck_rank(tmp_path, monkeypatch):
    import distripy
    from distripy.errors import BandGeometryError, CommTimeoutError
    from distripy.serving.http import error_status
    from distripy.serving.ranks import running

    pipeline_variants.make_lora(str(tmp_path / "lora"), ["to_q", "conv1"], 2)
    lora_file = str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    config = distripy.DistriConfig(mode="full_sync", split_batch=False, timeout_s=30)
    # the ranks unpickle the factory: they import serving_pipelines from this folder
    tests = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    factory = functools.partial(serving_pipelines.tiny_pipeline_failing_on_one_prompt, SEED)
    engine = distripy.Engine(factory, nproc=2, config=config, timeout_s=120)
    started = list(engine.pids)
    launcher = engine._ranks.launcher.pid
    try:
        assert len(started) == 2 and all(running(pid) for pid in started)
        # the geometry the ranks reported: 16 pixels per deepest row, 2 bands (no CFG split)
        assert engine.geometry.pixel_unit == 16 and engine.size_multiples() == (16, 16)
        assert engine.min_height(5.0) == 32 and engine.default_size == engine.geometry.default_size
        for index, (arguments, scheduler, lora) in enumerate(CALLS):
            steps = []
            loras = [(lora_file, 0.8)] if lora else []
            images = engine(
                "a red boat", seed=10 + index, scheduler=scheduler, loras=loras,
                progress=lambda step, total: steps.append((step, total)), **arguments,
            )  # fmt: skip
            expected = _reference(arguments, scheduler, lora_file if lora else None, 10 + index)
            _assert_same_image(images[0], expected)
            total = arguments["num_inference_steps"]
            assert steps == [(step, total) for step in range(1, total + 1)]
        # throughput, then adaptive (speedup 1.5: two waiting requests are past it): two
        # requests waiting are run at once, one per rank, each alone; one with a LoRA, one
        # without (the ranks must still hold the same adapters afterwards)
        from distripy.serving.scheduling import SpeedupEstimate

        calls = {
            "lora": (dict(height=96, width=32, num_inference_steps=2, guidance_scale=3.0), 21, True),
            "plain": (dict(height=32, width=64, num_inference_steps=3, guidance_scale=1.0), 22, False),
        }
        expected = {
            name: _reference(arguments, None, lora_file if lora else None, seed)
            for name, (arguments, seed, lora) in calls.items()
        }
        for policy in ("throughput", "adaptive"):
            engine.policy = policy
            engine.speedups = SpeedupEstimate(2, speedup=1.5)
            results = {}

            def submit(name):
                arguments, seed, lora = calls[name]
                loras = [(lora_file, 0.8)] if lora else []
                results[name] = engine("a red boat", seed=seed, loras=loras, **arguments)[0]

            with engine._lock:  # both wait before the first run starts: one batch of two
                threads = [threading.Thread(target=submit, args=(name,)) for name in calls]
                for thread in threads:
                    thread.start()
                while len(engine._queue) < 2:
                    time.sleep(0.01)
            for thread in threads:
                thread.join(120)
            for name in calls:
                _assert_same_image(results[name], expected[name])
            assert set(engine.speedups._seconds) == {((96, 32, 2, None), True), ((32, 64, 3, None), True)}
        # adaptive with one request waiting (below the speedup): patch-parallel. Another mode
        # for one request, then the engine's own again (no LoRA: disabled)
        async_image = engine("a red boat", seed=10, mode="corrected_async_gn", warmup_steps=1, **CALLS[0][0])[
            0
        ]
        assert async_image.size == (32, 64)
        again = engine("a red boat", seed=10, **CALLS[0][0])[0]
        _assert_same_image(again, _reference(CALLS[0][0], None, None, 10))
        assert ((64, 32, 3, None), False) in engine.speedups._seconds
        engine.policy = "latency"
        # a bad argument: the pipeline's error, raised here; the ranks serve on
        with pytest.raises(distripy.errors.InputError, match="divisible by 8"):
            engine("a red boat", height=30, width=32, num_inference_steps=2)
        # a size the ranks cannot cut into 2 bands: their BandGeometryError, whole (HTTP 400)
        with pytest.raises(BandGeometryError, match="cannot be cut into 2 bands") as refused:
            engine("a red boat", height=16, width=32, num_inference_steps=2)
        assert type(refused.value) is BandGeometryError and error_status(refused.value)[0] == 400
        assert engine.pids == started and engine.restarts == 0 and engine.healthy

        # a rank stopped mid-request: the request times out at its deadline, then all is stopped
        stopped = list(engine.pids)
        assert stopped == started

        def stop_rank_1(step, total):
            if step == 2:
                os.kill(stopped[1], signal.SIGSTOP)

        begun = time.monotonic()
        with pytest.raises(distripy.errors.EngineTimeoutError):
            engine(
                "a red boat",
                seed=1,
                progress=stop_rank_1,
                timeout_s=4,
                height=64,
                width=32,
                num_inference_steps=200,
            )
        assert 4 <= time.monotonic() - begun < 4 + 15
        assert not engine.healthy and engine.pids == []
        assert not running(launcher) and not any(running(pid) for pid in stopped)
        # the next request restarts the ranks; a CommTimeoutError they raise arrives as one (HTTP
        # 503), and the ranks, whose transfers cannot be trusted any more, are stopped again
        with pytest.raises(CommTimeoutError, match="staged") as failed:
            engine(serving_pipelines.FAILING_PROMPT, seed=1, height=64, width=32, num_inference_steps=2)
        assert type(failed.value) is CommTimeoutError and error_status(failed.value)[0] == 503
        assert engine.restarts == 1 and engine.failures == 2 and not engine.healthy
    finally:
        engine.close()
    with pytest.raises(distripy.errors.EngineError, match="closed"):
        engine("a red boat")


def test_an_engine_refuses_bad_settings_before_starting(tmp_path):
    import distripy

    with pytest.raises(distripy.errors.InputError, match="no model_index.json"):
        distripy.Engine(str(tmp_path), nproc=2)
    with pytest.raises(distripy.errors.InputTypeError, match="cannot be pickled"):
        distripy.Engine(lambda: None, nproc=2)
    with pytest.raises(distripy.errors.ConfigError, match="nproc=0"):
        distripy.Engine(functools.partial(tiny_sdxl_pipeline, SEED), nproc=0)
    with pytest.raises(distripy.errors.ConfigError, match="dtype='half'"):
        distripy.Engine(functools.partial(tiny_sdxl_pipeline, SEED), nproc=1, dtype="half")
    with pytest.raises(distripy.errors.ConfigError, match="policy='fast' is not one of latency, throughput"):
        distripy.Engine(functools.partial(tiny_sdxl_pipeline, SEED), nproc=1, policy="fast")


def test_the_policies_take_the_queue_as_the_scaling_argument_says():
    from distripy.errors import ConfigError
    from distripy.serving.scheduling import PRIOR_EFFICIENCY, SpeedupEstimate, plan_run

    assert plan_run("latency", 5, 8, 6.0) == (False, 1)
    assert plan_run("throughput", 1, 8, 6.0) == (True, 1)
    assert plan_run("throughput", 20, 8, 6.0) == (True, 8)
    # adaptive: patch-parallel while fewer requests wait than the speedup, one per rank beyond
    assert [plan_run("adaptive", q, 8, 5.7) for q in (1, 5, 6, 30)] == [
        (False, 1),
        (False, 1),
        (True, 6),
        (True, 8),
    ]
    assert plan_run("adaptive", 3, 1, 0.5) == (False, 1)  # one rank: nothing to choose
    assert plan_run("adaptive", 0, 8, 5.7) == (False, 0)
    with pytest.raises(ConfigError, match="policy='fast' is not one of"):
        plan_run("fast", 1, 2, 1.0)
    estimate = SpeedupEstimate(8)
    assert estimate.speedup("1024") == PRIOR_EFFICIENCY * 8
    estimate.record("1024", False, 0.5)  # patch-parallel: 0.5 s per image
    assert estimate.speedup("1024") == PRIOR_EFFICIENCY * 8  # until one-per-rank is measured too
    estimate.record("1024", True, 2.5)
    assert estimate.speedup("1024") == pytest.approx(5.0) and estimate.speedup("2048") == 6.0
    estimate.record("1024", True, 3.5)  # a moving average
    assert estimate.speedup("1024") == pytest.approx((0.7 * 2.5 + 0.3 * 3.5) / 0.5)
    assert SpeedupEstimate(8, speedup=3.0).speedup("1024") == 3.0
    with pytest.raises(ConfigError, match="speedup=0 must be a positive number"):
        SpeedupEstimate(8, speedup=0)
