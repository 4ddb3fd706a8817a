"""The serving layer's protocol, without rank processes: typed errors cross the link whole (a
``BandGeometryError`` stays one, an exception that cannot be pickled arrives as a ``RemoteError``
naming its class), each error class has its HTTP status (400 naming the field, 503 with
Retry-After), every field of OpenAI's images-generation request is read as documented
(``serving.images_api``), and so is every field of what ``distripy generate`` takes beside it
(start, mask and ControlNet images, strength, LoRAs among the server's only, the refiner's start,
scheduler and spacing: ``serving.pipeline_fields``), and the ranks' channel over the world
``Comm`` keeps its waits bounded (heartbeats while idle, a ``CommTimeoutError`` when rank 0 is
gone)."""

import base64
import io
import multiprocessing
import time

import pytest
from PIL import Image

from distripy.application import PipelineSpec
from distripy.errors import (
    BandGeometryError,
    CommError,
    CommTimeoutError,
    ConfigError,
    EngineError,
    EngineTimeoutError,
    InputError,
    InputTypeError,
    RankMismatchError,
)
from distripy.geometry import BandGeometry, bands_per_image
from distripy.serving.engine import raised_by_ranks
from distripy.serving.http import error_status
from distripy.serving.images_api import (
    LIMITS,
    QUALITY_STEPS,
    BadRequest,
    ServedPipeline,
    encode_image,
    parse_request,
)
from distripy.serving.messages import Failure, Generate, Images, RaisedError, Ready, RemoteError


class _TwoArguments(Exception):
    """Pickles (its class is importable) but does not come back: ``__init__`` takes two arguments
    and passes one message on."""

    def __init__(self, what, why):
        super().__init__(f"{what} because {why}")


def _through_a_connection(message):
    """``message`` after a trip through a ``multiprocessing`` connection (pickled, as the engine's
    link to rank 0 carries it)."""
    send, receive = multiprocessing.Pipe()
    with send, receive:
        send.send(message)
        return receive.recv()


def test_errors_cross_the_link_whole():
    geometry_error = BandGeometryError("latent height 2 cannot be cut into 2 bands")
    geometry_error.collective = True
    arrived = _through_a_connection(Failure.of(geometry_error)).exception()
    assert type(arrived) is BandGeometryError and str(arrived) == str(geometry_error)
    assert arrived.collective is True  # its attributes too
    for error in (
        CommTimeoutError("all_gather did not complete within 30 s"),
        InputTypeError("x"),
        KeyError("k"),
    ):
        arrived = _through_a_connection(Failure.of(error)).exception()
        assert type(arrived) is type(error) and str(arrived) == str(error)

    # not rebuilt whole: a DistripyError naming the original class and message
    def local():
        class Unimportable(Exception):
            pass

        return Unimportable("from a function")

    for error, name in (
        (_TwoArguments("a", "b"), "test_serving_messages._TwoArguments"),
        (local(), "Unimportable"),
    ):
        arrived = _through_a_connection(Failure.of(error)).exception()
        assert isinstance(arrived, RemoteError) and isinstance(arrived, EngineError)
        assert name in arrived.class_name and str(error) in str(arrived)
        assert type(_through_a_connection(arrived)) is RemoteError  # and crosses again
    # ranks that failed alike: the same class and message
    assert RaisedError.of(ValueError("v")).same_as(RaisedError.of(ValueError("v")))
    assert not RaisedError.of(ValueError("v")).same_as(RaisedError.of(TypeError("v")))


def test_the_messages_are_typed_and_travel():
    from distripy.application import GenerationRequest

    request = Generate(GenerationRequest(prompt="a boat", height=64, width=32, steps=2, seed=4))
    assert _through_a_connection(request) == request
    assert request.kind == (64, 32, 2, None)
    assert request.as_request().prompt == "a boat" and request.as_request().seed == 4
    ready = _through_a_connection(Ready((11, 12), BandGeometry(levels=2, vae_scale=8, sample_size=128)))
    assert ready.pids == (11, 12) and ready.geometry.pixel_unit == 32 and ready.geometry.default_size == 1024
    images = _through_a_connection(Images([Image.new("RGB", (4, 8))], ranks_failed=True))
    assert images.images[0].size == (4, 8) and images.ranks_failed


