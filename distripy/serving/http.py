"""``distripy serve``: an ``Engine`` behind HTTP (FastAPI on uvicorn).

* ``POST /v1/images/generations``: shaped like the widely used images API (``prompt``, ``n``,
  ``size`` "WxH", ``response_format`` ``b64_json``), plus distripy's fields (``steps``,
  ``guidance``, ``seed``, ``negative_prompt``, ``mode``, ``warmup_steps``, ``scheduler``). Every
  field is checked before the request is queued: a bad one is a 400 that names it (a size that
  does not split into the ranks' bands included).
* A bounded queue (``queue_size`` requests waiting or running): a full queue answers 429 with a
  ``Retry-After`` from the recent latencies. Each request has a deadline (``request_timeout_s``,
  queueing included): past it, or when the ranks fail, 503; the engine's ranks are then
  restarted in the background and ``/health`` says so until they are back.
* ``GET /health``: 200 with the ranks' process ids while they run, 503 otherwise.
* ``GET /metrics``: Prometheus text (``prometheus_client``): queue depth, request latency
  histogram, images, errors by kind.
* One log line per request (logger ``distripy.serve``).

The engine queues the requests in arrival order and runs them by its policy (``Engine.policy``,
``distripy serve --policy``): each on every rank, or several at once, one per rank.
"""

import asyncio
import base64
import io
import json
import logging
import math
import os
import re
import signal
import statistics
import threading
import time
from collections import deque
from typing import Optional

from distripy.config import MODE_CHOICES
from distripy.errors import EngineError, EngineTimeoutError, InputError
from distripy.pipelines.schedulers import SCHEDULERS

__all__ = ["LIMITS", "make_app"]

LIMITS = {"n": (1, 8), "steps": (1, 200), "guidance": (0.0, 50.0), "body_bytes": 64 * 1024, "side": 8192}
"""The largest request the service takes (``n`` images, ``steps``, ``guidance`` range, body size,
image side in pixels)."""

_SIZE = re.compile(r"^(\d+)x(\d+)$")
log = logging.getLogger("distripy.serve")


