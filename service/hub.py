"""Streams: one broadcaster, any number of viewers, and the newest pending frame.

The hub is plain asyncio state driven from the event loop (no locks). Frames flow:
broadcaster -> `submit` (newest wins; older pending frames are dropped and counted) ->
`take_batch` (the scheduler) -> `publish_styled` -> every viewer's one-frame mailbox, which a
slow viewer simply overwrites, so it skips frames and never slows anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from service import codec, protocol
from service.config import PROCESSORS, StreamConfig
from service.connection import Connection, OutFrame
from service.metrics import Metrics, RateMeter
from service.rates import TokenBucket, Usage

log = logging.getLogger("dreamstream.hub")

BUDGET_NOTICE_S = 5.0  # how often a broadcaster over its pixel budget is told so


class HubFull(Exception):
    """Too many streams or viewers; the socket is refused with this message."""


@dataclass
class PendingFrame:
    data: bytes  # the encoded image as received; its header already checked
    ts: float  # the broadcaster's ts, or the receive time, in ms since the epoch
    received: float = field(default_factory=time.monotonic)
    number: int = 0  # the stream's frames_in count when it arrived: orders results that return out of order
    pixels: int = 0  # width x height, from the header


class Stream:
    def __init__(self, stream_id: str, config: StreamConfig) -> None:
        self.id = stream_id
        self.config = config
        self.config_version = 0
        self.broadcaster: Connection | None = None
        self.ever_live = False
        self.viewers: set[Connection] = set()
        self.pending: PendingFrame | None = None
        self.seq = 0
        self.last_shown = 0  # `number` of the newest frame shown to viewers
        # `config_version` of that frame: a config change shows with its first styled frame; until then the frames
        # still in flight (seconds of them with stream batching) keep the old style, after it never again
        self.shown_version = 0
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self.last_latency_ms: float | None = None
        self.fps_bucket = TokenBucket(0.0, 0.0)  # set by the hub: max_fps, with a short burst
        self.pixel_bucket = TokenBucket(0.0, 0.0)  # set by the hub: the stream's pixel budget a second
        self.usage = Usage()
        self.switching: dict[str, Any] | None = None  # a processor switch waiting for its load (service/state.py)
        self.budget_told = 0.0  # when the broadcaster was last told it is over its pixel budget
        self.in_meter = RateMeter()
        self.out_meter = RateMeter()
        self.last_submit = 0.0  # monotonic time of the last frame in: the scheduler waits for streams about to send

    @property
    def state(self) -> str:
        if self.broadcaster is not None:
            return "live"
        return "offline" if self.ever_live else "waiting"

    def status_message(self) -> dict[str, Any]:
        message = protocol.status(self.state, len(self.viewers), self.config.to_dict())
        if self.switching is not None:
            message["switching"] = self.switching
        return message

    def expire_stuck_viewers(self) -> None:
        now = time.monotonic()
        for viewer in list(self.viewers):
            viewer.expire_if_stuck(now)

    def stats_message(self) -> dict[str, Any]:
        return protocol.stats(
            self.in_meter.rate(), self.out_meter.rate(), self.dropped, self.last_latency_ms, len(self.viewers)
        )

    def summary(self) -> dict[str, Any]:
        return {
            "stream_id": self.id,
            "state": self.state,
            "viewers": len(self.viewers),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "dropped": self.dropped,
            "fps_in": round(self.in_meter.rate(), 2),
            "fps_out": round(self.out_meter.rate(), 2),
            "latency_ms": self.last_latency_ms,
            "config": self.config.to_dict(),
        }


@dataclass(frozen=True)
class Job:
    """A frame handed to the scheduler, with the config (and its version) it must be styled with."""

    stream: Stream
    frame: PendingFrame
    config: StreamConfig
    version: int


def batch_key(config: StreamConfig) -> tuple[str, int, bool]:
    """Frames batch together when they share this: a lightning batch of mixed step counts would swap the
    UNet's weights between its parts, and ControlNet on/off are separate model calls anyway."""
    return config.processor_type, config.num_steps, config.use_controlnet


