"""service/gpu_pool.py: how a round is cut into calls, what a lost or slow call costs, when the pool is woken.

The pool's call is a coroutine here (on Modal, `Restyler().restyle.remote.aio`); tests/test_modal_app.py drives
GpuPool end to end in the gateway app over a real server.
"""

from __future__ import annotations

import asyncio
import time

from service.config import Settings, StreamConfig
from service.engine import FrameJob
from service.gpu_pool import GpuPool, split_round


def test_a_round_is_split_into_near_equal_calls():
    jobs = [FrameJob(str(i), b"x", StreamConfig()) for i in range(10)]
    assert [len(c) for c in split_round(jobs, 8)] == [5, 5]  # the round waits for its slowest call
    assert [len(c) for c in split_round(jobs, 3)] == [3, 3, 2, 2]
    assert [j.stream_id for c in split_round(jobs, 4) for j in c] == [j.stream_id for j in jobs]
    assert split_round(jobs[:1], 8) == [jobs[:1]] and split_round([], 8) == []


def make_pool(restyle, timeout_s: float = 5.0, call_size: int = 8) -> GpuPool:
    return GpuPool(restyle, "filter", Settings(processor="filter", processing_timeout_s=timeout_s), label="L4",
                   max_gpus=2, call_size=call_size, idle_s=300, warmup_timeout_s=5)


def test_a_slow_or_lost_call_fails_its_own_frames_not_the_round():
    async def restyle(jobs: list[FrameJob]) -> list[bytes | Exception]:
        if any(j.stream_id == "stuck" for j in jobs):
            await asyncio.sleep(60)
        if any(j.stream_id == "lost" for j in jobs):
            raise ConnectionError("container went away")
        return [j.stream_id.encode() for j in jobs]

    pool = make_pool(restyle, timeout_s=0.3, call_size=1)
    config = StreamConfig()
    jobs = [FrameJob(name, b"x", config) for name in ("stuck", "lost", "ok")]
    started = time.monotonic()
    stuck, lost, fine = asyncio.run(pool.process(jobs))
    assert time.monotonic() - started < 5
    assert isinstance(stuck, TimeoutError) and isinstance(lost, ConnectionError) and fine == b"ok"


def test_a_pool_that_cannot_work_says_why_in_its_frames_and_its_reason():
    async def broken(jobs: list[FrameJob]) -> list[bytes | Exception]:
        return [RuntimeError("the lightning processor could not be loaded: model X is unavailable")] * len(jobs)

    pool = make_pool(broken)
    [result] = asyncio.run(pool.process([FrameJob("s", b"x", StreamConfig())]))
    assert isinstance(result, RuntimeError) and "model X is unavailable" in str(result)
    assert "model X is unavailable" in pool.reason


def test_a_pool_idle_past_its_scaledown_is_woken_again_before_frames():
    calls: list[list[str]] = []

    async def restyle(jobs: list[FrameJob]) -> list[bytes | Exception]:
        calls.append([j.stream_id for j in jobs])
        return [b"jpeg"] * len(jobs)

    async def scenario() -> None:
        pool = make_pool(restyle)
        assert "no GPU running" in pool.reason
        await pool.process([FrameJob("a", b"x", StreamConfig())])
        assert calls == [["_warmup"], ["a"]] and "answering" in pool.reason  # woken first, then the frame
        await pool.process([FrameJob("a", b"x", StreamConfig())])
        assert calls[-1] == ["a"]  # up: no second wake
        pool.idle_s = 0  # the pool has stopped its GPUs since
        assert "no GPU running" in pool.reason
        await pool.process([FrameJob("a", b"x", StreamConfig())])
        assert calls[-2:] == [["_warmup"], ["a"]]

    asyncio.run(scenario())
