"""Issue 16 items 1, 4 and 6 against a real `dreamstream serve`: /api/process in a lane below the live streams
(pixel cap, slow bodies, a key), browser pages from other origins and DNS rebinding refused on both sockets and
the POST routes (in real Chromium too) while our own pages and clients without Origin work, /metrics bounded
after thousands of churned stream ids, /api/streams and /metrics behind the viewer token, and no secret in the
log at info or debug level.

The healthy stream (tests/hostile.HealthyStream: 320x240 at 30 fps and a viewer, in a process of its own) must
keep 27 fps (90 %) during each attack; on a shared machine its rate just before the attack is measured too, and
the bar is 90 % of that when the machine alone gives it less than 30.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import logging
import os
import socket
import struct
import threading
import time

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image

from service import auth
from service.config import Settings
from service.hub import StreamHub
from service.metrics import OTHER, Metrics
from tests.browser import browser_fixture, open_page  # noqa: F401  (the `browser` fixture)
from tests.helpers import gradient_jpeg, recv_json, running_server
from tests.helpers import run as run_here
from tests.hostile import HealthyStream, close_code, rss_mb

HEALTHY = gradient_jpeg((320, 240))
PASS_FPS = 27.0
KEYS = {"alpha": "sk-alpha-4e1b7c90d2", "beta": "sk-beta-a83f26e5c1"}
BROADCAST_KEY = "bk-all-71c0e94d3b"
VIEWER_TOKEN = "vt-watch-2d8e5a1f60"


def run(coro, timeout: float = 60):
    """helpers.run in a thread of its own: once the module's Chromium is up, Playwright's sync API holds an event
    loop in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run_here, coro, timeout).result()


