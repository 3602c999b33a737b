"""The capture side: a thread that grabs the source from OBS at a steady rate into a one-slot mailbox.

The thread owns its own `ObsConnection` (websocket-client sockets are not thread-safe) and is the
only code that blocks on OBS. The mailbox holds one frame: a capture the sender has not taken yet
is replaced by the newer one, so a slow server link drops old frames instead of building a queue
of stale ones (newest frame first, as the server itself does).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from obs_plugin.obs_client import ObsConnection, ObsFatal, ObsRequestError, ObsUnavailable
from obs_plugin.overlay import install_overlay
from obs_plugin.retry import Backoff, StateLog
from obs_plugin.sources import SourceNotFound, check_no_feedback, resolve_source
from obs_plugin.status import Frame, Stats

log = logging.getLogger("dreamstream.obs")

RECHECK_FEEDBACK_S = 5.0


class Mailbox:
    """One slot shared by the capture thread (put) and the event loop (get)."""

    def __init__(self, stats: Stats):
        self._stats = stats
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def put(self, frame: Frame) -> None:
        with self._lock:
            if self._frame is not None:
                self._stats.on_replaced()
            self._frame = frame
        if self._loop is not None and self._event is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the loop has closed: we are shutting down
                pass

    def take(self) -> Frame | None:
        with self._lock:
            frame, self._frame = self._frame, None
        return frame

    async def get(self) -> Frame:
        assert self._event is not None, "bind() the mailbox to the event loop first"
        while True:
            self._event.clear()  # before take(): a put() after take() sets it again
            frame = self.take()
            if frame is not None:
                return frame
            await self._event.wait()


@dataclass(frozen=True)
class CaptureOptions:
    host: str
    port: int
    password: str
    source: str | None
    fps: float
    width: int
    overlay_url: str | None = None  # set: --install-overlay
    overlay_scene: str | None = None
    timeout: float = 5.0


class Capturer(threading.Thread):
    """Connects to OBS (again and again, with backoff), checks the source once, then captures.

    `on_ready` fires once the first connection passed the checks. Fatal problems (wrong password,
    missing source at start, feedback loop, no browser_source) are stored in `fatal` and reported
    through `on_exit`; everything else is retried.
    """

    def __init__(
        self,
        options: CaptureOptions,
        mailbox: Mailbox,
        stats: Stats,
        link_up: threading.Event,
        on_ready: Callable[[], None],
        on_exit: Callable[[], None],
    ):
        super().__init__(name="obs-capture", daemon=True)
        self.options = options
        self.mailbox = mailbox
        self.stats = stats
        self.link_up = link_up
        self.on_ready = on_ready
        self.on_exit = on_exit
        self.stop_event = threading.Event()
        self.fatal: BaseException | None = None
        self._state = StateLog(log)
        self._source: tuple[str, bool] | None = None  # resolved on the first connection

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        try:
            self._run()
        except ObsFatal as exc:
            self.fatal = exc
        except BaseException as exc:  # reported by the main thread, never lost silently
            log.exception("the capture thread failed")
            self.fatal = exc
        finally:
            self.on_exit()

    def _run(self) -> None:
        opts = self.options
        address = f"ws://{opts.host}:{opts.port}"
        backoff = Backoff()
        while not self.stop_event.is_set():
            try:
                conn = ObsConnection(opts.host, opts.port, opts.password, opts.timeout)
            except ObsUnavailable as exc:
                self._set_state(f"unreachable: {exc}", f"waiting for OBS: {exc}; retrying", logging.WARNING, "waiting")
                self.stop_event.wait(backoff.next())
                continue
            try:
                version = conn.version()
                self._set_state("connected", f"connected to OBS {version.obs} (obs-websocket {version.websocket}) "
                                f"at {address}", logging.INFO, "connected")
                if not self._prepare(conn):
                    self.stop_event.wait(backoff.next())
                    continue
                backoff.reset()
                self._capture(conn)
            except (ObsUnavailable, ObsRequestError) as exc:
                self._set_state(f"lost: {exc}", f"{exc}; reconnecting to OBS", logging.WARNING, "reconnecting")
                self.stop_event.wait(backoff.next())
            finally:
                conn.close()

    def _set_state(self, key: str, message: str, level: int, short: str) -> None:
        self._state.enter(key, message, level)
        self.stats.set_obs_state(short)

    def _prepare(self, conn: ObsConnection) -> bool:
        """Resolve the source and run the one-time checks. False: not ready yet, retry later."""
        opts = self.options
        if self._source is None:  # first connection: a bad --source is a typo, say so and stop
            name, is_scene = resolve_source(conn, opts.source)
            if opts.source is None:
                log.info("capturing %r, the current program scene (pass --source to choose another)", name)
            if opts.overlay_url is not None:
                install_overlay(conn, opts.overlay_url, opts.overlay_scene)
            check_no_feedback(conn, name, is_scene)
            log.info("capturing %s %r at %g fps, %d px wide", "scene" if is_scene else "input", name, opts.fps,
                     opts.width)
            self._source = (name, is_scene)  # only now: a connection lost before this point starts over
            self.on_ready()
            return True
        name, _ = self._source
        try:
            # after OBS restarts the scene collection may not hold the source (yet): wait for it
            self._source = resolve_source(conn, name)
        except SourceNotFound as exc:
            self._set_state(f"missing {name}", f"{exc} Waiting for it to come back.", logging.WARNING,
                            f"waiting for source {name!r}")
            return False
        check_no_feedback(conn, *self._source)
        log.info("capturing %r again", name)
        return True

    def _capture(self, conn: ObsConnection) -> None:
        opts = self.options
        assert self._source is not None
        name, is_scene = self._source
        interval = 1.0 / opts.fps
        next_at = time.monotonic()
        recheck_at = next_at + RECHECK_FEEDBACK_S
        while not self.stop_event.is_set():
            if not self.link_up.is_set():
                # nobody to send to: rendering screenshots would only cost OBS time
                self.stats.set_obs_state("connected, paused until the server is back")
                self.link_up.wait(0.5)
                next_at = time.monotonic()
                continue
            started = time.monotonic()
            data = conn.screenshot(name, opts.width)
            done = time.monotonic()
            frame = Frame(data=data, captured_at=started, capture_ms=(done - started) * 1000)
            self.mailbox.put(frame)
            self.stats.on_capture(frame)
            self.stats.set_obs_state("capturing")
            if done >= recheck_at:  # someone may have added the overlay to this scene meanwhile
                check_no_feedback(conn, name, is_scene)
                recheck_at = done + RECHECK_FEEDBACK_S
            # a fixed schedule, but never a burst to catch up after a slow capture
            next_at = max(next_at + interval, done)
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))

