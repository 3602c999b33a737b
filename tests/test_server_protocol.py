"""The WebSocket protocol of SPEC §3 against a real `dreamstream serve` with real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
import websockets

from tests.helpers import gradient_jpeg, mean_rgb, recv_json, run, running_server, solid_jpeg
from tests.hostile import stalled_viewer

RED, BLUE = (220, 20, 20), (20, 20, 220)


def frame_bytes(msg: dict) -> bytes:
    assert msg["frame"].startswith("data:image/jpeg;base64,")
    return base64.b64decode(msg["frame"].split(",", 1)[1])


@pytest.fixture(scope="module")
def identity_server(tmp_path_factory):
    """Frames come back untouched: colours tell streams apart."""
    with running_server(tmp_path_factory.mktemp("identity"), processor="identity") as srv:
        yield srv


@pytest.fixture(scope="module")
def filter_server(tmp_path_factory):
    # no fps limit and no pixel budget: these tests send unpaced bursts on purpose (newest frame wins)
    env = {"DREAMSTREAM_MAX_FPS": "0", "DREAMSTREAM_MAX_STREAM_PIXELS_PER_S": "0"}
    with running_server(tmp_path_factory.mktemp("filter"), processor="filter", env=env) as srv:
        yield srv


def test_original_readme_json_flow_styles_the_frame(filter_server):
    """The original README: a JSON frame with a data URL in, a styled data-URL frame out to viewers."""

    async def main():
        src = gradient_jpeg((320, 240))
        async with websockets.connect(f"{filter_server.ws}/ws/viewer/readme") as viewer:
            assert (await recv_json(viewer))["state"] == "waiting"
            async with websockets.connect(f"{filter_server.ws}/ws/broadcaster/readme") as bc:
                ready = await recv_json(bc, "ready")
                assert ready["stream_id"] == "readme" and ready["config"]["processor_type"] == "filter"
                assert (await recv_json(viewer, "status"))["state"] == "live"
                data_url = "data:image/jpeg;base64," + base64.b64encode(src).decode()
                await bc.send(json.dumps({"type": "frame", "frame": data_url, "ts": 1234.5}))
                msg = await recv_json(viewer, "frame")
                assert msg["seq"] == 1 and msg["ts"] == 1234.5 and msg["latency_ms"] >= 0
                out = frame_bytes(msg)
                # styled: same picture size, visibly different pixels
                import simplejpeg

                a = simplejpeg.decode_jpeg(src, colorspace="RGB").astype(int)
                b = simplejpeg.decode_jpeg(out, colorspace="RGB").astype(int)
                assert a.shape == b.shape
                assert abs(a - b).mean() > 5
                # bare base64 works too
                await bc.send(json.dumps({"type": "frame", "frame": base64.b64encode(src).decode()}))
                assert (await recv_json(viewer, "frame"))["seq"] == 2

    run(main())


def test_binary_frames_and_binary_viewers(identity_server):
    async def main():
        url = identity_server.ws
        async with websockets.connect(f"{url}/ws/broadcaster/bin") as bc, websockets.connect(
            f"{url}/ws/viewer/bin?format=binary"
        ) as viewer:
            await recv_json(bc, "ready")
            await recv_json(viewer, "status")
            await bc.send(solid_jpeg(RED))
            while True:
                raw = await asyncio.wait_for(viewer.recv(), 10)
                if isinstance(raw, bytes):
                    break
            assert raw[:2] == b"\xff\xd8"
            assert abs(mean_rgb(raw) - RED).max() < 8

    run(main())


def test_png_and_webp_frames_come_out_as_jpeg(identity_server):
    import io

    from PIL import Image

    async def main():
        url = identity_server.ws
        async with websockets.connect(f"{url}/ws/broadcaster/fmt") as bc, websockets.connect(
            f"{url}/ws/viewer/fmt?source=original"
        ) as original, websockets.connect(f"{url}/ws/viewer/fmt") as styled:
            await recv_json(bc, "ready")
            for fmt in ("PNG", "WEBP"):
                buf = io.BytesIO()
                Image.new("RGB", (64, 48), BLUE).save(buf, fmt)
                await bc.send(buf.getvalue())
                for viewer in (original, styled):
                    out = frame_bytes(await recv_json(viewer, "frame"))
                    assert out[:2] == b"\xff\xd8"
                    assert abs(mean_rgb(out) - BLUE).max() < 8

    run(main())


def test_viewer_before_broadcaster_then_offline_then_live_again(identity_server):
    async def main():
        url = identity_server.ws
        async with websockets.connect(f"{url}/ws/viewer/early") as viewer:
            status = await recv_json(viewer)
            assert status == {"type": "status", "state": "waiting", "viewers": 1, "config": status["config"]}
            async with websockets.connect(f"{url}/ws/broadcaster/early") as bc:
                await recv_json(bc, "ready")
                assert (await recv_json(viewer, "status"))["state"] == "live"
                await bc.send(solid_jpeg(RED))
                assert (await recv_json(viewer, "frame"))["seq"] == 1
            assert (await recv_json(viewer, "status"))["state"] == "offline"
            async with websockets.connect(f"{url}/ws/broadcaster/early") as bc:
                await recv_json(bc, "ready")
                assert (await recv_json(viewer, "status"))["state"] == "live"
                await bc.send(solid_jpeg(BLUE))
                msg = await recv_json(viewer, "frame")
                assert abs(mean_rgb(frame_bytes(msg)) - BLUE).max() < 8

    run(main())


def test_second_broadcaster_replaces_first(identity_server):
    async def main():
        url = identity_server.ws
        async with websockets.connect(f"{url}/ws/viewer/swap") as viewer:
            await recv_json(viewer)
            first = await websockets.connect(f"{url}/ws/broadcaster/swap")
            await recv_json(first, "ready")
            async with websockets.connect(f"{url}/ws/broadcaster/swap") as second:
                await recv_json(second, "ready")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(first.recv(), 5)
                assert closed.value.rcvd.code == 4000
                await second.send(solid_jpeg(BLUE))
                msg = await recv_json(viewer, "frame")
                assert abs(mean_rgb(frame_bytes(msg)) - BLUE).max() < 8

    run(main())


def test_two_streams_never_mix(identity_server):
    async def main():
        url = identity_server.ws
        async with websockets.connect(f"{url}/ws/broadcaster/red") as red, websockets.connect(
            f"{url}/ws/broadcaster/blue"
        ) as blue, websockets.connect(f"{url}/ws/viewer/red") as red_v, websockets.connect(
            f"{url}/ws/viewer/blue"
        ) as blue_v:
            await recv_json(red, "ready")
            await recv_json(blue, "ready")
            await red.send(json.dumps({"type": "config", "prompt": "only red"}))
            assert (await recv_json(red, "config"))["config"]["prompt"] == "only red"
            for _ in range(10):
                await red.send(solid_jpeg(RED))
                await blue.send(solid_jpeg(BLUE))
                await asyncio.sleep(0.03)
            got: dict[str, list] = {"red": [], "blue": []}
            prompts: dict[str, list] = {"red": [], "blue": []}
            for name, viewer in (("red", red_v), ("blue", blue_v)):
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    try:
                        msg = await recv_json(viewer, timeout=deadline - time.monotonic())
                    except asyncio.TimeoutError:
                        break
                    if msg["type"] == "frame":
                        got[name].append(mean_rgb(frame_bytes(msg)))
                    elif msg["type"] == "status":
                        prompts[name].append(msg["config"]["prompt"])
            assert got["red"] and got["blue"]
            assert prompts["red"][-1] == "only red"
            assert "only red" not in prompts["blue"]
            assert all(abs(c - RED).max() < 8 for c in got["red"])
            assert all(abs(c - BLUE).max() < 8 for c in got["blue"])

    run(main())


def test_newest_frame_wins_under_a_fast_sender(filter_server):
    """100 large frames sent as fast as possible: older ones are dropped, the last one is always shown."""

    async def main():
        url = filter_server.ws
        big = gradient_jpeg((1920, 1080))
        async with websockets.connect(f"{url}/ws/broadcaster/fast") as bc, websockets.connect(
            f"{url}/ws/viewer/fast"
        ) as viewer:
            await recv_json(bc, "ready")
            await recv_json(viewer, "status")
            b64 = base64.b64encode(big).decode()
            for i in range(1, 101):
                await bc.send(json.dumps({"type": "frame", "frame": b64, "ts": i}))
            seen = []
            while not seen or seen[-1] != 100:
                seen.append((await recv_json(viewer, "frame"))["ts"])
            assert seen == sorted(seen), "frames must never go back in time"
            assert len(seen) < 60, f"expected most of 100 frames dropped, {len(seen)} processed"
            # every frame is accounted for: shown or dropped (stats come once a second; wait for one that has all)
            stats = await recv_json(bc, "stats")
            while stats["dropped"] + len(seen) < 100:
                stats = await recv_json(bc, "stats", timeout=3)
            assert stats["dropped"] + len(seen) == 100
            assert stats["viewers"] == 1

    run(main())


def test_stalled_viewer_does_not_slow_a_fast_one(identity_server):
    """A viewer that never reads (its TCP buffer fills) costs the other viewer no frames."""

    async def main():
        url = identity_server.ws
        stalled = stalled_viewer(identity_server.port, "/ws/viewer/stall")
        frame = gradient_jpeg((640, 480))  # ~60 kB: the stalled socket's buffers fill within a few frames
        async with websockets.connect(f"{url}/ws/broadcaster/stall") as bc, websockets.connect(
            f"{url}/ws/viewer/stall?format=binary"
        ) as fast:
            await recv_json(bc, "ready")
            received = 0
            start = time.monotonic()
            for _ in range(60):  # 2 s at 30 fps
                await bc.send(frame)
                await asyncio.sleep(1 / 30)
                while True:
                    try:
                        raw = await asyncio.wait_for(fast.recv(), 0.001)
                    except asyncio.TimeoutError:
                        break
                    received += isinstance(raw, bytes)
            deadline = time.monotonic() + 2
            while received < 60 and time.monotonic() < deadline:
                try:
                    raw = await asyncio.wait_for(fast.recv(), 0.5)
                    received += isinstance(raw, bytes)
                except asyncio.TimeoutError:
                    break
            elapsed = time.monotonic() - start
        stalled.close()
        assert received >= 57, f"fast viewer got {received}/60 frames in {elapsed:.1f} s"

    run(main())


BAD_INPUTS = [
    ("not json at all", "bad_message"),
    (json.dumps([1, 2, 3]), "bad_message"),
    (json.dumps({"type": "dance"}), "bad_message"),
    (json.dumps({"frame": "abc"}), "bad_message"),
    (json.dumps({"type": "frame"}), "bad_frame"),
    (json.dumps({"type": "frame", "frame": "!!!not base64!!!"}), "bad_frame"),
    (json.dumps({"type": "frame", "frame": base64.b64encode(b"hello world").decode()}), "bad_frame"),
    (json.dumps({"type": "frame", "frame": "data:text/html;base64,PGgxPg=="}), "bad_frame"),
    (json.dumps({"type": "frame", "frame": base64.b64encode(solid_jpeg(RED)).decode(), "ts": "noon"}), "bad_message"),
    (json.dumps({"type": "config", "strength": 7}), "bad_config"),
    (json.dumps({"type": "config", "strength": "high"}), "bad_config"),
    (json.dumps({"type": "config", "colour": "red"}), "bad_config"),
    (json.dumps({"type": "config", "processor_type": "magic"}), "bad_config"),
    (json.dumps({"type": "config", "num_steps": True}), "bad_config"),
    (b"\x00\x01garbage bytes", "bad_frame"),
    (b"", "bad_frame"),
    (solid_jpeg(RED)[:200], "bad_frame"),  # truncated JPEG: header fine, pixels missing
]


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the IDAT is tiny and wrong: never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_every_bad_input_gets_its_error_and_the_stream_goes_on(identity_server):
    async def main():
        url = identity_server.ws
        async with websockets.connect(f"{url}/ws/broadcaster/bad") as bc, websockets.connect(
            f"{url}/ws/broadcaster/good"
        ) as good, websockets.connect(f"{url}/ws/viewer/good") as good_v, websockets.connect(
            f"{url}/ws/viewer/bad"
        ) as bad_v:
            await recv_json(bc, "ready")
            await recv_json(good, "ready")
            cases = BAD_INPUTS + [
                (_bomb_png(40000, 40000), "too_large"),
                (b"\xff" * (4 * 1024 * 1024 + 10), "too_large"),
                (json.dumps({"type": "frame", "frame": "A" * (6 * 1024 * 1024)}), "too_large"),
            ]
            for i, (payload, code) in enumerate(cases):
                await bc.send(payload)
                err = await recv_json(bc, "error")
                assert err["code"] == code, f"case {i}: {payload[:60]!r} -> {err}"
                assert err["message"]
                await good.send(solid_jpeg(BLUE))
            await bc.send(json.dumps({"type": "ping"}))
            assert await recv_json(bc, "pong") == {"type": "pong"}
            # the bad stream still works
            await bc.send(solid_jpeg(RED))
            assert abs(mean_rgb(frame_bytes(await recv_json(bad_v, "frame"))) - RED).max() < 8
            frames = 0
            while True:
                try:
                    msg = await recv_json(good_v, "frame", timeout=1)
                    frames += 1
                    assert abs(mean_rgb(frame_bytes(msg)) - BLUE).max() < 8
                except asyncio.TimeoutError:
                    break
            assert frames >= 5

    run(main())


@pytest.mark.parametrize("path", ["/ws/broadcaster/bad%20id", "/ws/viewer/" + "x" * 65, "/ws/viewer/a.b"])
def test_invalid_stream_ids_are_closed_with_1008(identity_server, path):
    async def main():
        async with websockets.connect(identity_server.ws + path) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd.code == 1008

    run(main())


def test_config_changes_are_acknowledged_and_reach_viewers(filter_server):
    async def main():
        url = filter_server.ws
        async with websockets.connect(f"{url}/ws/broadcaster/cfg") as bc, websockets.connect(
            f"{url}/ws/viewer/cfg"
        ) as viewer:
            await recv_json(bc, "ready")
            await recv_json(viewer, "status")
            await bc.send(json.dumps({"type": "config", "prompt": "pencil sketch", "strength": 1.0, "seed": 7}))
            reply = await recv_json(bc, "config")
            assert reply["config"] == {
                "prompt": "pencil sketch",
                "strength": 1.0,
                "num_steps": 2,
                "processor_type": "filter",
                "use_controlnet": True,
                "seed": 7,
            }
            assert (await recv_json(viewer, "status"))["config"]["prompt"] == "pencil sketch"
            await bc.send(solid_jpeg(RED))
            out = mean_rgb(frame_bytes(await recv_json(viewer, "frame")))
            # a pencil sketch of a flat red frame is grey/white paper, not red
            assert out.max() - out.min() < 20

    run(main())


def test_http_api(identity_server):
    import httpx

    base = identity_server.http
    health = httpx.get(f"{base}/healthz").json()
    assert health["status"] == "ok" and health["processor"] == "identity" and health["device"] == "cpu"
    assert "streams" in health

    out = httpx.post(f"{base}/api/process", content=solid_jpeg(RED), headers={"content-type": "image/jpeg"})
    assert out.status_code == 200 and out.headers["content-type"] == "image/jpeg"
    assert abs(mean_rgb(out.content) - RED).max() < 8
    body = {"image": "data:image/jpeg;base64," + base64.b64encode(solid_jpeg(BLUE)).decode(), "prompt": "x"}
    out = httpx.post(f"{base}/api/process", json=body)
    assert out.status_code == 200 and abs(mean_rgb(out.content) - BLUE).max() < 8
    bad = httpx.post(f"{base}/api/process", content=b"nope", headers={"content-type": "image/jpeg"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_frame"
    bad = httpx.post(f"{base}/api/process", json={"image": base64.b64encode(solid_jpeg(RED)).decode(), "strength": 9})
    assert bad.status_code == 422 and "strength" in bad.json()["message"]

    missing = httpx.post(f"{base}/api/streams/nobody/config", json={"prompt": "x"})
    assert missing.status_code == 404

    async def main():
        async with websockets.connect(f"{identity_server.ws}/ws/broadcaster/http") as bc:
            await recv_json(bc, "ready")
            r = await asyncio.to_thread(
                httpx.post, f"{base}/api/streams/http/config", json={"prompt": "from a stream deck"}
            )
            assert r.status_code == 200 and r.json()["config"]["prompt"] == "from a stream deck"
            assert (await recv_json(bc, "config"))["config"]["prompt"] == "from a stream deck"
            r = await asyncio.to_thread(httpx.post, f"{base}/api/streams/http/config", json={"bogus": 1})
            assert r.status_code == 422 and "bogus" in r.json()["message"]
            await bc.send(solid_jpeg(RED))
            await asyncio.sleep(0.5)
            listed = (await asyncio.to_thread(httpx.get, f"{base}/api/streams")).json()["streams"]
            mine = [s for s in listed if s["stream_id"] == "http"]
            assert mine and mine[0]["state"] == "live" and mine[0]["frames_in"] == 1
            metrics = (await asyncio.to_thread(httpx.get, f"{base}/metrics")).text
            assert 'dreamstream_frames_in_total{stream="http"} 1.0' in metrics
            assert "dreamstream_processing_latency_seconds_bucket" in metrics
            assert "dreamstream_viewers" in metrics

    run(main())


def test_pages_render(identity_server):
    import httpx

    for path in ("/", "/?stream=abc&autostart=1", "/view/abc", "/overlay/abc", "/overlay/abc/compare"):
        r = httpx.get(identity_server.http + path)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], path