def test_what_the_engine_raises_for_the_ranks_errors():
    for error in (BandGeometryError("b"), CommTimeoutError("c"), RankMismatchError("r")):
        assert raised_by_ranks(error) is error
    converted = raised_by_ranks(ValueError("height must be divisible by 8"))
    assert type(converted) is InputError and "ValueError: height must be divisible by 8" in str(converted)
    assert isinstance(converted.__cause__, ValueError)
    assert type(raised_by_ranks(TypeError("t"))) is InputTypeError
    assert type(raised_by_ranks(RuntimeError("r"))) is EngineError


def test_each_error_class_has_its_http_status():
    in_queue = EngineTimeoutError("late")
    in_queue.in_queue = True
    assert error_status(BandGeometryError("height 16 is too small")) == (400, "invalid_request", "size")
    assert error_status(InputError("x")) == (400, "invalid_request", None)
    assert error_status(InputTypeError("x"))[0] == 400
    assert error_status(ConfigError("x"))[0] == 400
    assert error_status(CommTimeoutError("x")) == (503, "timeout", None)
    assert error_status(CommError("x")) == (503, "comm_failed", None)
    assert error_status(EngineTimeoutError("x")) == (503, "timeout", None)
    assert error_status(in_queue) == (503, "deadline", None)
    assert error_status(EngineError("x")) == (503, "engine_failed", None)
    assert error_status(RemoteError("some.Error", "x")) == (503, "engine_failed", None)
    assert error_status(RuntimeError("x")) == (500, "internal_error", None)


class FakeEngine:
    """What the HTTP layer asks of an ``Engine``: 2 ranks, the tiny SDXL's geometry (16 pixels per
    deepest row, 32 by default), the CFG split; it answers with blank images of the asked size or
    raises ``raises``."""

    nproc = 2
    restartable = True
    start_seconds = 2.5
    restarts = 0
    pids = [1, 2]
    spec = PipelineSpec("tiny-sdxl")

    def __init__(self, raises=None):
        self.geometry = BandGeometry(levels=1, vae_scale=8, sample_size=4)
        self.default_size = self.geometry.default_size
        self.raises = raises
        self.healthy = True
        self.calls = []
        self.restarted = 0

    def bands(self, guidance_scale=None):
        return bands_per_image(self.nproc, (guidance_scale or 0) > 1)

    def __call__(self, prompt, seed, timeout_s, **call):
        self.calls.append(dict(call, prompt=prompt, seed=seed))
        if self.raises is not None:
            self.healthy = not isinstance(self.raises, (CommError, EngineError))
            raise self.raises
        return [Image.new("RGB", (call["width"], call["height"]), (200, 30, 30))] * call[
            "num_images_per_prompt"
        ]

    def restart(self):
        self.restarted += 1

    def close(self):
        pass


def _parsed(served=None, **body):
    return parse_request(dict({"prompt": "a red boat"}, **body), FakeEngine(), served)


def _refused(field, served=None, **body):
    with pytest.raises(BadRequest) as refused:
        _parsed(served, **body)
    assert refused.value.field == field, (body, refused.value)
    assert field in str(refused.value)
    return str(refused.value)


