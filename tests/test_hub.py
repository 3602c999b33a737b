"""The hub and scheduler driven directly, without a server: the rules a socket test can't pin down exactly."""

from __future__ import annotations

import asyncio

from service.config import StreamConfig
from service.hub import Connection, Stream, StreamHub
from service.metrics import Metrics


class FakeSocket:
    """Stands in for a socket only where the hub needs an object to hold; nothing is sent through it."""


def make_hub(**kwargs) -> StreamHub:
    return StreamHub(StreamConfig(processor_type="identity", num_steps=1), Metrics(), **kwargs)


def watched_stream() -> tuple[StreamHub, Stream, Connection]:
    """A hub with no fps limit, one stream and one viewer of it (call inside a running loop)."""
    hub = make_hub(max_fps=0)
    stream = hub.open("s")
    viewer = Connection(FakeSocket())
    hub.add_viewer(stream, viewer)
    return hub, stream, viewer


def test_an_old_configs_style_never_follows_the_new_one():
    """A config change shows with its first styled frame: frames still in flight keep the old style until then (no
    freeze while a stream-batched pipeline drains: seconds of frames), and never after it."""
    async def main():
        hub, stream, viewer = watched_stream()
        hub.submit(stream, b"frame-1", 1.0)
        [old_1] = hub.take_batch(8)
        hub.submit(stream, b"frame-2", 2.0)
        [old_2] = hub.take_batch(8)
        hub.set_config(stream, {"prompt": "new style"})  # arrives while frames 1 and 2 are being styled
        hub.submit(stream, b"frame-3", 3.0)
        [new_3] = hub.take_batch(8)
        assert (old_2.config.prompt, new_3.config.prompt) != ("new style", "new style")
        hub.publish_styled(old_1, b"styled-1-old")  # nothing newer shown yet: the viewer still sees the stream
        assert viewer.waiting_frame.jpeg == b"styled-1-old"
        hub.publish_styled(new_3, b"styled-3-new")
        assert viewer.waiting_frame.jpeg == b"styled-3-new"
        hub.publish_styled(old_2, b"styled-2-old")  # late and old: never shown after the new style
        assert viewer.waiting_frame.jpeg == b"styled-3-new"
        assert stream.dropped == 1

    asyncio.run(main())


def test_newest_frame_wins_and_batches_take_one_frame_per_stream_fairly():
    async def main():
        hub = make_hub(max_fps=0)
        streams = [hub.open(f"s{i}") for i in range(3)]
        for i, stream in enumerate(streams):
            for n in range(5):
                hub.submit(stream, f"{i}-{n}".encode(), float(n))
        batch = hub.take_batch(2)
        assert [j.frame.data for j in batch] == [b"0-4", b"1-4"]
        assert [s.dropped for s in streams] == [4, 4, 4]
        hub.submit(streams[0], b"0-5", 5.0)
        assert [j.frame.data for j in hub.take_batch(8)] == [b"2-4", b"0-5"]  # longest-waiting first
        assert hub.take_batch(8) == []

    asyncio.run(main())


def test_fps_limit_drops_the_excess():
    async def main():
        hub = make_hub(max_fps=10)
        stream = hub.open("s")
        accepted = sum(hub.submit(stream, b"x", None) for _ in range(50))  # a burst far above 10 fps
        assert accepted == int(hub.burst)
        assert stream.dropped == 50 - 1  # all but the one still pending: rate-limited or superseded

    asyncio.run(main())


def test_switching_processor_takes_its_default_steps():
    cfg = StreamConfig(processor_type="filter", num_steps=2)
    assert cfg.updated({"processor_type": "standard"}).num_steps == 25
    assert cfg.updated({"processor_type": "lightning"}).num_steps == 4
    assert cfg.updated({"processor_type": "lightning", "num_steps": 8}).num_steps == 8


def test_a_result_that_returns_after_a_newer_one_is_dropped():
    """With several rounds in flight (a remote GPU pool), results can return out of order."""

    async def main():
        hub, stream, viewer = watched_stream()
        hub.submit(stream, b"frame-1", 1.0)
        [first] = hub.take_batch(8)
        hub.submit(stream, b"frame-2", 2.0)
        [second] = hub.take_batch(8)
        hub.publish_styled(second, b"styled-2")
        hub.publish_styled(first, b"styled-1")
        assert viewer.waiting_frame.jpeg == b"styled-2"
        assert stream.frames_out == 1 and stream.dropped == 1

    asyncio.run(main())


def test_a_remote_pool_gets_several_batches_in_flight():
    """The scheduler keeps `max_in_flight` rounds going, so one slow round trip doesn't cap a stream's fps."""
    from service.backends import CallableBackend
    from service.scheduler import Scheduler

    async def main():
        hub, stream, viewer = watched_stream()
        concurrent = peak = 0

        async def remote(jobs):
            nonlocal concurrent, peak
            concurrent += 1
            peak = max(peak, concurrent)
            await asyncio.sleep(0.05)  # a 50 ms round trip
            concurrent -= 1
            return [job.data for job in jobs]

        scheduler = Scheduler(hub, CallableBackend(remote, "identity", "remote", "test", max_in_flight=4))
        scheduler.start()
        for i in range(40):  # 200 fps for 0.2 s
            hub.submit(stream, b"frame-%d" % i, float(i))
            await asyncio.sleep(0.005)
        # stop() takes no new frame: let the newest one (maybe still waiting for a slot on a busy machine) go out
        for _ in range(200):
            if stream.pending is None and not scheduler.rounds:
                break
            await asyncio.sleep(0.01)
        await scheduler.stop()
        assert peak == 4
        assert stream.frames_out >= 10  # one round at a time would give at most ~5 in 0.25 s
        assert viewer.waiting_frame.jpeg == b"frame-39"

    asyncio.run(main())


def test_loading_a_processor_is_not_held_to_the_processing_timeout():
    """Switching a stream to a processor that takes longer to load (compile) than the timeout still works."""
    import time as _time

    from service.backends import LocalBackend
    from service.engine import Engine, FrameJob
    from tests.helpers import solid_jpeg

    class SlowLoadingEngine(Engine):
        loads = 0

        def processor(self, processor_type, on_progress=None):
            if processor_type not in self.processors:
                SlowLoadingEngine.loads += 1
                _time.sleep(0.5)  # longer than the 0.2 s processing timeout below
            return super().processor(processor_type, on_progress)

    async def main():
        config = StreamConfig(processor_type="identity", num_steps=1)
        backend = LocalBackend(SlowLoadingEngine(config), "identity", "test", timeout_s=0.2)
        [result] = await backend.process([FrameJob("s", solid_jpeg((10, 200, 10)), config)])
        assert isinstance(result, bytes), result
        assert SlowLoadingEngine.loads == 1
        await backend.close()

    asyncio.run(main())
