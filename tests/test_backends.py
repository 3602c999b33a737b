"""The local backend driven directly: one thread per processor, always, even past a processing timeout."""

from __future__ import annotations

import asyncio

import numpy as np

from service import codec
from service.backends import LocalBackend
from service.config import StreamConfig
from service.engine import Engine, FrameJob

GREY = codec.encode_jpeg(np.full((16, 16, 3), 128, np.uint8))


def job(stream_id: str, prompt: str) -> FrameJob:
    return FrameJob(stream_id, GREY, StreamConfig(prompt=prompt, processor_type="identity", num_steps=1))


def test_a_processor_stuck_past_the_timeout_is_never_entered_by_a_second_thread():
    """`fault:sleep=2` holds the identity processor for 2 s against a 0.5 s timeout. With test faults on, the
    identity processor raises if a second thread enters it while one is inside: the frames sent meanwhile must be
    served (by a fresh instance), and once the stuck call returns everything still works."""
    engine = Engine(StreamConfig(processor_type="identity", num_steps=1), {"identity": {"test_faults": True}})
    backend = LocalBackend(engine, "identity", "test", timeout_s=0.5)

    async def main() -> None:
        await backend.start()
        [stuck] = await backend.process([job("a", "fault:sleep=2")])
        assert isinstance(stuck, TimeoutError) and "longer than 0.5 s" in str(stuck)
        for _ in range(3):  # while the first call still sleeps inside its processor
            [result] = await backend.process([job("b", "fine")])
            assert isinstance(result, bytes), result
            assert codec.decode(result).shape == (16, 16, 3)
        await asyncio.sleep(2)  # the stuck call returns on its old thread and ends there
        [result] = await backend.process([job("a", "fine again")])
        assert isinstance(result, bytes), result
        await backend.close()

    asyncio.run(main())
