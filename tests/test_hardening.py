"""Hardening (SPEC §3, issue 8) against a real `dreamstream serve` with real WebSocket clients:
keys, tokens and origins; limits checked before decoding; processor faults and hangs; a broadcaster
that vanishes; graceful shutdown; and the HTTP API under schemathesis.

The 10,000-message fuzz lives in test_fuzz.py, the load tests (500 viewers, stalled viewers) in
test_load.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import simplejpeg
import websockets

from tests.helpers import gradient_jpeg, mean_rgb, recv_json, run, running_server, solid_jpeg
from tests.hostile import (
    b64_frame,
    close_code,
    jpeg_claiming,
    jpeg_with_segments,
    png_claiming,
    png_zip_bomb,
    recv_frame,
    refused_with,
    rss_mb,
    send_until_closed,
    stalled_viewer,
    webp_claiming,
)

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)
KEYS = {"alpha": "sk-alpha-7f3a91c2e5", "beta": "sk-beta-0b5e44d8a1"}
BROADCAST_KEY = "bk-global-c41d9e07f2"
VIEWER_TOKEN = "vt-viewer-9d2f61ab3c"
WRONG = "wrong-guess-5e6f7a8b"  # a mistyped key is still a secret-shaped string: it must not be logged either
ALLOWED_ORIGIN = "https://studio.example"


def wait_idle(server, timeout: float = 5.0) -> None:
    """Until the server has dropped every stream an earlier test left (disconnects are asynchronous)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.http}/api/streams").json()["streams"]:
        assert time.monotonic() < deadline, "streams from an earlier test are still open"
        time.sleep(0.05)


# ---- keys, tokens, origins, and secrets in logs --------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Keys, a viewer token and an origin list, on a public address (so it must not warn: keys are on)."""
    env = {
        "DREAMSTREAM_STREAM_KEYS": ",".join(f"{k}:{v}" for k, v in KEYS.items()),
        "DREAMSTREAM_BROADCAST_KEY": BROADCAST_KEY,
        "DREAMSTREAM_VIEWER_TOKEN": VIEWER_TOKEN,
        "DREAMSTREAM_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
    }
    tmp = tmp_path_factory.mktemp("guarded")
    with running_server(tmp, processor="identity", env=env, args=["--host", "0.0.0.0"]) as srv:
        yield srv


def test_stream_keys_guard_broadcasters(guarded):
    async def main():
        base = f"{guarded.ws}/ws/broadcaster"
        for query in ("", "?key=", f"?key={WRONG}", f"?key={KEYS['beta']}", f"?key={KEYS['alpha'].upper()}"):
            assert "key" in await refused_with(f"{base}/alpha{query}")
        for stream, key in (("alpha", KEYS["alpha"]), ("beta", KEYS["beta"]), ("gamma", BROADCAST_KEY)):
            async with websockets.connect(f"{base}/{stream}?key={key}") as bc:
                assert (await recv_json(bc, "ready"))["stream_id"] == stream

    run(main())


def test_viewer_token_guards_viewers_and_overlays(guarded):
    async def main():
        base = f"{guarded.ws}/ws/viewer/alpha"
        for url in (base, f"{base}?token=", f"{base}?token={WRONG}", f"{base}?token={VIEWER_TOKEN}x"):
            assert "token" in await refused_with(url)
        for query in ("", "&source=original", "&format=binary"):
            async with websockets.connect(f"{base}?token={VIEWER_TOKEN}{query}") as viewer:
                assert (await recv_json(viewer, "status"))["state"] == "waiting"

    run(main())


