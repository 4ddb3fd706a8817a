"""``distripy serve``: an ``Engine`` behind HTTP (FastAPI on uvicorn).

* ``POST /v1/images/generations``: OpenAI's images API as its clients send it (every field of the
  request; what each does here, and distripy's own fields with their diffusers names:
  ``serving.images_api``). Every field is checked before the request is queued: a bad one is a
  400 that names it (a size that does not split into the ranks' bands included); so is an
  unknown one. The request may also send what ``distripy generate`` takes for the pipeline the
  server loaded (a start image and its mask, ControlNet images, the LoRAs it was started with,
  the refiner's start: ``serving.pipeline_fields``). The images come back as ``b64_json`` in the
  asked ``output_format``.
* Errors keep their class across the ranks (``serving.messages``) and map to a status by it
  (``error_status``): an input the pipeline refused (``InputError``, ``BandGeometryError``,
  ``ConfigError``, ...) 400, naming the field where known; a failed transfer between the ranks
  (``CommError``, ``CommTimeoutError``), failed ranks (``EngineError``) and a deadline
  (``EngineTimeoutError``) 503, with a ``Retry-After`` where a wait helps (the queue's, or the
  ranks' restart); anything else 500.
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
import json
import logging
import math
import os
import signal
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

from distripy.errors import (
    BandGeometryError,
    CommError,
    CommTimeoutError,
    ConfigError,
    EngineError,
    EngineTimeoutError,
    InputError,
    InputTypeError,
)
from distripy.serving.images_api import LIMITS, BadRequest, ServedPipeline, parse_request

__all__ = ["LIMITS", "ServedPipeline", "error_status", "make_app", "parse_request", "serve_forever"]

log = logging.getLogger("distripy.serve")


def error_status(error: BaseException) -> Tuple[int, str, Optional[str]]:
    """``(HTTP status, error type, field)`` for an exception a generation raised: the request's
    input refused 400 (the field where the error names one: ``size`` for a ``BandGeometryError``),
    the queue's deadline 503 ``deadline``, the ranks' or their transfers' failures 503, anything
    else 500."""
    if isinstance(error, BandGeometryError):
        return 400, "invalid_request", getattr(error, "field", None) or "size"
    if isinstance(error, (InputError, InputTypeError, ConfigError)):
        return 400, "invalid_request", getattr(error, "field", None)
    if isinstance(error, EngineTimeoutError) and getattr(error, "in_queue", False):
        return 503, "deadline", None  # the ranks are fine
    if isinstance(error, (EngineTimeoutError, CommTimeoutError)):
        return 503, "timeout", None
    if isinstance(error, CommError):
        return 503, "comm_failed", None
    if isinstance(error, EngineError):
        return 503, "engine_failed", None
    return 500, "internal_error", None


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
        """Seconds until the queue has likely moved on: the typical latency times its depth."""
        typical = statistics.median(self.latencies) if self.latencies else 1.0
        return max(1, math.ceil(typical * max(1, self.depth)))

    def restart_after(self) -> int:
        """Seconds until restarted ranks are likely back: their last start's."""
        return max(1, math.ceil(getattr(self.engine, "start_seconds", 0.0) or 1.0))

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


def make_app(
    engine, queue_size: int = 16, request_timeout_s: float = 300.0, served: Optional[ServedPipeline] = None
):
    """The FastAPI application serving ``engine`` (an ``Engine``, closed when the app shuts down).
    ``served``: what its pipeline takes and the defaults of a request that names none
    (``distripy serve``'s flags; default: its spec's, with no LoRA active unless named)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    service = _Service(engine, queue_size, request_timeout_s)
    served = ServedPipeline.of(engine.spec) if served is None else served
    largest = LIMITS["body_bytes"] + LIMITS["image_bytes"] * served.image_fields

    # Requests are read (their images decoded) off the event loop, on threads of their own: the
    # default executor's may all be waiting in the engine's queue.
    parsing = ThreadPoolExecutor(2, thread_name_prefix="distripy-parse")

    def parse(raw: bytes):
        return parse_request(json.loads(raw or b"null"), engine, served, len(raw))

    @asynccontextmanager
    async def lifespan(app):
        yield
        parsing.shutdown(wait=False)
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
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > largest:  # refused before it is read
            return error(400, "invalid_request", f"body: {declared} bytes, over {largest}", "body")
        raw = await request.body()
        if len(raw) > largest:
            return error(400, "invalid_request", f"body: {len(raw)} bytes, over {largest}", "body")
        try:
            parsed = await asyncio.get_running_loop().run_in_executor(parsing, parse, raw)
        except ValueError as bad:  # json's JSONDecodeError
            return error(400, "invalid_request", f"body: not JSON ({bad})", "body")
        except BadRequest as bad:
            return error(400, "invalid_request", str(bad), bad.field)
        if service.depth >= service.queue_size:
            headers = {"Retry-After": str(service.retry_after())}
            return error(
                429, "queue_full", f"{service.depth} requests are queued; retry later", headers=headers
            )
        call = dict(parsed.call)
        seed = call.pop("seed")
        seed = seed if seed is not None else int.from_bytes(os.urandom(7), "big")
        service.depth += 1
        service.queue_gauge.set(service.depth)
        try:
            # The engine queues the calls in arrival order and runs them by its policy.
            remaining = service.request_timeout_s - (time.monotonic() - started)
            images = await asyncio.to_thread(engine, seed=seed, timeout_s=remaining, **call)
        except Exception as failed:  # noqa: BLE001 - each class has its status (error_status)
            return failure(failed)
        finally:
            service.depth -= 1
            service.queue_gauge.set(service.depth)
        data = await asyncio.to_thread(lambda: [{"b64_json": parsed.encode(image)} for image in images])
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
            "data": data,
            **parsed.response_fields(),
            "distripy": {"seconds": round(seconds, 3), "seed": seed, "steps": call["num_inference_steps"]},
        }

    def failure(failed: BaseException):
        """The answer to a generation that raised ``failed`` (``error_status``); failed ranks are
        restarted in the background."""
        status, kind, field = error_status(failed)
        headers = None
        message = str(failed) if status == 400 else str(failed).splitlines()[0]
        if kind == "deadline":
            message = "the request's deadline passed while it was queued"
            headers = {"Retry-After": str(service.retry_after())}
        elif status == 503 and not engine.healthy:
            service.recover()
            if getattr(engine, "restartable", True):
                headers = {"Retry-After": str(service.restart_after())}
        elif status == 500:
            log.error("a generation failed: %r", failed)
        return error(status, kind, message, field, headers)

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


def serve_forever(engine, host: str, port: int, **settings) -> None:
    """Serve ``engine`` (an app of ``make_app``'s ``settings``) on ``host:port`` until SIGTERM or
    Ctrl-C, then close it. uvicorn shuts down gracefully on either (the app's shutdown closes the
    engine, after the request in progress), then raises the signal again under the handler found
    before it started: the handlers set here make that a normal return, not death by the signal."""
    import uvicorn

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: None)
    try:
        uvicorn.run(make_app(engine, **settings), host=host, port=port, log_level="warning")
    finally:
        engine.close()
