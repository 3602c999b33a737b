"""The WebSocket protocol: every client message is parsed and checked here, every server message built here."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from service.codec import b64_size_ok, jpeg_data_url, split_base64
from service.errors import ClientError

ProtocolError = ClientError  # this module's name for it before there was one client-error type


@dataclass(frozen=True)
class FrameMessage:
    data: bytes
    ts: float | None = None


@dataclass(frozen=True)
class ConfigMessage:
    changes: dict[str, Any]


@dataclass(frozen=True)
class PingMessage:
    pass


ClientMessage = FrameMessage | ConfigMessage | PingMessage


def now_ms() -> float:
    return time.time() * 1000.0


def finite_number(value: Any) -> float | None:
    """A JSON number as a finite float, or None. JSON allows 1e999 (inf), NaN and 400-digit integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_config_changes(obj: Any) -> dict[str, Any]:
    """A config message's body as a dict of changes; its keys and values are checked by `StreamConfig.updated`."""
    if not isinstance(obj, dict):
        raise ClientError("bad_config", "config must be a JSON object")
    return obj


def parse_text(text: str, max_frame_bytes: int) -> ClientMessage:
    """A text message from a broadcaster -> a typed message, or ProtocolError."""
    if len(text) > max_frame_bytes * 4 // 3 + 4096:
        raise ClientError(
            "too_large", f"message is {len(text)} characters; frames are limited to {max_frame_bytes} bytes"
        )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # ValueError also covers integers of over 4300 digits
        raise ClientError("bad_message", "message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ClientError("bad_message", "message must be a JSON object with a 'type'")
    kind = obj.get("type")
    if kind == "frame":
        return _parse_frame(obj, max_frame_bytes)
    if kind == "config":
        body = {k: v for k, v in obj.items() if k != "type"}
        if "config" in body and isinstance(body["config"], dict) and len(body) == 1:
            body = body["config"]  # also accept {"type":"config","config":{...}}
        return ConfigMessage(parse_config_changes(body))
    if kind == "ping":
        return PingMessage()
    if not isinstance(kind, str):
        raise ClientError("bad_message", "message needs a string 'type': frame, config or ping")
    raise ClientError("bad_message", f"unknown message type {kind[:40]!r}; expected frame, config or ping")


def _parse_frame(obj: dict[str, Any], max_frame_bytes: int) -> FrameMessage:
    frame = obj.get("frame")
    if not isinstance(frame, str):
        raise ClientError("bad_frame", "frame message needs 'frame': a base64 string or data URL")
    if not b64_size_ok(frame, max_frame_bytes):
        raise ClientError("too_large", f"frame is over the {max_frame_bytes}-byte limit")
    ts = obj.get("ts")
    if ts is not None and (ts := finite_number(ts)) is None:
        raise ClientError("bad_message", "'ts' must be a finite number (milliseconds)")
    data, _ = split_base64(frame)
    return FrameMessage(data=data, ts=ts)


# ---- server -> client -------------------------------------------------------------------------

def error(code: str, message: str) -> dict[str, Any]:
    return ClientError(code, message).to_message()


def frame(jpeg: bytes, seq: int, ts: float, latency_ms: float) -> dict[str, Any]:
    """A styled (or original) frame for a JSON viewer."""
    return {"type": "frame", "frame": jpeg_data_url(jpeg), "seq": seq, "ts": ts, "latency_ms": round(latency_ms, 1)}


def ready(stream_id: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"type": "ready", "stream_id": stream_id, "config": config}


def config_reply(config: dict[str, Any]) -> dict[str, Any]:
    return {"type": "config", "config": config}


def pong() -> dict[str, Any]:
    return {"type": "pong"}


def stats(fps_in: float, fps_out: float, dropped: int, latency_ms: float | None, viewers: int) -> dict[str, Any]:
    return {
        "type": "stats",
        "fps_in": round(fps_in, 2),
        "fps_out": round(fps_out, 2),
        "dropped": dropped,
        "latency_ms": None if latency_ms is None else round(latency_ms, 1),
        "viewers": viewers,
    }


def status(state: str, viewers: int, config: dict[str, Any]) -> dict[str, Any]:
    return {"type": "status", "state": state, "viewers": viewers, "config": config}