def test_http_config_needs_the_stream_key(guarded):
    async def main():
        url = f"{guarded.http}/api/streams/alpha/config"
        async with websockets.connect(f"{guarded.ws}/ws/broadcaster/alpha?key={KEYS['alpha']}") as bc:
            await recv_json(bc, "ready")

            def post(**kwargs) -> httpx.Response:
                return httpx.post(url, json={"prompt": "chat says: watercolor"}, **kwargs)

            for kwargs in (
                {},
                {"params": {"key": WRONG}},
                {"headers": {"Authorization": f"Bearer {KEYS['beta']}"}},
                {"headers": {"Authorization": f"Basic {KEYS['alpha']}"}},
            ):
                r = await asyncio.to_thread(post, **kwargs)
                assert r.status_code == 401 and r.json()["error"] == "unauthorized", kwargs
            for kwargs in (
                {"headers": {"Authorization": f"Bearer {KEYS['alpha']}"}},
                {"params": {"key": KEYS["alpha"]}},
                {"headers": {"Authorization": f"Bearer {BROADCAST_KEY}"}},
            ):
                r = await asyncio.to_thread(post, **kwargs)
                assert r.status_code == 200 and r.json()["config"]["prompt"] == "chat says: watercolor", kwargs
                assert (await recv_json(bc, "config"))["config"]["prompt"] == "chat says: watercolor"

    run(main())


def test_allowed_origins_guard_browser_sockets(guarded):
    """Cross-site pages are refused; listed origins, our own pages, and non-browser clients are not."""

    async def main():
        bc_url = f"{guarded.ws}/ws/broadcaster/gamma?key={BROADCAST_KEY}"
        viewer_url = f"{guarded.ws}/ws/viewer/gamma?token={VIEWER_TOKEN}"
        for url in (bc_url, viewer_url):
            assert "origin" in await refused_with(url, origin="https://evil.example")
            assert "origin" in await refused_with(url, origin="http://studio.example")  # scheme matters
            for origin in (ALLOWED_ORIGIN, f"http://127.0.0.1:{guarded.port}", None):
                async with websockets.connect(url, origin=origin) as ws:
                    assert (await recv_json(ws))["type"] in ("ready", "status")

    run(main())


def test_secrets_never_reach_the_log(guarded):
    """uvicorn logs every request path with its query string; keys and tokens must come out redacted."""

    async def main():
        async with websockets.connect(f"{guarded.ws}/ws/broadcaster/alpha?key={KEYS['alpha']}") as bc, \
                websockets.connect(f"{guarded.ws}/ws/viewer/alpha?token={VIEWER_TOKEN}&format=binary") as viewer:
            await recv_json(bc, "ready")
            await bc.send(solid_jpeg(RED))
            await recv_frame(viewer, 5)
        for url in (f"{guarded.ws}/ws/broadcaster/beta?key={WRONG}", f"{guarded.ws}/ws/viewer/beta?token={WRONG}"):
            await refused_with(url)
        async with httpx.AsyncClient() as client:
            await client.get(f"{guarded.http}/overlay/alpha?token={VIEWER_TOKEN}&fit=contain")
            await client.post(f"{guarded.http}/api/streams/beta/config?key={KEYS['beta']}", json={})
            await client.post(f"{guarded.http}/api/streams/beta/config?KEY={BROADCAST_KEY}", json={})
            await client.post(
                f"{guarded.http}/api/streams/beta/config", json={}, headers={"Authorization": f"Bearer {WRONG}"}
            )

    run(main())
    time.sleep(0.3)  # let the last log lines land
    log = guarded.log()
    assert "[redacted]" in log, "the access log lines should be there, with the secrets blanked"
    for secret in (*KEYS.values(), BROADCAST_KEY, VIEWER_TOKEN, WRONG):
        assert secret not in log, f"{secret[:6]}... leaked into the server log"
    assert "no stream keys" not in log  # public address, but keys are on: no warning


def test_warns_when_public_without_keys(tmp_path):
    with running_server(tmp_path, processor="identity", args=["--host", "0.0.0.0"]) as srv:
        assert httpx.get(f"{srv.http}/healthz").json()["status"] == "ok"
        log = srv.log()
    assert re.search(r"WARNING .*serving on 0\.0\.0\.0 with no stream keys", log), log


# ---- limits --------------------------------------------------------------------------------------