def png(side: int, seed: int = 0, noise: int = 8) -> bytes:
    """A PNG with structure (a filter has work to do), `side` x `side`; without noise a 4096² one is ~1 MB."""
    y, x = np.mgrid[0:side, 0:side]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 // side, y * 255 // side, (x ^ y) & 0xFF], -1).astype(np.uint8)
    img = np.clip(img.astype(int) + rng.integers(-noise, noise + 1, img.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "PNG")
    return out.getvalue()


def bar(pre_fps: float) -> float:
    """27 fps, or 90 % of what this (shared) machine gave the healthy stream just before the attack."""
    return min(PASS_FPS, 0.9 * pre_fps)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Default settings (no keys, no origin list), bound to 127.0.0.1, the CPU filter processor."""
    with running_server(tmp_path_factory.mktemp("open"), processor="filter",
                        env={"DREAMSTREAM_MAX_FPS": "0"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """Keys and a viewer token, logging at debug level (websockets then logs every handshake header)."""
    env = {"DREAMSTREAM_STREAM_KEYS": ",".join(f"{k}:{v}" for k, v in KEYS.items()),
           "DREAMSTREAM_BROADCAST_KEY": BROADCAST_KEY, "DREAMSTREAM_VIEWER_TOKEN": VIEWER_TOKEN}
    with running_server(tmp_path_factory.mktemp("keyed"), processor="identity", env=env,
                        args=["--log-level", "debug"]) as srv:
        yield srv


# ---- raw clients: exact Host / Origin / subprotocol headers ---------------------------------------------------


def handshake(port: int, path: str, host: str | None = None, headers: dict[str, str] | None = None,
              timeout: float = 5.0) -> tuple[bool, int | None, str]:
    """Open a WebSocket with exactly these headers. (accepted, close code, close reason): accepted when the
    first message is a text message rather than a close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        head, buf = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            return False, None, head.split(b"\r\n")[0].decode()
        while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
            buf += sock.recv(4096)
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        payload = buf[2:2 + n]
        if opcode == 0x8:
            return False, struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        return True, None, ""
    finally:
        sock.close()


def post(url: str, body: bytes = b"", **kwargs) -> httpx.Response:
    return httpx.post(url, content=body, timeout=60, **kwargs)


# ---- 1. /api/process ---------------------------------------------------------------------------------------


def test_process_flood_stays_below_the_live_streams(server):
    """4 clients post legal 1 MP PNGs (each ~0.1-0.2 s of filter work here) and 2 more post 4096² PNGs, for 6 s:
    the 4096² ones are refused from their header (never decoded), the legal ones run in their lane, and the
    healthy stream keeps its frame rate. Before: 0.0-0.2 fps, 6.5-17 s gaps, RSS 90 -> 1500 MB."""
    legal, huge = png(1024), png(4096, noise=0)
    pid = server.proc.pid
    counts: dict[str, int] = {}
    huge_seconds: list[float] = []
    lock = threading.Lock()

    def client(body: bytes, end: float) -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            status = post(f"{server.http}/api/process", body, headers={"content-type": "image/png"}).status_code
            name = f"{'huge' if body is huge else 'legal'} {status}"
            with lock:
                counts[name] = counts.get(name, 0) + 1
                if body is huge:
                    huge_seconds.append(time.monotonic() - started)
            if status != 200:
                time.sleep(0.2)

    with HealthyStream(server.ws, "healthy", HEALTHY, fps=30) as hl:
        time.sleep(3.5)
        rss0 = rss_mb(pid)
        t0 = time.monotonic()
        end = t0 + 6.0
        threads = [threading.Thread(target=client, args=(legal if i < 4 else huge, end)) for i in range(6)]
        for t in threads:
            t.start()
        peak = rss0
        while time.monotonic() < end:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.2)
        t1 = time.monotonic()
        for t in threads:
            t.join(60)
    pre, during = hl.fps_between(t0 - 3.0, t0), hl.fps_between(t0 + 0.5, t1)
    print(f"healthy: {pre:.1f} fps before, {during:.1f} fps during (worst 2 s {hl.worst_window_fps(t0 + 0.5, t1):.1f});"
          f" responses {counts}; RSS {rss0:.0f} -> peak {peak:.0f} MB")
    assert during >= bar(pre), (pre, during, counts)
    assert counts.get("legal 200", 0) >= 1, counts  # the lane does serve them, below the live frames
    assert counts.get("huge 413", 0) >= 6 and not any(k.startswith("huge") and not k.endswith("413") for k in counts)
    assert max(huge_seconds) < 2.0  # refused from the header: no decoding, no waiting for a slot
    assert peak - rss0 < 150, (rss0, peak)

    # with no stream live, one-shots run back to back
    started = time.monotonic()
    for i in range(3):
        r = post(f"{server.http}/api/process", gradient_jpeg((320, 240), seed=i),
                 headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    assert time.monotonic() - started < 3.0


def test_slow_bodies_cannot_hold_the_slots(server):
    """8 requests declare 1 MB and send 3 bytes: they hold no slot (the body is read first), a real request is
    served meanwhile, and each slow one gets 408 and its connection closed. Before: 8/8 held for 20 s, the real
    request got 503."""
    legit: list[int] = []

    def real_request() -> None:
        r = post(f"{server.http}/api/process", gradient_jpeg((320, 240)), headers={"content-type": "image/jpeg"})
        legit.append(r.status_code)

    with HealthyStream(server.ws, "healthy", HEALTHY, fps=30) as hl:
        time.sleep(2.5)
        t0 = time.monotonic()
        slow = []
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /api/process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 1000000\r\n\r\n\x89PN")
            slow.append(sock)
        time.sleep(0.5)
        helper = threading.Thread(target=real_request)
        helper.start()
        answers, closed_after = [], []
        for sock in slow:
            sock.settimeout(max(0.1, t0 + 6.0 - time.monotonic()))
            data = b""
            try:
                while chunk := sock.recv(4096):  # to EOF: the server closed the connection
                    data += chunk
            except TimeoutError:
                data += b" (still open)"
            finally:
                sock.close()
            answers.append(data.split(b"\r\n")[0])
            closed_after.append(time.monotonic() - t0)
        helper.join(40)
        t1 = time.monotonic()
    pre, during = hl.fps_between(t0 - 2.0, t0), hl.fps_between(t0, t1)
    print(f"healthy: {pre:.1f} fps before, {during:.1f} during; slow bodies answered {set(answers)}, the last "
          f"closed after {max(closed_after):.1f} s; the real request: {legit}")
    assert all(b" 408 " in a for a in answers), answers
    assert max(closed_after) < 4.5  # BODY_IDLE_S (2 s) and some slack
    assert legit == [200]
    assert during >= bar(pre), (pre, during)


def test_process_pixel_cap_key_and_content_type(server, keyed):
    big = png(2048, noise=0)
    r = post(f"{server.http}/api/process", big, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "DREAMSTREAM_MAX_PROCESS_PIXELS" in r.json()["message"]
    as_json = json.dumps({"image": base64.b64encode(big).decode()}).encode()
    r = post(f"{server.http}/api/process", as_json, headers={"content-type": "application/json"})
    assert r.status_code == 413
    small = gradient_jpeg((320, 240))
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        r = post(f"{server.http}/api/process", small, headers={"content-type": kind} if kind else {})
        assert r.status_code == 415, kind  # what a cross-site form (or a fetch without preflight) can send

    url = f"{keyed.http}/api/process"
    jpeg = {"content-type": "image/jpeg"}
    for headers in ({}, {"Authorization": "Bearer wrong-key-0000"}):
        assert post(url, small, headers={**jpeg, **headers}).status_code == 401
    for key in (KEYS["alpha"], KEYS["beta"], BROADCAST_KEY):
        assert post(url, small, headers={**jpeg, "Authorization": f"Bearer {key}"}).status_code == 200
    assert post(url, small, params={"key": KEYS["beta"]}, headers=jpeg).status_code == 200


# ---- 4. origins and hosts ----------------------------------------------------------------------------------


def test_cross_origin_and_rebinding_refused_own_pages_and_companions_not(server):
    """Default settings. A page elsewhere (Origin evil.example, or localhost vs our 127.0.0.1) is refused on both
    sockets and the POST, with the reason and the env var; DNS rebinding (Host and Origin both evil.example:PORT)
    too; our own origin and clients without Origin are not. The streamer is never replaced."""
    p = server.port
    own = f"http://127.0.0.1:{p}"

    async def main():
        async with websockets.connect(f"{server.ws}/ws/broadcaster/main") as streamer:  # no Origin: a companion
            await recv_json(streamer, "ready")
            for path in ("/ws/broadcaster/main", "/ws/viewer/main"):
                for host, origin, words in (
                    (None, "http://evil.example", "DREAMSTREAM_ALLOWED_ORIGINS"),
                    (None, f"http://localhost:{p}", "DREAMSTREAM_ALLOWED_ORIGINS"),
                    (None, "null", "DREAMSTREAM_ALLOWED_ORIGINS"),
                    (f"evil.example:{p}", f"http://evil.example:{p}", "DREAMSTREAM_ALLOWED_HOSTS"),
                ):
                    accepted, code, reason = await asyncio.to_thread(handshake, p, path, host, {"Origin": origin})
                    assert not accepted and code == 1008 and words in reason, (path, host, origin, code, reason)
                for host, headers in ((None, {"Origin": own}), (f"localhost:{p}", {"Origin": f"http://localhost:{p}"}),
                                      (f"[::1]:{p}", {}), (None, {})):
                    if path.startswith("/ws/broadcaster"):
                        path = "/ws/broadcaster/other"  # not replacing the streamer
                    accepted, code, reason = await asyncio.to_thread(handshake, p, path, host, headers)
                    assert accepted, (path, host, headers, code, reason)
            try:
                replaced = await close_code(streamer, 0.5)
            except TimeoutError:
                replaced = None
            assert replaced is None  # still ours: no 4000 "replaced"

            config = f"{server.http}/api/streams/main/config"
            pwn = b'{"prompt": "pwned"}'
            for headers in (
                {"Origin": "http://evil.example", "Content-Type": "text/plain"},
                {"Origin": "http://evil.example", "Content-Type": "application/json"},
                {"Origin": f"http://evil.example:{p}", "Host": f"evil.example:{p}", "Content-Type": "application/json"},
                {"Content-Type": "text/plain"},  # a form post from a browser that sent no Origin
            ):
                r = await asyncio.to_thread(post, config, pwn, headers=headers)
                assert r.status_code in (403, 415), (headers, r.status_code)
                assert "DREAMSTREAM_ALLOWED" in r.json()["message"] or r.status_code == 415
            r = await asyncio.to_thread(post, config, b'{"prompt": "own page"}',
                                        headers={"Origin": own, "Content-Type": "application/json"})
            assert r.status_code == 200 and r.json()["config"]["prompt"] == "own page"
            r = await asyncio.to_thread(post, config, b'{"prompt": "a script"}',
                                        headers={"Content-Type": "application/json"})
            assert r.status_code == 200
            # a rebound page reading the stream list (same-origin GET: no Origin, but Sec-Fetch-*)
            r = await asyncio.to_thread(httpx.get, f"{server.http}/api/streams",
                                        headers={"Host": f"evil.example:{p}", "Sec-Fetch-Site": "same-origin"})
            assert r.status_code == 403 and "DREAMSTREAM_ALLOWED_HOSTS" in r.json()["message"]
            assert (await asyncio.to_thread(httpx.get, f"{server.http}/api/streams")).status_code == 200

    run(main())


def test_allowed_origins_and_hosts_are_normalised_and_open_deliberately(tmp_path):
    env = {"DREAMSTREAM_ALLOWED_ORIGINS": "HTTP://Studio.Example:80/, https://obs.example.com/",
           "DREAMSTREAM_ALLOWED_HOSTS": "dream.lan"}
    with running_server(tmp_path, processor="identity", env=env) as srv:
        p = srv.port
        for origin in ("http://studio.example", "http://STUDIO.example:80", "https://obs.example.com:443"):
            assert handshake(p, "/ws/viewer/x", None, {"Origin": origin})[0], origin
        for origin in ("https://studio.example", "http://studio.example:8080", "http://evil.example"):
            accepted, code, reason = handshake(p, "/ws/viewer/x", None, {"Origin": origin})
            assert not accepted and "DREAMSTREAM_ALLOWED_ORIGINS" in reason, origin
        # a LAN name opened with DREAMSTREAM_ALLOWED_HOSTS: its own pages work, rebinding names still do not
        assert handshake(p, "/ws/viewer/x", f"dream.lan:{p}", {"Origin": f"http://dream.lan:{p}"})[0]
        assert not handshake(p, "/ws/viewer/x", f"evil.example:{p}", {"Origin": f"http://evil.example:{p}"})[0]


def test_a_page_elsewhere_in_chromium_cannot_drive_or_watch_the_stream(server, browser):
    """Real Chromium: a page from http://localhost:PORT (another origin than http://127.0.0.1:PORT) tries both
    sockets and the cross-site POSTs; the page from 127.0.0.1 (our own) does the same and succeeds."""
    from tests.browser import FramePusher

    p = server.port
    attempt = """async ([base, stream, bstream]) => {
        const sock = (path) => new Promise((resolve) => {
            const ws = new WebSocket(base.replace("http", "ws") + path);
            let first = null;
            ws.onmessage = (e) => { if (first === null) { first = JSON.parse(e.data).type; ws.close(); } };
            ws.onclose = (e) => resolve({first, code: e.code, reason: e.reason});
        });
        const out = {broadcaster: await sock(`/ws/broadcaster/${bstream}`), viewer: await sock(`/ws/viewer/${stream}`)};
        const url = `${base}/api/streams/${stream}/config`;
        try {  // a form-like POST needs no preflight: no-cors sends it, the server must refuse it
            await fetch(url, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                              body: JSON.stringify({prompt: "pwned by a page"})});
            out.form = "sent";
        } catch (e) { out.form = String(e); }
        try {
            const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify({prompt: "from the page"})});
            out.json = r.status;
        } catch (e) { out.json = "blocked: " + String(e); }
        return out;
    }"""
    with FramePusher(server.ws, "xo", gradient_jpeg((320, 240)), fps=10) as pusher:
        deadline = time.monotonic() + 10
        while not httpx.get(f"{server.http}/api/streams").json()["streams"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with open_page(browser, f"http://localhost:{p}/view/xo") as page:  # served by us, under another name
            out = page.evaluate(attempt, [f"http://127.0.0.1:{p}", "xo", "xo"])
        print("page elsewhere:", out)
        for role in ("broadcaster", "viewer"):
            assert out[role]["first"] is None and out[role]["code"] == 1008, out
            assert "DREAMSTREAM_ALLOWED_ORIGINS" in out[role]["reason"], out
        assert str(out["json"]).startswith("blocked"), out  # no CORS for other origins: the preflight fails
        summary = next(s for s in httpx.get(f"{server.http}/api/streams").json()["streams"] if s["stream_id"] == "xo")
        assert "pwned" not in summary["config"]["prompt"] and summary["config"]["prompt"] != "from the page"
        assert pusher.connections == 1  # the broadcaster was never replaced

        with open_page(browser, f"http://127.0.0.1:{p}/view/xo") as page:  # our own page
            own = page.evaluate(attempt, [f"http://127.0.0.1:{p}", "xo", "own"])  # not replacing the pusher
        print("own page:", own)
        assert own["broadcaster"]["first"] == "ready" and own["viewer"]["first"] == "status", own
        assert own["json"] == 200, own
        summary = next(s for s in httpx.get(f"{server.http}/api/streams").json()["streams"] if s["stream_id"] == "xo")
        assert summary["config"]["prompt"] == "from the page"


# ---- 6. leaks ----------------------------------------------------------------------------------------------

CHURN_IDS = int(os.environ.get("DREAMSTREAM_TEST_CHURN_IDS", "2000"))
CHURN_PER_S = 60.0


def test_churned_stream_ids_leave_metrics_bounded(server):
    """CHURN_IDS short-lived streams (connect, one frame, close at once: the frame's result comes back after the
    stream is gone, the `stale` case that used to bring its series back): /metrics ends within 2x its idle size,
    with no series of a churned id. The issue's 20,000 at ~150 ids/s take minutes on 2 cores; the leak was per id
    (before: 2000 ids left 1010 series, 3 -> 85 KB), so 2000 show it as well; DREAMSTREAM_TEST_CHURN_IDS=20000
    runs the full size. Paced at 60 ids/s, with the healthy stream beside them: an unpaced connection flood is
    a connection-rate matter (issue 16 item 5), not this one."""
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.http}/api/streams").json()["streams"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    idle = httpx.get(f"{server.http}/metrics").content
    frame = gradient_jpeg((64, 64))

    async def churn() -> int:
        done = 0
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            nonlocal done
            await asyncio.sleep(i / CHURN_PER_S)  # paced: the connection rate itself is not this test's subject
            async with sem:
                async with websockets.connect(f"{server.ws}/ws/broadcaster/churn-{i}", compression=None) as ws:
                    await ws.send(frame)
                done += 1

        await asyncio.gather(*(one(i) for i in range(CHURN_IDS)))
        return done

    with HealthyStream(server.ws, "healthy", HEALTHY, fps=30) as hl:
        time.sleep(2.0)
        t0 = time.monotonic()
        done = run(churn(), timeout=600)
        t1 = time.monotonic()
        time.sleep(1.5)  # the last results come back (stale) after their streams are gone
        after = httpx.get(f"{server.http}/metrics").content
    churned = [line for line in after.splitlines() if b'stream="churn-' in line]
    print(f"{done} ids in {t1 - t0:.0f} s; /metrics {len(idle)} -> {len(after)} bytes; healthy "
          f"{hl.fps_between(t0 - 2, t0):.1f} fps before, {hl.fps_between(t0, t1):.1f} during")
    assert done == CHURN_IDS
    assert hl.fps_between(t0, t1) >= bar(hl.fps_between(t0 - 2, t0))
    assert not churned, churned[:5]
    assert len(after) <= 2 * len(idle), (len(idle), len(after))


def test_metrics_never_recreate_an_ended_stream_and_cap_the_labels():
    metrics = Metrics(max_labelled_streams=3)
    hub = StreamHub(Settings().stream_defaults("identity"), metrics)
    streams = [hub.open(f"s{i}") for i in range(5)]
    for s in streams:
        metrics.frames_in.labels(s.id).inc()
        metrics.frames_dropped.labels(s.id, "superseded").inc()
        metrics.viewers.labels(s.id).set(2)
    text = metrics.render().decode()
    assert {f's{i}"' in text for i in range(3)} == {True} and 's3"' not in text and 's4"' not in text
    assert f'dreamstream_frames_in_total{{stream="{OTHER}"}} 2.0' in text
    assert f'dreamstream_viewers{{stream="{OTHER}"}} 4.0' in text  # the streams past the cap, summed
    for s in streams:
        metrics.forget_stream(s.id)
        metrics.frames_dropped.labels(s.id, "stale").inc()  # a result back after its stream ended
        metrics.frames_out.labels(s.id).inc()
    text = metrics.render().decode()
    assert not any(f'stream="s{i}"' in text for i in range(5)), text
    assert f'dreamstream_viewers{{stream="{OTHER}"}} 0.0' in text and metrics.labelled_streams == 0
    metrics.frames_in.labels("s1").inc()  # the same id, live again: its own series again
    assert 'stream="s1"' in metrics.render().decode()


def test_stream_list_and_metrics_need_the_viewer_token(keyed):
    async def main():
        async with websockets.connect(f"{keyed.ws}/ws/broadcaster/alpha?key={KEYS['alpha']}") as bc:
            await recv_json(bc, "ready")
            await bc.send(gradient_jpeg((64, 64)))  # a frame in: the stream has series of its own
            await asyncio.sleep(0.3)
            for path in ("/api/streams", "/metrics"):
                url = f"{keyed.http}{path}"
                for kwargs in ({}, {"params": {"token": "wrong-token-1234"}}, {"params": {"key": KEYS["alpha"]}},
                               {"headers": {"Authorization": f"Bearer {KEYS['alpha']}"}}):
                    r = await asyncio.to_thread(httpx.get, url, **kwargs)
                    assert r.status_code == 401 and b"alpha" not in r.content, (path, kwargs)
                for kwargs in ({"params": {"token": VIEWER_TOKEN}},
                               {"headers": {"Authorization": f"Bearer {VIEWER_TOKEN}"}},
                               {"headers": {"Authorization": f"Bearer {BROADCAST_KEY}"}}):
                    r = await asyncio.to_thread(httpx.get, url, **kwargs)
                    assert r.status_code == 200 and b"alpha" in r.content, (path, kwargs)
            assert (await asyncio.to_thread(httpx.get, f"{keyed.http}/healthz")).status_code == 200  # stays open

    run(main())


def test_no_secret_in_the_log_at_debug_level(keyed):
    """Every way a key or token can travel, against a server logging at debug (websockets logs each handshake
    header there; the access log prints every query string): none of them in the log, `[redacted]` instead."""
    p = keyed.port
    encoded = "".join(f"%{b:02X}" for b in b"key")  # ?%6B%65%79=... opens the stream like ?key=
    for path, headers in (
        (f"/ws/broadcaster/alpha?%6Bey={KEYS['alpha']}", {}),
        (f"/ws/broadcaster/beta?{encoded}={KEYS['beta']}&x=1", {}),
        ("/ws/broadcaster/beta", {"Authorization": f"Bearer {BROADCAST_KEY}"}),
        ("/ws/broadcaster/beta", {"Sec-WebSocket-Protocol": KEYS["beta"]}),
        (f"/ws/viewer/alpha?tok%65n={VIEWER_TOKEN}", {}),
        (f"/ws/viewer/alpha?token={VIEWER_TOKEN}", {"Cookie": f"t={VIEWER_TOKEN}"}),
    ):
        handshake(p, path, None, headers)
    assert handshake(p, f"/ws/broadcaster/alpha?%6Bey={KEYS['alpha']}")[0]  # the decoded name still opens it
    small = gradient_jpeg((64, 64))
    post(f"{keyed.http}/api/process?key={KEYS['alpha']}", small, headers={"content-type": "image/jpeg"})
    post(f"{keyed.http}/api/process", small, headers={"content-type": "image/jpeg",
                                                       "Authorization": f"Bearer {KEYS['beta']}"})
    post(f"{keyed.http}/api/streams/alpha/config?%6bey={KEYS['alpha']}", b"{}",
         headers={"content-type": "application/json"})
    httpx.get(f"{keyed.http}/metrics?token={VIEWER_TOKEN}")
    httpx.get(f"{keyed.http}/api/streams", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})
    time.sleep(0.5)
    log = keyed.log()
    assert "< authorization: [redacted]" in log.lower(), "the debug header lines should be there, blanked"
    assert "[redacted]" in log
    for secret in (*KEYS.values(), BROADCAST_KEY, VIEWER_TOKEN):
        assert secret not in log, f"{secret[:6]}... leaked into the server log"
    assert "Logging error" not in log and "Traceback" not in log  # the filter keeps every record formattable


def test_redaction_of_the_shapes_each_log_level_prints():
    """info: access-log paths; debug: websockets' header lines; trace (plain uvicorn --log-level trace): the
    ASGI scope's repr."""
    cases = {
        "/ws/broadcaster/a?%6Bey=S1&x=1": "/ws/broadcaster/a?%6Bey=[redacted]&x=1",
        "/a?fit=cover;TOKEN=S1": "/a?fit=cover;TOKEN=[redacted]",
        "/a?monkey=banana&k%65y=S1": "/a?monkey=banana&k%65y=[redacted]",
        "< authorization: Bearer S1": "< authorization: [redacted]",
        "< sec-websocket-protocol: S1": "< sec-websocket-protocol: [redacted]",
        "{'query_string': b'token=S1', 'headers': [(b'authorization', b'Bearer S1'), (b'sec-websocket-protocol', "
        "b'S1')]}": "{'query_string': b'token=[redacted]', 'headers': [(b'authorization', b'[redacted]'), "
                    "(b'sec-websocket-protocol', b'[redacted]')]}",
    }
    for raw, clean in cases.items():
        assert auth.redact(raw) == clean, raw
        assert auth.redact(clean) == clean  # redacting twice changes nothing

    # whole records, through uvicorn's own formatters: the access formatter unpacks its five arguments
    from uvicorn.logging import AccessFormatter, DefaultFormatter

    access = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s')
    plain = DefaultFormatter("%(message)s")
    for logger, formatter, msg, args in (
        ("uvicorn.access", access, '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:1", "POST", "/api/process?%6Bey=S1", "1.1",
                                                              415)),
        ("uvicorn.error", plain, "< %s: %s", ("sec-websocket-protocol", "S1")),  # websockets, debug
        ("uvicorn.error", plain, '%s - "WebSocket %s" [accepted]', ("127.0.0.1:1", "/ws/viewer/a?tok%65n=S1")),
        ("uvicorn.asgi", plain, "%s [%d] Started scope=%s",  # uvicorn --log-level trace
         ("ASGI", 1, {"query_string": b"key=S1", "headers": [(b"authorization", b"Bearer S1")]})),
    ):
        record = logging.LogRecord(logger, logging.INFO, __file__, 1, msg, args, None)
        assert auth.RedactSecrets().filter(record)
        text = formatter.format(record)
        assert "S1" not in text and "[redacted]" in text, text


