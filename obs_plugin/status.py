"""What the companion measures, and the status line it prints when something in it changes.

The suggested audio sync offset is the median time from OBS rendering a frame to the styled frame
reaching a viewer: capture + wait before sending + server processing + one round trip (upload to
the server, then out to the overlay). Delaying the microphone by that much in OBS (Edit > Advanced
Audio Properties > Sync Offset) keeps speech in step with the styled video.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

_WINDOW_S = 2.0
MIN_SAMPLES = 5  # frames sent before the pipeline's median means anything


@dataclass(frozen=True)
class Frame:
    """One capture: the encoded image and when it was taken (time.monotonic())."""

    data: bytes
    captured_at: float  # when the GetSourceScreenshot request went out
    capture_ms: float  # how long OBS took to answer it


def _median(values: deque[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Snapshot:
    """The parts of the status line a user acts on; the line is printed again only when one of them changes."""

    obs_state: str
    server_state: str
    capture_fps: float
    offset_ms: float | None
    server_fps: float | None
    viewers: object

    def differs_from(self, before: Snapshot, frame_ms: float) -> bool:
        """A new state, viewer count or measured/lost offset; a rate off by 1 fps and 10 %; an offset moved by
        one frame interval. Smaller wobbles (a capture rate of 14.5 then 15.0) are not news."""
        if (self.obs_state, self.server_state, self.viewers) != (before.obs_state, before.server_state, before.viewers):
            return True
        if self.offset_ms is None or before.offset_ms is None:
            if (self.offset_ms is None) != (before.offset_ms is None):  # just measured, or lost
                return True
        elif abs(self.offset_ms - before.offset_ms) >= frame_ms:
            return True
        return _rate_moved(self.capture_fps, before.capture_fps) or _rate_moved(self.server_fps, before.server_fps)


def _rate_moved(now: float | None, before: float | None) -> bool:
    if now is None or before is None:
        return now != before
    return abs(now - before) >= max(1.0, 0.1 * before)


@dataclass
class Stats:
    """Shared by the capture thread and the event loop; every access holds `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    capture_times: deque[float] = field(default_factory=deque)
    capture_ms: deque[float] = field(default_factory=lambda: deque(maxlen=60))
    pipeline_ms: deque[float] = field(default_factory=lambda: deque(maxlen=300))
    rtt_ms: deque[float] = field(default_factory=lambda: deque(maxlen=30))
    server_ms: deque[float] = field(default_factory=lambda: deque(maxlen=30))
    captured: int = 0
    sent: int = 0
    replaced: int = 0
    server: dict = field(default_factory=dict)
    obs_state: str = "connecting to OBS"
    server_state: str = "not started (OBS first)"

    def on_capture(self, frame: Frame) -> None:
        with self.lock:
            self.captured += 1
            self.capture_times.append(frame.captured_at)
            self.capture_ms.append(frame.capture_ms)

    def on_replaced(self) -> None:
        """A capture was overwritten by a newer one before it could be sent (newest frame wins)."""
        with self.lock:
            self.replaced += 1

    def on_sent(self, frame: Frame, now: float) -> None:
        with self.lock:
            self.sent += 1
            self.pipeline_ms.append((now - frame.captured_at) * 1000)

    def on_rtt(self, rtt_ms: float) -> None:
        with self.lock:
            self.rtt_ms.append(rtt_ms)

    def on_server_stats(self, message: dict) -> None:
        with self.lock:
            self.server = message
            latency = message.get("latency_ms")
            if isinstance(latency, (int, float)) and latency >= 0:
                self.server_ms.append(float(latency))

    def set_obs_state(self, state: str) -> None:
        with self.lock:
            self.obs_state = state

    def set_server_state(self, state: str) -> None:
        with self.lock:
            self.server_state = state

    def audio_offset_ms(self) -> float | None:
        """The median capture -> styled-frame latency; None until every part of it has been measured (the
        server's processing time comes with its first `stats`, about a second in): a guess from the
        capture side alone would be far too short."""
        with self.lock:
            if len(self.pipeline_ms) < MIN_SAMPLES or not self.server_ms or not self.rtt_ms:
                return None
            return sum(statistics.median(part) for part in (self.pipeline_ms, self.server_ms, self.rtt_ms))

    def _capture_fps(self, now: float) -> float:
        """Captures a second over the last two seconds; call with `lock` held."""
        while self.capture_times and self.capture_times[0] < now - _WINDOW_S:
            self.capture_times.popleft()
        return len(self.capture_times) / _WINDOW_S

    def snapshot(self, now: float | None = None) -> Snapshot:
        now = time.monotonic() if now is None else now
        offset = self.audio_offset_ms()
        with self.lock:
            server_fps = self.server.get("fps_out")
            return Snapshot(
                obs_state=self.obs_state, server_state=self.server_state, capture_fps=self._capture_fps(now),
                offset_ms=offset, server_fps=float(server_fps) if isinstance(server_fps, (int, float)) else None,
                viewers=self.server.get("viewers"),
            )

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        offset = self.audio_offset_ms()
        with self.lock:
            fps = self._capture_fps(now)
            capture = _median(self.capture_ms)
            rtt = _median(self.rtt_ms)
            parts = [
                f"OBS: {self.obs_state}",
                f"capture {fps:.1f} fps" + (f" ({capture:.0f} ms)" if capture is not None else ""),
                f"sent {self.sent}" + (f" ({self.replaced} stale skipped)" if self.replaced else ""),
                f"server: {self.server_state}" + (f", rtt {rtt:.0f} ms" if rtt is not None else ""),
            ]
            if self.server:
                s = self.server
                parts.append(
                    f"server {_num(s.get('fps_out'))} fps out, {_num(s.get('latency_ms'))} ms, "
                    f"{_num(s.get('dropped'))} dropped, {_num(s.get('viewers'))} viewers"
                )
        parts.append(f"audio sync offset {offset:+.0f} ms" if offset is not None else "audio sync offset: n/a")
        return " | ".join(parts)


def _num(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return str(value) if value is not None else "?"