FRAME_LIMIT = 200_000


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    env = {
        "DREAMSTREAM_MAX_VIEWERS": "3",
        "DREAMSTREAM_MAX_STREAMS": "2",
        "DREAMSTREAM_MAX_FPS": "10",
        "DREAMSTREAM_MAX_FRAME_BYTES": str(FRAME_LIMIT),
        "DREAMSTREAM_MAX_FRAME_SIDE": "1024",
        "DREAMSTREAM_MAX_MESSAGE_BYTES": str(1 << 20),
        "DREAMSTREAM_SEND_TIMEOUT": "2",
    }
    with running_server(tmp_path_factory.mktemp("limited"), processor="identity", env=env) as srv:
        yield srv


def test_max_viewers_per_stream(limited):
    wait_idle(limited)

    async def main():
        url = f"{limited.ws}/ws/viewer/crowd"
        viewers = [await websockets.connect(url) for _ in range(3)]
        for v in viewers:
            await recv_json(v, "status")
        assert "DREAMSTREAM_MAX_VIEWERS" in await refused_with(url)
        await viewers.pop().close()
        await asyncio.sleep(0.2)
        async with websockets.connect(url) as again:  # a freed seat can be taken
            assert (await recv_json(again, "status"))["viewers"] == 3
        for v in viewers:
            await v.close()

    run(main())


def test_viewers_that_stop_reading_lose_their_seats(limited):
    """Three viewers that never read fill the stream's three seats; once their buffers are full and
    a send has waited DREAMSTREAM_SEND_TIMEOUT, they are dropped and a real viewer gets in."""
    wait_idle(limited)
    noisy = np.random.default_rng(3).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    frame = simplejpeg.encode_jpeg(noisy, quality=75, colorspace="RGB")
    assert 100_000 < len(frame) < FRAME_LIMIT
    stalled = [stalled_viewer(limited.port, "/ws/viewer/zombie?format=binary") for _ in range(3)]

    async def main():
        url = f"{limited.ws}/ws/viewer/zombie"
        while (await asyncio.to_thread(httpx.get, f"{limited.http}/healthz")).json()["viewers"] < 3:
            await asyncio.sleep(0.05)
        assert "DREAMSTREAM_MAX_VIEWERS" in await refused_with(url)
        async with websockets.connect(f"{limited.ws}/ws/broadcaster/zombie") as bc:
            await recv_json(bc, "ready")
            start = time.monotonic()
            while time.monotonic() - start < 20:
                for _ in range(5):
                    await bc.send(frame)
                    await asyncio.sleep(0.1)
                try:
                    async with websockets.connect(url) as viewer:
                        status = await recv_json(viewer, "status")
                        break
                except websockets.ConnectionClosed:  # refused: the seats are still taken
                    continue
            else:
                raise AssertionError("the stalled viewers kept their seats for 20 s")
            assert status["state"] == "live" and status["viewers"] <= 3
        assert "dropping a viewer that accepted nothing for 2 s" in limited.log()

    try:
        run(main())
    finally:
        for sock in stalled:
            sock.close()