class StreamHub:
    def __init__(
        self,
        default_config: StreamConfig,
        metrics: Metrics,
        max_streams: int = 100,
        max_viewers: int = 1000,
        max_fps: float = 60.0,
        max_pixels_per_s: float = 0.0,
    ) -> None:
        self.default_config = default_config
        self.max_pixels_per_s = max_pixels_per_s  # one stream's budget (0: none)
        self.metrics = metrics
        self.max_streams = max_streams
        self.max_viewers = max_viewers
        self.max_fps = max_fps
        self.burst = max(2.0, max_fps / 4)
        self.streams: dict[str, Stream] = {}
        self._ready: OrderedDict[str, None] = OrderedDict()  # streams with a pending frame, oldest first
        self._has_work = asyncio.Event()
        self._submitted = asyncio.Event()  # set on every frame in: wakes a scheduler filling a batch

    # ---- streams, broadcasters, viewers ----------------------------------------------------

    def open(self, stream_id: str, broadcaster: bool = False) -> Stream:
        """The stream, created if new. HubFull when at the stream limit.

        Live streams (with a broadcaster) and waiting ones (viewers only) are counted apart, each up
        to DREAMSTREAM_MAX_STREAMS: viewers, who need no key to wait, must not be able to fill the
        server with made-up stream ids and lock the real broadcasters out.
        """
        stream = self.streams.get(stream_id)
        if broadcaster and (stream is None or stream.broadcaster is None):
            if sum(s.broadcaster is not None for s in self.streams.values()) >= self.max_streams:
                raise HubFull(f"the server already has {self.max_streams} live streams (DREAMSTREAM_MAX_STREAMS)")
        elif stream is None and sum(s.broadcaster is None for s in self.streams.values()) >= self.max_streams:
            raise HubFull(f"the server already has {self.max_streams} streams waiting for a broadcaster")
        if stream is None:
            stream = self.streams[stream_id] = Stream(stream_id, self.default_config)
            stream.fps_bucket = TokenBucket(self.max_fps, self.burst)
            stream.pixel_bucket = TokenBucket(self.max_pixels_per_s, self.max_pixels_per_s)
            # A newcomer starts level with the most-served live stream, not at zero: otherwise a flood of new stream
            # ids, each with one frame, would always go ahead of the streams already live. Its usage decays (1 s),
            # so on a busy server a real new stream waits about a second for its fair share.
            now = time.monotonic()
            live = [s.usage.now(now) for s in self.streams.values() if s is not stream and s.broadcaster is not None]
            stream.usage.add(max(live, default=0.0), now)
            self.metrics.streams.set(len(self.streams))
        return stream

    def _close_if_idle(self, stream: Stream) -> None:
        if stream.broadcaster is None and not stream.viewers and self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self._ready.pop(stream.id, None)
            self.metrics.forget_stream(stream.id)
            self.metrics.streams.set(len(self.streams))

    async def attach_broadcaster(self, stream: Stream, conn: Connection) -> None:
        old, stream.broadcaster = stream.broadcaster, conn
        stream.ever_live = True
        conn.send_control(protocol.ready(stream.id, stream.config.to_dict()))
        if old is not None:
            log.info("stream %s: a new broadcaster replaces the old one", stream.id)
            old.close()
            try:
                await old.ws.close(code=4000, reason="replaced by a new broadcaster")
            except Exception:  # already gone
                pass
        else:
            log.info("stream %s: broadcaster connected", stream.id)
            self.tell_viewers(stream, stream.status_message())

    def detach_broadcaster(self, stream: Stream, conn: Connection) -> None:
        conn.close()
        if stream.broadcaster is not conn:
            return  # replaced already
        stream.broadcaster = None
        stream.pending = None
        self._ready.pop(stream.id, None)
        log.info("stream %s: broadcaster left; viewers see it offline", stream.id)
        self.tell_viewers(stream, stream.status_message())
        self._close_if_idle(stream)

    def add_viewer(self, stream: Stream, viewer: Connection) -> None:
        if len(stream.viewers) >= self.max_viewers:
            self._close_if_idle(stream)
            raise HubFull(f"stream {stream.id} already has {self.max_viewers} viewers (DREAMSTREAM_MAX_VIEWERS)")
        stream.viewers.add(viewer)
        self.metrics.viewers.labels(stream.id).set(len(stream.viewers))
        viewer.send_control(stream.status_message())

    def remove_viewer(self, stream: Stream, viewer: Connection) -> None:
        viewer.close()
        stream.viewers.discard(viewer)
        self.metrics.viewers.labels(stream.id).set(len(stream.viewers))
        self._close_if_idle(stream)

    def set_config(self, stream: Stream, changes: dict[str, Any]) -> StreamConfig:
        """Apply a config change (ValueError if invalid). Frames styled under the old config are never shown."""
        stream.config = stream.config.updated(changes)
        stream.config_version += 1
        log.info("stream %s: config %.300s", stream.id, {k: stream.config.to_dict()[k] for k in changes})  # capped
        self.tell_viewers(stream, stream.status_message())
        return stream.config

    def tell_broadcaster(self, stream: Stream, message: dict[str, Any]) -> None:
        if message.get("type") == "error":
            self.metrics.errors.labels(message["code"]).inc()
        if stream.broadcaster is not None:
            stream.broadcaster.send_control(message)

    def tell_viewers(self, stream: Stream, message: dict[str, Any]) -> None:
        for viewer in stream.viewers:
            viewer.send_control(message)

    # ---- frames ----------------------------------------------------------------------------

    def submit(self, stream: Stream, data: bytes, ts: float | None, pixels: int = 0) -> bool:
        """Make `data` the stream's newest frame. False when over the fps limit or the stream's pixel budget a
        second (dropped, counted; a broadcaster over its budget is told why, every few seconds)."""
        now = time.monotonic()
        stream.frames_in += 1
        stream.last_submit = now
        stream.in_meter.tick(now)
        self.metrics.frames_in.labels(stream.id).inc()
        if not stream.fps_bucket.take(1.0, now):
            self._drop(stream, "rate_limited")
            return False
        if not stream.pixel_bucket.take(pixels, now):
            self._drop(stream, "over_budget")
            if now - stream.budget_told > BUDGET_NOTICE_S:
                stream.budget_told = now
                self.tell_broadcaster(stream, protocol.error("too_large", (
                    f"this stream is over its budget of {self.max_pixels_per_s / 1e6:.0f} megapixels a second "
                    f"(DREAMSTREAM_MAX_STREAM_PIXELS_PER_S): frames are being dropped; send smaller frames or fewer")))
            return False
        if stream.pending is not None:
            self._drop(stream, "superseded")
        stream.pending = PendingFrame(data, ts if ts is not None else protocol.now_ms(), now, stream.frames_in,
                                      pixels)
        self._ready[stream.id] = None
        self._has_work.set()
        self._submitted.set()
        return True

    def _drop(self, stream: Stream, reason: str) -> None:
        stream.dropped += 1
        self.metrics.frames_dropped.labels(stream.id, reason).inc()

    async def wait_for_work(self) -> None:
        await self._has_work.wait()

    def wake(self) -> None:
        """Let the scheduler run a round without a new frame (a pipeline has frames in flight)."""
        self._has_work.set()

    async def wait_for_submit(self, timeout: float) -> None:
        """Until the next frame arrives from any stream, or `timeout` seconds."""
        self._submitted.clear()
        try:
            await asyncio.wait_for(self._submitted.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def head_key(self) -> tuple[str, int, bool] | None:
        """The `batch_key` of the longest-waiting ready stream: the next batch's."""
        for stream_id in self._ready:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.pending is not None:
                return batch_key(stream.config)
        return None

    def ready_ids(self, key: tuple[str, int, bool]) -> set[str]:
        """Streams with a frame waiting that could join a batch of `key`."""
        return {sid for sid in self._ready if (s := self.streams.get(sid)) is not None and s.pending is not None
                and batch_key(s.config) == key}

    def sending(self, now: float, within_s: float, key: tuple[str, int, bool]) -> set[str]:
        """Live streams of `key` that sent a frame in the last `within_s` seconds: likely to send again soon."""
        return {s.id for s in self.streams.values() if s.broadcaster is not None and now - s.last_submit < within_s
                and batch_key(s.config) == key}

    def take_batch(self, max_frames: int) -> list[Job]:
        """The newest frame of up to `max_frames` streams that run alike (`batch_key`: same processor, step count
        and ControlNet setting, so no batch swaps UNet weights); the others stay ready for the next batch.

        Fair across streams: the stream that has had the fewest pixels processed lately goes first, so a stream of
        small frames is not made to wait behind streams of big ones. A processor that gains nothing from batching
        (the CPU filter) takes one frame at a time, so nobody waits for a whole batch of someone else's frames.
        """
        now = time.monotonic()
        for stream_id in [sid for sid in self._ready if (s := self.streams.get(sid)) is None or s.pending is None]:
            del self._ready[stream_id]
        order = sorted(self._ready, key=lambda sid: self.streams[sid].usage.now(now))
        jobs: list[Job] = []
        key = None
        for stream_id in order:
            stream = self.streams[stream_id]
            if key is None:
                key = batch_key(stream.config)
                kind = PROCESSORS.get(key[0])
                max_frames = max_frames if kind is None or kind.batches else 1
            elif batch_key(stream.config) != key:
                continue
            del self._ready[stream_id]
            jobs.append(Job(stream, stream.pending, stream.config, stream.config_version))
            stream.usage.add(stream.pending.pixels, now)
            stream.pending = None
            if len(jobs) >= max_frames:
                break
        if not self._ready:
            self._has_work.clear()
        return jobs

    async def show_original(self, stream: Stream, data: bytes, info: codec.FrameInfo, ts: float) -> None:
        """Show a frame as it came to the stream's `source=original` viewers, if it has any (as JPEG: a PNG or
        WebP frame is converted off the event loop). ClientError when it cannot be decoded."""
        viewers = [v for v in stream.viewers if v.source == "original"]
        if not viewers:
            return
        jpeg = data if info.format == "jpeg" else await asyncio.to_thread(codec.to_jpeg, data, info)
        self._offer(stream, viewers, OutFrame(jpeg, stream.frames_in, ts, 0.0))

    def publish_styled(self, job: Job, jpeg: bytes) -> None:
        stream = job.stream
        if self.streams.get(stream.id) is not stream:
            self._drop(stream, "stale")  # the stream ended while its frame was being styled
            return
        if job.version < stream.shown_version:
            self._drop(stream, "stale")  # an older config's style, after a frame of a newer one was shown
            return
        if job.frame.number <= stream.last_shown:
            self._drop(stream, "stale")  # a newer frame of this stream came back first (several rounds in flight)
            return
        stream.last_shown, stream.shown_version = job.frame.number, job.version
        now = time.monotonic()
        latency_ms = (now - job.frame.received) * 1000.0
        stream.seq += 1
        stream.frames_out += 1
        stream.last_latency_ms = latency_ms
        stream.out_meter.tick(now)
        self.metrics.frames_out.labels(stream.id).inc()
        self.metrics.latency.labels(job.config.processor_type).observe(latency_ms / 1000.0)
        frame = OutFrame(jpeg, stream.seq, job.frame.ts, latency_ms)
        self._offer(stream, [v for v in stream.viewers if v.source == "styled"], frame)

    def _offer(self, stream: Stream, viewers: list[Connection], frame: OutFrame) -> None:
        skipped = sum(viewer.offer(frame) for viewer in viewers)
        if skipped:
            self.metrics.viewer_skipped.labels(stream.id).inc(skipped)

    def viewer_count(self) -> int:
        return sum(len(s.viewers) for s in self.streams.values())

    async def close_all(self, code: int, reason: str, timeout: float) -> None:
        """Close every socket with `code` once its queued messages and last frame are sent.

        Waits at most `timeout`: a viewer that stopped reading keeps its socket until uvicorn's own
        shutdown drops it.
        """
        conns = [c for s in self.streams.values() for c in (s.broadcaster, *s.viewers) if c is not None]
        for conn in conns:
            conn.close_after_flush(code, reason)
        if not conns:
            return
        waiters = [asyncio.ensure_future(c.finished.wait()) for c in conns]
        _, late = await asyncio.wait(waiters, timeout=timeout)
        for waiter in late:
            waiter.cancel()
