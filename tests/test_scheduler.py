"""Scheduler.fill: when the processor frees up and fewer streams are ready than are sending, wait (bounded) for
the late ones rather than run a small batch and make them wait a whole batch. A real StreamHub and a real
CallableBackend here, then a real server with closed-loop WebSocket clients.

Streams count as live through `hub.attach_broadcaster` with a `Connection` around a FakeSocket whose pump never
runs (nothing is sent to a broadcaster in these tests). Viewers are real `Connection`s whose pump sends into a
RecordingSocket: what the test sees is what a viewer's socket would have been sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable

import pytest
import websockets

from service.backends import CallableBackend
from service.engine import FrameJob
from service.hub import Connection, Stream, StreamHub
from service.scheduler import Scheduler
from tests.helpers import gradient_jpeg, running_server
from tests.test_hub import FakeSocket, make_hub

SLOW_BATCH_S = 20.0  # a last batch this slow lets fill wait up to batch_wait_s
LONG_WAIT_S = 5.0  # batch_wait_s: far past every bound the tests assert, so a wait that ran out would show


class RecordingSocket:
    """What a viewer's socket is sent, in order."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.arrived = asyncio.Event()

    async def send_bytes(self, data: bytes) -> None:
        self.frames.append(data)
        self.arrived.set()

    async def send_text(self, text: str) -> None:
        pass  # status messages

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


class Recorder:
    """The remote call of a CallableBackend: notes each batch's stream ids and returns the frames unchanged."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.hold: dict[str, asyncio.Event] = {}  # stream id -> released when set: a slow round trip

    async def __call__(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        self.calls.append([job.stream_id for job in jobs])
        for job in jobs:
            if job.stream_id in self.hold:
                await self.hold[job.stream_id].wait()
        return [job.data for job in jobs]


@contextlib.asynccontextmanager
async def scheduled(
    count: int, max_in_flight: int = 1, batch_wait_s: float = LONG_WAIT_S
) -> AsyncIterator[tuple[StreamHub, Scheduler, Recorder, list[Stream], list[RecordingSocket]]]:
    """`count` live streams s1.. each with one binary viewer, and a running Scheduler."""
    hub = make_hub(max_fps=0)
    recorder = Recorder()
    scheduler = Scheduler(hub, CallableBackend(recorder, "identity", "test", "test", max_in_flight=max_in_flight),
                          max_batch=8, batch_wait_s=batch_wait_s)
    streams, sockets, pumps = [], [], []
    for n in range(1, count + 1):
        stream = hub.open(f"s{n}", broadcaster=True)
        await hub.attach_broadcaster(stream, Connection(FakeSocket()))
        socket = RecordingSocket()
        viewer = Connection(socket, binary=True)
        hub.add_viewer(stream, viewer)
        pumps.append(asyncio.create_task(viewer.pump()))
        streams.append(stream)
        sockets.append(socket)
    scheduler.start()
    try:
        yield hub, scheduler, recorder, streams, sockets
    finally:
        for event in recorder.hold.values():
            event.set()
        await scheduler.stop()
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait for `condition`; the seconds it took. Fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def shown(socket: RecordingSocket, frame: bytes) -> Callable[[], bool]:
    return lambda: frame in socket.frames


def test_fill_waits_for_streams_about_to_send_and_batches_them_all():
    async def main():
        async with scheduled(3) as (hub, scheduler, recorder, streams, sockets):
            for stream in streams:  # all three have sent recently: their first frames are styled and shown
                hub.submit(stream, b"warm-" + stream.id.encode(), None)
            await until(lambda: all(s.frames for s in sockets))
            recorder.calls.clear()

            scheduler.batch_seconds = SLOW_BATCH_S  # as if the processor were slow: filling is worth a wait
            hub.submit(streams[0], b"next-s1", None)

            async def the_other_two_a_little_later():
                await asyncio.sleep(0.02)
                hub.submit(streams[1], b"next-s2", None)
                hub.submit(streams[2], b"next-s3", None)

            late = asyncio.create_task(the_other_two_a_little_later())
            took = await until(lambda: all(s.frames[-1].startswith(b"next-") for s in sockets))
            await late
            assert recorder.calls[0] == ["s1", "s2", "s3"]
            assert len(recorder.calls) == 1
            assert [s.frames[-1] for s in sockets] == [b"next-s1", b"next-s2", b"next-s3"]
            assert took < 2.0  # the wait ended when the last stream was ready, not at batch_wait_s

    asyncio.run(main())


@pytest.mark.parametrize("batch_wait_s, batch_seconds", [
    pytest.param(LONG_WAIT_S, 4.0, id="a-quarter-of-the-last-batch"),
    pytest.param(1.0, SLOW_BATCH_S, id="batch_wait_s"),
])
def test_a_stream_that_sent_but_does_not_send_again_delays_the_others_a_bounded_time(batch_wait_s, batch_seconds):
    """The wait for a stream about to send ends after min(batch_wait_s, batch_seconds / 4): 1 s in both cases."""

    async def main():
        async with scheduled(2, batch_wait_s=batch_wait_s) as (hub, scheduler, recorder, [sends, stops], views):
            hub.submit(sends, b"sends-0", None)
            hub.submit(stops, b"stops-0", None)
            await until(lambda: all(view.frames for view in views))
            recorder.calls.clear()

            scheduler.batch_seconds = batch_seconds
            hub.submit(sends, b"sends-1", None)  # `stops` sent a moment ago, so the batch waits for it, then gives up
            took = await until(shown(views[0], b"sends-1"))
            assert 0.5 < took < 3.0, took
            assert recorder.calls == [["s1"]]

    asyncio.run(main())


def test_a_lone_stream_never_waits():
    async def main():
        async with scheduled(1) as (hub, scheduler, recorder, [stream], [socket]):
            for n in range(3):
                scheduler.batch_seconds = SLOW_BATCH_S
                frame = b"frame-%d" % n
                hub.submit(stream, frame, None)
                assert await until(shown(socket, frame)) < 1.0
            assert recorder.calls == [["s1"]] * 3

    asyncio.run(main())


def test_a_stream_that_went_quiet_is_not_waited_for():
    async def main():
        async with scheduled(2) as (hub, scheduler, recorder, [active, quiet], [active_view, quiet_view]):
            hub.submit(active, b"active-0", None)
            hub.submit(quiet, b"quiet-0", None)
            await until(lambda: active_view.frames and quiet_view.frames)
            await asyncio.sleep(Scheduler.SENDING_WINDOW_S + 0.2)  # both go quiet, still live
            recorder.calls.clear()

            scheduler.batch_seconds = SLOW_BATCH_S
            hub.submit(active, b"active-1", None)
            assert await until(shown(active_view, b"active-1")) < 1.0
            assert recorder.calls == [["s1"]]

    asyncio.run(main())


def test_a_stream_that_cannot_join_the_batch_is_not_waited_for():
    """s2 runs lightning at another step count: it could never share s1's batch, so s1 must not wait for it."""

    async def main():
        async with scheduled(2) as (hub, scheduler, recorder, [two, four], [two_view, four_view]):
            hub.set_config(two, {"processor_type": "lightning", "num_steps": 2})
            hub.set_config(four, {"processor_type": "lightning", "num_steps": 4})
            hub.submit(two, b"two-0", None)
            hub.submit(four, b"four-0", None)
            await until(lambda: two_view.frames and four_view.frames)
            recorder.calls.clear()

            scheduler.batch_seconds = SLOW_BATCH_S
            hub.submit(two, b"two-1", None)  # `four` sent a moment ago, but into another batch
            assert await until(shown(two_view, b"two-1")) < 1.0
            assert recorder.calls == [["s1"]]

    asyncio.run(main())