def test_max_streams_counts_live_and_waiting_apart(limited):
    """Viewers need no key, so they must not be able to fill the server and lock broadcasters out."""
    wait_idle(limited)

    async def main():
        ws = limited.ws
        waiting = [await websockets.connect(f"{ws}/ws/viewer/w{i}") for i in range(2)]
        for viewer in waiting:
            assert (await recv_json(viewer, "status"))["state"] == "waiting"
        assert "waiting for a broadcaster" in await refused_with(f"{ws}/ws/viewer/w2")
        live = [await websockets.connect(f"{ws}/ws/broadcaster/b{i}") for i in range(2)]
        for bc in live:
            await recv_json(bc, "ready")  # the waiting streams did not take these seats
        assert "DREAMSTREAM_MAX_STREAMS" in await refused_with(f"{ws}/ws/broadcaster/b2")
        assert "DREAMSTREAM_MAX_STREAMS" in await refused_with(f"{ws}/ws/broadcaster/w0")
        await live.pop().close()
        await asyncio.sleep(0.2)
        async with websockets.connect(f"{ws}/ws/broadcaster/w0") as bc:
            await recv_json(bc, "ready")
            assert (await recv_json(waiting[0], "status"))["state"] == "live"
        for sock in (*waiting, *live):
            await sock.close()

    run(main())


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_fps_limit_drops_the_excess_and_counts_it(limited):
    """60 frames in one second against a 10 fps limit: about 10 shown, the rest dropped, none queued."""
    wait_idle(limited)

    async def main():
        async with websockets.connect(f"{limited.ws}/ws/viewer/fast?format=binary") as viewer, \
                websockets.connect(f"{limited.ws}/ws/broadcaster/fast") as bc:
            await recv_json(bc, "ready")
            frame = solid_jpeg(GREEN, (64, 64))
            start = time.monotonic()
            for i in range(60):
                await bc.send(frame)
                await asyncio.sleep(max(0.0, start + (i + 1) / 60 - time.monotonic()))
            sent_at = time.monotonic()
            shown, late = 0, 0
            while True:
                try:
                    msg = await asyncio.wait_for(viewer.recv(), 1.0)
                except asyncio.TimeoutError:
                    break
                if isinstance(msg, bytes):
                    shown += 1
                    late += time.monotonic() - sent_at > 0.5
            assert 8 <= shown <= 16, f"{shown} frames shown at a 10 fps limit"
            assert late == 0, "frames over the limit were queued and shown later"
            stats = await recv_json(bc, "stats", timeout=3)
            while stats["dropped"] < 44:
                stats = await recv_json(bc, "stats", timeout=3)
            metrics = (await asyncio.to_thread(httpx.get, f"{limited.http}/metrics")).text
            assert _metric(metrics, "dreamstream_frames_dropped_total", stream="fast", reason="rate_limited") >= 44

    run(main())


def test_size_and_dimension_limits_are_checked_before_decoding(limited):
    """Bombs are refused from their headers in milliseconds; the server's memory does not move."""
    wait_idle(limited)
    pid = limited.proc.pid

    async def main():
        async with websockets.connect(f"{limited.ws}/ws/broadcaster/bombs") as bc, \
                websockets.connect(f"{limited.ws}/ws/viewer/bombs?format=binary") as viewer:
            await recv_json(bc, "ready")
            rss_before = rss_mb(pid)
            cases = [
                (b"\xff\xd8\xff" + b"\0" * FRAME_LIMIT, "too_large"),
                (b64_frame(b"\0" * (FRAME_LIMIT + 1000)), "too_large"),
                (png_claiming(40000, 40000), "too_large"),
                (jpeg_claiming(40000, 40000), "too_large"),
                (jpeg_claiming(65535, 65535), "too_large"),
                (webp_claiming(16000, 16000), "too_large"),
                (png_claiming(1025, 8), "too_large"),
                (b64_frame(png_claiming(8, 40000)), "too_large"),
                (png_claiming(10, 10, extra_chunks=9000), "bad_frame"),  # Pillow would walk these in Python
                (jpeg_with_segments(gradient_jpeg((64, 64)), 40000), "bad_frame"),
            ]
            for payload, code in cases:
                start = time.monotonic()
                await bc.send(payload)
                err = await recv_json(bc, "error")
                took = time.monotonic() - start
                assert err["code"] == code, (payload[:40], err)
                assert took < 0.5, f"{err['message']}: took {took:.2f} s"
            # a PNG of honest size whose pixel stream inflates to 128 MiB: decoded to 3 MB, and shown
            bomb = png_zip_bomb(1024, 1024, 128 << 20)
            assert len(bomb) < FRAME_LIMIT
            await bc.send(bomb)
            assert mean_rgb(await recv_frame(viewer, 10)).max() < 8
            await bc.send(solid_jpeg(BLUE))
            assert abs(mean_rgb(await recv_frame(viewer, 10)) - BLUE).max() < 8
            assert rss_mb(pid) - rss_before < 60, f"RSS {rss_before:.0f} -> {rss_mb(pid):.0f} MiB"

    run(main())