def test_every_field_of_the_images_api_is_read_as_documented():
    plain = _parsed()
    assert plain.call == dict(
        prompt="a red boat", negative_prompt=None, num_images_per_prompt=1, height=32, width=32,
        num_inference_steps=30, guidance_scale=5.0, seed=None, mode=None, warmup_steps=None, scheduler=None,
        timestep_spacing=None, init_image=None, mask_image=None, strength=None, control_images=(), loras=(),
        refiner_start=None,
    )  # fmt: skip
    assert plain.output_format == "png" and plain.quality == "medium"
    assert plain.response_fields() == dict(
        background="opaque", output_format="png", size="32x32", quality="medium"
    )
    # quality: a steps preset unless the steps are given; auto / standard / hd name presets
    for quality, steps in QUALITY_STEPS.items():
        assert _parsed(quality=quality).call["num_inference_steps"] == steps
    assert _parsed(quality="auto").quality == "medium" and _parsed(quality="hd").quality == "high"
    assert _parsed(quality="standard").call["num_inference_steps"] == 30
    explicit = _parsed(quality="low", num_inference_steps=7)
    assert explicit.call["num_inference_steps"] == 7 and explicit.quality is None
    assert "quality" not in explicit.response_fields()
    _refused("quality", quality="ultra")
    # output_format and output_compression
    jpeg = _parsed(output_format="jpeg", output_compression=40)
    assert (jpeg.output_format, jpeg.output_compression) == ("jpeg", 40)
    assert _parsed(output_format="webp").output_compression == 100
    for unserved in ("gif", "svg"):
        assert "png, jpeg or webp" in _refused("output_format", output_format=unserved)
    _refused("output_format", output_format="bmp")
    _refused("output_compression", output_compression=101, output_format="jpeg")
    _refused("output_compression", output_compression=50)  # png
    _refused("output_compression", output_compression=50, output_format="png")
    _refused("frame_count", frame_count=4)
    _refused("frame_duration_ms", frame_duration_ms=100)
    _refused("svg", svg={"model": "x"})
    # refused clearly: no file hosting, no streaming, no transparency
    assert "hosts no files" in _refused("response_format", response_format="url")
    assert _parsed(response_format="b64_json").output_format == "png"
    assert "streaming is not served" in _refused("stream", stream=True)
    assert _parsed(stream=False, partial_images=2).call["prompt"] == "a red boat"
    _refused("partial_images", partial_images=4)
    assert "opaque" in _refused("background", background="transparent")
    # accepted and ignored, but checked against the API's values
    accepted = _parsed(
        model="gpt-image-2", style="natural", moderation="low", complexity="high", background="opaque",
        user="someone", n=2,
    )  # fmt: skip
    assert accepted.call["num_images_per_prompt"] == 2 and accepted.safety_identifier == "someone"
    assert _parsed(user="someone", safety_identifier="hashed").safety_identifier == "hashed"
    assert _parsed(background="auto", style=None, model=None).call["prompt"] == "a red boat"  # nulls
    _refused("style", style="gothic")
    _refused("moderation", moderation="none")
    _refused("complexity", complexity="extreme")
    _refused("model", model=3)
    _refused("user", user=["a"])
    _refused("n", n=9)
    # size: auto, WIDTHxHEIGHT, or width / height (which must agree with it)
    assert _parsed(size="auto").call["height"] == 32
    sized = _parsed(size="32x64")
    assert (sized.call["width"], sized.call["height"]) == (32, 64) and sized.response_fields()[
        "size"
    ] == "32x64"
    assert (_parsed(width=48, height=64).call["width"], _parsed(height=64).call["width"]) == (48, 32)
    assert _parsed(size="32x64", width=32, height=64).call["height"] == 64
    assert "width=48 and size='32x64' disagree" in _refused("width", size="32x64", width=48)
    _refused("height", height=60)  # not whole deepest rows: BandGeometry's message
    assert "multiple of 16" in _refused("size", size="32x60")
    assert "multiple of 16" in _refused("width", width=40)
    assert "too small for 2 bands" in _refused("size", size="32x16", guidance_scale=1.0)
    assert _parsed(size="32x16", guidance_scale=5.0).call["height"] == 16  # CFG split: 1 band each
    _refused("size", size="32by64")
    _refused("height", height=9000)


def test_the_diffusers_names_beside_distripys():
    both = _parsed(num_inference_steps=12, guidance_scale=3.5, negative_prompt="blurry", seed=9)
    assert (both.call["num_inference_steps"], both.call["guidance_scale"]) == (12, 3.5)
    assert (both.call["negative_prompt"], both.call["seed"]) == ("blurry", 9)
    assert (
        _parsed(steps=12, num_inference_steps=12, guidance=2, guidance_scale=2.0).call["num_inference_steps"]
        == 12
    )
    message = _refused("num_inference_steps", steps=10, num_inference_steps=12)
    assert "steps=10" in message and "num_inference_steps=12" in message
    message = _refused("guidance_scale", guidance=5.0, guidance_scale=7.5)
    assert "guidance=5.0" in message and "guidance_scale=7.5" in message
    _refused("num_inference_steps", num_inference_steps=0)
    _refused("guidance_scale", guidance_scale="high")
    _refused("seed", seed=-1)
    _refused("negative_prompt", negative_prompt=3)
    _refused("colour", colour="blue")  # unknown fields are still refused, by name
    _refused("prompt", prompt="")


