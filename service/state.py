"""What one server holds: settings, hub, scheduler, backend, and which processors it offers.

`create_app` (service/app.py) builds one `DreamStream` and hands it to the routes; sockets, pages and the HTTP
API reach it as `request.app.state.dreamstream`. Tests can drive it without HTTP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from service import protocol
from service.backends import LocalBackend, ProcessorBackend
from service.config import PROCESSORS, Settings, StreamConfig
from service.engine import Engine
from service.errors import ClientError
from service.hub import Stream, StreamHub
from service.metrics import Metrics
from service.processors import resolve_auto
from service.scheduler import Scheduler

log = logging.getLogger("dreamstream")

SHUTDOWN_GRACE_S = 10.0  # how long shutdown waits for the batch in flight


@dataclass
class Switch:
    """A stream's switch to a processor that is loading: the changes to apply once it has loaded."""

    kind: str
    changes: dict[str, Any]
    task: asyncio.Task | None = None


class DreamStream:
    """Everything one server holds."""

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
            max_pixels_per_s=settings.max_stream_pixels_per_s,
        )
        if backend is None:
            engine = Engine(
                self.default_config,
                settings.processor_options,
                settings.max_frame_bytes,
                settings.max_frame_side,
                settings.jpeg_quality,
                max_frame_pixels=settings.max_frame_pixels,
                max_process_side=settings.max_process_side,
            )
            backend = LocalBackend(engine, processor, reason, settings.processing_timeout_s)
        self.backend = backend
        self.scheduler = Scheduler(self.hub, backend, settings.max_batch, settings.batch_wait_s)
        self.offered = offered_processors(settings, processor, backend)
        self.ready = False
        self.closing = False  # set by `drain`: new sockets are refused with 1001
        self.pending_requests = 0  # POST /api/process calls in progress
        self.load_error: str | None = None
        self._loading: asyncio.Task | None = None
        self._switches: dict[str, Switch] = {}  # stream id -> its processor switch waiting for a load

    async def startup(self) -> None:
        log.info("processor: %s (%s)", self.backend.processor, self.backend.reason)
        log.info("processors offered: %s", ", ".join(
            f"{name} ({why})" if why else name for name, why in self.offered.items()))
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
        """A graceful stop, before the server closes connections: refuse new sockets, let the batch in flight
        finish and reach its viewers, then close every socket with 1001 (going away). See service/server.py."""
        if self.closing:
            return
        self.closing = True
        log.info("shutting down: finishing the frames in flight, then closing sockets with 1001")
        await self.scheduler.stop(SHUTDOWN_GRACE_S)
        await self.hub.close_all(1001, "server shutting down", timeout=2.0)

    async def shutdown(self) -> None:
        await self.drain()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        for switch in self._switches.values():
            if switch.task is not None:
                switch.task.cancel()
        await self.backend.close()

    # ---- config changes --------------------------------------------------------------------

    def change_config(self, stream: Stream, changes: dict[str, Any]) -> StreamConfig:
        """Apply a `config` message (ClientError when invalid or not offered here).

        A switch to a processor that is not loaded yet loads it in the background first; until then the stream keeps
        the processor it has (and takes other changes at once: they carry over to the switch), and if the load
        fails it keeps it for good and its broadcaster and viewers are told why."""
        new = stream.config.updated(changes)  # checks every key before anything changes
        kind = new.processor_type
        pending = self._switches.get(stream.id)
        if "processor_type" not in changes and pending is not None:
            pending.changes.update(changes)  # e.g. a prompt typed while the new processor loads
            return self.hub.set_config(stream, changes)
        if kind != stream.config.processor_type:
            if kind not in self.offered or self.offered[kind]:
                why = self.offered.get(kind) or "this server does not offer it (DREAMSTREAM_PROCESSORS)"
                raise ClientError("bad_config", f"processor_type {kind!r} is not available here: {why}")
            if not self.backend.is_loaded(kind):
                self._start_switch(stream, changes, kind)
                return stream.config
        self._cancel_switch(stream)
        return self.hub.set_config(stream, changes)

    def _start_switch(self, stream: Stream, changes: dict[str, Any], kind: str) -> None:
        self._cancel_switch(stream)
        log.info("stream %s: loading the %s processor before switching to it", stream.id, kind)
        switch = Switch(kind, dict(changes))
        switch.task = asyncio.create_task(self._switch_when_loaded(stream, switch))
        self._switches[stream.id] = switch
        self._tell_switching(stream, {"to": kind, "state": "loading"})

    def _cancel_switch(self, stream: Stream) -> None:
        switch = self._switches.pop(stream.id, None)
        if switch is not None and switch.task is not None:
            switch.task.cancel()
            self._tell_switching(stream, None)

    def _tell_switching(self, stream: Stream, switching: dict[str, Any] | None) -> None:
        """Viewers (the overlay HUD, the dock) hear of a switch in their `status` message."""
        stream.switching = switching
        self.hub.tell_viewers(stream, stream.status_message())

    async def _switch_when_loaded(self, stream: Stream, switch: Switch) -> None:
        try:
            await self.backend.load(switch.kind)
        except Exception as exc:
            if self._switches.get(stream.id) is switch:
                del self._switches[stream.id]
            why = f"could not switch to {switch.kind}: {exc}; the stream goes on with {stream.config.processor_type}"
            self.hub.tell_broadcaster(stream, protocol.error("bad_config", why))
            self._tell_switching(stream, {"to": switch.kind, "state": "failed", "reason": why})
            return
        if self._switches.get(stream.id) is not switch or self.hub.streams.get(stream.id) is not stream:
            return
        del self._switches[stream.id]
        stream.switching = None
        try:
            config = self.hub.set_config(stream, switch.changes)  # tells viewers (status) itself
        except ClientError as exc:  # a change made while loading does not fit the new processor (e.g. its steps)
            self.hub.tell_broadcaster(stream, exc.to_message())
            self.hub.tell_viewers(stream, stream.status_message())
            return
        self.hub.tell_broadcaster(stream, protocol.config_reply(config.to_dict()))

    def switching_to(self, stream: Stream) -> str | None:
        """The processor this stream is waiting to switch to, if any."""
        switch = self._switches.get(stream.id)
        return None if switch is None else switch.kind

    # ---- health ----------------------------------------------------------------------------

    def processors_health(self) -> dict[str, dict[str, Any]]:
        """SPEC §7's `processors` block: each type users can pick, with its state, load progress and reason."""
        block: dict[str, dict[str, Any]] = {}
        for name in PROCESSORS:
            if not PROCESSORS[name].offered and name not in self.offered:
                continue
            why = self.offered.get(name, "this server does not offer it (DREAMSTREAM_PROCESSORS)")
            if why:
                block[name] = {"state": "unavailable", "progress": 0.0, "reason": why}
            else:
                block[name] = self.backend.processor_state(name)
        return block

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else ("error" if self.load_error else "loading"),
            "processor": self.backend.processor,
            "device": self.backend.device,
            "reason": self.backend.reason,
            "streams": len(self.hub.streams),
            "viewers": self.hub.viewer_count(),
            "processors": self.processors_health(),
            **({"optimise": optimise} if (optimise := self.backend.optimise_progress()) else {}),
            **({"error": self.load_error} if self.load_error else {}),
        }


def offered_processors(settings: Settings, default: str, backend: ProcessorBackend) -> dict[str, str]:
    """Every processor type streams may switch to here -> "" (offered) or why not.

    DREAMSTREAM_PROCESSORS fixes the list; by default it is what this machine can run (filter, the diffusion
    processors with their extra and a CUDA GPU). The server's own processor is always offered."""
    offered: dict[str, str] = {}
    for name, kind in PROCESSORS.items():
        if settings.processors is not None:
            if name in settings.processors or name == default:
                offered[name] = ""
            continue
        if name == default:
            offered[name] = ""
        elif kind.offered:
            offered[name] = backend.availability(name)
    return offered


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