def test_a_stream_with_a_frame_in_flight_is_not_waited_for():
    """A remote pool runs several batches at once: a stream whose frame is still out will not send before it
    returns (closed loop), so the next batch must not wait for it."""

    async def main():
        async with scheduled(2, max_in_flight=2) as (hub, scheduler, recorder, [slow, other], [slow_view, other_view]):
            recorder.hold["s1"] = asyncio.Event()  # s1's round trip does not return until released
            hub.submit(slow, b"slow-0", None)
            await until(lambda: recorder.calls == [["s1"]])

            scheduler.batch_seconds = SLOW_BATCH_S
            hub.submit(other, b"other-0", None)
            assert await until(shown(other_view, b"other-0")) < 1.0
            assert recorder.calls == [["s1"], ["s2"]]
            assert slow_view.frames == []

            recorder.hold["s1"].set()
            await until(shown(slow_view, b"slow-0"))

    asyncio.run(main())


# ---- a real server ---------------------------------------------------------------------------------------

STREAMS = 4
RUN_S = 3.0


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def closed_loop(base: str, stream_id: str, frame: bytes, until_t: float) -> int:
    """One broadcaster that sends its next frame only once its binary viewer has the styled previous one.
    Returns how many styled frames the viewer got."""
    async with websockets.connect(f"{base}/ws/viewer/{stream_id}?format=binary") as viewer, \
            websockets.connect(f"{base}/ws/broadcaster/{stream_id}") as broadcaster:
        while isinstance(await asyncio.wait_for(broadcaster.recv(), 10), bytes):
            pass  # up to the `ready` message
        received = 0
        while time.monotonic() < until_t:
            await broadcaster.send(frame)
            while True:
                out = await asyncio.wait_for(viewer.recv(), 10)
                if isinstance(out, bytes):
                    break  # text: status and stats messages
            assert out[:2] == b"\xff\xd8"
            received += 1
        return received


def test_a_real_server_batches_closed_loop_streams(tmp_path):
    # identity with a 10 ms sleep a frame stands in for a model that batches (the filter styles one frame at a time)
    env = {"DREAMSTREAM_MAX_FPS": "0", "DREAMSTREAM_TEST_FAULTS": "1"}
    with running_server(tmp_path, processor="identity", env=env, args=["--prompt", "fault:sleep=0.01"]) as server:

        async def main():
            frame = gradient_jpeg((256, 256))
            until_t = time.monotonic() + RUN_S
            return await asyncio.gather(*(closed_loop(server.ws, f"loop{n}", frame, until_t) for n in range(STREAMS)))

        counts = asyncio.run(asyncio.wait_for(main(), 60))
        with urllib.request.urlopen(server.http + "/metrics", timeout=10) as resp:
            text = resp.read().decode()

    assert all(count >= 5 for count in counts), counts  # every stream's viewer kept getting styled frames
    frames, calls = metric(text, "dreamstream_batch_size_sum"), metric(text, "dreamstream_batch_size_count")
    assert frames >= sum(counts)
    # Closed-loop streams fall into alternating batches of 1 and 3 without fill (about 2 frames a call, measured
    # with DREAMSTREAM_BATCH_WAIT_MS=0); with it, all 4 go together (about 3.9, also on two busy cores).
    assert frames / calls > 2.5, f"{frames:.0f} frames in {calls:.0f} processor calls"