def test_host_and_origin_rules():
    """The rules the server tests above rely on, case by case (no server)."""
    local = Settings()  # --host 127.0.0.1
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.2:8000"):
        assert auth.host_allowed(local, host), host
    for host in ("evil.example:8000", "192.168.1.20:8000", "", None, "a@evil.example", "evil.example/x"):
        assert not auth.host_allowed(local, host), host
    assert auth.host_allowed(local, "10.0.0.5:8000", local_address="10.0.0.5")  # the address it came in on
    public = Settings(host="0.0.0.0", allowed_hosts=["studio.example.com", "*.modal.run", "Box.LAN:9000"])
    for host in ("192.168.1.20:8000", "[fe80::1]:8000", "studio.example.com", "ws--app.modal.run", "box.lan"):
        assert auth.host_allowed(public, host), host
    for host in ("modal.run.evil.example", "evil.example", "studio.example.com.evil.example"):
        assert not auth.host_allowed(public, host), host
    assert auth.host_allowed(Settings(allowed_hosts=["*"]), "anything.example")

    assert auth.normalise_origin("HTTPS://Studio.Example:443/") == "https://studio.example"
    assert auth.normalise_origin("http://studio.example:8080") == "http://studio.example:8080"
    for bad in ("null", "file://", "chrome-extension://abc", "http://x/path", "garbage"):
        assert auth.normalise_origin(bad) is None, bad
    listed = Settings(allowed_origins=["http://studio.example/"])
    assert auth.origin_allowed(listed, "http://STUDIO.example:80", "127.0.0.1:8000")
    assert not auth.origin_allowed(listed, "https://studio.example", "127.0.0.1:8000")
    assert auth.origin_allowed(local, "http://127.0.0.1:8000", "127.0.0.1:8000")  # own page
    assert not auth.origin_allowed(local, "http://localhost:8000", "127.0.0.1:8000")  # another origin
    assert not auth.origin_allowed(local, "http://127.0.0.1:9000", "127.0.0.1:8000")
    assert auth.origin_allowed(local, "https://studio.example.com", "studio.example.com")  # behind a TLS proxy
    assert auth.origin_allowed(local, None, "evil.example")  # not a browser: the keys guard it

    assert auth.browser_refusal(local, {"host": "evil.example"}) is None  # no Origin, no Sec-Fetch: not checked
    assert "DREAMSTREAM_ALLOWED_HOSTS" in auth.browser_refusal(local, {"host": "evil.example",
                                                                       "sec-fetch-site": "same-origin"})
    why = auth.browser_refusal(local, {"host": "127.0.0.1:8000", "origin": "http://evil.example"})
    assert "DREAMSTREAM_ALLOWED_ORIGINS" in why and len(why.encode()) <= 123  # fits a close frame's reason
    assert len(auth.browser_refusal(local, {"host": "x" * 500, "origin": "http://x"}).encode()) <= 123

    keyed = Settings(stream_keys={"a": "ka", "b": "kb"}, broadcast_key="all", viewer_token="t")
    assert all(auth.any_key_allowed(keyed, k) for k in ("ka", "kb", "all"))
    assert not any(auth.any_key_allowed(keyed, k) for k in (None, "", "KA", "t"))
    assert auth.any_key_allowed(Settings(), None)
    assert auth.reader_allowed(keyed, "t") and auth.reader_allowed(keyed, "all")
    assert not auth.reader_allowed(keyed, "ka") and not auth.reader_allowed(keyed, None)
    assert auth.reader_allowed(Settings(), None)
