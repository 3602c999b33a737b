"""StreamHub.take_batch groups streams that run alike (`hub.batch_key`: processor, step count, ControlNet), so a
lightning batch never swaps UNet weights between its parts. The longest-waiting stream decides the batch; the
others stay ready, in their order, for the next one."""

from __future__ import annotations

import asyncio
from typing import Any

from service.hub import StreamHub
from tests.test_hub import make_hub


def streams_with(hub: StreamHub, configs: list[dict[str, Any]]) -> list[str]:
    """One stream per config change set, each with one frame ready, submitted in this order."""
    ids = []
    for n, changes in enumerate(configs, 1):
        stream = hub.open(f"s{n}")
        hub.set_config(stream, changes)
        hub.submit(stream, f"frame-of-s{n}".encode(), float(n))
        ids.append(stream.id)
    return ids


def batch_ids(hub: StreamHub, max_frames: int = 8) -> list[str]:
    return [job.stream.id for job in hub.take_batch(max_frames)]


LIGHTNING_2 = {"processor_type": "lightning", "num_steps": 2}
LIGHTNING_4 = {"processor_type": "lightning", "num_steps": 4}


def test_lightning_streams_with_different_step_counts_go_in_separate_batches():
    async def main():
        hub = make_hub(max_fps=0)
        streams_with(hub, [LIGHTNING_2, LIGHTNING_4, LIGHTNING_2])
        first = hub.take_batch(8)
        assert [job.stream.id for job in first] == ["s1", "s3"]
        assert [job.frame.data for job in first] == [b"frame-of-s1", b"frame-of-s3"]
        assert {job.config.num_steps for job in first} == {2}
        assert batch_ids(hub) == ["s2"]
        assert batch_ids(hub) == []

    asyncio.run(main())


def test_controlnet_on_and_off_go_in_separate_batches():
    async def main():
        hub = make_hub(max_fps=0)
        on, off = {**LIGHTNING_4, "use_controlnet": True}, {**LIGHTNING_4, "use_controlnet": False}
        streams_with(hub, [on, off, on, off])
        assert batch_ids(hub) == ["s1", "s3"]
        assert batch_ids(hub) == ["s2", "s4"]
        assert batch_ids(hub) == []

    asyncio.run(main())


def test_different_processors_go_in_separate_batches_and_the_longest_waiting_decides():
    async def main():
        hub = make_hub(max_fps=0)
        other = {"processor_type": "identity", "num_steps": 1}  # a processor that batches too (the filter does not)
        streams_with(hub, [other, LIGHTNING_4, other, LIGHTNING_4])
        assert batch_ids(hub) == ["s1", "s3"]
        assert batch_ids(hub) == ["s2", "s4"]

    asyncio.run(main())


def test_streams_left_out_keep_their_place_and_the_batch_limit_still_holds():
    async def main():
        hub = make_hub(max_fps=0)
        streams_with(hub, [LIGHTNING_2, LIGHTNING_4, LIGHTNING_2, LIGHTNING_4, LIGHTNING_2])
        assert batch_ids(hub, 2) == ["s1", "s3"]  # two of the three 2-step streams
        assert batch_ids(hub, 2) == ["s2", "s4"]  # s2 has waited longest now
        assert batch_ids(hub, 2) == ["s5"]
        assert batch_ids(hub, 2) == []

    asyncio.run(main())


def test_a_stream_left_out_still_gets_its_newest_frame():
    async def main():
        hub = make_hub(max_fps=0)
        streams_with(hub, [LIGHTNING_2, LIGHTNING_4])
        assert batch_ids(hub) == ["s1"]
        hub.submit(hub.streams["s2"], b"newer-frame-of-s2", 9.0)  # arrives while s1's batch runs
        [job] = hub.take_batch(8)
        assert (job.stream.id, job.frame.data) == ("s2", b"newer-frame-of-s2")
        assert hub.streams["s2"].dropped == 1  # the older frame, superseded

    asyncio.run(main())


def test_streams_that_differ_only_in_prompt_strength_or_seed_share_a_batch():
    """Per-stream prompt and noise caches let these mix in one model call."""

    async def main():
        hub = make_hub(max_fps=0)
        streams_with(hub, [
            {**LIGHTNING_4, "prompt": "pencil sketch"},
            {**LIGHTNING_4, "prompt": "oil painting", "strength": 0.4},
            {**LIGHTNING_4, "seed": 7},
        ])
        assert batch_ids(hub) == ["s1", "s2", "s3"]

    asyncio.run(main())
