"""The FastAPI app: `create_app(settings)` wires settings -> hub -> scheduler -> backend and mounts the routes.

Routes stay thin; the logic lives in the hub, the scheduler, the engine and the processors.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import auth, codec, protocol
from service.backends import LocalBackend, ProcessorBackend
from service.config import Settings, valid_stream_id
from service.engine import Engine, FrameJob
from service.hub import StreamHub
from service.metrics import Metrics
from service.pages import register_pages
from service.processors import resolve_auto
from service.scheduler import Scheduler
from service.sockets import broadcaster_socket, viewer_socket

log = logging.getLogger("dreamstream")

SHUTDOWN_GRACE_S = 10.0  # how long shutdown waits for the batch in flight
CONFIG_BODY_LIMIT = 64 * 1024


class DreamStream:
    """Everything one server holds. Tests can drive it without HTTP."""

    def __init__(self, settings: Settings, backend: ProcessorBackend | None = None) -> None:
        self.settings = settings
        if backend is None:
            processor, reason = resolve_auto(settings.processor)
        else:
            processor, reason = backend.processor, backend.reason
        self.default_config = settings.stream_defaults(processor)
        self.metrics = Metrics()
        self.hub = StreamHub(
            self.default_config,
            self.metrics,
            max_streams=settings.max_streams,
            max_viewers=settings.max_viewers_per_stream,
            max_fps=settings.max_fps,
        )
        if backend is None:
            engine = Engine(
                self.default_config,
                settings.processor_options,
                settings.max_frame_bytes,
                settings.max_frame_side,
                settings.jpeg_quality,
            )
            backend = LocalBackend(engine, processor, reason, settings.processing_timeout_s)
        self.backend = backend
        self.scheduler = Scheduler(self.hub, backend, settings.max_batch, settings.batch_wait_s)
        self.ready = False
        self.closing = False  # set by `drain`: new sockets are refused with 1001
        self.pending_requests = 0  # POST /api/process calls in progress
        self.load_error: str | None = None
        self._loading: asyncio.Task | None = None

    async def startup(self) -> None:
        log.info("processor: %s (%s)", self.backend.processor, self.backend.reason)
        if not _is_loopback(self.settings.host) and not self.settings.keys_enabled:
            log.warning(
                "serving on %s with no stream keys: anyone who can reach it can broadcast. "
                "Set DREAMSTREAM_STREAM_KEYS or DREAMSTREAM_BROADCAST_KEY.",
                self.settings.host,
            )
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            await self.backend.start()
            self.ready = True
            log.info("ready: %s processor on %s", self.backend.processor, self.backend.device)
        except Exception as exc:
            self.load_error = str(exc)
            log.error("the %s processor failed to load: %s", self.backend.processor, exc)
        self.scheduler.start()  # even after a failed load: frames then get processing_failed, not silence

    async def drain(self) -> None:
        """A graceful stop, before the server closes connections: refuse new sockets, let the batch in
        flight finish and reach its viewers, then close every socket with 1001 (going away).

        `dreamstream serve` runs this ahead of uvicorn's own shutdown, which would close the sockets
        with 1012 before the app's lifespan hears of it (see service/cli.py).
        """
        if self.closing:
            return
        self.closing = True
        log.info("shutting down: finishing the frames in flight, then closing sockets with 1001")
        await self.scheduler.stop(SHUTDOWN_GRACE_S)
        await self.hub.close_all(1001, "server shutting down", timeout=2.0)

    async def shutdown(self) -> None:
        self.closing = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.scheduler.stop(SHUTDOWN_GRACE_S)
        await self.backend.close()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else ("error" if self.load_error else "loading"),
            "processor": self.backend.processor,
            "device": self.backend.device,
            "reason": self.backend.reason,
            "streams": len(self.hub.streams),
            "viewers": self.hub.viewer_count(),
            **({"optimise": optimise} if (optimise := self.backend.optimise_progress()) else {}),
            **({"error": self.load_error} if self.load_error else {}),
        }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _http_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


_STATUS_FOR = {"bad_frame": 400, "bad_message": 400, "bad_config": 422, "too_large": 413}


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit`, checked as it arrives (never buffered whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_app(settings: Settings | None = None, backend: ProcessorBackend | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    auth.install_log_redaction()
    ds = DreamStream(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await ds.startup()
        yield
        await ds.shutdown()

    app = FastAPI(title="DreamStream", version="0.1.0", lifespan=lifespan)
    app.state.dreamstream = ds

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return ds.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ds.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/streams")
    async def streams() -> dict[str, Any]:
        return {"streams": [s.summary() for s in ds.hub.streams.values()]}

    @app.post(
        "/api/process",
        responses={200: {"content": {"image/jpeg": {}}}, 400: {}, 413: {}, 422: {}, 503: {}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "image/webp": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "additionalProperties": False,
                            "properties": {
                                "image": {"type": "string", "description": "base64 or data URL"},
                                **protocol.CONFIG_SCHEMA["properties"],
                            },
                        }
                    },
                },
            }
        },
    )
    async def process(request: Request) -> Response:
        """Restyle one image: raw image bytes, or JSON {"image": b64, "prompt": ...}; JPEG back."""
        if ds.pending_requests >= settings.max_pending_requests:
            return JSONResponse(
                {"error": "busy", "message": "too many images waiting to be processed; retry shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        ds.pending_requests += 1
        try:
            return await _process(request)
        finally:
            ds.pending_requests -= 1

    async def _process(request: Request) -> Response:
        body = await _read_body(request, settings.max_frame_bytes * 4 // 3 + 4096)
        if body is None:
            return _http_error(413, "too_large", f"request is over the {settings.max_frame_bytes}-byte frame limit")
        config = ds.default_config
        try:
            if request.headers.get("content-type", "").startswith("application/json"):
                try:
                    obj = json.loads(body)
                except (ValueError, RecursionError):  # ValueError: also bad UTF-8 and integers of 4300+ digits
                    return _http_error(400, "bad_message", "body is not valid JSON")
                if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                    return _http_error(400, "bad_message", "JSON body needs 'image': a base64 string or data URL")
                changes = protocol.parse_config_changes({k: v for k, v in obj.items() if k != "image"})
                config = config.updated(changes)
                data, _ = codec.split_base64(obj["image"])
            else:
                data = body
            codec.probe(data, settings.max_frame_bytes, settings.max_frame_side)
        except (codec.FrameError, protocol.ProtocolError) as exc:
            return _http_error(_STATUS_FOR[exc.code], exc.code, exc.message)
        except (ValueError, binascii.Error) as exc:
            return _http_error(422, "bad_config", str(exc))
        [result] = await ds.backend.process([FrameJob("api", data, config)])
        if isinstance(result, codec.FrameError):
            return _http_error(_STATUS_FOR[result.code], result.code, result.message)
        if isinstance(result, Exception):
            return _http_error(503, "processing_failed", f"processing failed: {result}")
        return Response(result, media_type="image/jpeg")

    @app.post(
        "/api/streams/{stream_id}/config",
        responses={200: {}, 400: {}, 401: {}, 404: {}, 413: {}, 422: {}},
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": protocol.CONFIG_SCHEMA}}}
        },
    )
    async def set_config(stream_id: str, request: Request, key: str | None = None) -> Response:
        """The `config` message over HTTP, for Stream Deck buttons, OBS macros and chat bots."""
        if not valid_stream_id(stream_id):
            return _http_error(400, "bad_message", "stream id must be 1-64 characters of A-Z a-z 0-9 _ -")
        given = auth.bearer_key(request.headers.get("authorization"), key)
        if not auth.broadcaster_allowed(settings, stream_id, given):
            return _http_error(401, "unauthorized", "missing or wrong stream key (Authorization: Bearer KEY or ?key=)")
        stream = ds.hub.streams.get(stream_id)
        if stream is None:
            return _http_error(404, "unknown_stream", f"stream {stream_id!r} is not live; start its broadcaster first")
        body = await _read_body(request, CONFIG_BODY_LIMIT)
        if body is None:
            return _http_error(413, "too_large", f"config bodies are limited to {CONFIG_BODY_LIMIT} bytes")
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # ValueError: also bad UTF-8 and integers of 4300+ digits
            return _http_error(400, "bad_message", "body is not valid JSON")
        try:
            config = ds.hub.set_config(stream, protocol.parse_config_changes(obj))
        except protocol.ProtocolError as exc:
            return _http_error(422, exc.code, exc.message)
        except ValueError as exc:
            return _http_error(422, "bad_config", str(exc))
        ds.hub.tell_broadcaster(stream, protocol.config_reply(config.to_dict()))
        return JSONResponse({"stream_id": stream_id, "config": config.to_dict()})

    app.add_api_websocket_route("/ws/broadcaster/{stream_id}", broadcaster_socket)
    app.add_api_websocket_route("/ws/viewer/{stream_id}", viewer_socket)
    register_pages(app, ds)
    return app


def __getattr__(name: str) -> Any:
    """`uvicorn service.app:app` builds the app from the environment on first access, not on import."""
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
