"""What the companion measures, and the status line it prints once a second.

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


@dataclass(frozen=True)
class Frame:
    """One capture: the encoded image and when it was taken (time.monotonic())."""

    data: bytes
    captured_at: float  # when the GetSourceScreenshot request went out
    capture_ms: float  # how long OBS took to answer it


def _median(values: deque[float]) -> float | None:
    return statistics.median(values) if values else None


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
        with self.lock:
            pipeline = _median(self.pipeline_ms)
            if pipeline is None:
                return None
            return pipeline + (_median(self.server_ms) or 0.0) + (_median(self.rtt_ms) or 0.0)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        offset = self.audio_offset_ms()
        with self.lock:
            while self.capture_times and self.capture_times[0] < now - _WINDOW_S:
                self.capture_times.popleft()
            fps = len(self.capture_times) / _WINDOW_S
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
