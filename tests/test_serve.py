"""``distripy serve`` as a real process (2 gloo ranks, the tiny SDXL pipeline) answering a real
HTTP client on 127.0.0.1: 16 concurrent requests all get their single-device images; a full
queue answers 429 with Retry-After; bad fields are 400s that name them (a LoRA the server was not
started with, a ControlNet image it has no ControlNet for, ... included); the official ``openai``
client's ``images.generate`` gets its images, with the API's fields (``quality``,
``output_format``, ...) and the diffusers names in ``extra_body``; an img2img request (a base64
start image and a strength) gets the single-device pipeline's image; a rank killed mid-request
makes that request a 503 and the ranks restart, after which requests succeed; SIGTERM ends the
service and every process it started. The tests share one server and run in file order."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from distripy.serving.ranks import running as _running

SEED = 3
SIZE = dict(width=32, height=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, path, body=None, timeout=120):
    """(status, headers by lower-case name, JSON body) of a GET (no body) or a POST."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            headers = {key.lower(): value for key, value in response.headers.items()}
            return response.status, headers, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        headers = {key.lower(): value for key, value in error.headers.items()}
        return error.code, headers, json.loads(error.read() or b"null")


def _metric(url, name) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _wait(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from distripy.pipelines.tiny import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline(seed=SEED).save_pretrained(folder)
    return folder


def _start_serving(command, url):
    """Start ``command`` (its own session) and wait until ``url`` answers ``/health`` with 200."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )

    def up():
        assert process.poll() is None, process.stdout.read()[-3000:]
        try:
            return _request(url, "/health", timeout=5)[0] == 200
        except OSError:
            return False

    try:
        _wait(up, "the server to start", timeout=180)
    except BaseException:
        process.kill()
        process.communicate(timeout=30)
        raise
    return process


@pytest.fixture(scope="module")
def server(tiny_model):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "distripy.cli", "serve", "--model", str(tiny_model), "--nproc", "2",
        "--port", str(port), "--queue-size", "16", "--request-timeout", "60", "--timeout", "30",
    ]  # fmt: skip
    process = _start_serving(command, url)
    try:
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


@pytest.fixture(scope="module")
def single_device(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(single_device):
    pipe = single_device

    def image(seed, steps=2):
        generator = torch.Generator().manual_seed(seed)
        result = pipe(
            "a red boat", num_inference_steps=steps, guidance_scale=5.0, generator=generator, **SIZE
        )
        return np.asarray(result.images[0], dtype=np.float64)

    return image


def _body(seed, steps=2, **extra):
    return dict(
        prompt="a red boat",
        size=f"{SIZE['width']}x{SIZE['height']}",
        steps=steps,
        guidance=5.0,
        seed=seed,
        **extra,
    )


def _decoded(answer) -> np.ndarray:
    from PIL import Image

    (item,) = answer["data"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.float64)


def _same_image(image, expected):
    difference = np.abs(image - expected)  # equal up to 8-bit rounding of values equal to ~1e-6
    return image.shape == expected.shape and difference.max() <= 1 and (difference > 0).mean() < 0.005


def test_sixteen_concurrent_requests_all_get_their_images(server, reference):
    url, _ = server
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda seed: _request(url, "/v1/images/generations", _body(seed)), range(16)))
    for seed, (status, _, answer) in enumerate(answers):
        assert status == 200, answer
        assert answer["distripy"]["seed"] == seed
        assert _same_image(_decoded(answer), reference(seed)), seed
    assert _metric(url, "distripy_images_total") >= 16


def test_a_full_queue_answers_429_with_retry_after(server):
    url, _ = server
    with ThreadPoolExecutor(17) as pool:
        slow = pool.submit(_request, url, "/v1/images/generations", _body(100, steps=80))
        _wait(lambda: _metric(url, "distripy_queue_depth") == 1, "the slow request to run")
        quick = [pool.submit(_request, url, "/v1/images/generations", _body(101 + i)) for i in range(15)]
        _wait(lambda: _metric(url, "distripy_queue_depth") == 16, "the queue to fill")
        status, headers, answer = _request(url, "/v1/images/generations", _body(200))
        assert status == 429 and answer["error"]["type"] == "queue_full", answer
        assert int(headers["retry-after"]) >= 1
        assert all(future.result()[0] == 200 for future in [slow] + quick)


BAD = [
    (dict(size="32by64"), "size"),
    (dict(size="32x60"), "size"),  # 60 rows are not whole rows of the UNet's deepest level
    (dict(size="32x16", guidance=1.0), "size"),  # one deepest row: too few for 2 bands
    (dict(size="30x64"), "size"),
    (dict(scheduler="warp"), "scheduler"),
    (dict(steps=0), "steps"),
    (dict(steps=10_000), "steps"),
    (dict(n=0), "n"),
    (dict(guidance="high"), "guidance"),
    (dict(mode="fast"), "mode"),
    (dict(response_format="url"), "response_format"),
    (dict(colour="blue"), "colour"),
    (dict(prompt=""), "prompt"),
    (dict(stream=True), "stream"),
    (dict(output_format="gif"), "output_format"),
    (dict(output_compression=50), "output_compression"),  # png
    (dict(num_inference_steps=3), "num_inference_steps"),  # beside steps=2
    (dict(height=48), "height"),  # beside size 32x64
    (dict(loras=[{"path": "/etc/passwd", "scale": 1.0}]), "loras"),  # a server loads no file a client names
    (dict(control_images=["aGVsbG8="]), "control_images"),  # it loaded no ControlNet
    (dict(refiner_start=0.5), "refiner_start"),  # nor a refiner
    (dict(init_image="not base64!"), "init_image"),
    (dict(init_image="aGVsbG8="), "init_image"),  # base64, but not an image
    (dict(strength=0.5), "strength"),  # without init_image
    (dict(timestep_spacing="sideways"), "timestep_spacing"),
]


def test_bad_fields_are_400s_that_name_them(server):
    url, _ = server
    for change, field in BAD:
        status, _, answer = _request(url, "/v1/images/generations", dict(_body(1), **change))
        assert status == 400 and answer["error"]["param"] == field, (change, answer)
        assert field in answer["error"]["message"]
    status, _, answer = _request(url, "/v1/images/generations", b"{not json")
    assert status == 400 and answer["error"]["param"] == "body"
    status, _, answer = _request(
        url, "/v1/images/generations", json.dumps(_body(1, negative_prompt="x" * 70_000)).encode()
    )
    assert status == 400 and answer["error"]["param"] == "body" and "bytes" in answer["error"]["message"]


def test_the_openai_client_gets_its_images(server, reference):
    """``client.images.generate`` as a new user writes it: the API's fields, distripy's and the
    diffusers names in ``extra_body``; the images are the single-device pipeline's."""
    import openai
    from PIL import Image

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
    common = dict(prompt="a red boat", model="distripy", size="32x64", user="tester", style="natural")
    png = client.images.generate(
        **common, n=1, quality="high", response_format="b64_json", moderation="low", background="opaque",
        extra_body={"guidance_scale": 5.0, "num_inference_steps": 2, "seed": 11},
    )  # fmt: skip
    assert png.output_format == "png" and png.size == "32x64" and png.background == "opaque"
    assert png.quality is None  # the steps were given: the quality preset did not choose them
    assert _same_image(_decoded(png.model_dump()), reference(11))
    jpeg = client.images.generate(
        **common, quality="low", output_format="jpeg", output_compression=90,
        extra_body={"guidance_scale": 5.0, "seed": 12, "negative_prompt": "blurry"},
    )  # fmt: skip
    assert jpeg.output_format == "jpeg" and jpeg.quality == "low"
    assert jpeg.model_dump()["distripy"]["steps"] == 15  # quality="low"'s preset
    (item,) = jpeg.data
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.format == "JPEG" and image.size == (32, 64)
    sized = client.images.generate(
        prompt="a red boat", output_format="webp",
        extra_body={"width": 32, "height": 64, "steps": 2, "guidance": 5.0, "seed": 13},
    )  # fmt: skip
    (item,) = sized.data
    assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).format == "WEBP"
    # what cannot be served is a 400 the client raises, naming the field
    refusals = [
        (dict(extra_body={"stream": True}), "stream"),  # (a client that knows stream=True would await events)
        (dict(response_format="url"), "response_format"),
        (dict(background="transparent"), "background"),
        (dict(output_format="gif"), "output_format"),
        (dict(extra_body={"guidance_scale": 5.0, "guidance": 7.0}), "guidance_scale"),
        (dict(extra_body={"colour": "blue"}), "colour"),
        (dict(size="32x60"), "size"),
    ]
    for change, field in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(**dict(common, **change))
        assert refused.value.status_code == 400 and refused.value.body["param"] == field, change
    with pytest.raises(openai.BadRequestError, match="guidance=7.0"):
        client.images.generate(**common, extra_body={"guidance_scale": 5.0, "guidance": 7.0})


