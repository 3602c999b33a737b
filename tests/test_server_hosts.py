"""The same app whoever starts it: `dreamstream serve` and plain `uvicorn service.app:app` enforce the same message
limits and stop the same way (the frame in flight delivered, then 1001 to every socket), as service/server.py says."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import websockets

from tests.helpers import gradient_jpeg, mean_rgb, recv_json, run, running_server, solid_jpeg
from tests.hostile import close_code, send_until_closed

RED = (220, 20, 20)
LAUNCHERS = ["dreamstream serve", "uvicorn"]
LIMITS = {
    "DREAMSTREAM_MAX_FRAME_BYTES": str(200_000),
    "DREAMSTREAM_MAX_MESSAGE_BYTES": str(1 << 20),
    "DREAMSTREAM_TEST_FAULTS": "1",
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_same_limits(tmp_path, launcher):
    with running_server(tmp_path, processor="identity", env=LIMITS, launcher=launcher) as srv:

        async def main():
            async with websockets.connect(f"{srv.ws}/ws/broadcaster/lim", max_size=None) as bc:
                await recv_json(bc, "ready")
                await bc.send(gradient_jpeg((1024, 1024), seed=3) + b"\0" * 300_000)  # over the frame limit
                error = await recv_json(bc, "error")
                assert error["code"] == "too_large" and "200000" in error["message"]
                await bc.send(json.dumps({"type": "ping"}))
                assert await recv_json(bc, "pong")  # the socket lives on
                assert await send_until_closed(bc, b"\0" * (2 << 20)) == 1009  # over the message limit
            async with websockets.connect(f"{srv.ws}/ws/viewer/lim") as viewer:
                await recv_json(viewer, "status")
                assert await send_until_closed(viewer, "x" * (2 << 20)) == 1009

        run(main())


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_same_graceful_stop(tmp_path, launcher):
    with running_server(tmp_path, processor="identity", env=LIMITS, launcher=launcher) as srv:

        async def main():
            async with websockets.connect(f"{srv.ws}/ws/viewer/bye?format=binary") as viewer, \
                    websockets.connect(f"{srv.ws}/ws/broadcaster/bye") as bc:
                await recv_json(bc, "ready")
                await bc.send(json.dumps({"type": "config", "prompt": "fault:sleep=1.5"}))  # caught mid-flight
                await recv_json(bc, "config")
                await bc.send(solid_jpeg(RED))
                await asyncio.sleep(0.4)
                srv.proc.send_signal(signal.SIGTERM)
                frames, code = [], None
                try:
                    async with asyncio.timeout(10):
                        async for msg in viewer:
                            if isinstance(msg, bytes):
                                frames.append(msg)
                except websockets.ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd else None
                code = code or viewer.close_code
                assert len(frames) == 1 and abs(mean_rgb(frames[0]) - RED).max() < 8, "in-flight frame lost"
                assert code == 1001, f"viewer closed with {code}"
                assert await close_code(bc) == 1001

        run(main())
        srv.proc.wait(10)
        assert "1012" not in srv.log()