def test_a_message_over_the_socket_limit_closes_only_that_socket(limited):
    """Memory per connection is bounded: past DREAMSTREAM_MAX_MESSAGE_BYTES the socket goes (1009)."""
    wait_idle(limited)
    pid = limited.proc.pid

    async def main():
        rss_before = rss_mb(pid)
        async with websockets.connect(f"{limited.ws}/ws/broadcaster/huge", max_size=None) as bc:
            await recv_json(bc, "ready")
            assert await send_until_closed(bc, b"\0" * (8 << 20)) == 1009
        async with websockets.connect(f"{limited.ws}/ws/viewer/huge") as viewer:
            await recv_json(viewer, "status")
            await viewer.send("x" * (900 << 10))  # viewers have nothing to say; big chatter is read and dropped
            await viewer.send(json.dumps({"type": "ping"}))
            assert (await recv_json(viewer, "pong")) == {"type": "pong"}
            assert await send_until_closed(viewer, "x" * (2 << 20)) == 1009
        assert rss_mb(pid) - rss_before < 30
        assert httpx.get(f"{limited.http}/healthz").json()["status"] == "ok"

    run(main())


def test_http_bodies_are_bounded(limited):
    """A huge upload is refused from its Content-Length (or as it streams), never buffered whole."""
    big = b"\xff\xd8\xff" + b"\0" * (4 << 20)
    r = httpx.post(f"{limited.http}/api/process", content=big, headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks():
        for _ in range(64):
            yield b"\0" * 65536

    r = httpx.post(f"{limited.http}/api/process", content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413
    r = httpx.post(f"{limited.http}/api/streams/any/config", content=b"{" * 100_000,
                   headers={"content-type": "application/json"})  # without it: 415 (tests/test_security.py)
    assert r.status_code in (404, 413)


# ---- faults --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The identity processor with test faults on: prompt `fault:raise` raises, `fault:sleep=S` hangs."""
    env = {"DREAMSTREAM_TEST_FAULTS": "1", "DREAMSTREAM_PROCESSING_TIMEOUT": "1", "DREAMSTREAM_MAX_FPS": "0"}
    with running_server(tmp_path_factory.mktemp("faulty"), processor="identity", env=env) as srv:
        yield srv


async def _set_prompt(bc, prompt: str) -> None:
    await bc.send(json.dumps({"type": "config", "prompt": prompt}))
    assert (await recv_json(bc, "config"))["config"]["prompt"] == prompt


def test_a_raising_processor_fails_the_frame_not_the_stream(faulty):
    async def main():
        ws = faulty.ws
        async with websockets.connect(f"{ws}/ws/broadcaster/boom") as bad, \
                websockets.connect(f"{ws}/ws/broadcaster/calm") as good, \
                websockets.connect(f"{ws}/ws/viewer/boom?format=binary") as bad_v, \
                websockets.connect(f"{ws}/ws/viewer/calm?format=binary") as good_v:
            await recv_json(bad, "ready")
            await recv_json(good, "ready")
            await _set_prompt(bad, "fault:raise")
            for _ in range(10):  # both streams' frames meet in the same batches
                await bad.send(solid_jpeg(RED))
                await good.send(solid_jpeg(BLUE))
                err = await recv_json(bad, "error")
                assert err["code"] == "processing_failed" and "injected test fault" in err["message"]
                assert abs(mean_rgb(await recv_frame(good_v, 5)) - BLUE).max() < 8
            await _set_prompt(bad, "fine again")
            await bad.send(solid_jpeg(RED))
            assert abs(mean_rgb(await recv_frame(bad_v, 5)) - RED).max() < 8
        assert "injected test fault" in faulty.log()  # logged with its traceback, for whoever runs the show

    run(main())


def test_a_hanging_processor_times_out_and_the_stream_goes_on(faulty):
    async def main():
        async with websockets.connect(f"{faulty.ws}/ws/broadcaster/stuck") as bc, \
                websockets.connect(f"{faulty.ws}/ws/viewer/stuck?format=binary") as viewer:
            await recv_json(bc, "ready")
            await _set_prompt(bc, "fault:sleep=5")
            start = time.monotonic()
            await bc.send(solid_jpeg(RED))
            err = await recv_json(bc, "error", timeout=5)
            assert err["code"] == "processing_failed" and "longer than 1 s" in err["message"]
            assert time.monotonic() - start < 2.5
            await _set_prompt(bc, "unstuck")
            start = time.monotonic()
            await bc.send(solid_jpeg(GREEN))  # the hung call still sleeps; a fresh worker takes this one
            assert abs(mean_rgb(await recv_frame(viewer, 5)) - GREEN).max() < 8
            assert time.monotonic() - start < 1.0
        assert httpx.get(f"{faulty.http}/healthz").json()["status"] == "ok"

    run(main())


def test_a_vanished_broadcaster_shows_offline_and_resumes(faulty):
    """The broadcaster's connection dies without a close frame (network gone); viewers see offline, then live."""

    async def main():
        async with websockets.connect(f"{faulty.ws}/ws/viewer/flaky?format=binary") as viewer:
            assert (await recv_json(viewer, "status"))["state"] == "waiting"
            bc = await websockets.connect(f"{faulty.ws}/ws/broadcaster/flaky")
            await recv_json(bc, "ready")
            assert (await recv_json(viewer, "status"))["state"] == "live"
            await bc.send(solid_jpeg(RED))
            await recv_frame(viewer, 5)
            bc.transport.abort()  # TCP reset: no close handshake
            assert (await recv_json(viewer, "status"))["state"] == "offline"
            async with websockets.connect(f"{faulty.ws}/ws/broadcaster/flaky") as again:
                await recv_json(again, "ready")
                assert (await recv_json(viewer, "status"))["state"] == "live"
                await again.send(solid_jpeg(BLUE))
                assert abs(mean_rgb(await recv_frame(viewer, 5)) - BLUE).max() < 8

    run(main())


# ---- graceful shutdown ---------------------------------------------------------------------------
# (the frame in flight, then 1001: tests/test_server_hosts.py, under both dreamstream serve and plain uvicorn)


def test_sigterm_with_a_hung_processor_still_exits(tmp_path):
    """A processor call that never returns must not keep a stopped server alive."""
    env = {"DREAMSTREAM_TEST_FAULTS": "1", "DREAMSTREAM_PROCESSING_TIMEOUT": "1"}
    with running_server(tmp_path, processor="identity", env=env) as srv:

        async def main():
            async with websockets.connect(f"{srv.ws}/ws/broadcaster/wedged") as bc:
                await recv_json(bc, "ready")
                await _set_prompt(bc, "fault:sleep=600")
                await bc.send(solid_jpeg(RED))
                assert (await recv_json(bc, "error", timeout=5))["code"] == "processing_failed"
                start = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                assert await close_code(bc) == 1001
                await asyncio.to_thread(srv.proc.wait, 10)
                assert time.monotonic() - start < 5

        run(main())


# ---- the HTTP API under schemathesis -------------------------------------------------------------


def test_http_api_passes_schemathesis(tmp_path):
    """Property-based requests from /openapi.json: no request, however odd, gets a 5xx."""
    with running_server(tmp_path, processor="identity") as srv:
        cmd = [
            str(Path(sys.executable).with_name("st")), "run", f"{srv.http}/openapi.json",
            "--checks", "not_a_server_error", "--max-examples", "60", "--workers", "1",
            "--request-timeout", "10", "--seed", "8",
        ]
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
        assert httpx.get(f"{srv.http}/healthz").json()["status"] == "ok"
        assert "Traceback" not in srv.log()