def test_an_img2img_request_gets_the_single_device_image(server, single_device):
    """A start image sent as base64 (its size the request's), a strength: the image the one-device
    img2img pipeline makes; one of another size is a 400 naming it."""
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    url, _ = server
    rng = np.random.default_rng(4)
    start = Image.fromarray((rng.random((SIZE["height"], SIZE["width"], 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    start.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    # no guidance: no CFG split, so the image is cut into 2 bands (the start image's encoding too)
    body = dict(prompt="a red boat", init_image=encoded, strength=0.6, steps=3, guidance=1.0, seed=21)
    status, _, answer = _request(url, "/v1/images/generations", body)
    assert status == 200, answer
    assert answer["size"] == "32x64"  # the start image's
    one = AutoPipelineForImage2Image.from_pipe(single_device)
    expected = one(
        "a red boat", image=start, strength=0.6, num_inference_steps=3, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(21),
    ).images[0]  # fmt: skip
    assert _same_image(_decoded(answer), np.asarray(expected, dtype=np.float64))
    status, _, answer = _request(url, "/v1/images/generations", dict(body, size="64x64"))
    assert status == 400 and answer["error"]["param"] == "init_image", answer
    assert "32x64 pixels, but the request's size is 64x64" in answer["error"]["message"]


def test_a_killed_rank_fails_its_request_with_503_then_requests_succeed(server, reference):
    url, _ = server
    status, _, health = _request(url, "/health")
    assert status == 200 and len(health["pids"]) == 2
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_request, url, "/v1/images/generations", _body(5, steps=150))
        _wait(lambda: _metric(url, "distripy_queue_depth") == 1, "the request to run")
        time.sleep(0.5)  # into its steps (were it not, the request fails all the same)
        os.kill(health["pids"][1], signal.SIGKILL)
        status, _, answer = slow.result(timeout=120)
    assert status == 503 and answer["error"]["type"] in ("engine_failed", "comm_failed", "timeout"), answer
    assert not any(_running(pid) for pid in health["pids"])
    _wait(lambda: _request(url, "/health", timeout=5)[0] == 200, "the ranks to restart", timeout=180)
    status, _, answer = _request(url, "/v1/images/generations", _body(7))
    assert status == 200 and _same_image(_decoded(answer), reference(7))
    assert _request(url, "/health")[2]["restarts"] == 1


def test_sigterm_ends_the_service_and_every_process_it_started(server):
    url, process = server
    pids = _request(url, "/health")[2]["pids"]
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
    _wait(lambda: not any(_running(pid) for pid in pids), "the ranks to end", timeout=10)
    assert "generated 1 image(s) 32x64" in output  # one log line per request


def test_under_torchrun_rank_0_serves_and_every_process_is_a_rank(tiny_model, reference):
    """``distripy serve`` started by torchrun (as on several nodes; here 2 local processes): the
    launcher's processes are the ranks, rank 0 answers HTTP; SIGTERM to torchrun ends them all."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "distripy.cli", "serve", "--model", str(tiny_model), "--port", str(port), "--timeout", "30",
    ]  # fmt: skip
    process = _start_serving(command, url)
    try:
        health = _request(url, "/health")[2]
        assert health["ranks"] == 2 and len(health["pids"]) == 2
        status, _, answer = _request(url, "/v1/images/generations", _body(31))
        assert status == 200, answer
        assert _same_image(_decoded(answer), reference(31))
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        _wait(lambda: not any(_running(pid) for pid in health["pids"]), "the ranks to end", timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=30)


def test_ranks_that_cannot_be_restarted_end_the_service(monkeypatch):
    """After a failure, a torchrun group's engine cannot restart its ranks: the service stops
    itself (uvicorn's graceful SIGTERM) so that ``distripy serve`` exits 1 and torchrun restarts
    the group; a restartable engine is restarted in the background instead."""
    from distripy.serving import http

    class FakeEngine:
        restartable = False
        restarted = 0

        def restart(self):
            FakeEngine.restarted += 1

    signals = []
    monkeypatch.setattr(http.os, "kill", lambda pid, signum: signals.append((pid, signum)))
    service = http._Service(FakeEngine(), queue_size=4, request_timeout_s=10)
    service.recover()
    assert signals == [(os.getpid(), signal.SIGTERM)] and FakeEngine.restarted == 0
    FakeEngine.restartable = True
    service.recover()
    service.restarting.join(10)
    assert FakeEngine.restarted == 1 and len(signals) == 1


def test_under_torchrun_nproc_is_refused(monkeypatch, capsys, tmp_path):
    from distripy import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["serve", "--model", str(tmp_path), "--nproc", "2"]) == 2
    assert "--nproc 2: under torchrun the ranks are torchrun's processes" in capsys.readouterr().err
