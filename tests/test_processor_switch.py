"""Switching a stream's processor, against a real server: only offered processors, loads off the frame worker,
the stream keeps its processor until the new one is ready, and a failed switch says why and changes nothing.

Which processor styled a frame shows in its size: the filter keeps the input's 160x120, the tiny diffusion models
run at 64x64.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import simplejpeg
import websockets

from tests.helpers import gradient_jpeg, recv_json, run, running_server
from tests.hostile import HealthyStream, rss_mb

pytest_plugins = ["tests.fixtures_diffusion"]
FRAME = gradient_jpeg((160, 120))
TINY = {"DREAMSTREAM_WIDTH": "64", "DREAMSTREAM_HEIGHT": "64", "DREAMSTREAM_MAX_FPS": "0"}


def frame_size(msg: dict) -> tuple[int, int]:
    image = simplejpeg.decode_jpeg(base64.b64decode(msg["frame"].split(",", 1)[1]), colorspace="RGB")
    return image.shape[1], image.shape[0]


def test_a_cpu_server_offers_what_it_can_run_and_refuses_the_rest_at_once(tmp_path):
    with running_server(tmp_path, processor="filter") as srv:
        processors = httpx.get(f"{srv.http}/healthz").json()["processors"]
        assert processors["filter"]["state"] == "ready"
        assert "identity" not in processors  # a test processor, not offered to users
        for kind in ("standard", "lightning"):
            assert processors[kind]["state"] == "unavailable"
            assert "CUDA GPU" in processors[kind]["reason"] and "DREAMSTREAM_PROCESSORS" in processors[kind]["reason"]
        rss_before = rss_mb(srv.proc.pid)

        with HealthyStream(srv.ws, "healthy", gradient_jpeg((320, 240)), fps=30) as healthy:
            time.sleep(1.0)

            async def main():
                async with websockets.connect(f"{srv.ws}/ws/broadcaster/switcher") as bc:
                    await recv_json(bc, "ready")
                    for _ in range(5):  # again and again: each answered at once, nothing loads
                        start = time.monotonic()
                        await bc.send(json.dumps({"type": "config", "processor_type": "standard"}))
                        error = await recv_json(bc, "error")
                        assert time.monotonic() - start < 0.5
                        assert error["code"] == "bad_config" and "needs a CUDA GPU" in error["message"]
                    await bc.send(json.dumps({"type": "ping"}))
                    await recv_json(bc, "pong")
                summary = httpx.get(f"{srv.http}/api/streams").json()["streams"]
                assert all(s["config"]["processor_type"] == "filter" for s in summary)

            start = time.monotonic()
            run(main())
            time.sleep(1.0)
            end = time.monotonic()
        gaps = [b - a for a, b in zip(healthy.arrivals, healthy.arrivals[1:], strict=False) if start <= a < end]
        assert gaps and max(gaps) < 0.2, f"the healthy stream stalled {max(gaps):.2f} s"
        assert rss_mb(srv.proc.pid) - rss_before < 50


def test_a_switch_loads_in_the_background_then_applies(tiny_env, tmp_path):
    env = {**tiny_env, **TINY, "DREAMSTREAM_PROCESSORS": "filter,standard"}
    with running_server(tmp_path, processor="filter", env=env) as srv:
        assert httpx.get(f"{srv.http}/healthz").json()["processors"]["standard"]["state"] == "ready"

        async def main():
            async with websockets.connect(f"{srv.ws}/ws/viewer/sw") as viewer, \
                    websockets.connect(f"{srv.ws}/ws/broadcaster/sw") as bc:
                await recv_json(bc, "ready")
                sizes: list[tuple[int, int]] = []

                async def send_and_watch():  # a live stream: frames keep coming whatever the server does
                    while True:
                        await bc.send(FRAME)
                        try:
                            sizes.append(frame_size(await recv_json(viewer, "frame", timeout=0.3)))
                        except TimeoutError:
                            pass

                streaming = asyncio.create_task(send_and_watch())
                await bc.send(json.dumps({"type": "config", "processor_type": "standard", "num_steps": 2}))
                reply = await recv_json(bc, "config")
                assert reply["config"]["processor_type"] == "filter" and reply["loading"] == "standard"
                # a prompt typed while it loads (here from the dock, over HTTP) applies at once, and carries over
                posted = await asyncio.to_thread(httpx.post, f"{srv.http}/api/streams/sw/config",
                                                 json={"prompt": "neon city"})
                assert posted.json()["loading"] == "standard" and posted.json()["config"]["prompt"] == "neon city"
                reply = await recv_json(bc, "config")
                assert reply["config"]["prompt"] == "neon city" and reply["config"]["processor_type"] == "filter"
                assert reply["loading"] == "standard"
                progress = []  # what /healthz says while it loads (the studio shows "loading standard... n %")

                async def watch_health():
                    while True:
                        health = await asyncio.to_thread(httpx.get, f"{srv.http}/healthz")
                        progress.append(health.json()["processors"]["standard"])
                        await asyncio.sleep(0.3)

                watching = asyncio.create_task(watch_health())
                switched = await recv_json(bc, "config", timeout=150)  # the load (a minute on a busy CPU)
                watching.cancel()
                loading = [p for p in progress if p["state"] == "loading"]
                assert loading and any(0 < p["progress"] < 1 for p in loading), progress
                assert [p["progress"] for p in loading] == sorted(p["progress"] for p in loading)
                assert any(p["stage"].startswith("loading ") for p in loading)
                assert switched["config"]["processor_type"] == "standard" and switched["config"]["num_steps"] == 2
                assert switched["config"]["prompt"] == "neon city"
                assert "loading" not in switched
                styled_by_filter = len(sizes)
                assert styled_by_filter >= 3 and set(sizes) == {(160, 120)}  # the filter went on meanwhile
                deadline = time.monotonic() + 60
                while (not sizes or sizes[-1] != (64, 64)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                streaming.cancel()
                assert sizes[-1] == (64, 64), "no frame from the standard processor after the switch"
                assert set(sizes[styled_by_filter:]) <= {(160, 120), (64, 64)}

        run(main(), timeout=240)
        processors = httpx.get(f"{srv.http}/healthz").json()["processors"]
        assert processors["standard"] == {"state": "ready", "progress": 1.0, "loaded": True}


def test_a_failed_switch_keeps_the_processor_and_says_why(tiny_env, tmp_path):
    env = {**tiny_env, **TINY, "DREAMSTREAM_PROCESSORS": "filter,standard",
           "DREAMSTREAM_STANDARD_BASE_MODEL": str(tmp_path / "no-such-model")}
    with running_server(tmp_path, processor="filter", env=env) as srv:

        async def main():
            async with websockets.connect(f"{srv.ws}/ws/viewer/fail") as viewer, \
                    websockets.connect(f"{srv.ws}/ws/broadcaster/fail") as bc:
                await recv_json(bc, "ready")
                await recv_json(viewer, "status")
                await bc.send(json.dumps({"type": "config", "processor_type": "standard"}))
                assert (await recv_json(bc, "config"))["loading"] == "standard"
                status = await recv_json(viewer, "status")
                while "switching" not in status:
                    status = await recv_json(viewer, "status")
                assert status["switching"] == {"to": "standard", "state": "loading"}  # the overlay and dock hear it
                status = await recv_json(viewer, "status", timeout=60)
                assert status["switching"]["state"] == "failed" and "no-such-model" in status["switching"]["reason"]
                error = await recv_json(bc, "error", timeout=60)
                assert error["code"] == "bad_config"
                assert "could not switch to standard" in error["message"] and "no-such-model" in error["message"]
                assert "goes on with filter" in error["message"]
                await bc.send(FRAME)
                assert frame_size(await recv_json(viewer, "frame")) == (160, 120)
                await asyncio.sleep(0.2)

        run(main(), timeout=120)
        standard = httpx.get(f"{srv.http}/healthz").json()["processors"]["standard"]
        assert standard["state"] == "ready" and "the last load failed" in standard["reason"]
        assert httpx.get(f"{srv.http}/api/streams").json()["streams"] == []
