"""Connections against a real server (issue 16, items 5 and 7), each beside a healthy 30 fps stream: a stalled
viewer's connection aborted when the send timeout fires (its fd released), slowloris and silent sockets closed
within the header timeout, total and per-address caps that refuse the excess (logged, a few lines) while another
address connects, a config flood answered boundedly with a bounded log, an unpaced frame flood that costs the
healthy stream nothing, and a stream id with a trailing newline refused. The same protocol under plain uvicorn
(`--http service.server:HttpProtocol`)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.helpers import Server, free_port, gradient_jpeg, recv_json, run, running_server
from tests.hostile import HealthyStream, refused_with, stalled_viewer

HEALTHY_FRAME = gradient_jpeg((320, 240))
PASS_FPS = 27.0  # issue 16: >= 90 % of 30 fps during each attack
SEND_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 1.5
STALLED = 20


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed (FIN or RST) this connection; pending data, if any, is left unread."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def established(sock: socket.socket) -> bool:
    """The kernel still sees the connection as established (TCP_INFO's tcpi_state; a reset or FIN changes it
    even when the data before it was never read)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 1
    except OSError:
        return False


def connect_from(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def healthz_from(port: int, source: str) -> int | str:
    """/healthz's status from `source`, or what went wrong (a refused connection is closed at once)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def log_lines(server: Server, needle: str) -> int:
    return sum(needle in line for line in server.log().splitlines())


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {"DREAMSTREAM_SEND_TIMEOUT": str(SEND_TIMEOUT_S), "DREAMSTREAM_HEADER_TIMEOUT": str(HEADER_TIMEOUT_S)}
    with running_server(tmp_path_factory.mktemp("connections"), processor="identity", env=env) as server:
        yield server


# ---- item 5: connections that are never closed ---------------------------------------------------


def test_stalled_viewers_are_aborted_and_their_fds_released(srv):
    """20 viewers stop reading while a stream pours 100 kB frames at them: when the send timeout fires each seat
    is freed AND its connection aborted (reset), so the server's fds go back to what they were."""
    pid = srv.proc.pid
    big = os.urandom(100_000)  # not an image: the original-source viewers are sent what the broadcaster sends
    big = gradient_jpeg((640, 480)) + big  # a JPEG with trailing bytes: accepted, 100+ kB on the wire

    async def pour(stop: asyncio.Event) -> None:
        async with websockets.connect(f"{srv.ws}/ws/broadcaster/stall", max_size=None) as bc:
            await recv_json(bc, "ready")
            while not stop.is_set():
                await bc.send(big)
                await asyncio.sleep(0.2)

    async def main() -> tuple[float, float, int, int, list[socket.socket]]:
        stop = asyncio.Event()
        pourer = asyncio.create_task(pour(stop))
        await asyncio.sleep(0.5)
        before = fds(pid)
        start = time.monotonic()
        stalled = [stalled_viewer(srv.port, "/ws/viewer/stall?source=original&format=binary")
                   for _ in range(STALLED)]
        await asyncio.sleep(1.0)
        held = fds(pid)
        deadline = start + SEND_TIMEOUT_S + 25
        while time.monotonic() < deadline and (fds(pid) > before + 2 or any(established(s) for s in stalled)):
            await asyncio.sleep(0.25)
        released = time.monotonic() - start
        after = fds(pid)
        stop.set()
        await pourer
        return start, released, held - before, after - before, stalled

    with HealthyStream(srv.ws, "healthy-stall", HEALTHY_FRAME) as healthy:
        start, released, held, left, stalled = run(main())
        end = time.monotonic()
    still = sum(established(s) for s in stalled)
    for s in stalled:
        s.close()
    print(f"\n{STALLED} stalled viewers: +{held} fds while held, +{left} after {released:.1f} s; healthy "
          f"{healthy.fps_between(start, end):.1f} fps")
    assert held >= STALLED
    assert still == 0, f"{still}/{STALLED} stalled connections still established"
    assert left <= 2, f"{left} fds still held {released:.1f} s after the stalled viewers connected"
    assert released <= SEND_TIMEOUT_S + 20
    deadline = time.monotonic() + 5
    while httpx.get(f"{srv.http}/healthz").json()["viewers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{srv.http}/healthz").json()["viewers"] == 0  # every seat freed (the healthy one left too)
    assert healthy.fps_between(start, end) >= PASS_FPS


def test_slowloris_and_silent_sockets_are_closed_within_the_header_timeout(srv):
    """40 connections trickle header lines (one every 0.4 s, never the blank line) and 40 send nothing: all open
    before the header timeout, all closed soon after it; a quick request meanwhile is served; a few log lines."""
    pid = srv.proc.pid
    before_lines = log_lines(srv, "DREAMSTREAM_HEADER_TIMEOUT")

    async def main() -> tuple[float, list[bool], list[bool], float, int]:
        before = fds(pid)
        start = time.monotonic()
        slow = [connect_from(srv.port) for _ in range(40)]
        silent = [connect_from(srv.port) for _ in range(40)]
        for s in slow:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        opened_at = time.monotonic()
        early: list[bool] = []
        while time.monotonic() < start + HEADER_TIMEOUT_S + 2.0:
            await asyncio.sleep(0.4)
            for i, s in enumerate(slow):
                with contextlib.suppress(OSError):
                    s.sendall(f"X-Slow-{i}: a\r\n".encode())
            if not early and time.monotonic() > opened_at + HEADER_TIMEOUT_S * 0.6:
                early = [closed_by_server(s) for s in slow + silent]
                assert (await asyncio.to_thread(httpx.get, f"{srv.http}/healthz")).status_code == 200
        closed = [closed_by_server(s) for s in slow + silent]
        await asyncio.sleep(0.5)
        left = fds(pid) - before
        for s in slow + silent:
            s.close()
        return start, early, closed, time.monotonic(), left

    with HealthyStream(srv.ws, "healthy-slow", HEALTHY_FRAME) as healthy:
        start, early, closed, end, left = run(main())
    fps = healthy.fps_between(start, end)
    print(f"\nslowloris + silent: {sum(early)}/80 closed at 0.6x the timeout, {sum(closed)}/80 after it; "
          f"+{left} fds; healthy {fps:.1f} fps")
    assert not any(early), "closed before the header timeout"
    assert all(closed), f"{80 - sum(closed)}/80 still open past the header timeout"
    assert left <= 2
    lines = log_lines(srv, "DREAMSTREAM_HEADER_TIMEOUT") - before_lines
    assert 1 <= lines <= 3, f"{lines} log lines for 80 timeouts"
    assert fps >= PASS_FPS


def test_a_kept_alive_connection_is_timed_on_each_request_head(srv):
    """One request served, then a second head trickled on the same connection: closed like the first would be."""
    sock = connect_from(srv.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(5)
    response = sock.recv(65536)
    while not response.endswith(b"}"):  # the head and the JSON body may come in two reads
        response += sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    time.sleep(HEADER_TIMEOUT_S + 1.0)
    assert closed_by_server(sock)
    sock.close()


def test_connection_caps_refuse_the_excess_and_let_other_addresses_in(tmp_path):
    """20 per address, 60 in all: 127.0.0.1's excess is closed at once while 127.0.0.2 is served; when three
    addresses hold 60, a fourth is refused too; each refusal kind is logged, a line or two for dozens."""
    env = {"DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS": "20", "DREAMSTREAM_MAX_CONNECTIONS": "60",
           "DREAMSTREAM_HEADER_TIMEOUT": "30"}
    with running_server(tmp_path, processor="identity", env=env) as server, \
            HealthyStream(server.ws, "healthy", HEALTHY_FRAME) as healthy:  # 2 connections from 127.0.0.1
        start = time.monotonic()
        mine = [connect_from(server.port) for _ in range(30)]
        time.sleep(0.5)
        refused = sum(closed_by_server(s) for s in mine)
        other, same = healthz_from(server.port, "127.0.0.2"), healthz_from(server.port, "127.0.0.1")
        two = [connect_from(server.port, "127.0.0.2") for _ in range(20)]
        three = [connect_from(server.port, "127.0.0.3") for _ in range(20)]
        time.sleep(0.3)
        total_refused = healthz_from(server.port, "127.0.0.4")
        for s in mine + two + three:
            s.close()
        time.sleep(0.5)
        again = healthz_from(server.port, "127.0.0.1")
        end = time.monotonic()
    fps = healthy.fps_between(start, end)
    log = server.log()
    print(f"\ncaps: {refused}/30 refused from 127.0.0.1 (2 held by the healthy stream); 127.0.0.2 {other}, "
          f"127.0.0.1 {same}, 127.0.0.4 at the total cap {total_refused}, 127.0.0.1 later {again}; healthy "
          f"{fps:.1f} fps")
    assert refused == 30 - 18
    assert other == 200 and same != 200
    assert total_refused != 200 and again == 200
    refusals = [line for line in log.splitlines() if "refused a connection" in line]
    per_address = [line for line in refusals if "DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS" in line]
    assert 1 <= len(per_address) <= 2 and "127.0.0.1" in per_address[0], per_address
    assert 1 <= sum("(DREAMSTREAM_MAX_CONNECTIONS)" in line for line in refusals) <= 2, refusals
    assert fps >= PASS_FPS


def test_plain_uvicorn_with_the_protocol_gets_the_same_limits(tmp_path):
    """`uvicorn service.app:app --http service.server:HttpProtocol`: the header timeout and the per-address cap
    from the environment, as under `dreamstream serve`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DREAMSTREAM_PROCESSOR": "identity",
           "DREAMSTREAM_HEADER_TIMEOUT": "1", "DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS": "5"}
    command = [sys.executable, "-m", "uvicorn", "service.app:app", "--http", "service.server:HttpProtocol"]
    server = Server(free_port(), env, [], tmp_path / "server.log", command)
    server.start()
    try:
        held = [connect_from(server.port, "127.0.0.3") for _ in range(6)]
        time.sleep(0.3)
        assert [closed_by_server(s) for s in held] == [False] * 5 + [True]
        assert healthz_from(server.port, "127.0.0.2") == 200
        time.sleep(1.5)
        assert all(closed_by_server(s) for s in held)
        for s in held:
            s.close()
        log = server.log()
        assert "DREAMSTREAM_HEADER_TIMEOUT" in log and "DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS" in log
    finally:
        server.stop()


# ---- item 7: small ones --------------------------------------------------------------------------


def test_a_config_flood_is_answered_boundedly_with_a_bounded_log(srv):
    """3000 config messages (1000-character prompts) as fast as one socket can send: a bounded number of replies,
    a `bad_message` now and then (not one per message), the log grows by kilobytes, the healthy stream holds."""
    log_before = Path(srv.log_path).stat().st_size
    pad = "x" * 990

    async def main() -> tuple[float, float, dict[str, int], list[str]]:
        async with websockets.connect(f"{srv.ws}/ws/broadcaster/cfg", max_size=None) as bc:
            await recv_json(bc, "ready")

            async def flood() -> None:
                for i in range(3000):
                    await bc.send(json.dumps({"type": "config", "prompt": f"{i:09d} {pad}"}))

            start = time.monotonic()
            sender = asyncio.create_task(flood())
            counts: dict[str, int] = {}
            notices: list[str] = []
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(4.0):
                    while True:
                        msg = json.loads(await bc.recv())
                        kind = msg["type"] if msg["type"] != "error" else f"error:{msg['code']}"
                        counts[kind] = counts.get(kind, 0) + 1
                        if kind == "error:bad_message":
                            notices.append(msg["message"])
            end = time.monotonic()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            bc.transport.abort()  # gone now: a close would wait behind the messages still queued in TCP
            return start, end, counts, notices

    with HealthyStream(srv.ws, "healthy-cfg", HEALTHY_FRAME) as healthy:
        start, end, counts, notices = run(main())
    time.sleep(0.5)
    grew = Path(srv.log_path).stat().st_size - log_before
    fps = healthy.fps_between(start, end)
    print(f"\nconfig flood, 4 s: {counts}; log +{grew / 1e3:.0f} kB; healthy {fps:.1f} fps; {notices[:1]}")
    assert 0 < counts.get("config", 0) <= 100 + 50 * 4 + 20
    assert 1 <= len(notices) <= 2 and "too many control messages" in notices[0]
    assert grew < 200_000, f"the log grew {grew} bytes"
    assert fps >= PASS_FPS


def test_an_unpaced_frame_flood_costs_the_healthy_stream_nothing(srv):
    """One socket sends small JPEGs as fast as it can for 4 s: it is read at a bounded pace (the rest waits in
    TCP), the stream still works, and the healthy stream keeps its rate."""
    tiny = gradient_jpeg((64, 64), seed=1)

    async def main() -> tuple[float, float, int]:
        async with websockets.connect(f"{srv.ws}/ws/broadcaster/flood") as bc:
            await recv_json(bc, "ready")
            sent = 0
            start = time.monotonic()

            async def flood() -> None:
                nonlocal sent
                while True:
                    await bc.send(tiny)
                    sent += 1

            sender = asyncio.create_task(flood())
            await asyncio.sleep(4.0)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            end = time.monotonic()
            streams = (await asyncio.to_thread(httpx.get, f"{srv.http}/api/streams")).json()["streams"]
            flood_in = next(s["frames_in"] for s in streams if s["stream_id"] == "flood")
            return start, end, flood_in

    with HealthyStream(srv.ws, "healthy-flood", HEALTHY_FRAME) as healthy:
        start, end, read = run(main())
    fps = healthy.fps_between(start, end)
    print(f"\nframe flood, 4 s: {read} frames read; healthy {fps:.1f} fps")
    assert 0 < read <= 4 * 170 + 300
    assert fps >= PASS_FPS


def test_a_stream_id_with_a_trailing_newline_is_refused(srv):
    async def main() -> None:
        for role in ("broadcaster", "viewer"):
            reason = await refused_with(f"{srv.ws}/ws/{role}/main%0A")
            assert "stream id" in reason

    run(main())
    assert "main\n" not in json.dumps(httpx.get(f"{srv.http}/api/streams").json())


# ---- the pieces, without a server ----------------------------------------------------------------


def test_the_per_address_key_groups_an_ipv6_host_and_unmaps_ipv4():
    from service.server import address_key

    assert address_key(("203.0.113.7", 5000)) == "203.0.113.7"
    assert address_key(("::ffff:203.0.113.7", 5000)) == "203.0.113.7"
    assert address_key(("2001:db8:1:2:aaaa::1", 5000)) == address_key(("2001:db8:1:2:bbbb::9", 1)) \
        == "2001:db8:1:2::/64"
    assert address_key(("2001:db8:1:3::1", 5000)) != address_key(("2001:db8:1:2::1", 5000))
    assert address_key(None) is None  # a Unix socket: only the total cap applies


def test_refusals_are_logged_once_per_interval_with_a_count(caplog):
    import logging

    from service.server import LogEvery

    say = LogEvery(logging.getLogger("dreamstream.connections"), interval=0.2)
    with caplog.at_level(logging.WARNING, "dreamstream.connections"):
        for _ in range(500):
            say("address", "refused one")
        time.sleep(0.25)
        say("address", "refused one")
        say("total", "refused another kind")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused one", "refused one (and 499 more since the last such line)", "refused another kind"]


def test_serve_logs_the_connection_limits_at_start(srv):
    line = next(line for line in srv.log().splitlines() if "connections:" in line)
    assert "1.5 s (DREAMSTREAM_HEADER_TIMEOUT)" in line and "100 per address" in line
