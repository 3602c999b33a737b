"""Prometheus metrics, in a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("dreamstream_frames_in", "Frames received from broadcasters", ["stream"], registry=r)
        self.frames_out = Counter(
            "dreamstream_frames_processed", "Frames processed and sent to viewers", ["stream"], registry=r
        )
        self.frames_dropped = Counter(
            "dreamstream_frames_dropped",
            "Frames dropped: superseded by a newer one, over the fps limit, or stale after a config change",
            ["stream", "reason"],
            registry=r,
        )
        self.errors = Counter("dreamstream_errors", "Error messages sent to clients", ["code"], registry=r)
        self.latency = Histogram(
            "dreamstream_processing_latency_seconds",
            "Receive-to-publish time of a processed frame",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dreamstream_batch_size", "Frames per processor call", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.viewers = Gauge("dreamstream_viewers", "Connected viewers", ["stream"], registry=r)
        self.streams = Gauge("dreamstream_streams", "Streams with a broadcaster or viewers", registry=r)
        self.viewer_skipped = Counter(
            "dreamstream_viewer_frames_skipped", "Frames a slow viewer skipped", ["stream"], registry=r
        )

    def forget_stream(self, stream_id: str) -> None:
        """Drop a closed stream's labelled series so the label set stays bounded."""
        for metric in (self.frames_in, self.frames_out, self.viewers, self.viewer_skipped):
            try:
                metric.remove(stream_id)
            except KeyError:
                pass
        for reason in ("superseded", "rate_limited", "stale"):
            try:
                self.frames_dropped.remove(stream_id, reason)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        return len(self._times) / self.window_s

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
