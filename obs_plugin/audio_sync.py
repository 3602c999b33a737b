"""`--sync-audio INPUT`: keep OBS's audio sync offset of INPUT at the measured capture -> styled-frame latency.

The styled video reaches the stream `Stats.audio_offset_ms()` after OBS rendered the frame (the median
of capture + wait before sending + server processing + the round trip). Delaying the microphone by as
much keeps speech in step with it. The offset follows the latency as it drifts, but only once it is
off by at least one frame interval: a few ms of jitter must not rewrite OBS's setting every second,
and nobody hears less than a frame. The offset OBS had when we first connected is put back when the
companion ends, whatever ends it (Ctrl+C, SIGTERM, an error); only a SIGKILL leaves ours in place.

A thread of its own with its own `ObsConnection` (a websocket-client socket is not thread-safe); it
reads OBS's value every second, so a hand edit in OBS or an OBS restart is corrected too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from obs_plugin.capture import CaptureOptions
from obs_plugin.obs_client import (
    AUDIO_SYNC_OFFSET_MAX_MS,
    STATUS_INVALID_RESOURCE_STATE,
    STATUS_RESOURCE_NOT_FOUND,
    ObsConnection,
    ObsError,
    ObsFatal,
    ObsRequestError,
    ObsUnavailable,
)
from obs_plugin.retry import Backoff
from obs_plugin.sources import input_names
from obs_plugin.status import Stats

log = logging.getLogger("dreamstream.obs")

CHECK_EVERY_S = 1.0


class NoSuchAudioInput(ObsFatal):
    pass


def next_offset(current_ms: int, measured_ms: float | None, frame_ms: float) -> int | None:
    """The offset to set, or None to leave `current_ms` alone (no measurement yet, or off by less than a frame)."""
    if measured_ms is None:
        return None
    target = int(round(min(max(measured_ms, 0.0), AUDIO_SYNC_OFFSET_MAX_MS)))
    return target if abs(target - current_ms) >= frame_ms else None


class AudioSync(threading.Thread):
    """Sets INPUT's sync offset from `stats` until stopped, then restores the offset it found.

    `on_ready` fires once the input is found on the first connection (the stream waits for it); a
    missing input or one without audio is a fatal configuration error (`fatal`, reported through
    `on_exit`). OBS going away is waited out like the capture side does.
    """

    def __init__(self, options: CaptureOptions, input_name: str, stats: Stats, on_ready: Callable[[], None],
                 on_exit: Callable[[], None]):
        super().__init__(name="obs-audio-sync", daemon=True)
        self.options = options
        self.input_name = input_name
        self.stats = stats
        self.frame_ms = 1000.0 / options.fps
        self.on_ready = on_ready
        self.on_exit = on_exit
        self.stop_event = threading.Event()
        self.fatal: BaseException | None = None
        self.original_ms: int | None = None  # what OBS had before we touched it
        self._changed = False
        self._conn: ObsConnection | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        try:
            self._run()
        except ObsFatal as exc:
            self.fatal = exc
        except BaseException as exc:  # reported by the main thread, never lost silently
            log.exception("the audio sync thread failed")
            self.fatal = exc
        finally:
            self._restore()
            if self._conn is not None:
                self._conn.close()
            if self.fatal is not None:
                self.on_exit()

    def _run(self) -> None:
        opts = self.options
        backoff = Backoff()
        while not self.stop_event.is_set():
            try:
                self._conn = ObsConnection(opts.host, opts.port, opts.password, opts.timeout)
                if self.original_ms is None:
                    self.original_ms = self._read_first(self._conn)
                    self.on_ready()
                backoff.reset()
                self._follow(self._conn)
            except (ObsUnavailable, ObsRequestError) as exc:
                # the capture side reports OBS coming and going; say it here only at debug level
                log.debug("audio sync: %s; trying again", exc)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self.stop_event.wait(backoff.next())

    def _read_first(self, conn: ObsConnection) -> int:
        try:
            offset = conn.audio_sync_offset(self.input_name)
        except ObsRequestError as exc:
            if exc.code in (STATUS_RESOURCE_NOT_FOUND, STATUS_INVALID_RESOURCE_STATE):
                raise self._no_such_input(conn, exc.code) from None
            raise
        log.info("--sync-audio: %r audio sync offset is %+d ms now; it goes back to that on exit",
                 self.input_name, offset)
        return offset

    def _no_such_input(self, conn: ObsConnection, code: int) -> NoSuchAudioInput:
        with_audio = [name for name in input_names(conn) if _has_audio(conn, name)]
        what = "no input named" if code == STATUS_RESOURCE_NOT_FOUND else "no audio (so no sync offset) in"
        listed = ", ".join(repr(name) for name in with_audio) or "(none)"
        return NoSuchAudioInput(
            f"--sync-audio: OBS has {what} {self.input_name!r}. Inputs with audio: {listed} "
            "(names are case-sensitive)."
        )

    def _follow(self, conn: ObsConnection) -> None:
        while not self.stop_event.wait(CHECK_EVERY_S):
            current = conn.audio_sync_offset(self.input_name)
            measured = self.stats.audio_offset_ms()
            target = next_offset(current, measured, self.frame_ms)
            if target is None:
                continue
            conn.set_audio_sync_offset(self.input_name, target)
            self._changed = True
            log.info("--sync-audio: %r audio sync offset set to %+d ms (was %+d ms; median capture -> styled "
                     "frame latency %.0f ms)", self.input_name, target, current, measured)

    def _restore(self) -> None:
        if not self._changed or self.original_ms is None:
            return
        for attempt in (1, 2):  # the open session, else a fresh one (OBS may have restarted)
            try:
                if attempt == 2 or self._conn is None:
                    if self._conn is not None:
                        self._conn.close()
                    opts = self.options
                    self._conn = ObsConnection(opts.host, opts.port, opts.password, timeout=2.0)
                self._conn.set_audio_sync_offset(self.input_name, self.original_ms)
                log.info("--sync-audio: %r audio sync offset restored to %+d ms", self.input_name, self.original_ms)
                return
            except ObsError as exc:
                failure = exc
        log.warning("--sync-audio: could not restore %r audio sync offset (%s): set it back to %+d ms by hand "
                    "(Edit > Advanced Audio Properties > Sync Offset)", self.input_name, failure, self.original_ms)


def _has_audio(conn: ObsConnection, name: str) -> bool:
    try:
        conn.audio_sync_offset(name)
    except ObsRequestError:
        return False
    return True