def _b64(size, image_format="PNG", colour=(10, 120, 200)):
    """A base64 image file of ``size`` (width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_start_and_mask_images_strength_and_size():
    start = _b64((32, 64))
    img2img = _parsed(init_image=start, strength=0.6)
    call = img2img.call
    assert (call["width"], call["height"], call["strength"]) == (32, 64, 0.6)  # the start image's size
    assert call["init_image"].mode == "RGB" and call["init_image"].getpixel((0, 0)) == (10, 120, 200)
    assert img2img.size == "32x64"
    # a data: URL, JPEG, WebP, base64 wrapped as MIME wraps it; an explicit size that agrees
    data_url = "data:image/png;base64," + start
    assert _parsed(init_image=data_url, size="32x64").call["init_image"].size == (32, 64)
    assert _parsed(init_image=_b64((32, 64), "JPEG"), strength=1).call["strength"] == 1.0
    assert _parsed(init_image=_b64((32, 64), "WEBP"), width=32).call["height"] == 64
    wrapped = "\n".join(start[i : i + 76] for i in range(0, len(start), 76))
    assert _parsed(init_image=wrapped).call["init_image"].size == (32, 64)
    inpaint = _parsed(init_image=start, mask_image=_b64((32, 64), colour=(255, 255, 255)), strength=0.9)
    assert inpaint.call["mask_image"].mode == "L" and inpaint.call["mask_image"].getpixel((0, 0)) == 255
    # each refused naming its field
    assert "not valid base64" in _refused("init_image", init_image="not base64!")
    assert "not a PNG, JPEG or WebP image" in _refused(
        "init_image", init_image=base64.b64encode(b"hello").decode()
    )
    assert "a GIF image" in _refused("init_image", init_image=_b64((32, 64), "GIF"))
    assert "must be base64" in _refused("init_image", init_image="data:image/png," + start)
    _refused("init_image", init_image=3)
    assert "48x64 pixels, but the request's size is 32x64" in _refused(
        "init_image", init_image=_b64((48, 64)), size="32x64"
    )
    _refused("init_image", init_image=_b64((32, 60)))  # its size is not whole deepest rows
    assert "needs init_image too" in _refused("mask_image", mask_image=start)
    assert "32x32 pixels" in _refused("mask_image", init_image=start, mask_image=_b64((32, 32)))
    for strength in (0, 1.5, -0.2):
        assert "must be in (0, 1]" in _refused("strength", init_image=start, strength=strength)
    _refused("strength", init_image=start, strength="half")
    assert "only with init_image" in _refused("strength", strength=0.5)
    huge = "A" * (LIMITS["image_bytes"] + 4)
    assert "over" in _refused("init_image", init_image=huge)


def test_control_images_one_per_controlnet_the_server_loaded():
    two = ServedPipeline(controlnets=2)
    control = _b64((32, 64))
    call = _parsed(two, control_images=[control, _b64((32, 64), "JPEG")], size="32x64").call
    assert len(call["control_images"]) == 2 and all(image.mode == "RGB" for image in call["control_images"])
    assert _parsed(two, control_images=[]).call["control_images"] == ()  # none: the plain pipeline
    message = _refused("control_images", two, control_images=[control])
    assert "1 image, but the server loaded 2 ControlNets" in message
    assert "distripy serve --controlnet" in _refused("control_images", control_images=[control])
    _refused("control_images", two, control_images=control)  # not a list
    assert "image 1: not valid base64" in _refused("control_images", two, control_images=[control, "??"])
    assert "image 1 is 32x32 pixels" in _refused(
        "control_images", two, control_images=[control, _b64((32, 32))], size="32x64"
    )
    # ControlNet img2img: the start image sets the size the conditions must have
    call = _parsed(ServedPipeline(controlnets=1), control_images=[control], init_image=control).call
    assert call["init_image"].size == call["control_images"][0].size == (32, 64)


def test_loras_only_among_those_the_server_was_started_with():
    spec = PipelineSpec("tiny-sdxl", loras=["/srv/loras/style.safetensors", "/srv/loras/ink/ink.safetensors"])
    served = ServedPipeline.of(spec, [("loras/style.safetensors", 0.7), ("loras/ink", 1.0)])
    style, ink = spec.loras
    # none named: the server's at their scales; [] none; by the name given at start or the file
    assert _parsed(served).call["loras"] == ((style, 0.7), (ink, 1.0))
    assert _parsed(served, loras=[]).call["loras"] == ()
    assert _parsed(served, loras=[{"path": "loras/ink", "scale": -0.5}]).call["loras"] == ((ink, -0.5),)
    assert _parsed(served, loras=[{"path": style}]).call["loras"] == ((style, 0.7),)  # the start's scale
    # an Engine's spec alone: its files may be named, none is active unless named
    assert _parsed(ServedPipeline.of(spec)).call["loras"] == ()
    assert _parsed(ServedPipeline.of(spec), loras=[{"path": ink}]).call["loras"] == ((ink, 1.0),)
    # a server loads no file a request names
    message = _refused("loras", served, loras=[{"path": "/home/someone/other.safetensors", "scale": 1}])
    assert "'/home/someone/other.safetensors' is not a LoRA this server was started with" in message
    assert "loras/style.safetensors, loras/ink" in message
    assert "it serves: none" in _refused("loras", loras=[{"path": "a.safetensors"}])
    assert "named twice" in _refused("loras", served, loras=[{"path": "loras/ink"}, {"path": ink}])
    message = _refused("loras", served, loras=[{"path": ink, "scale": "x"}])
    assert "scale 'x' must be a finite number" in message
    for bad in ({"path": ink, "weight": 1}, {"scale": 1}, ink, {"path": 3}):
        _refused("loras", served, loras=[bad])
    _refused("loras", served, loras={"path": ink})


def test_the_refiner_start_scheduler_and_spacing():
    refined = ServedPipeline(refiner=True)
    assert _parsed(refined, refiner_start=0.7).call["refiner_start"] == 0.7
    assert _parsed(refined).call["refiner_start"] is None  # the refiner's default start
    assert "there is no refiner" in _refused("refiner_start", refiner_start=0.7)
    for start in (0, 1, 1.2):
        assert "must be in (0, 1)" in _refused("refiner_start", refined, refiner_start=start)
    start = _b64((32, 64))
    assert _parsed(refined, init_image=start).call["init_image"] is not None  # img2img is refined
    assert "not inpainting" in _refused("mask_image", refined, init_image=start, mask_image=start)
    # the scheduler and the spacing: the request's, else the server's defaults
    defaults = ServedPipeline(scheduler="euler", timestep_spacing="trailing")
    call = _parsed(defaults).call
    assert (call["scheduler"], call["timestep_spacing"]) == ("euler", "trailing")
    chosen = _parsed(defaults, scheduler="ddim", timestep_spacing="leading").call
    assert (chosen["scheduler"], chosen["timestep_spacing"]) == ("ddim", "leading")
    _refused("scheduler", scheduler="warp")
    _refused("timestep_spacing", timestep_spacing="sideways")


def test_the_pipeline_fields_reach_the_engine_call_over_http(monkeypatch):
    """The HTTP layer passes the decoded images, the LoRAs and the rest to the engine's call; a
    body may carry images beyond the 64 KiB the rest of it may take, up to a limit per image."""
    from fastapi.testclient import TestClient

    from distripy.serving.http import make_app

    monkeypatch.setitem(LIMITS, "image_bytes", 400_000)
    engine = FakeEngine()
    engine.spec = PipelineSpec("tiny-sdxl", controlnets=["net"], loras=["/srv/style.safetensors"])
    served = ServedPipeline.of(engine.spec, [("style.safetensors", 0.8)], scheduler="euler")
    noise = Image.effect_noise((128, 256), 80).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    start = base64.b64encode(buffer.getvalue()).decode()
    assert len(start) > LIMITS["body_bytes"]  # a start image larger than the rest of a body may be
    body = {
        "prompt": "a red boat", "init_image": start, "mask_image": _b64((128, 256)), "strength": 0.5,
        "control_images": [_b64((128, 256))], "loras": [{"path": "style.safetensors"}], "seed": 4,
        "timestep_spacing": "trailing", "quality": "low",
    }  # fmt: skip
    with TestClient(make_app(engine, queue_size=4, request_timeout_s=30, served=served)) as client:
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["size"] == "128x256"
        (call,) = engine.calls
        assert call["init_image"].tobytes() == noise.tobytes() and call["mask_image"].mode == "L"
        assert (call["strength"], call["loras"], call["seed"]) == (0.5, (("/srv/style.safetensors", 0.8),), 4)
        assert len(call["control_images"]) == 1 and call["refiner_start"] is None
        assert (call["scheduler"], call["timestep_spacing"]) == ("euler", "trailing")
        answer = client.post("/v1/images/generations", json=dict(body, loras=[{"path": "/etc/passwd"}]))
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "loras"
        assert "/etc/passwd" in answer.json()["error"]["message"]
        # the rest of the body is still limited, and so is the whole body
        answer = client.post("/v1/images/generations", json=dict(body, negative_prompt="x" * 70_000))
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"
        assert "bytes besides the images" in answer.json()["error"]["message"]
        answer = client.post("/v1/images/generations", json=dict(body, init_image="A" * 1_400_000))
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"
        assert "over 1265536" in answer.json()["error"]["message"]  # 64 KiB + 3 images' (2 + 1 ControlNet)
        assert len(engine.calls) == 1


def test_output_compression_is_honoured_in_the_encoded_image():
    image = Image.effect_noise((64, 64), 60).convert("RGB")
    sizes = {}
    for output_format in ("jpeg", "webp"):
        for compression in (10, 95):
            data = encode_image(image, output_format, compression)
            decoded = Image.open(io.BytesIO(data))
            assert decoded.format == output_format.upper() and decoded.size == (64, 64)
            sizes[output_format, compression] = len(data)
        assert sizes[output_format, 10] < sizes[output_format, 95] / 2
    png = Image.open(io.BytesIO(encode_image(image)))
    assert png.format == "PNG" and png.tobytes() == image.tobytes()


def test_the_http_statuses_of_the_ranks_errors():
    from fastapi.testclient import TestClient

    from distripy.serving.http import make_app

    body = {"prompt": "a red boat", "size": "32x64", "output_format": "jpeg", "quality": "low"}
    engine = FakeEngine()
    with TestClient(make_app(engine, queue_size=4, request_timeout_s=30)) as client:
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        assert reply["output_format"] == "jpeg" and reply["quality"] == "low" and reply["size"] == "32x64"
        assert engine.calls[0]["num_inference_steps"] == 15 and reply["distripy"]["steps"] == 15
        import base64

        decoded = Image.open(io.BytesIO(base64.b64decode(reply["data"][0]["b64_json"])))
        assert decoded.format == "JPEG" and decoded.size == (32, 64)
        # a BandGeometryError the ranks raised: 400 naming the size; the ranks serve on
        engine.raises = BandGeometryError("latent height 8 cannot be cut into 2 bands")
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 400, answer.text
        assert (
            answer.json()["error"]["param"] == "size" and "cannot be cut" in answer.json()["error"]["message"]
        )
        assert engine.restarted == 0
        # a transfer that timed out between the ranks: 503, restarting, Retry-After the start's
        engine.raises = CommTimeoutError("all_gather_object over 2 ranks did not complete within 30 s")
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "timeout", answer.text
        assert answer.headers["retry-after"] == "3"
        for _ in range(100):
            if engine.restarted:
                break
            time.sleep(0.01)
        assert engine.restarted == 1
        # the queue's deadline: 503 with the queue's Retry-After, nothing restarted
        engine.healthy, engine.raises = True, EngineTimeoutError("late")
        engine.raises.in_queue = True
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "deadline"
        assert int(answer.headers["retry-after"]) >= 1 and engine.restarted == 1
        engine.raises = RuntimeError("a bug")
        assert client.post("/v1/images/generations", json=body).status_code == 500


# -- the ranks' channel over the world Comm -----------------------------------------------------


class _SlowEngine:
    """Rank 0's link to an engine that sends ``messages`` one by one, each ``delay_s`` after the
    one before (``delays_s``)."""

    def __init__(self, messages, delays_s):
        self.messages, self.delays_s = list(messages), list(delays_s)
        self.since = time.monotonic()

    def poll(self, timeout):
        due = self.since + self.delays_s[0]
        time.sleep(max(0.0, min(timeout, due - time.monotonic())))
        return time.monotonic() >= due

    def recv(self):
        self.since = time.monotonic()
        self.delays_s.pop(0)
        return self.messages.pop(0)

    def send(self, message):
        pass


def _channel_on_ranks(rank, world_size, timeout_s):
    from distripy.serving.messages import Close
    from distripy.serving.worker import RankChannel

    engine = _SlowEngine(["first", Close()], [1.6 * timeout_s, 0.0]) if rank == 0 else None
    channel = RankChannel(engine, rank, timeout_s)
    # the engine is silent for longer than the timeout: rank 0's heartbeats keep the others waiting
    assert channel.next_message() == "first"
    assert channel.gather(rank * 10) == [0, 10]
    assert isinstance(channel.next_message(), Close)
    # rank 0 gone quiet (not heartbeating): the others' wait ends at the timeout, as a CommError
    if rank == 0:
        time.sleep(2 * timeout_s)
        return None
    begun = time.monotonic()
    with pytest.raises(CommTimeoutError):
        channel.next_message()
    waited = time.monotonic() - begun
    assert channel.comm.broken  # recorded in the comm's health: nothing waits twice
    with pytest.raises(CommError, match="not attempted"):
        channel.broadcast(None)
    return waited


def test_the_ranks_channel_keeps_every_wait_bounded(run_ranks):
    timeout_s = 2.0
    waited = run_ranks(_channel_on_ranks, 2, timeout_s, timeout=60)[1]
    assert timeout_s * 0.9 <= waited < timeout_s + 10
