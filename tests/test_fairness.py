"""No stream's legal frames starve the others (issue 16, item 2), against a real server beside a healthy stream:
a per-frame pixel limit, a per-stream pixel budget a second, frames shrunk while they are decoded, and a scheduler
that serves the stream with the least recent work first."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time

import httpx
import numpy as np
import simplejpeg
import websockets
from PIL import Image

from service.config import StreamConfig
from service.hub import StreamHub
from service.metrics import Metrics
from tests.helpers import gradient_jpeg, recv_json, run, running_server
from tests.hostile import HealthyStream


def big_png(side: int = 4096) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (30, 90, 160)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_a_4096_png_stream_is_refused_per_frame_while_the_healthy_stream_keeps_its_rate(tmp_path):
    with running_server(tmp_path, processor="filter") as srv:
        png = big_png()
        with HealthyStream(srv.ws, "healthy", gradient_jpeg((320, 240)), fps=30) as healthy:
            time.sleep(1.0)

            async def main():
                async with websockets.connect(f"{srv.ws}/ws/broadcaster/huge", max_size=None) as bc:
                    await recv_json(bc, "ready")
                    errors = []
                    for _ in range(25):  # 5 s at 5 fps
                        await bc.send(png)
                        errors.append(await recv_json(bc, "error"))
                        await asyncio.sleep(0.2)
                    return errors

            start = time.monotonic()
            errors = run(main())
            end = time.monotonic()
        assert all(e["code"] == "too_large" and "DREAMSTREAM_MAX_FRAME_PIXELS" in e["message"] for e in errors)
        assert "4096x4096" in errors[0]["message"]
        fps = healthy.fps_between(start, end)
        assert fps >= 27, f"the healthy stream fell to {fps:.1f} fps"


def test_a_stream_over_its_pixel_budget_drops_its_own_frames_and_is_told_why(tmp_path):
    env = {"DREAMSTREAM_MAX_STREAM_PIXELS_PER_S": str(640 * 480 * 5), "DREAMSTREAM_MAX_FPS": "0"}
    with running_server(tmp_path, processor="filter", env=env) as srv:

        async def main():
            frame = gradient_jpeg((640, 480))
            async with websockets.connect(f"{srv.ws}/ws/viewer/greedy?format=binary") as viewer, \
                    websockets.connect(f"{srv.ws}/ws/broadcaster/greedy") as bc:
                await recv_json(bc, "ready")
                for _ in range(40):  # 20 fps for 2 s: four times the budget
                    await bc.send(frame)
                    await asyncio.sleep(0.05)
                error = await recv_json(bc, "error")
                assert error["code"] == "too_large" and "DREAMSTREAM_MAX_STREAM_PIXELS_PER_S" in error["message"]
                got = 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        while True:
                            got += isinstance(await viewer.recv(), bytes)
                assert got >= 3  # the budget's share still reaches the viewer
                dropped = re.search(r'dreamstream_frames_dropped_total\{reason="over_budget",stream="greedy"\} (\S+)',
                                    httpx.get(f"{srv.http}/metrics").text)
                assert dropped and float(dropped.group(1)) >= 20


        run(main())


def test_big_frames_are_shrunk_while_decoding(tmp_path):
    with running_server(tmp_path, processor="identity") as srv:

        async def main():
            async with websockets.connect(f"{srv.ws}/ws/viewer/hd?format=binary") as viewer, \
                    websockets.connect(f"{srv.ws}/ws/broadcaster/hd") as bc:
                await recv_json(bc, "ready")
                await bc.send(gradient_jpeg((1920, 1080)))
                while not isinstance(out := await viewer.recv(), bytes):
                    pass
                return simplejpeg.decode_jpeg(out).shape

        assert run(main()) == (540, 960, 3)  # DREAMSTREAM_MAX_PROCESS_SIDE: 960 px long side


def test_the_stream_with_the_least_recent_work_goes_first():
    async def main():
        hub = StreamHub(StreamConfig(processor_type="filter", num_steps=2), Metrics())
        heavy, light = hub.open("heavy", broadcaster=True), hub.open("light", broadcaster=True)
        for _ in range(3):  # heavy has had big frames processed
            hub.submit(heavy, b"h", None, pixels=1920 * 1080)
            assert [job.stream.id for job in hub.take_batch(8)] == ["heavy"]
        hub.submit(heavy, b"h", None, pixels=1920 * 1080)  # heavy is ready first...
        hub.submit(light, b"l", None, pixels=320 * 240)
        assert [job.stream.id for job in hub.take_batch(8)] == ["light"]  # ...light goes first, one frame a call
        assert [job.stream.id for job in hub.take_batch(8)] == ["heavy"]
        assert np.isclose(light.usage.now(time.monotonic()), 320 * 240, rtol=0.1)

    asyncio.run(main())


def test_frames_of_a_batching_processor_still_batch():
    async def main():
        hub = StreamHub(StreamConfig(processor_type="identity", num_steps=1), Metrics())
        for n in range(4):
            hub.submit(hub.open(f"s{n}", broadcaster=True), b"x", None, pixels=100)
        assert len(hub.take_batch(8)) == 4

    asyncio.run(main())
