"""The HTTP API: health, metrics, the live streams, one-off restyling, and stream config for Stream Deck & co.

Plain functions of the request; the server they serve is `request.app.state.dreamstream` (service/state.py).

Guards (README "Security"): a browser request (Origin / Sec-Fetch-*) to the routes below must name one of this
server's hosts and come from its own pages or DREAMSTREAM_ALLOWED_ORIGINS (403 otherwise); the state-changing
routes need a JSON (or image) body, never a type a cross-site form can send, unless a key is given (415);
/api/streams and /metrics need the viewer token once one is set (401). POST /api/process runs in a lane of its own
below the live streams (`OneShotLane`), with a pixel cap and its body read under a timeout before it takes a slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import auth, codec, protocol
from service.backends import LocalBackend
from service.config import StreamConfig, valid_stream_id
from service.engine import FrameJob
from service.errors import ClientError
from service.state import DreamStream

CONFIG_BODY_LIMIT = 64 * 1024
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
# What a cross-site <form> (or a fetch without a CORS preflight) can send: never enough for a state change.
SIMPLE_TYPES = ("", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
BODY_IDLE_S = 2.0  # a request body that sends nothing for this long is dropped (408, connection closed)
BODY_TOTAL_S = 20.0  # ... and one that takes longer than this in all (4 MiB at 2 Mbit/s takes 17 s)
READERS_PER_SLOT = 4  # bodies being read at once: DREAMSTREAM_MAX_PENDING_REQUESTS x this


def _ds(request: Request) -> DreamStream:
    return request.app.state.dreamstream


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _client_error(exc: ClientError) -> JSONResponse:
    return JSONResponse(exc.to_http(), status_code=exc.status)


def _busy(message: str, retry_s: int = 1) -> JSONResponse:
    return _error(503, "busy", message, {"Retry-After": str(retry_s)})


def _local_address(request: Request) -> str | None:
    server = request.scope.get("server")
    return str(server[0]) if server else None


def _browser_refusal(request: Request, ds: DreamStream) -> JSONResponse | None:
    """403 for a browser request from another site, or one that names a host that is not ours (DNS rebinding)."""
    why = auth.browser_refusal(ds.settings, request.headers, _local_address(request))
    return None if why is None else _error(403, "forbidden", why)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class BodyTimeout(Exception):
    pass


async def _read_body(request: Request, limit: int, idle_s: float = BODY_IDLE_S,
                     total_s: float = BODY_TOTAL_S) -> bytes | None:
    """The request body, or None when it is over `limit`, checked as it arrives (never buffered whole).
    BodyTimeout when a chunk takes longer than `idle_s` or the whole body longer than `total_s`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    chunks = request.stream().__aiter__()
    deadline = time.monotonic() + total_s
    while True:
        left = deadline - time.monotonic()
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), min(idle_s, max(left, 0.0)))
        except StopAsyncIteration:
            return bytes(body)
        except asyncio.TimeoutError:
            raise BodyTimeout from None
        body += chunk
        if len(body) > limit:
            return None


def _body_timeout() -> JSONResponse:
    response = _error(408, "timeout", f"the request body did not arrive in time (a pause over {BODY_IDLE_S:g} s, "
                                      f"or over {BODY_TOTAL_S:g} s in all)")
    response.headers["Connection"] = "close"  # its unread rest must not be parsed as the next request
    return response


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # ValueError: also bad UTF-8 and integers of 4300+ digits
        raise ClientError("bad_message", "body is not valid JSON") from None


async def healthz(request: Request) -> dict[str, Any]:
    return _ds(request).health()


def _reader_refusal(request: Request, ds: DreamStream, token: str | None, key: str | None) -> JSONResponse | None:
    """/api/streams and /metrics name every stream (and its prompt): once DREAMSTREAM_VIEWER_TOKEN is set they need
    it (or the broadcast key), as `Authorization: Bearer`, `?token=` or `?key=`."""
    if (refused := _browser_refusal(request, ds)) is not None:
        return refused
    given = auth.bearer_key(request.headers.get("authorization"), token or key)
    if auth.reader_allowed(ds.settings, given):
        return None
    return _error(401, "unauthorized", "missing or wrong viewer token (DREAMSTREAM_VIEWER_TOKEN): "
                                       "send Authorization: Bearer TOKEN or ?token=", {"WWW-Authenticate": "Bearer"})


