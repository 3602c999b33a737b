"""The HTTP API: health, metrics, the live streams, one-off restyling, and stream config for Stream Deck & co.

Plain functions of the request; the server they serve is `request.app.state.dreamstream` (service/state.py).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import auth, codec, protocol
from service.config import StreamConfig, valid_stream_id
from service.engine import FrameJob
from service.errors import ClientError
from service.state import DreamStream

CONFIG_BODY_LIMIT = 64 * 1024
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")


def _ds(request: Request) -> DreamStream:
    return request.app.state.dreamstream


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def _client_error(exc: ClientError) -> JSONResponse:
    return JSONResponse(exc.to_http(), status_code=exc.status)


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


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # ValueError: also bad UTF-8 and integers of 4300+ digits
        raise ClientError("bad_message", "body is not valid JSON") from None


async def healthz(request: Request) -> dict[str, Any]:
    return _ds(request).health()


async def metrics(request: Request) -> Response:
    return Response(_ds(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def streams(request: Request) -> dict[str, Any]:
    return {"streams": [s.summary() for s in _ds(request).hub.streams.values()]}


async def process(request: Request) -> Response:
    """Restyle one image: raw image bytes, or JSON {"image": b64, "prompt": ...}; JPEG back."""
    ds = _ds(request)
    if ds.pending_requests >= ds.settings.max_pending_requests:
        return JSONResponse(
            {"error": "busy", "message": "too many images waiting to be processed; retry shortly"},
            status_code=503,
            headers={"Retry-After": "1"},
        )
    ds.pending_requests += 1
    try:
        [result] = await ds.backend.process([await _process_job(request, ds)])
    except ClientError as exc:
        return _client_error(exc)
    finally:
        ds.pending_requests -= 1
    if isinstance(result, ClientError):
        return _client_error(result)
    if isinstance(result, Exception):
        return _error(503, "processing_failed", f"processing failed: {result}")
    return Response(result, media_type="image/jpeg")


async def _process_job(request: Request, ds: DreamStream) -> FrameJob:
    """The request as a job for the backend, or ClientError."""
    limits = ds.settings
    body = await _read_body(request, limits.max_frame_bytes * 4 // 3 + 4096)
    if body is None:
        raise ClientError("too_large", f"request is over the {limits.max_frame_bytes}-byte frame limit")
    config = ds.default_config
    if request.headers.get("content-type", "").startswith("application/json"):
        obj = _json(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise ClientError("bad_message", "JSON body needs 'image': a base64 string or data URL")
        config = config.updated({k: v for k, v in obj.items() if k != "image"})
        if why := ds.offered.get(config.processor_type, "this server does not offer it"):
            raise ClientError("bad_config", f"processor_type {config.processor_type!r} is not available here: {why}")
        data, _ = codec.split_base64(obj["image"])
    else:
        data = body
    codec.probe(data, limits.max_frame_bytes, limits.max_frame_side)
    return FrameJob("api", data, config)


async def set_config(stream_id: str, request: Request, key: str | None = None) -> Response:
    """The `config` message over HTTP, for Stream Deck buttons, OBS macros and chat bots."""
    ds = _ds(request)
    if not valid_stream_id(stream_id):
        return _error(400, "bad_message", "stream id must be 1-64 characters of A-Z a-z 0-9 _ -")
    given = auth.bearer_key(request.headers.get("authorization"), key)
    if not auth.broadcaster_allowed(ds.settings, stream_id, given):
        return _error(401, "unauthorized", "missing or wrong stream key (Authorization: Bearer KEY or ?key=)")
    stream = ds.hub.streams.get(stream_id)
    if stream is None:
        return _error(404, "unknown_stream", f"stream {stream_id!r} is not live; start its broadcaster first")
    body = await _read_body(request, CONFIG_BODY_LIMIT)
    if body is None:
        return _error(413, "too_large", f"config bodies are limited to {CONFIG_BODY_LIMIT} bytes")
    try:
        config = ds.change_config(stream, protocol.parse_config_changes(_json(body)))
    except ClientError as exc:
        return _client_error(exc)
    ds.hub.tell_broadcaster(stream, protocol.config_reply(config.to_dict()))
    return JSONResponse({"stream_id": stream_id, "config": config.to_dict()})


def register_api(app: FastAPI) -> None:
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/api/streams", streams, methods=["GET"])
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
        responses={200: {"content": {"image/jpeg": {}}}, 400: {}, 413: {}, 422: {}, 503: {}},
        openapi_extra={"requestBody": {"required": True, "content": {
            **{kind: image_schema for kind in IMAGE_TYPES}, "application/json": {"schema": json_schema}}}},
    )
    app.add_api_route(
        "/api/streams/{stream_id}/config", set_config, methods=["POST"],
        responses={200: {}, 400: {}, 401: {}, 404: {}, 413: {}, 422: {}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": StreamConfig.http_schema()}}}},
    )
