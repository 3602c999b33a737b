"""Server settings and per-stream config: plain data, read from env vars and CLI flags in one place."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

PROCESSOR_TYPES = ("filter", "standard", "lightning", "identity")
LIGHTNING_STEPS = (1, 2, 4, 8)
DEFAULT_STEPS = {"filter": 2, "identity": 1, "standard": 25, "lightning": 4}
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_stream_id(stream_id: str) -> bool:
    return bool(STREAM_ID_RE.match(stream_id))


def _env_number(name: str, default: float, kind: type[int] | type[float]) -> Any:
    """The env var `name` as an int or float (`kind`), or `default` when unset or empty."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {raw!r}") from exc


def parse_stream_keys(raw: str) -> dict[str, str]:
    """`id1:key1,id2:key2` -> {id1: key1, id2: key2}."""
    keys: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        stream_id, sep, key = part.partition(":")
        if not sep or not stream_id or not key:
            raise ValueError("DREAMSTREAM_STREAM_KEYS must look like 'id1:key1,id2:key2'")
        keys[stream_id.strip()] = key.strip()
    return keys


@dataclass(frozen=True)
class StreamConfig:
    """What one stream is restyled with. Each stream has its own copy; `config` messages change it."""

    prompt: str = "Van Gogh style painting"
    strength: float = 0.7
    num_steps: int = 4
    processor_type: str = "filter"
    use_controlnet: bool = True
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: dict[str, Any]) -> StreamConfig:
        """A copy with `changes` applied, checked by `validate`.

        Switching processor without naming `num_steps` takes the new processor's default step count.
        """
        changes = dict(changes)
        new_type = changes.get("processor_type", self.processor_type)
        if new_type != self.processor_type and "num_steps" not in changes and new_type in DEFAULT_STEPS:
            changes["num_steps"] = DEFAULT_STEPS[new_type]
        new = replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        if self.processor_type not in PROCESSOR_TYPES:
            raise ValueError(f"processor_type must be one of {', '.join(PROCESSOR_TYPES[:3])}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError("strength must be in (0, 1]")
        if not 1 <= self.num_steps <= 100:
            raise ValueError("num_steps must be between 1 and 100")
        if self.processor_type == "lightning" and self.num_steps not in LIGHTNING_STEPS:
            raise ValueError("num_steps must be 1, 2, 4 or 8 for the lightning processor")
        if len(self.prompt) > 1000:
            raise ValueError("prompt must be at most 1000 characters")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be a non-negative integer")


@dataclass
class Settings:
    """Everything the server is started with. `Settings.from_env()` reads the DREAMSTREAM_* vars."""

    host: str = "127.0.0.1"
    port: int = 8000
    processor: str = "auto"  # auto | filter | standard | lightning | identity
    prompt: str = "Van Gogh style painting"
    strength: float = 0.7
    steps: int | None = None  # None: the processor's default
    use_controlnet: bool = True
    processor_options: dict[str, Any] = field(default_factory=dict)
    # auth
    stream_keys: dict[str, str] = field(default_factory=dict)
    broadcast_key: str | None = None
    viewer_token: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    # limits
    max_frame_bytes: int = 4 * 1024 * 1024
    max_frame_side: int = 4096
    max_fps: float = 60.0
    max_viewers_per_stream: int = 1000
    max_streams: int = 100
    max_batch: int = 8
    batch_wait_s: float = 0.015  # the longest a batch waits for streams about to send (see scheduler.py)
    processing_timeout_s: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024  # any WebSocket message; bigger ones close the socket (1009)
    max_pending_requests: int = 8  # POST /api/process calls waiting for the processor; more get 503
    send_timeout_s: float = 20.0  # a viewer that takes no data for this long is dropped, freeing its seat
    jpeg_quality: int = 85

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = os.environ
        settings = cls(
            stream_keys=parse_stream_keys(env.get("DREAMSTREAM_STREAM_KEYS", "")),
            broadcast_key=env.get("DREAMSTREAM_BROADCAST_KEY") or None,
            viewer_token=env.get("DREAMSTREAM_VIEWER_TOKEN") or None,
            allowed_origins=[
                o.strip() for o in env.get("DREAMSTREAM_ALLOWED_ORIGINS", "").split(",") if o.strip()
            ],
            max_frame_bytes=_env_number("DREAMSTREAM_MAX_FRAME_BYTES", 4 * 1024 * 1024, int),
            max_frame_side=_env_number("DREAMSTREAM_MAX_FRAME_SIDE", 4096, int),
            max_fps=_env_number("DREAMSTREAM_MAX_FPS", 60.0, float),
            max_viewers_per_stream=_env_number("DREAMSTREAM_MAX_VIEWERS", 1000, int),
            max_streams=_env_number("DREAMSTREAM_MAX_STREAMS", 100, int),
            max_batch=_env_number("DREAMSTREAM_MAX_BATCH", 8, int),
            batch_wait_s=_env_number("DREAMSTREAM_BATCH_WAIT_MS", 15.0, float) / 1000,
            processing_timeout_s=_env_number("DREAMSTREAM_PROCESSING_TIMEOUT", 30.0, float),
            max_message_bytes=_env_number("DREAMSTREAM_MAX_MESSAGE_BYTES", 16 * 1024 * 1024, int),
            max_pending_requests=_env_number("DREAMSTREAM_MAX_PENDING_REQUESTS", 8, int),
            send_timeout_s=_env_number("DREAMSTREAM_SEND_TIMEOUT", 20.0, float),
            processor=env.get("DREAMSTREAM_PROCESSOR", "auto"),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        return settings

    def stream_defaults(self, processor: str) -> StreamConfig:
        """A new stream's config under these settings, for `processor` (steps: its default unless set)."""
        config = StreamConfig(
            prompt=self.prompt,
            strength=self.strength,
            num_steps=self.steps or DEFAULT_STEPS.get(processor, 1),
            processor_type=processor,
            use_controlnet=self.use_controlnet,
        )
        config.validate()
        return config

    @property
    def keys_enabled(self) -> bool:
        return bool(self.stream_keys or self.broadcast_key)

    @property
    def ws_max_size(self) -> int:
        """uvicorn's per-message cap: at least a max-size frame as base64 JSON, so it gets `too_large`, not 1009."""
        return max(self.max_message_bytes, self.max_frame_bytes * 4 // 3 + 64 * 1024)
