"""A real `dreamstream serve --processor lightning` on tiny models: styled frames reach a real viewer socket.

The models come in through the env vars alone (as a user with a local mirror would set them), so this
also checks that nothing on the server's path needs the network or a GPU.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request

import simplejpeg
import websockets

from tests.helpers import gradient_jpeg, running_server

pytest_plugins = ["tests.fixtures_diffusion"]


async def next_message(ws, kind: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(raw, str) and (msg := json.loads(raw))["type"] == kind:
            return msg


def styled(msg: dict):
    assert msg["frame"].startswith("data:image/jpeg;base64,")
    return simplejpeg.decode_jpeg(base64.b64decode(msg["frame"].split(",", 1)[1]), colorspace="RGB")


def test_lightning_frames_stream_through_websockets(tiny_env, tmp_path):
    env = {**tiny_env, "DREAMSTREAM_WIDTH": "64", "DREAMSTREAM_HEIGHT": "64", "DREAMSTREAM_MAX_FPS": "0"}
    with running_server(tmp_path, processor="lightning", args=["--steps", "2", "--prompt", "a watercolor"],
                        env=env, timeout=120) as server:
        deadline = time.monotonic() + 120
        while True:  # the processor loads and warms up after the port opens
            with urllib.request.urlopen(server.http + "/healthz", timeout=5) as resp:
                health = json.loads(resp.read())
            if health["status"] != "loading" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert health["status"] == "ok" and health["processor"] == "lightning", (health, server.log()[-3000:])

        async def main() -> None:
            async with (websockets.connect(f"{server.ws}/ws/viewer/tiny") as viewer,
                        websockets.connect(f"{server.ws}/ws/broadcaster/tiny") as broadcaster):
                ready = await next_message(broadcaster, "ready")
                assert ready["config"]["processor_type"] == "lightning"
                assert ready["config"]["num_steps"] == 2
                await broadcaster.send(gradient_jpeg((160, 120)))
                first = styled(await next_message(viewer, "frame"))
                assert first.shape == (64, 64, 3)
                # a live config change: 1 step (the x0 checkpoint) and another prompt, same socket
                await broadcaster.send(json.dumps({"type": "config", "num_steps": 1, "prompt": "neon"}))
                assert (await next_message(broadcaster, "config"))["config"]["num_steps"] == 1
                await broadcaster.send(gradient_jpeg((160, 120)))
                second = styled(await next_message(viewer, "frame"))
                assert second.shape == (64, 64, 3)
                assert abs(second.astype(int) - first.astype(int)).mean() > 1
                await broadcaster.send(json.dumps({"type": "config", "num_steps": 3}))
                error = await next_message(broadcaster, "error")
                assert error["code"] == "bad_config" and "num_steps" in error["message"]

        asyncio.run(asyncio.wait_for(main(), 120))
    log = server.log()
    assert "lightning_unet: sdxl_lightning_1step_unet_x0.safetensors active" in log