class _BadRequest(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _number(body: dict, field: str, kind, default, bounds=None):
    value = body.get(field, default)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise _BadRequest(field, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise _BadRequest(field, f"{value} is outside [{bounds[0]}, {bounds[1]}]")
    return value


def parse_request(body, engine) -> dict:
    """The engine call a request body asks for; raises ``_BadRequest`` naming the first bad field."""
    if not isinstance(body, dict):
        raise _BadRequest("body", "must be a JSON object")
    known = {"prompt", "n", "size", "response_format", "steps", "guidance", "seed", "negative_prompt",
             "mode", "warmup_steps", "scheduler", "model", "user"}  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise _BadRequest(unknown[0], "unknown field")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRequest("prompt", "a non-empty string is required")
    negative = body.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise _BadRequest("negative_prompt", "must be a string")
    if body.get("response_format", "b64_json") != "b64_json":
        raise _BadRequest("response_format", "only 'b64_json' is served")
    n = _number(body, "n", int, 1, LIMITS["n"])
    steps = _number(body, "steps", int, 30, LIMITS["steps"])
    guidance = _number(body, "guidance", float, 5.0, LIMITS["guidance"])
    seed = _number(body, "seed", int, None, (0, 2**63 - 1))
    warmup = _number(body, "warmup_steps", int, None, (0, LIMITS["steps"]))
    mode = body.get("mode")
    if mode is not None and mode not in MODE_CHOICES:
        raise _BadRequest("mode", f"{mode!r} is not one of {', '.join(MODE_CHOICES)}")
    scheduler = body.get("scheduler")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise _BadRequest("scheduler", f"{scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    default = engine.default_size
    size = body.get("size", f"{default}x{default}")
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None:
        raise _BadRequest("size", f"must be 'WIDTHxHEIGHT', got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    rows, columns = engine.size_multiples(guidance)
    if not (0 < width <= LIMITS["side"] and 0 < height <= LIMITS["side"]):
        raise _BadRequest("size", f"{size}: each side must be in [1, {LIMITS['side']}]")
    if height % rows or width % columns:
        raise _BadRequest(
            "size",
            f"{size} does not split into this server's bands: the height must be a multiple of {rows} "
            f"and the width of {columns} pixels",
        )
    if height < engine.min_height(guidance):
        raise _BadRequest(
            "size",
            f"{size}: the height must be at least {engine.min_height(guidance)} pixels on this server "
            f"(one row of {rows} pixels per band)",
        )
    return dict(
        prompt=prompt, negative_prompt=negative, num_images_per_prompt=n, height=height, width=width,
        num_inference_steps=steps, guidance_scale=guidance, seed=seed, mode=mode, warmup_steps=warmup,
        scheduler=scheduler,
    )  # fmt: skip


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class _Service:
    """The queue, the metrics and the engine's recovery."""

    def __init__(self, engine, queue_size: int, request_timeout_s: float) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.depth = 0  # waiting or running
        self.latencies = deque(maxlen=50)
        self.restarting: Optional[threading.Thread] = None
        self.restart_error: Optional[str] = None
        self.registry = CollectorRegistry()
        self.queue_gauge = Gauge(
            "distripy_queue_depth", "Requests waiting or running", registry=self.registry
        )
        self.latency = Histogram(
            "distripy_request_seconds",
            "Latency of answered generation requests",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.images = Counter("distripy_images", "Images generated", registry=self.registry)
        self.errors = Counter("distripy_errors", "Failed requests by kind", ["kind"], registry=self.registry)

    def retry_after(self) -> int:
        typical = statistics.median(self.latencies) if self.latencies else 1.0
        return max(1, math.ceil(typical * max(1, self.depth)))

    def recover(self) -> None:
        """Restart the engine's ranks in the background (after a failure). Ranks that cannot be
        restarted from here (a torchrun group's) end the service instead: ``distripy serve`` then
        exits non-zero and torchrun restarts the group."""
        if not getattr(self.engine, "restartable", True):
            log.error("the ranks failed and cannot be restarted from here: stopping the service")
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
            return
        if self.restarting is not None and self.restarting.is_alive():
            return

        def restart() -> None:
            try:
                self.engine.restart()
                self.restart_error = None
            except EngineError as error:
                self.restart_error = str(error).splitlines()[0]

        self.restarting = threading.Thread(target=restart, name="distripy-engine-restart", daemon=True)
        self.restarting.start()


def make_app(engine, queue_size: int = 16, request_timeout_s: float = 300.0):
    """The FastAPI application serving ``engine`` (an ``Engine``, closed when the app shuts down)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    service = _Service(engine, queue_size, request_timeout_s)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)  # waits for the request in progress

    app = FastAPI(title="distripy", lifespan=lifespan)
    app.state.service = service

    def error(status: int, kind: str, message: str, field: Optional[str] = None, headers=None):
        service.errors.labels(kind).inc()
        detail = {"message": message, "type": kind}
        if field is not None:
            detail["param"] = field
        return JSONResponse({"error": detail}, status_code=status, headers=headers)

    @app.post("/v1/images/generations")
    async def generate(request: Request):
        started = time.monotonic()
        raw = await request.body()
        if len(raw) > LIMITS["body_bytes"]:
            return error(
                400, "invalid_request", f"body: {len(raw)} bytes, over {LIMITS['body_bytes']}", "body"
            )
        try:
            call = parse_request(json.loads(raw or b"null"), engine)
        except ValueError as bad:  # json's JSONDecodeError
            return error(400, "invalid_request", f"body: not JSON ({bad})", "body")
        except _BadRequest as bad:
            return error(400, "invalid_request", str(bad), bad.field)
        if service.depth >= service.queue_size:
            headers = {"Retry-After": str(service.retry_after())}
            return error(
                429, "queue_full", f"{service.depth} requests are queued; retry later", headers=headers
            )
        service.depth += 1
        service.queue_gauge.set(service.depth)
        try:
            # The engine queues the calls in arrival order and runs them by its policy.
            remaining = service.request_timeout_s - (time.monotonic() - started)
            seed = call.pop("seed")
            seed = seed if seed is not None else int.from_bytes(os.urandom(7), "big")
            images = await asyncio.to_thread(engine, seed=seed, timeout_s=remaining, **call)
        except InputError as bad:  # what the pipeline itself refused
            return error(400, "invalid_request", str(bad))
        except EngineTimeoutError as failed:
            if getattr(failed, "in_queue", False):  # the ranks are fine
                return error(503, "deadline", "the request's deadline passed while it was queued")
            service.recover()
            return error(503, "timeout", str(failed).splitlines()[0])
        except EngineError as failed:
            service.recover()
            return error(503, "engine_failed", str(failed).splitlines()[0])
        finally:
            service.depth -= 1
            service.queue_gauge.set(service.depth)
        seconds = time.monotonic() - started
        service.latencies.append(seconds)
        service.latency.observe(seconds)
        service.images.inc(len(images))
        log.info(
            "generated %d image(s) %dx%d, %d steps, seed %d in %.2f s",
            len(images), call["width"], call["height"], call["num_inference_steps"], seed, seconds,
        )  # fmt: skip
        return {
            "created": int(time.time()),
            "data": [{"b64_json": _png_base64(image)} for image in images],
            "distripy": {"seconds": round(seconds, 3), "seed": seed},
        }

    @app.get("/health")
    async def health():
        restarting = service.restarting is not None and service.restarting.is_alive()
        if engine.healthy:
            return {"status": "ok", "ranks": engine.nproc, "pids": engine.pids, "restarts": engine.restarts}
        status = "restarting" if restarting else "unhealthy"
        body = {"status": status, "ranks": engine.nproc, "restarts": engine.restarts}
        if service.restart_error and not restarting:
            body["error"] = service.restart_error
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.middleware("http")
    async def log_other_requests(request: Request, call_next):
        response = await call_next(request)
        if request.url.path != "/v1/images/generations" or response.status_code != 200:
            log.info("%s %s -> %d", request.method, request.url.path, response.status_code)
        return response

    return app
