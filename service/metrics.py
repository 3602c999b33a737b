"""Prometheus metrics, in a registry of the app's own (several apps can live in one process).

Series labelled with a stream id stay bounded: at most `max_labelled_streams` streams have series of their own
(the others, and anything counted for a stream that has already ended, such as a `stale` result that came back
after its stream was removed, go under `stream="_other"`), and a stream's series are all removed when it ends.
A stream gets series of its own only through what opens one (a frame in, a viewer joining), so nothing counted
after its end can bring a removed stream's series back.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_LABELLED_STREAMS = 200  # = DREAMSTREAM_MAX_STREAMS' default of 100 live + 100 waiting
PROCESSOR_STATES = ("ready", "loading", "unavailable")  # SPEC §7's states of /healthz's processors block
OTHER = "_other"  # the label of the streams past the cap, and of counts for streams that have ended


class _PerStream:
    """A labelled metric whose first label is the stream id, bounded and forgotten through its `Metrics`."""

    def __init__(self, owner: Metrics, metric: Any, opens: bool) -> None:
        self._owner, self._metric, self._opens = owner, metric, opens

    def labels(self, stream_id: str, *rest: str) -> Any:
        return self._owner._child(self._metric, self._opens, stream_id, rest)

    def remove(self, *labels: str) -> None:
        self._metric.remove(*labels)

    def collect(self) -> Any:
        return self._metric.collect()


class _OtherGauge:
    """The `_other` viewers gauge: the sum over the streams past the cap, each of which sets its own part."""

    def __init__(self, owner: Metrics, stream_id: str) -> None:
        self._owner, self._stream_id = owner, stream_id

    def set(self, value: float) -> None:
        self._owner._other_viewers[self._stream_id] = value
        self._owner._gauge.labels(OTHER).set(sum(self._owner._other_viewers.values()))

    def inc(self, amount: float = 1) -> None:
        self.set(self._owner._other_viewers.get(self._stream_id, 0) + amount)


class Metrics:
    def __init__(self, max_labelled_streams: int = MAX_LABELLED_STREAMS) -> None:
        self.registry = CollectorRegistry()
        self.max_labelled_streams = max_labelled_streams
        self._labelled: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}  # stream id -> its series
        self._past_cap: set[str] = set()  # open streams counted under `_other`
        self._other_viewers: dict[str, float] = {}
        r = self.registry
        self.frames_in = _PerStream(self, Counter(
            "dreamstream_frames_in", "Frames received from broadcasters", ["stream"], registry=r), opens=True)
        self.frames_out = _PerStream(self, Counter(
            "dreamstream_frames_processed", "Frames processed and sent to viewers", ["stream"], registry=r),
            opens=False)
        self.frames_dropped = _PerStream(self, Counter(
            "dreamstream_frames_dropped",
            "Frames dropped: superseded by a newer one, over the fps limit or budget, or stale after a config change",
            ["stream", "reason"],
            registry=r,
        ), opens=False)
        self.errors = Counter("dreamstream_errors", "Error messages sent to clients", ["code"], registry=r)
        self.latency = Histogram(
            "dreamstream_processing_latency_seconds",
            "Receive-to-publish time of a processed frame, by the processor that styled it",
            ["processor"],  # a label from the fixed table of processor types: bounded
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dreamstream_batch_size", "Frames per processor call", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self._gauge = Gauge("dreamstream_viewers", "Connected viewers", ["stream"], registry=r)
        self.viewers = _PerStream(self, self._gauge, opens=True)
        self.processor_state = Gauge(
            "dreamstream_processor_state",
            "1 for the state each offered processor is in (ready, loading, unavailable), 0 for the others",
            ["processor", "state"],
            registry=r,
        )
        self.streams = Gauge("dreamstream_streams", "Streams with a broadcaster or viewers", registry=r)
        self.viewer_skipped = _PerStream(self, Counter(
            "dreamstream_viewer_frames_skipped", "Frames a slow viewer skipped", ["stream"], registry=r), opens=False)

    def _child(self, metric: Any, opens: bool, stream_id: str, rest: tuple[str, ...]) -> Any:
        if stream_id not in self._labelled and stream_id != OTHER:
            if not opens or stream_id in self._past_cap:
                return self._other(metric, stream_id, rest)
            if len(self._labelled) >= self.max_labelled_streams:
                self._past_cap.add(stream_id)
                return self._other(metric, stream_id, rest)
            self._labelled[stream_id] = set()
        if stream_id != OTHER:
            self._labelled[stream_id].add((metric, (stream_id, *rest)))
        return metric.labels(stream_id, *rest)

    def _other(self, metric: Any, stream_id: str, rest: tuple[str, ...]) -> Any:
        if metric is self._gauge:
            return _OtherGauge(self, stream_id) if stream_id in self._past_cap else _Nothing()
        return metric.labels(OTHER, *rest)

    @property
    def labelled_streams(self) -> int:
        return len(self._labelled)

    def forget_stream(self, stream_id: str) -> None:
        """Remove an ended stream's series (every one it had, whatever the label); later counts for it go to
        `_other` until a stream of that id opens again."""
        for metric, labels in self._labelled.pop(stream_id, ()):
            try:
                metric.remove(*labels)
            except KeyError:
                pass
        if stream_id in self._past_cap:
            self._past_cap.discard(stream_id)
            if self._other_viewers.pop(stream_id, None) is not None:
                self._gauge.labels(OTHER).set(sum(self._other_viewers.values()))

    def set_processor_states(self, processors: dict[str, dict[str, Any]]) -> None:
        """The processors block of /healthz as gauges: each processor's current state 1, its other states 0 (so a
        query for `state="loading"` sees a load end), and processors no longer listed removed."""
        listed = {(name, info["state"]) for name, info in processors.items()}
        states = [*PROCESSOR_STATES, *sorted({state for _, state in listed} - set(PROCESSOR_STATES))]
        for name in processors:
            for state in states:
                self.processor_state.labels(name, state).set(1 if (name, state) in listed else 0)
        for metric in self.processor_state.collect():
            for sample in metric.samples:
                if sample.labels["processor"] not in processors:
                    try:
                        self.processor_state.remove(sample.labels["processor"], sample.labels["state"])
                    except KeyError:
                        pass

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Nothing:
    """A gauge child that records nothing (a viewer count for a stream that has ended)."""

    def set(self, value: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass


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
