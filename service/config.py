"""Server settings and per-stream config: plain data, read from env vars and CLI flags in one place.

Three things live here, each once:
- `PROCESSORS`, the processor table: every processor type, its step counts, what it needs, whether users see it.
- `StreamConfig`, one strict pydantic model: the WebSocket `config` check, the HTTP config check and the OpenAPI
  schema all come from it.
- `Settings`, everything a server is started with; `Settings.from_env()` is the one reader of DREAMSTREAM_* vars.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ClientError


@dataclass(frozen=True)
class ProcessorKind:
    """One row of the processor table."""

    name: str
    entry: str  # "module:Class", imported only when the processor is first built
    default_steps: int
    summary: str
    steps: tuple[int, ...] | None = None  # the only step counts it runs (None: 1-100)
    diffusion: bool = False  # needs the diffusion extra (torch, diffusers) and model weights
    batches: bool = True  # gains from styling several streams' frames in one call (a GPU model does; the filter not)
    offered: bool = True  # offered to users (identity is for tests and benchmarks)
    env_options: tuple[str, ...] = ()  # its options a server takes from DREAMSTREAM_* vars (`option_env_var`)


# Model options (hub id or local path) of the diffusion processors, and how they run; their defaults live with the
# loading code (service/processors/models.py, diffusion.py). The env var of each: `option_env_var`.
_MODEL_OPTIONS = ("base_model", "controlnet_model", "depth_model", "tiny_vae", "vae_model")
RUNTIME_OPTIONS = ("device", "dtype", "width", "height", "compile", "batch_sizes", "gpu_jpeg", "offline")
_SHARED_OPTION_ENV = {"depth_model": "DREAMSTREAM_DEPTH_MODEL", "lightning_unet": "DREAMSTREAM_LIGHTNING_UNET",
                      "test_faults": "DREAMSTREAM_TEST_FAULTS", "offline": "HF_HUB_OFFLINE"}
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off", "none"})


def parse_flag(value: Any, name: str, default: bool = False) -> bool:
    """An on/off option: True/False, or the words of an env var (1/0, true/false, yes/no, on/off); None: default."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be on or off (1/0, true/false), got {value!r}")


PROCESSORS: dict[str, ProcessorKind] = {
    kind.name: kind
    for kind in (
        ProcessorKind("filter", "service.processors.filter:FilterProcessor", 2,
                      "a painterly CPU filter: no GPU, no weights", batches=False),
        ProcessorKind("standard", "service.processors.standard:StandardProcessor", 25,
                      "Stable Diffusion 1.5 img2img + depth ControlNet: the quality mode", diffusion=True,
                      env_options=_MODEL_OPTIONS + ("tiny_encoder", "stream_batch", "cfg_every") + RUNTIME_OPTIONS),
        ProcessorKind("lightning", "service.processors.lightning:LightningProcessor", 4,
                      "SDXL-Lightning, 1-8 steps: the live mode", steps=(1, 2, 4, 8), diffusion=True,
                      env_options=_MODEL_OPTIONS + ("lightning_unet", "tiny_encoder") + RUNTIME_OPTIONS),
        ProcessorKind("identity", "service.processors.base:IdentityProcessor", 1,
                      "frames unchanged (tests and relay benchmarks)", offered=False, env_options=("test_faults",)),
    )
}
PROCESSOR_TYPES = tuple(PROCESSORS)
OFFERED_TYPES = tuple(name for name, kind in PROCESSORS.items() if kind.offered)
DEFAULT_STEPS = {name: kind.default_steps for name, kind in PROCESSORS.items()}
LIGHTNING_STEPS: tuple[int, ...] = PROCESSORS["lightning"].steps or ()
STREAM_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_stream_id(stream_id: str) -> bool:
    return bool(STREAM_ID_RE.fullmatch(stream_id))  # fullmatch: `$` would also take "main\n"


def check_steps(processor_type: str, num_steps: int) -> None:
    """ValueError for a step count `processor_type` cannot run (lightning has one distilled UNet per count)."""
    allowed = PROCESSORS[processor_type].steps
    if allowed is not None and num_steps not in allowed:
        choices = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
        raise ValueError(f"num_steps must be {choices} for the {processor_type} processor, got {num_steps!r}")


def option_env_var(processor_type: str, option: str) -> str:
    """The env var of a processor option: DREAMSTREAM_<TYPE>_<OPTION> for a model (e.g.
    DREAMSTREAM_LIGHTNING_BASE_MODEL), DREAMSTREAM_<OPTION> for how it runs and for models both processors share."""
    if option in _SHARED_OPTION_ENV:
        return _SHARED_OPTION_ENV[option]
    if option in RUNTIME_OPTIONS:
        return f"DREAMSTREAM_{option.upper()}"
    return f"DREAMSTREAM_{processor_type.upper()}_{option.upper()}"


