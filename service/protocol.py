"""The WebSocket protocol: every client message is parsed and checked here, every server message built here."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from service.codec import FrameError, b64_size_ok, split_base64
from service.config import PROCESSOR_TYPES

ERROR_CODES = ("bad_frame", "bad_message", "too_large", "bad_config", "processing_failed")

# config keys a client may send: the Python types each accepts, and the JSON type's name for errors
CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "prompt": ((str,), "string"),
    "strength": ((int, float), "number"),
    "num_steps": ((int,), "integer"),
    "processor_type": ((str,), "string"),
    "use_controlnet": ((bool,), "boolean"),
    "seed": ((int,), "integer"),
}


# The same rules as JSON Schema, for the HTTP API's OpenAPI document (StreamConfig.validate is the authority).
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "maxLength": 1000},
        "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "num_steps": {"type": "integer", "minimum": 1, "maximum": 100},
        "processor_type": {"type": "string", "enum": list(PROCESSOR_TYPES)},
        "use_controlnet": {"type": "boolean"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    },
}


class ProtocolError(ValueError):
    """A message we answer with an `error` message; the socket stays open."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES
        super().__init__(message)
        self.code = code
        self.message = message


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


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages that never echo the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


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
    """Check the keys and JSON types of a config object; values are checked by StreamConfig."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_config", "config must be a JSON object")
    changes: dict[str, Any] = {}
    for key, value in obj.items():
        if key not in CONFIG_FIELDS:
            raise ProtocolError(
                "bad_config", f"unknown config key {key[:40]!r}; known keys: {', '.join(CONFIG_FIELDS)}"
            )
        types, json_name = CONFIG_FIELDS[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ProtocolError("bad_config", f"config key {key!r} must be a {json_name}; got {json_type(value)}")
        if key == "strength":
            value = finite_number(value)
            if value is None:
                raise ProtocolError("bad_config", "config key 'strength' must be a finite number")
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate such as \ud800 is valid JSON, not valid text
                raise ProtocolError("bad_config", f"config key {key!r} must be valid Unicode text") from None
        changes[key] = value
    return changes


def parse_text(text: str, max_frame_bytes: int) -> ClientMessage:
    """A text message from a broadcaster -> a typed message, or ProtocolError."""
    if len(text) > max_frame_bytes * 4 // 3 + 4096:
        raise ProtocolError(
            "too_large", f"message is {len(text)} characters; frames are limited to {max_frame_bytes} bytes"
        )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # ValueError also covers integers of over 4300 digits
        raise ProtocolError("bad_message", "message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "message must be a JSON object with a 'type'")
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
        raise ProtocolError("bad_message", "message needs a string 'type': frame, config or ping")
    raise ProtocolError("bad_message", f"unknown message type {kind[:40]!r}; expected frame, config or ping")


def _parse_frame(obj: dict[str, Any], max_frame_bytes: int) -> FrameMessage:
    frame = obj.get("frame")
    if not isinstance(frame, str):
        raise ProtocolError("bad_frame", "frame message needs 'frame': a base64 string or data URL")
    if not b64_size_ok(frame, max_frame_bytes):
        raise ProtocolError("too_large", f"frame is over the {max_frame_bytes}-byte limit")
    ts = obj.get("ts")
    if ts is not None and (ts := finite_number(ts)) is None:
        raise ProtocolError("bad_message", "'ts' must be a finite number (milliseconds)")
    try:
        data, _ = split_base64(frame)
    except FrameError as exc:
        raise ProtocolError(exc.code, exc.message) from None
    return FrameMessage(data=data, ts=ts)


# ---- server -> client -------------------------------------------------------------------------

def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


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