async def metrics(request: Request, token: str | None = None, key: str | None = None) -> Response:
    ds = _ds(request)
    if (refused := _reader_refusal(request, ds, token, key)) is not None:
        return refused
    ds.metrics.set_processor_states(ds.processors_health())  # what /healthz would say now
    return Response(ds.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def streams(request: Request, token: str | None = None, key: str | None = None) -> Response:
    ds = _ds(request)
    if (refused := _reader_refusal(request, ds, token, key)) is not None:
        return refused
    return JSONResponse({"streams": [s.summary() for s in ds.hub.streams.values()]})


# ---- POST /api/process: one-shot requests, below the live streams ----------------------------------


class OneShotLane:
    """Where POST /api/process waits: its own lane, which never runs ahead of live frames.

    One one-shot at a time, and only when the live streams have no frame waiting and no batch in flight (the
    scheduler is idle; a remote GPU pool, which takes several batches at once, needs two free slots), or when no
    such gap came for `GAP_WAIT_S`. The local
    worker cannot be interrupted, so a one-shot that starts just before a live frame arrives delays that frame by
    its own time: while any stream is live, the lane therefore rests after each one-shot, keeping its share of the
    worker to `SHARE` (3 %: a live stream loses at most a frame or two a second), and the pixel cap
    (DREAMSTREAM_MAX_PROCESS_PIXELS) bounds each one-shot's time. With no stream live, one-shots run back to
    back. A request that cannot get a turn within `WAIT_S` gets 503.
    """

    SHARE = 0.03
    POLL_S = 0.002  # how often a waiting one-shot looks for a gap between live rounds
    LIVE_WINDOW_S = 1.0  # a stream that sent a frame this recently is live
    WAIT_S = 30.0
    # Live work that never pauses (a stream-batched pipeline stepping back to back, or streams sending faster than
    # their processor styles) leaves no gap: after this long the one-shot takes the worker's next turn anyway
    # (between two rounds; its share still bounded by SHARE).
    GAP_WAIT_S = 1.0

    def __init__(self) -> None:
        self._queue: deque[object] = deque()  # FIFO among the one-shots; the head runs next
        self._running = False
        self.waiting = 0  # requests holding a slot (DREAMSTREAM_MAX_PENDING_REQUESTS): in the lane or running
        self.reading = 0  # bodies being read (before they take a slot)
        self.rest_until = 0.0

    @staticmethod
    def _live(ds: DreamStream, now: float) -> bool:
        return any(s.broadcaster is not None and now - s.last_submit < OneShotLane.LIVE_WINDOW_S
                   for s in ds.hub.streams.values())

    @staticmethod
    def _live_work(ds: DreamStream) -> bool:
        """A live frame waiting for a batch, or the live batches in flight using the backend: with one local worker,
        any batch in flight; a remote pool that takes several at once must have two of its slots free."""
        scheduler = ds.scheduler
        return len(scheduler.rounds) > max(0, scheduler.max_in_flight - 2) or ds.hub.head_key() is not None

    def _may_start(self, ds: DreamStream, ticket: object, now: float, since: float) -> bool:
        if self._running or self._queue[0] is not ticket:
            return False
        if self._live_work(ds) and now - since < self.GAP_WAIT_S:
            return False
        return now >= self.rest_until or not self._live(ds, now)

    async def run(self, ds: DreamStream, job: FrameJob) -> bytes | Exception:
        """The job's result; TimeoutError when it got no turn within WAIT_S."""
        ticket = object()
        self._queue.append(ticket)
        since = time.monotonic()
        deadline = since + self.WAIT_S
        try:
            while not self._may_start(ds, ticket, now := time.monotonic(), since):
                if now > deadline:
                    raise TimeoutError("no turn within the wait")
                await asyncio.sleep(self.POLL_S if self._queue[0] is ticket else 10 * self.POLL_S)
            self._running = True
            try:
                started = time.monotonic()
                [result] = await ds.backend.process([job])
                if isinstance(ds.backend, LocalBackend):  # a remote pool's one-shot holds no worker of ours
                    self.rest_until = time.monotonic() + (time.monotonic() - started) * (1 / self.SHARE - 1)
                return result
            finally:
                self._running = False
        finally:
            self._queue.remove(ticket)


def _lane(request: Request) -> OneShotLane:
    return request.app.state.process_lane


async def process(request: Request, key: str | None = None) -> Response:
    """Restyle one image: raw image bytes, or JSON {"image": b64, "prompt": ...}; JPEG back."""
    ds = _ds(request)
    lane = _lane(request)
    limits = ds.settings
    if (refused := _browser_refusal(request, ds)) is not None:
        return refused
    given = auth.bearer_key(request.headers.get("authorization"), key)
    if not auth.any_key_allowed(limits, given):
        return _error(401, "unauthorized", "missing or wrong key: /api/process takes any stream key or the "
                                           "broadcast key (Authorization: Bearer KEY or ?key=)")
    if _content_type(request) in SIMPLE_TYPES and not (limits.keys_enabled and given):
        return _error(415, "bad_message", "send the image with Content-Type image/jpeg, image/png or image/webp, "
                                          "or as application/json {\"image\": base64}")
    if lane.reading >= limits.max_pending_requests * READERS_PER_SLOT:
        return _busy("too many uploads in progress; retry shortly")
    lane.reading += 1
    try:
        body = await _read_body(request, limits.max_frame_bytes * 4 // 3 + 4096)
    except BodyTimeout:
        return _body_timeout()
    finally:
        lane.reading -= 1
    try:
        if body is None:
            raise ClientError("too_large", f"request is over the {limits.max_frame_bytes}-byte frame limit")
        job = _process_job(request, ds, body)
    except ClientError as exc:
        return _client_error(exc)
    if lane.waiting >= limits.max_pending_requests:
        return _busy("too many images waiting to be processed; retry shortly")
    lane.waiting += 1
    ds.pending_requests += 1
    try:
        result = await lane.run(ds, job)
    except TimeoutError:
        return _busy("the live streams are keeping the processor busy: one-shot requests wait for a gap; "
                     "retry later", 5)
    finally:
        lane.waiting -= 1
        ds.pending_requests -= 1
    if isinstance(result, ClientError):
        return _client_error(result)
    if isinstance(result, Exception):
        return _error(503, "processing_failed", f"processing failed: {result}")
    return Response(result, media_type="image/jpeg")


def _process_job(request: Request, ds: DreamStream, body: bytes) -> FrameJob:
    """The request as a job for the backend, or ClientError. Checks the image's header against the frame limits
    and the one-shot pixel cap: an image over it is refused from its header, never decoded."""
    limits = ds.settings
    config = ds.default_config
    if _content_type(request) == "application/json":
        obj = _json(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise ClientError("bad_message", "JSON body needs 'image': a base64 string or data URL")
        config = config.updated({k: v for k, v in obj.items() if k != "image"})
        if why := ds.offered.get(config.processor_type, "this server does not offer it"):
            raise ClientError("bad_config", f"processor_type {config.processor_type!r} is not available here: {why}")
        data, _ = codec.split_base64(obj["image"])
    else:
        data = body
    info = codec.probe(data, limits.max_frame_bytes, limits.max_frame_side)
    if info.width * info.height > limits.max_process_pixels:
        raise ClientError("too_large", f"image is {info.width}x{info.height}; /api/process takes at most "
                                       f"{limits.max_process_pixels} pixels (DREAMSTREAM_MAX_PROCESS_PIXELS)")
    return FrameJob("api", data, config)


async def set_config(stream_id: str, request: Request, key: str | None = None) -> Response:
    """The `config` message over HTTP, for Stream Deck buttons, OBS macros and chat bots."""
    ds = _ds(request)
    if (refused := _browser_refusal(request, ds)) is not None:
        return refused
    if not valid_stream_id(stream_id):
        return _error(400, "bad_message", "stream id must be 1-64 characters of A-Z a-z 0-9 _ -")
    given = auth.bearer_key(request.headers.get("authorization"), key)
    if not auth.broadcaster_allowed(ds.settings, stream_id, given):
        return _error(401, "unauthorized", "missing or wrong stream key (Authorization: Bearer KEY or ?key=)")
    if _content_type(request) != "application/json" and not ds.settings.keys_enabled:
        return _error(415, "bad_message", "send the config as Content-Type: application/json")
    stream = ds.hub.streams.get(stream_id)
    if stream is None:
        return _error(404, "unknown_stream", f"stream {stream_id!r} is not live; start its broadcaster first")
    try:
        body = await _read_body(request, CONFIG_BODY_LIMIT)
    except BodyTimeout:
        return _body_timeout()
    if body is None:
        return _error(413, "too_large", f"config bodies are limited to {CONFIG_BODY_LIMIT} bytes")
    try:
        config = ds.change_config(stream, protocol.parse_config_changes(_json(body)))
    except ClientError as exc:
        return _client_error(exc)
    reply = protocol.config_reply(config.to_dict())
    if (loading := ds.switching_to(stream)) is not None:
        reply["loading"] = loading  # the processor asked for is loading; the stream keeps its own until then
    ds.hub.tell_broadcaster(stream, reply)
    return JSONResponse({"stream_id": stream_id, **{k: v for k, v in reply.items() if k != "type"}})


def register_api(app: FastAPI) -> None:
    app.state.process_lane = OneShotLane()
    reader = {200: {}, 401: {}, 403: {}}
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], responses={**reader, 200: {"content": {"text/plain": {}}}})
    app.add_api_route("/api/streams", streams, methods=["GET"], responses=reader)
    image_schema = {"schema": {"type": "string", "format": "binary"}}
    json_schema = {
        "type": "object",
        "required": ["image"],
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "description": "base64 or data URL"},
            **StreamConfig.http_schema()["properties"],
        },
    }
    app.add_api_route(
        "/api/process", process, methods=["POST"],
        responses={200: {"content": {"image/jpeg": {}}}, 400: {}, 401: {}, 403: {}, 408: {}, 413: {}, 415: {},
                   422: {}, 503: {}},
        openapi_extra={"requestBody": {"required": True, "content": {
            **{kind: image_schema for kind in IMAGE_TYPES}, "application/json": {"schema": json_schema}}}},
    )
    app.add_api_route(
        "/api/streams/{stream_id}/config", set_config, methods=["POST"],
        responses={200: {}, 400: {}, 401: {}, 403: {}, 404: {}, 408: {}, 413: {}, 415: {}, 422: {}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": StreamConfig.http_schema()}}}},
    )
