"""The standard processor's stream batching through a real `dreamstream serve --processor standard` (tiny models,
CPU), with frames sent at camera rate as the studio and `dreamstream obs` send them.

What a viewer sees: several frames in flight at once (throughput x latency, Little's law: one in flight at most
without stream batching), every styled frame equal to the sequential loop's for the same input and config (JPEG
rounding aside), in the order sent; after a live config change the new style shows and the old one never comes
back; a stream that stops sending still gets its last frame, and a lone frame (a client that sends its next
frame only when the last came back) comes out too; a one-shot /api/process request meanwhile gets its turn.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import simplejpeg
import websockets

from service import codec
from service.processors import FrameRequest
from tests.fixtures_diffusion import create_processor
from tests.helpers import gradient_jpeg, recv_json, run, running_server

pytest_plugins = ["tests.fixtures_diffusion"]

STEPS, STRENGTH = 20, 0.7  # 14 passes a frame: 14 frames in flight when fed every pass
FPS = 20.0
FRAMES = [gradient_jpeg((96, 72), seed=i) for i in range(6)]


def decode_frame(msg: dict) -> np.ndarray:
    return simplejpeg.decode_jpeg(base64.b64decode(msg["frame"].split(",", 1)[1]), colorspace="RGB")


def test_frames_in_flight_are_exact_ordered_and_none_is_left_behind(tiny_env, tmp_path):
    env = {**tiny_env, "DREAMSTREAM_WIDTH": "64", "DREAMSTREAM_HEIGHT": "64", "DREAMSTREAM_MAX_FPS": "0"}
    args = ["--steps", str(STEPS), "--strength", str(STRENGTH), "--prompt", "a watercolor"]
    with running_server(tmp_path, processor="standard", args=args, env=env, timeout=120) as server:
        received: list[tuple[float, dict]] = []  # (arrival wall time, frame message)
        answers: dict[str, int] = {}
        sent: list[tuple[int, float, str]] = []  # (frame index, ts, config phase)

        async def main() -> dict:
            async with (websockets.connect(f"{server.ws}/ws/viewer/s", max_size=None) as viewer,
                        websockets.connect(f"{server.ws}/ws/broadcaster/s", max_size=None) as broadcaster):
                ready = await recv_json(broadcaster, "ready", timeout=120)

                async def watch():
                    async for raw in viewer:
                        msg = json.loads(raw)
                        if msg["type"] == "frame":
                            received.append((time.time(), msg))

                async def send(count: int, phase: str):
                    for _ in range(count):
                        i = len(sent)
                        ts = time.time() * 1000
                        sent.append((i, ts, phase))
                        frame = base64.b64encode(FRAMES[i % len(FRAMES)]).decode()
                        await broadcaster.send(json.dumps({"type": "frame", "frame": frame, "ts": ts}))
                        await asyncio.sleep(1 / FPS)

                async def arrived(ts: float) -> None:
                    async with asyncio.timeout(60):
                        while not received or received[-1][1]["ts"] < ts:
                            await asyncio.sleep(0.05)

                watcher = asyncio.create_task(watch())
                await send(int(3 * FPS), "old")  # the pipeline fills, then runs full
                await broadcaster.send(json.dumps({"type": "config", "prompt": "neon city"}))
                await recv_json(broadcaster, "config")
                # a one-shot request meanwhile: the pipeline never pauses, and the request still gets its turn
                one_shot = asyncio.create_task(asyncio.to_thread(
                    httpx.post, f"{server.http}/api/process", content=FRAMES[0],
                    headers={"content-type": "image/jpeg"}, timeout=60))
                await send(int(2 * FPS), "new")
                await arrived(sent[-1][1])  # the stream stopped sending: its last frame still comes
                answers["one-shot"] = (await one_shot).status_code
                for _ in range(2):  # now one frame at a time, each sent when the last came back (a closed loop)
                    await send(1, "new")
                    await arrived(sent[-1][1])
                watcher.cancel()
                return ready["config"]

        config = run(main(), timeout=180)

    assert answers == {"one-shot": 200}
    by_ts = {ts: (i, phase) for i, ts, phase in sent}
    stamps = [msg["ts"] for _, msg in received]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), "frames out of order or repeated"
    assert stamps[-1] == sent[-1][1], "the last frame sent never reached the viewer"

    # Little's law over the first phase's steady part: frames in flight = frames/s out x latency
    steady = [(at, msg) for at, msg in received if by_ts[msg["ts"]][1] == "old"][5:]
    assert len(steady) >= 5, f"only {len(steady)} styled frames in the first phase"
    rate = (len(steady) - 1) / (steady[-1][0] - steady[0][0])
    latency = float(np.median([at - msg["ts"] / 1000 for at, msg in steady]))
    assert rate * latency >= 2, f"{rate:.1f} frames/s x {latency:.2f} s latency: not stream-batched"

    # each frame is the sequential loop's frame for its input and config (the JPEG round trip aside), and once the
    # new prompt shows, the old one never does again
    proc = create_processor("standard", style_prompt="a watercolor", num_steps=STEPS, width=64, height=64)
    references: dict[tuple[int, str], np.ndarray] = {}

    def reference(i: int, prompt: str) -> np.ndarray:
        key = (i % len(FRAMES), prompt)
        if key not in references:
            image = codec.decode(FRAMES[key[0]])
            [out] = proc.process_batch([FrameRequest(image, prompt, STRENGTH, STEPS, config["seed"])])
            references[key] = simplejpeg.decode_jpeg(codec.encode_jpeg(out, 85), colorspace="RGB")
        return references[key]

    styles = []
    for _, msg in received:
        i, phase = by_ts[msg["ts"]]
        image = decode_frame(msg).astype(np.int16)
        off = {prompt: np.abs(image - reference(i, prompt)).mean() for prompt in ("a watercolor", "neon city")}
        style = min(off, key=off.get)
        assert off[style] < 1.0 < max(off.values()), f"frame {i} ({phase}) matches neither config: {off}"
        if phase == "old" and style == "neon city":
            raise AssertionError(f"frame {i}, sent before the change, was styled with the new prompt")
        styles.append(style)
    first_new = styles.index("neon city")
    assert all(style == "neon city" for style in styles[first_new:]), styles