def processor_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Each processor type's options set in the environment (as text; the processor parses them), read here once.
    The server (`Settings.from_env`), the Python API and Modal pass them down; processors never read the env."""
    env = os.environ if env is None else env
    options: dict[str, dict[str, str]] = {}
    for name, kind in PROCESSORS.items():
        found = {option: env[var].strip() for option in kind.env_options
                 if (var := option_env_var(name, option)) in env and env[var].strip()}
        if found:
            options[name] = found
    return options


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


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


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


def parse_processor_list(items: list[str], source: str = "DREAMSTREAM_PROCESSORS") -> tuple[str, ...] | None:
    """`filter,lightning` -> ("filter", "lightning"); an empty list -> None (what this machine can run)."""
    if not items:
        return None
    unknown = [item for item in items if item not in PROCESSORS]
    if unknown:
        raise ValueError(f"{source}: unknown processor {unknown[0]!r}; choose from {', '.join(OFFERED_TYPES)}")
    return tuple(dict.fromkeys(items))


# What each config key must be, in words, for `bad_config` messages (they never echo the value itself).
_RULES = {
    "prompt": "a string of at most 1000 characters",
    "strength": "a finite number in (0, 1]",
    "num_steps": "between 1 and 100 (an integer)",
    "processor_type": f"one of {', '.join(OFFERED_TYPES)}",
    "use_controlnet": "true or false",
    "seed": "an integer from 0 to 2^63-1",
}


class StreamConfig(BaseModel):
    """What one stream is restyled with. Each stream has its own copy; `config` messages change it.

    Strict: JSON's types only (no "0.5" for a number, no true for an integer), no unknown keys. Every field has
    a default, so the model's JSON schema is also the schema of a partial change (the HTTP config body).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    prompt: str = Field("Van Gogh style painting", max_length=1000)
    strength: float = Field(0.7, gt=0, le=1, allow_inf_nan=False)
    num_steps: int = Field(4, ge=1, le=100)
    processor_type: Literal[PROCESSOR_TYPES] = "filter"  # type: ignore[valid-type]
    use_controlnet: bool = True
    seed: int = Field(42, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _steps_fit_processor(self) -> StreamConfig:
        check_steps(self.processor_type, self.num_steps)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def updated(self, changes: dict[str, Any]) -> StreamConfig:
        """A copy with `changes` applied, or ClientError("bad_config") saying which key is wrong and why.

        Switching processor without naming `num_steps` takes the new processor's default step count.
        """
        if not isinstance(changes, dict):
            raise ClientError("bad_config", "config must be a JSON object")
        changes = dict(changes)
        new_type = changes.get("processor_type", self.processor_type)
        if isinstance(new_type, str) and new_type != self.processor_type and "num_steps" not in changes \
                and new_type in DEFAULT_STEPS:
            changes["num_steps"] = DEFAULT_STEPS[new_type]
        try:
            return StreamConfig.model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            raise config_error(exc, changes) from None

    @classmethod
    def http_schema(cls) -> dict[str, Any]:
        """The JSON schema of a config change, for the OpenAPI document."""
        return cls.model_json_schema()


def config_error(exc: ValidationError, changes: dict[str, Any]) -> ClientError:
    """A pydantic error as one readable `bad_config` message about the first wrong key."""
    first = exc.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    if first["type"] == "extra_forbidden":
        return ClientError("bad_config", f"unknown config key {key[:40]!r}; known keys: {', '.join(_RULES)}")
    if key in _RULES:
        got = changes.get(key)
        return ClientError("bad_config", f"{key} must be {_RULES[key]}; got {json_type(got)}")
    message = str(first.get("ctx", {}).get("error") or first["msg"]).removeprefix("Value error, ")
    return ClientError("bad_config", message)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages that never echo the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


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
    # each processor type's options, e.g. {"lightning": {"base_model": "/models/sdxl", "compile": "full"}}
    processor_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the processor types streams may switch to (DREAMSTREAM_PROCESSORS); None: those this machine can run
    processors: tuple[str, ...] | None = None
    # auth
    stream_keys: dict[str, str] = field(default_factory=dict)
    broadcast_key: str | None = None
    viewer_token: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted besides ours and loopback
    # limits
    max_frame_bytes: int = 4 * 1024 * 1024
    max_frame_side: int = 4096
    max_frame_pixels: int = 3840 * 2160  # what one frame may decode to (4K UHD)
    max_process_side: int = 960  # frames are shrunk to this long side as they are decoded (1080p: DCT 1/2)
    max_stream_pixels_per_s: float = 1920 * 1080 * 30.0  # one stream's budget: 1080p at 30 fps
    max_fps: float = 60.0
    max_viewers_per_stream: int = 1000
    max_streams: int = 100
    max_batch: int = 8
    batch_wait_s: float = 0.015  # the longest a batch waits for streams about to send (see scheduler.py)
    processing_timeout_s: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024  # any WebSocket message; bigger ones close the socket (1009)
    max_pending_requests: int = 8  # POST /api/process calls waiting for the processor; more get 503
    max_process_pixels: int = 1024 * 1024  # POST /api/process: bigger images are refused (413) from the header
    send_timeout_s: float = 20.0  # a viewer that takes no data for this long is dropped, freeing its seat
    # connections (enforced by service/server.py's HTTP protocol: `dreamstream serve`, or uvicorn --http)
    header_timeout_s: float = 5.0  # a connection whose request head is not complete by then is closed (0 = off)
    max_connections: int | None = None  # open at once (0 = no cap); None: the open-file limit less 256
    max_connections_per_address: int = 100  # open at once from one IP address (one /64 for IPv6; 0 = no cap)
    jpeg_quality: int = 85
    overlays_dir: str | None = None  # another copy of the pages (DREAMSTREAM_OVERLAYS_DIR), for designers

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = os.environ
        settings = cls(
            stream_keys=parse_stream_keys(env.get("DREAMSTREAM_STREAM_KEYS", "")),
            broadcast_key=env.get("DREAMSTREAM_BROADCAST_KEY") or None,
            viewer_token=env.get("DREAMSTREAM_VIEWER_TOKEN") or None,
            allowed_origins=_env_list("DREAMSTREAM_ALLOWED_ORIGINS"),
            allowed_hosts=_env_list("DREAMSTREAM_ALLOWED_HOSTS"),
            processors=parse_processor_list(_env_list("DREAMSTREAM_PROCESSORS")),
            processor_options=processor_options_from_env(env),
            max_frame_bytes=_env_number("DREAMSTREAM_MAX_FRAME_BYTES", 4 * 1024 * 1024, int),
            max_frame_side=_env_number("DREAMSTREAM_MAX_FRAME_SIDE", 4096, int),
            max_frame_pixels=_env_number("DREAMSTREAM_MAX_FRAME_PIXELS", 3840 * 2160, int),
            max_process_side=_env_number("DREAMSTREAM_MAX_PROCESS_SIDE", 960, int),
            max_stream_pixels_per_s=_env_number("DREAMSTREAM_MAX_STREAM_PIXELS_PER_S", 1920 * 1080 * 30.0, float),
            max_fps=_env_number("DREAMSTREAM_MAX_FPS", 60.0, float),
            max_viewers_per_stream=_env_number("DREAMSTREAM_MAX_VIEWERS", 1000, int),
            max_streams=_env_number("DREAMSTREAM_MAX_STREAMS", 100, int),
            max_batch=_env_number("DREAMSTREAM_MAX_BATCH", 8, int),
            batch_wait_s=_env_number("DREAMSTREAM_BATCH_WAIT_MS", 15.0, float) / 1000,
            processing_timeout_s=_env_number("DREAMSTREAM_PROCESSING_TIMEOUT", 30.0, float),
            max_message_bytes=_env_number("DREAMSTREAM_MAX_MESSAGE_BYTES", 16 * 1024 * 1024, int),
            max_pending_requests=_env_number("DREAMSTREAM_MAX_PENDING_REQUESTS", 8, int),
            max_process_pixels=_env_number("DREAMSTREAM_MAX_PROCESS_PIXELS", 1024 * 1024, int),
            send_timeout_s=_env_number("DREAMSTREAM_SEND_TIMEOUT", 20.0, float),
            header_timeout_s=_env_number("DREAMSTREAM_HEADER_TIMEOUT", 5.0, float),
            max_connections=_env_number("DREAMSTREAM_MAX_CONNECTIONS", None, int),
            max_connections_per_address=_env_number("DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS", 100, int),
            processor=env.get("DREAMSTREAM_PROCESSOR", "auto"),
            overlays_dir=env.get("DREAMSTREAM_OVERLAYS_DIR") or None,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        return settings

    def stream_defaults(self, processor: str) -> StreamConfig:
        """A new stream's config under these settings, for `processor` (steps: its default unless set)."""
        return StreamConfig(
            prompt=self.prompt,
            strength=self.strength,
            num_steps=self.steps or DEFAULT_STEPS.get(processor, 1),
            processor_type=processor,
            use_controlnet=self.use_controlnet,
        )

    @property
    def keys_enabled(self) -> bool:
        return bool(self.stream_keys or self.broadcast_key)

    @property
    def ws_max_size(self) -> int:
        """uvicorn's per-message cap: at least a max-size frame as base64 JSON, so it gets `too_large`, not 1009."""
        return max(self.max_message_bytes, self.max_frame_bytes * 4 // 3 + 64 * 1024)
