"""Issue 16's attacks, measured from outside against a real `dreamstream serve` (filter processor, 127.0.0.1).

    .venv/bin/python benchmarks/abuse.py --quick                   # scaled down: a few minutes on 2 cores
    .venv/bin/python benchmarks/abuse.py                           # the issue's sizes
    .venv/bin/python benchmarks/abuse.py --case leaks --case small --json out.json

Every case starts its own server (`python -m service.cli serve --processor filter`) as a subprocess, with a
healthy stream beside the attack: a broadcaster sending a 320x240 JPEG at a paced 30 fps (text `frame`
messages carrying its own `ts`) and a viewer of the same stream, both in a separate process so the attack's
clients do not share their event loop. For each attack the healthy viewer's fps, worst gap between frames and
p50 end-to-end latency (send -> styled frame back, one clock) over the attack's window are reported, with the
case's own outcome: refused or not and the close code, the server's fds (/proc/PID/fd) and RSS
(/proc/PID/status), /metrics size, secrets found in the log.

Attack clients speak raw sockets (RawWS below): exact handshake headers (Host, Origin, subprotocols),
pre-masked frames sent with one sendall, sockets that never read. `want` is what issue 16 asks for; `ok` says
whether the row meets it (`-`: a measurement with no pass/fail). A healthy stream under 27 fps fails its row.

The header and table go to stdout (so `> benchmarks/results/abuse_before.txt` keeps a clean record);
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import http.client
import io
import json
import multiprocessing
import os
import platform
import re
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

import simplejpeg  # noqa: E402

HEALTHY_FPS = 30.0
HEALTHY_SIZE = (320, 240)
PASS_FPS = 27.0  # issue 16: the healthy stream keeps >= 90 % of 30 fps during every attack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- sizes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """The issue's sizes (default) or `--quick`'s."""

    attack_s: float = 20.0  # how long a timed attack runs (the healthy stream's window)
    warm_s: float = 3.0  # the healthy stream runs alone this long before each timed attack (its `pre` fps)
    api_clients: int = 16
    slow_bodies: int = 8
    big_streams: int = 20
    stalled_viewers: int = 200  # per wave
    stalled_waves: int = 3
    send_timeout_s: float | None = None  # None: the server's default (20 s)
    slowloris: int = 1500
    silent: int = 1000
    hold_s: float = 24.0  # how long slowloris / silent sockets are held before counting the open ones (past the
    # server's 5 s DREAMSTREAM_HEADER_TIMEOUT, quick runs too)
    per_address: int = 1000
    churn_ids: int = 20000
    config_messages: int = 20000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(attack_s=4.0, warm_s=1.0, api_clients=16, slow_bodies=8, big_streams=20, stalled_viewers=50,
                   stalled_waves=1, send_timeout_s=4.0, slowloris=200, silent=200, hold_s=7.0, per_address=200,
                   churn_ids=1500, config_messages=5000)


# ---- one row of the table --------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    attack: str
    want: str = ""
    outcome: str = ""
    ok: bool | None = None  # meets `want` (None: nothing to judge)
    healthy: dict[str, Any] = field(default_factory=dict)  # fps, max_gap_ms, p50_ms, p95_ms, frames
    details: dict[str, Any] = field(default_factory=dict)

    def verdict(self) -> str:
        fps = self.healthy.get("fps")
        oks = [self.ok] if self.ok is not None else []
        if fps is not None:
            oks.append(fps >= PASS_FPS)
        return "-" if not oks else ("ok" if all(oks) else "FAIL")


def print_table(rows: list[Row], out=sys.stdout) -> None:
    """Two lines a row: the case, the healthy stream's fps just before the attack (pre) and during it (fps, worst
    gap, p50 latency), the 1-minute load average, ok/FAIL and the attack; then the outcome and the want."""
    print(f"{'case':<24}{'pre':>6}{'fps':>6}{'gap ms':>8}{'p50 ms':>8}{'load':>6}  {'ok':<5}attack", file=out)
    print(f"{'':<24}{'':>34}  {'':<5}-> outcome  (want: ...)", file=out)
    print("-" * 120, file=out)
    for r in rows:
        h = r.healthy
        numbers = (f"{_num(h.get('pre_fps'), 1):>6}{_num(h.get('fps'), 1):>6}{_num(h.get('max_gap_ms'), 0):>8}"
                   f"{_num(h.get('p50_ms'), 0):>8}{_num(r.details.get('load1'), 1):>6}")
        print(f"{r.case:<24}{numbers}  {r.verdict():<5}{r.attack}", file=out)
        want = f"  (want: {r.want})" if r.want else ""
        print(f"{'':<24}{'':>34}  {'':<5}-> {r.outcome}{want}", file=out)


def _num(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# ---- the server under test -------------------------------------------------------------------------


class Server:
    """`python -m service.cli serve --processor filter` run in `root` (a checkout) on a free port, its log in
    `workdir`."""

    def __init__(self, root: Path, workdir: Path, name: str, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()):
        self.root = root
        self.port = free_port()
        self.name = name
        self.log_path = workdir / f"{name}-{self.port}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("DREAMSTREAM_")}
        self.env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--processor", "filter", "--port", str(self.port),
             *self.args], cwd=self.root, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                status, _, body, _ = http_request(self.port, "GET", "/healthz", timeout=1)
                if status == 200 and json.loads(body)["status"] == "ok":
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready in {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024

    def fds(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size

    def health(self) -> dict[str, Any]:
        status, _, body, _ = http_request(self.port, "GET", "/healthz", timeout=10)
        return json.loads(body) if status == 200 else {"http_status": status}

    def problems(self) -> str:
        """What went wrong on the server side since the last call: died, new tracebacks in the log."""
        total = self.log().count("Traceback")
        new, self._tracebacks = total - getattr(self, "_tracebacks", 0), total
        notes = []
        if not self.alive():
            notes.append(f"SERVER EXITED rc={self.proc.poll()}")
        if new:
            notes.append(f"{new} new tracebacks in the server log")
        return "; ".join(notes)


class Sampler:
    """Peak RSS and fds of the server, sampled every 0.2 s in a thread while the `with` block runs."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak_rss = 0.0
        self.peak_fds = 0
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, self.server.rss_mb() or 0.0)
            self.peak_fds = max(self.peak_fds, self.server.fds() or 0)


# ---- plain HTTP and a raw WebSocket client ---------------------------------------------------------


def http_request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                 timeout: float = 30.0, source: str | None = None) -> tuple[int, dict[str, str], bytes, float]:
    """(status, headers, body, seconds). A `Host` in `headers` replaces the default one."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - started
    finally:
        conn.close()


MASK = b"\x5a\x13\xc7\x2e"


def ws_frame(payload: bytes | str, opcode: int | None = None) -> bytes:
    """One masked client -> server frame (text for str, binary for bytes, or `opcode`)."""
    if isinstance(payload, str):
        payload, opcode = payload.encode(), opcode or 0x1
    n = len(payload)
    head = bytes([0x80 | (opcode or 0x2)])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    data = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(MASK, np.uint8), n)
    return head + MASK + data.tobytes()


def ws_close_frame(code: int = 1000) -> bytes:
    return ws_frame(struct.pack("!H", code), 0x8)


def handshake_request(path: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take the complete server -> client frames (unmasked) off the front of `buf`."""
    out = []
    while len(buf) >= 2:
        opcode, n, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, pos = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, pos = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < pos + n:
            break
        out.append((opcode, bytes(buf[pos:pos + n])))
        del buf[:pos + n]
    return out


class RawWS:
    """A WebSocket client on a plain blocking socket: the handshake exactly as given, nothing read unless asked."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None, host: str | None = None,
                 source: str | None = None, rcvbuf: int | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(handshake_request(path, host or f"127.0.0.1:{port}", headers))
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        first = head.split(b"\r\n", 1)[0].split()
        self.status = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0

    def send(self, payload: bytes | str) -> None:
        self.sock.sendall(ws_frame(payload))

    def messages(self, seconds: float, until: int | None = None) -> list[tuple[int, bytes]]:
        """Frames received within `seconds` (or until `until` frames, or a close frame, or EOF)."""
        out: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + seconds
        while True:
            out += parse_frames(self.buf)
            if (until and len(out) >= until) or any(op == 0x8 for op, _ in out):
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                return out
            except OSError:
                return out
            if not chunk:
                return out
            self.buf += chunk

    def outcome(self, seconds: float = 2.0) -> tuple[bool, str]:
        """(accepted, words): refused sockets are accepted then closed with a code, or answered with HTTP 4xx."""
        if self.status != 101:
            return False, f"HTTP {self.status}"
        for opcode, payload in self.messages(seconds, until=1):
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return False, f"closed {code} {payload[2:].decode(errors='replace')[:60]!r}"
            if opcode == 0x1:
                return True, "accepted (" + json.loads(payload).get("type", "?") + ")"
        return True, "accepted (silent)"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(ws_close_frame())
        self.sock.close()


def still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed this connection (nothing read but pending data is left in place)."""
    sock.setblocking(False)  # a socket with a timeout waits for data first, whatever the flags
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)  # b"": EOF; data: the server answered (a 408, a close frame): look closer if needed


def established(sock: socket.socket) -> bool:
    """Whether the kernel still sees this connection as established: a reset or a FIN from the server changes the
    state even when the data before it was never read (TCP_INFO's first byte, tcpi_state; 1 = ESTABLISHED)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 1
    except OSError:
        return False


# ---- frames ----------------------------------------------------------------------------------------


def camera_jpeg(width: int, height: int, seed: int = 0, noise: float = 6.0, quality: int = 85) -> bytes:
    """A camera-like frame: gradients, a disc, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width, y / height
    img = np.stack([x * 200 + 30, y * 180 + 40, (1 - x) * 160 + 60 * np.sin(6 * y + seed / 5)], -1)
    cx, cy = 0.5 + 0.3 * np.cos(seed / 5), 0.5 + 0.3 * np.sin(seed / 5)
    img[(x - cx) ** 2 + (y - cy) ** 2 < 0.02] = (230, 200, 40)
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality)


def big_image(side: int, fmt: str) -> bytes:
    """A legal side x side image that compresses well (a smooth gradient): small on the wire, big to decode."""
    ramp = (np.arange(side, dtype=np.uint16) * 256 // side).astype(np.uint8)
    img = np.stack([np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side)),
                    np.full((side, side), 128, np.uint8)], -1)
    if fmt == "jpeg":
        return encode_jpeg(np.ascontiguousarray(img), 85)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "PNG", optimize=True)
    return out.getvalue()


# ---- the healthy stream, in its own process ---------------------------------------------------------


def _healthy_main(conn, port: int, stream: str, key: str | None, token: str | None) -> None:
    asyncio.run(_healthy(conn, port, stream, key, token))


async def _healthy(conn, port: int, stream: str, key: str | None, token: str | None) -> None:
    import websockets

    frames = [base64.b64encode(camera_jpeg(*HEALTHY_SIZE, seed=i)).decode() for i in range(30)]
    records: list[tuple[float, float]] = []  # (monotonic time a styled frame arrived, its latency in ms)
    events: list[tuple[float, str]] = []  # closes, errors, reconnects
    sent = [0]
    stop = asyncio.Event()
    base = f"ws://127.0.0.1:{port}"
    b_url = f"{base}/ws/broadcaster/{stream}" + (f"?key={key}" if key else "")
    v_url = f"{base}/ws/viewer/{stream}?format=json" + (f"&token={token}" if token else "")

    async def keep(role: str, url: str, body) -> None:
        while not stop.is_set():
            try:
                async with websockets.connect(url, max_size=None, compression=None, open_timeout=10,
                                              ping_interval=None) as ws:
                    await body(ws)
            except Exception as exc:  # closed by the server, refused, timed out: noted, then reconnect
                if not stop.is_set():
                    events.append((time.monotonic(), f"{role}: {type(exc).__name__}: {str(exc)[:100]}"))
                    await asyncio.sleep(0.5)

    async def broadcast(ws) -> None:
        async def drain() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain())
        try:
            period, due, i = 1 / HEALTHY_FPS, time.monotonic(), 0
            while not stop.is_set():
                await ws.send(json.dumps({"type": "frame", "frame": frames[i % len(frames)], "ts": time.time() * 1000}))
                sent[0] += 1
                i += 1
                due = max(due + period, time.monotonic() - period)  # paced: a late frame is not made up twice
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if reader.done():
                    reader.result()
        finally:
            reader.cancel()

    async def watch(ws) -> None:
        async for message in ws:
            if isinstance(message, str) and message.startswith('{"type": "frame"'):
                ts = json.loads(message)["ts"]
                records.append((time.monotonic(), time.time() * 1000 - ts))
            if stop.is_set():
                return

    async def control() -> None:
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            conn.send({"records": list(records), "events": list(events), "sent": sent[0]})
            if command == "stop":
                stop.set()
                return

    tasks = [asyncio.create_task(keep("viewer", v_url, watch))]
    await asyncio.sleep(0.3)
    tasks.append(asyncio.create_task(keep("broadcaster", b_url, broadcast)))
    await control()
    await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Healthy:
    """A 30 fps 320x240 broadcaster and a viewer of the same stream in a child process; `stats(t0, t1)`."""

    def __init__(self, port: int, stream: str = "healthy", key: str | None = None, token: str | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_healthy_main, args=(child, port, stream, key, token), daemon=True)
        self.proc.start()
        self.last: dict[str, Any] = {"records": [], "events": [], "sent": 0}

    def snapshot(self, command: str = "snapshot") -> dict[str, Any]:
        if self.proc.is_alive():
            self.conn.send(command)
            if self.conn.poll(30):
                self.last = self.conn.recv()
        return self.last

    def wait_live(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.snapshot()["records"]) >= 10:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the healthy stream did not start: {self.last['events'][-3:]}")

    def stats(self, t0: float, t1: float) -> dict[str, Any]:
        snap = self.snapshot()
        times = [t for t, _ in snap["records"] if t0 <= t <= t1]
        lat = sorted(ms for t, ms in snap["records"] if t0 <= t <= t1)
        gaps = np.diff([t0, *times, t1]) * 1000
        events = [e for t, e in snap["events"] if t0 <= t <= t1]
        out = {"fps": round(len(times) / (t1 - t0), 1), "max_gap_ms": round(float(gaps.max()), 0),
               "p50_ms": round(statistics.median(lat), 1) if lat else None,
               "p95_ms": round(lat[int(len(lat) * 0.95)], 1) if lat else None, "frames": len(times),
               "window_s": round(t1 - t0, 1)}
        if events:
            out["events"] = events[:5]
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.snapshot("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


@contextlib.contextmanager
def serving(ctx: Context, name: str, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
            key: str | None = None, token: str | None = None,
            healthy: bool = True) -> Iterator[tuple[Server, Healthy | None]]:
    """A fresh server and (by default) the healthy stream beside it, live and warmed up."""
    env = dict(env or {})
    if ctx.sizes.send_timeout_s is not None:
        env.setdefault("DREAMSTREAM_SEND_TIMEOUT", str(ctx.sizes.send_timeout_s))
    server = Server(ctx.server_root, ctx.workdir, name, env, args)
    progress(f"{name}: starting a server on port {server.port}")
    server.start()
    hl = None
    try:
        if healthy:
            hl = Healthy(server.port, key=key, token=token)
            hl.wait_live()
        yield server, hl
    finally:
        if hl is not None:
            hl.stop()
        server.stop()


@dataclass
class Context:
    sizes: Sizes
    workdir: Path
    server_root: Path = ROOT
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row, server: Server | None = None) -> None:
        if server is not None and (problems := server.problems()):
            row.details["server"] = problems
            row.outcome += f" [{problems}]"
        row.details["load1"] = round(os.getloadavg()[0], 1)  # other work on this machine skews the fps
        self.rows.append(row)
        h = row.healthy
        progress(f"  {row.case} | {row.attack} | fps {h.get('fps')} gap {h.get('max_gap_ms')} ms "
                 f"p50 {h.get('p50_ms')} ms | {row.outcome} | {row.verdict()}")


def settle(hl: Healthy, timeout: float = 20.0) -> None:
    """Until the healthy stream is back to 80 % of its rate over the last second (the server has worked off the
    previous attack), or `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        if hl.stats(now - 1.0, now)["fps"] >= 0.8 * HEALTHY_FPS:
            return
        time.sleep(0.5)


def timed(ctx: Context, hl: Healthy, fn, *args: Any) -> tuple[Any, dict[str, Any]]:
    """Run the attack `fn(*args)` (sync or a coroutine function); its result and the healthy stream's stats over
    the attack, with `pre_fps`: its rate over the `warm_s` just before (what this machine gave it unattacked)."""
    settle(hl)
    pre = time.monotonic()
    time.sleep(ctx.sizes.warm_s)
    t0 = time.monotonic()
    result = asyncio.run(fn(*args)) if asyncio.iscoroutinefunction(fn) else fn(*args)
    stats = hl.stats(t0, time.monotonic())
    stats["pre_fps"] = hl.stats(pre, t0)["fps"]
    return result, stats


def healthy_over(hl: Healthy, t0: float, at_least: float = 3.0) -> dict[str, Any]:
    """The healthy stream over a series of quick checks that began at `t0` (padded to `at_least` seconds)."""
    time.sleep(max(0.0, t0 + at_least - time.monotonic()))
    return hl.stats(t0, time.monotonic())


# ---- paced raw senders ------------------------------------------------------------------------------


async def paced_sender(port: int, path: str, frames: list[bytes], fps: float | None, seconds: float,
                       counts: dict[str, int]) -> None:
    """One broadcaster socket sending pre-masked `frames` at `fps` (None: as fast as the socket takes them)."""
    ws = await asyncio.to_thread(RawWS, port, path)
    if ws.status != 101:
        counts["refused"] = counts.get("refused", 0) + 1
        return
    ws.sock.setblocking(False)
    loop = asyncio.get_running_loop()
    end = time.monotonic() + seconds
    due, i = time.monotonic(), 0
    try:
        while time.monotonic() < end:
            await loop.sock_sendall(ws.sock, frames[i % len(frames)])
            counts["sent"] = counts.get("sent", 0) + 1
            i += 1
            if fps:
                due = max(due + 1 / fps, time.monotonic() - 1 / fps)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            elif i % 64 == 0:
                await asyncio.sleep(0)
    except OSError:
        counts["closed"] = counts.get("closed", 0) + 1
    finally:
        ws.sock.close()


async def paced_streams(port: int, streams: list[str], frames: list[bytes], fps: float | None,
                        seconds: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    await asyncio.gather(*(paced_sender(port, f"/ws/broadcaster/{s}", frames, fps, seconds, counts) for s in streams))
    return counts


# ---- case 0: the healthy stream alone ---------------------------------------------------------------


def case_baseline(ctx: Context) -> None:
    with serving(ctx, "baseline") as (server, hl):
        rss0, fds0 = server.rss_mb(), server.fds()
        _, stats = timed(ctx, hl, time.sleep, ctx.sizes.attack_s)
        ctx.add(Row("baseline", "none: the healthy stream alone", outcome=f"RSS {rss0:.0f} MB, {fds0} fds",
                    healthy=stats, details={"rss_mb": rss0, "fds": fds0}), server)


# ---- case 1: /api/process ---------------------------------------------------------------------------


def case_api_process_flood(ctx: Context) -> None:
    s = ctx.sizes
    png = big_image(4096, "png")
    with serving(ctx, "api_process_flood") as (server, hl):
        rss0 = server.rss_mb()
        counts: dict[str, int] = {}
        lock = threading.Lock()
        seconds: list[float] = []

        def client(end: float) -> None:
            while time.monotonic() < end:
                try:  # a request still waiting 10 s after the attack is given up (the window ends there)
                    status, _, _, took = http_request(server.port, "POST", "/api/process", png,
                                                      {"Content-Type": "image/png"},
                                                      timeout=max(1.0, end + 10 - time.monotonic()))
                except OSError as exc:
                    status, took = type(exc).__name__, 0.0
                with lock:
                    counts[str(status)] = counts.get(str(status), 0) + 1
                    if status == 200:
                        seconds.append(took)
                if status != 200:
                    time.sleep(0.05)  # a 503 comes back at once: a short pause keeps this client off the CPU

        def flood() -> None:
            end = time.monotonic() + s.attack_s
            threads = [threading.Thread(target=client, args=(end,)) for _ in range(s.api_clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        with Sampler(server) as sampler:
            _, stats = timed(ctx, hl, flood)
        time.sleep(1)
        rss1 = server.rss_mb()
        p50 = f", p50 {statistics.median(seconds):.1f} s each" if seconds else ""
        ctx.add(Row("1 api_process_flood",
                    f"{s.api_clients} clients POST a 4096² PNG ({len(png) // 1024} KB) to /api/process, "
                    f"{s.attack_s:g} s",
                    want="healthy ≥ 27 fps; one-shot work in a lower lane",
                    outcome=f"responses {counts}{p50}; RSS {rss0:.0f} → peak {sampler.peak_rss:.0f} → {rss1:.0f} MB",
                    healthy=stats, details={"responses": counts, "rss_mb": [rss0, sampler.peak_rss, rss1]}), server)

    # slow bodies, on a fresh server: requests of the flood still running would hold slots of their own
    with serving(ctx, "slow_bodies") as (server, hl):

        def slow_bodies() -> dict[str, Any]:
            socks = []
            for _ in range(s.slow_bodies):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(b"POST /api/process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 1000000\r\n\r\n\x89PN")
                socks.append(sock)
            time.sleep(min(2.0, s.attack_s / 2))
            small = camera_jpeg(320, 240)
            status, _, _, took = http_request(server.port, "POST", "/api/process", small,
                                              {"Content-Type": "image/jpeg"}, timeout=30)
            time.sleep(max(0.0, s.attack_s - min(2.0, s.attack_s / 2)))
            answers = []
            for x in socks:  # an answer (a 503, a 408) or nothing yet, without consuming it
                x.setblocking(False)
                try:
                    answers.append(x.recv(12, socket.MSG_PEEK)[9:12].decode() or "closed")
                except BlockingIOError:
                    answers.append("waiting")
                except OSError:
                    answers.append("reset")
            for x in socks:
                x.close()
            return {"legit_status": status, "legit_s": round(took, 2),
                    "slow": {a: answers.count(a) for a in sorted(set(answers))}}

        result, stats = timed(ctx, hl, slow_bodies)
        waiting = result["slow"].get("waiting", 0)
        ctx.add(Row("1 slow_bodies", f"{s.slow_bodies} POSTs declare 1 MB, send 3 bytes, held {s.attack_s:g} s",
                    want="body read under a timeout before taking a slot; a real request served",
                    outcome=f"a legit 320x240 POST meanwhile → {result['legit_status']} in {result['legit_s']} s; "
                            f"the slow bodies after {s.attack_s:g} s: {result['slow']} (waiting = still unanswered)",
                    ok=result["legit_status"] == 200 and waiting == 0,
                    healthy=stats, details=result), server)


# ---- case 2: big legal frames -----------------------------------------------------------------------


def case_big_frames(ctx: Context) -> None:
    s = ctx.sizes
    progress("big_frames: making the frames")
    png = ws_frame(big_image(4096, "png"))
    jpeg = ws_frame(big_image(4096, "jpeg"))
    noisy = [ws_frame(camera_jpeg(1920, 1080, seed=i, noise=8, quality=85)) for i in range(3)]
    vga = [ws_frame(camera_jpeg(640, 480, seed=i, noise=8)) for i in range(3)]
    attacks = [
        ("png4096_5fps", f"one stream: 4096² PNG ({len(png) // 1024} KB) at 5 fps", ["big"], [png], 5.0),
        ("jpeg4096_5fps", f"one stream: 4096² JPEG ({len(jpeg) // 1024} KB) at 5 fps", ["big"], [jpeg], 5.0),
        ("noisy1080p_30fps", f"one stream: noisy 1080p JPEG ({len(noisy[0]) // 1024} KB) at 30 fps", ["big"], noisy,
         30.0),
        ("vga_60fps_x20", f"{s.big_streams} streams: 640x480 JPEG ({len(vga[0]) // 1024} KB) at 60 fps each",
         [f"vga{i}" for i in range(s.big_streams)], vga, 60.0),
    ]
    with serving(ctx, "big_frames") as (server, hl):
        for name, what, streams, frames, fps in attacks:
            with Sampler(server) as sampler:
                counts, stats = timed(ctx, hl, paced_streams, server.port, streams, frames, fps, s.attack_s)
            rate = counts.get("sent", 0) / s.attack_s
            ctx.add(Row(f"2 {name}", f"{what}, {s.attack_s:g} s",
                        want="healthy ≥ 27 fps (fair scheduler, pixel budget)",
                        outcome=f"sent {rate:.1f} frames/s; peak RSS {sampler.peak_rss:.0f} MB",
                        healthy=stats, details={**counts, "peak_rss_mb": sampler.peak_rss}), server)


# ---- case 3: a processor this machine cannot run ----------------------------------------------------


def case_unrunnable_processor(ctx: Context) -> None:
    s = ctx.sizes
    with serving(ctx, "unrunnable_processor") as (server, hl):
        rss0 = server.rss_mb()

        def attack() -> dict[str, Any]:
            ws = RawWS(server.port, "/ws/broadcaster/victim")
            ws.messages(1.0, until=1)  # ready
            ws.send(json.dumps({"type": "config", "processor_type": "standard"}))
            replies = ws.messages(1.0, until=1)
            small = ws_frame(camera_jpeg(320, 240))
            end, got = time.monotonic() + max(s.attack_s, 8.0), []
            while time.monotonic() < end:  # a frame now and then: each triggers the (remembered) load
                ws.sock.sendall(small)
                got += ws.messages(0.5)
            ws.close()
            texts = [json.loads(p) for op, p in replies + got if op == 0x1]
            first = next((m for m in texts if m.get("type") in ("config", "error")), {})
            errors = sorted({m.get("code") for m in texts if m.get("type") == "error"})
            return {"reply": first.get("type") + (f" {first.get('code')}" if first.get("code") else ""),
                    "errors": errors}

        with Sampler(server) as sampler:
            result, stats = timed(ctx, hl, attack)
        time.sleep(3)
        rss1 = server.rss_mb()
        ok = result["reply"].startswith("error bad_config") and stats["max_gap_ms"] <= 200 and rss1 - rss0 <= 50
        ctx.add(Row("3 unrunnable_processor", 'a second stream sends {"processor_type":"standard"} + a frame '
                                              'each 0.5 s (CPU box)',
                    want="bad_config at once; no gap > 200 ms; RSS back within 50 MB",
                    outcome=f"reply: {result['reply']}, then errors {result['errors']}; max gap "
                            f"{stats['max_gap_ms']:.0f} ms; RSS {rss0:.0f} → peak {sampler.peak_rss:.0f} → "
                            f"{rss1:.0f} MB",
                    ok=ok, healthy=stats, details={**result, "rss_mb": [rss0, sampler.peak_rss, rss1]}), server)


# ---- case 4: cross-origin pages ---------------------------------------------------------------------


def case_cross_origin(ctx: Context) -> None:
    evil = "http://evil.example"
    with serving(ctx, "cross_origin_default") as (server, hl):
        p = server.port
        t0 = time.monotonic()
        victim = RawWS(p, "/ws/broadcaster/main")
        victim.messages(1.0, until=1)
        attacker = RawWS(p, "/ws/broadcaster/main", {"Origin": evil})
        accepted, words = attacker.outcome()
        victim_end = next((f"closed {struct.unpack('!H', pl[:2])[0]}" for op, pl in victim.messages(2.0)
                           if op == 0x8), "still open")
        ctx.add(Row("4 xo_ws_broadcaster", f"default settings: /ws/broadcaster/main with Origin {evil}",
                    want="refused (own origin only when Origin is sent)",
                    outcome=f"{words}; the streamer's socket: {victim_end}", ok=not accepted), server)
        viewer = RawWS(p, "/ws/viewer/main", {"Origin": evil})
        accepted_v, words_v = viewer.outcome()
        ctx.add(Row("4 xo_ws_viewer", f"default settings: /ws/viewer/main with Origin {evil}",
                    want="refused", outcome=words_v, ok=not accepted_v), server)
        status, _, body, _ = http_request(p, "POST", "/api/streams/main/config", b'{"prompt":"pwned"}',
                                          {"Origin": evil, "Content-Type": "text/plain"})
        ctx.add(Row("4 xo_post_config", f"default settings: cross-site text/plain POST /api/streams/main/config "
                                        f"from {evil}",
                    want="refused (needs application/json or the key)", outcome=f"HTTP {status}",
                    ok=status >= 400, healthy=healthy_over(hl, t0)), server)
        for x in (viewer, attacker, victim):
            x.close()

    allowed = "http://studio.example/"  # a trailing slash, the way people paste origins
    with serving(ctx, "cross_origin_allowlist", env={"DREAMSTREAM_ALLOWED_ORIGINS": allowed}) as (server, hl):
        p = server.port
        t0 = time.monotonic()
        checks = [
            ("4 al_evil_origin", f"ALLOWED_ORIGINS={allowed}: broadcaster with Origin {evil}",
             {"Origin": evil}, None, "/ws/broadcaster/main", False),
            ("4 al_rebind_bcast", f"DNS rebinding: broadcaster with Host+Origin evil.example:{p}",
             {"Origin": f"http://evil.example:{p}"}, f"evil.example:{p}", "/ws/broadcaster/main", False),
            ("4 al_rebind_viewer", f"DNS rebinding: viewer with Host+Origin evil.example:{p}",
             {"Origin": f"http://evil.example:{p}"}, f"evil.example:{p}", "/ws/viewer/main", False),
            ("4 al_listed_origin", "the listed origin (set with a trailing /): Origin http://studio.example",
             {"Origin": "http://studio.example"}, None, "/ws/viewer/main", True),
            ("4 al_own_origin", f"own page: Origin http://127.0.0.1:{p}", {"Origin": f"http://127.0.0.1:{p}"}, None,
             "/ws/viewer/main", True),
            ("4 no_origin_client", "a client without Origin (OBS companion, scripts)", {}, None, "/ws/viewer/main",
             True),
        ]
        for name, what, headers, host, path, want_accept in checks:
            ws = RawWS(p, path, headers, host=host)
            accepted, words = ws.outcome()
            ws.close()
            ctx.add(Row(name, what, want="accepted" if want_accept else "refused", outcome=words,
                        ok=accepted == want_accept), server)
        status, _, _, _ = http_request(p, "POST", "/api/streams/healthy/config", b'{"prompt":"pwned"}',
                                       {"Origin": evil, "Content-Type": "text/plain"})
        ctx.add(Row("4 al_post_config", f"ALLOWED_ORIGINS set: text/plain POST /api/streams/healthy/config from {evil}",
                    want="refused", outcome=f"HTTP {status}", ok=status >= 400, healthy=healthy_over(hl, t0)), server)


# ---- case 5: connections that are never closed ------------------------------------------------------


def case_connections(ctx: Context) -> None:
    s = ctx.sizes
    timeout = s.send_timeout_s or 20.0
    with serving(ctx, "connections") as (server, hl):
        p = server.port
        base_viewers = server.health()["viewers"]
        fds0, rss0 = server.fds(), server.rss_mb()

        def stalled() -> dict[str, Any]:
            socks, fds_after = [], []
            for _ in range(s.stalled_waves):
                wave = [RawWS(p, "/ws/viewer/healthy", rcvbuf=4096) for _ in range(s.stalled_viewers)]
                socks += wave
                deadline = time.monotonic() + timeout + 40
                time.sleep(timeout)
                while time.monotonic() < deadline and server.health()["viewers"] > base_viewers:
                    time.sleep(0.5)  # until every stalled seat is freed
                time.sleep(2.0)
                fds_after.append(server.fds())
            open_ = sum(established(w.sock) for w in socks)
            for w in socks:
                w.sock.close()
            return {"fds_after_waves": fds_after, "open": open_, "viewers": server.health()["viewers"]}

        with Sampler(server) as sampler:
            result, stats = timed(ctx, hl, stalled)
        total = s.stalled_viewers * s.stalled_waves
        ctx.add(Row("5 stalled_viewers", f"{s.stalled_waves} wave(s) of {s.stalled_viewers} viewers that never read "
                                         f"(send timeout {timeout:g} s)",
                    want="connections aborted when the send timeout fires",
                    outcome=f"seats freed (viewers {result['viewers']}); fds {fds0} → {result['fds_after_waves']} "
                            f"after each wave's timeout; {result['open']}/{total} still established; RSS {rss0:.0f} → "
                            f"peak {sampler.peak_rss:.0f} MB",
                    ok=result["open"] == 0 and result["fds_after_waves"][-1] - fds0 < total // 10, healthy=stats,
                    details={**result, "fds_before": fds0}), server)
        time.sleep(1)

        def hold(kind: str, count: int) -> dict[str, Any]:
            socks = []
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", p), timeout=10)
                if kind == "slowloris":
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                socks.append(sock)
            fds_held = server.fds()
            end = time.monotonic() + s.hold_s
            while time.monotonic() < end:
                time.sleep(min(4.0, max(0.0, end - time.monotonic())))
                if kind == "slowloris":
                    for i, sock in enumerate(socks):  # one more header line every few seconds
                        with contextlib.suppress(OSError):
                            sock.sendall(f"X-Slow-{i}: a\r\n".encode())
            status, _, _, took = http_request(p, "GET", "/healthz", timeout=10)
            open_ = sum(still_open(x) for x in socks)
            for x in socks:
                x.close()
            return {"open": open_, "fds_held": fds_held, "healthz": status, "healthz_s": round(took, 2)}

        for kind, count in (("slowloris", s.slowloris), ("silent", s.silent)):
            fds_b = server.fds()
            result, stats = timed(ctx, hl, hold, kind, count)
            what = "send partial HTTP headers, a line every 4 s" if kind == "slowloris" else "send nothing"
            ctx.add(Row(f"5 {kind}", f"{count} TCP connections {what}, held {s.hold_s:g} s",
                        want="closed within a header/handshake timeout",
                        outcome=f"{result['open']}/{count} still open after {s.hold_s:g} s; fds {fds_b} → "
                                f"{result['fds_held']}; /healthz {result['healthz']} in {result['healthz_s']} s",
                        ok=result["open"] == 0, healthy=stats, details=result), server)
            time.sleep(1)

        def per_address() -> dict[str, Any]:
            socks = []
            for _ in range(s.per_address):
                try:
                    socks.append(socket.create_connection(("127.0.0.1", p), timeout=5))
                except OSError:
                    break
            time.sleep(2.0)
            refused = sum(not still_open(x) for x in socks) + (s.per_address - len(socks))
            other = "no 127.0.0.2"
            with contextlib.suppress(OSError):
                other = http_request(p, "GET", "/healthz", timeout=10, source="127.0.0.2")[0]
            same = "refused (reset)"  # the cap closes a connection from the same address at once
            with contextlib.suppress(OSError):
                same = http_request(p, "GET", "/healthz", timeout=10)[0]
            for x in socks:
                x.close()
            return {"refused": refused, "other_address": other, "same_address": same}

        result, stats = timed(ctx, hl, per_address)
        ctx.add(Row("5 per_address_cap", f"{s.per_address} idle connections from 127.0.0.1, then /healthz from "
                                         "127.0.0.2",
                    want="the excess from one address refused, another address served",
                    outcome=f"{result['refused']}/{s.per_address} refused; /healthz from 127.0.0.2 → "
                            f"{result['other_address']}, from 127.0.0.1 → {result['same_address']}",
                    ok=result["refused"] > 0 and result["other_address"] == 200, healthy=stats, details=result),
                server)


# ---- case 6: leaks ----------------------------------------------------------------------------------


async def churn(port: int, count: int, frame: bytes, workers: int = 32) -> dict[str, int]:
    """`count` short-lived stream ids: connect a broadcaster, send one frame, close."""
    counts = {"ok": 0, "failed": 0}
    ids = iter(range(count))
    started = time.monotonic()

    async def worker() -> None:
        for i in ids:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(handshake_request(f"/ws/broadcaster/churn-{i}", f"127.0.0.1:{port}"))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                writer.write(frame + ws_close_frame())
                await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    while await asyncio.wait_for(reader.read(65536), 5):  # until the server's close
                        pass
                writer.close()
                counts["ok" if b" 101 " in head.split(b"\r\n")[0] + b" " else "failed"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                counts["failed"] += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    counts["per_s"] = round(count / (time.monotonic() - started))
    return counts


def metrics_scrape(port: int, headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
    status, _, body, took = http_request(port, "GET", "/metrics", headers=headers)
    return status, body, took


def case_leaks(ctx: Context) -> None:
    s = ctx.sizes
    with serving(ctx, "leaks_churn") as (server, hl):
        _, idle, idle_s = metrics_scrape(server.port)
        small = ws_frame(camera_jpeg(64, 64))
        counts, stats = timed(ctx, hl, churn, server.port, s.churn_ids, small)
        time.sleep(2)
        _, after, after_s = metrics_scrape(server.port)
        stale = after.count(b'reason="stale"')
        series = sum(1 for line in after.splitlines() if b'stream="churn-' in line)
        streams = server.health()["streams"]
        ok = len(after) <= 2 * len(idle)
        ctx.add(Row("6 churned_ids", f"{s.churn_ids} short-lived stream ids (connect, one frame, close)",
                    want="/metrics within 2x its idle size",
                    outcome=f"/metrics {len(idle) / 1024:.0f} → {len(after) / 1024:.0f} KB, {series} churn-* series "
                            f"({stale} stale), scrape {idle_s * 1000:.0f} → {after_s * 1000:.0f} ms; {counts}; "
                            f"streams now {streams}",
                    ok=ok, healthy=stats, details={"idle_bytes": len(idle), "after_bytes": len(after), **counts,
                                                   "series": series, "stale": stale}), server)

    secrets = {"K_HEALTHY": "hk-9f2c61d0a7", "K_ENC": "enck-5b8e0c31f4", "K_BEARER": "bearerk-77a1d2e9c3",
               "K_SUB": "subk-3c9d5e1a0b", "TOKEN": "vtok-e4a28b6f19"}
    env = {"DREAMSTREAM_STREAM_KEYS": f"healthy:{secrets['K_HEALTHY']},enc:{secrets['K_ENC']},"
                                      f"bearer:{secrets['K_BEARER']},sub:{secrets['K_SUB']}",
           "DREAMSTREAM_VIEWER_TOKEN": secrets["TOKEN"]}
    # one server at debug, the most talkative level: each secret found is reported with the levels of the lines
    # it is on (INFO: also in the default log)
    with serving(ctx, "leaks_secrets", env=env, args=("--log-level", "debug"), key=secrets["K_HEALTHY"],
                 token=secrets["TOKEN"]) as (server, hl):
        p = server.port
        t0 = time.monotonic()
        status, _, body, _ = http_request(p, "GET", "/api/streams")
        listed = b'"healthy"' in body
        ctx.add(Row("6 api_streams_no_token", "keys + viewer token set: GET /api/streams without the token",
                    want="401 without the token",
                    outcome=f"HTTP {status}; lists the stream id and prompt: {'yes' if listed else 'no'}",
                    ok=status in (401, 403)), server)
        status, body, _ = metrics_scrape(p)
        named = b'stream="healthy"' in body
        ctx.add(Row("6 metrics_no_token", "keys + viewer token set: GET /metrics without the token",
                    want="401 without the token",
                    outcome=f"HTTP {status}; names the stream: {'yes' if named else 'no'}",
                    ok=status in (401, 403)), server)
        tries = {}
        ws = RawWS(p, f"/ws/broadcaster/enc?%6Bey={secrets['K_ENC']}")
        tries["?%6Bey= (query, encoded)"] = ws.outcome()[1]
        ws.close()
        ws = RawWS(p, "/ws/broadcaster/bearer", {"Authorization": f"Bearer {secrets['K_BEARER']}"})
        tries["Authorization: Bearer (socket)"] = ws.outcome()[1]
        ws.close()
        status, _, _, _ = http_request(p, "POST", "/api/streams/healthy/config", b'{"prompt":"x"}',
                                       {"Authorization": f"Bearer {secrets['K_BEARER']}",
                                        "Content-Type": "application/json"})
        tries["Authorization: Bearer (POST config)"] = f"HTTP {status}"
        ws = RawWS(p, "/ws/broadcaster/sub", {"Sec-WebSocket-Protocol": secrets["K_SUB"]})
        tries["Sec-WebSocket-Protocol"] = ws.outcome()[1]
        ws.close()
        time.sleep(1.0)
        lines = server.log().splitlines()
        leaked = {}
        for name, value in secrets.items():
            levels = {m.group(1) for line in lines if value in line
                      and (m := re.search(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b", line))}
            if any(value in line for line in lines):
                leaked[name] = "/".join(sorted(levels)) or "?"
        found = ", ".join(f"{k} ({v})" for k, v in leaked.items()) or "none"
        ctx.add(Row("6 secrets_in_log", "--log-level debug: secrets as ?key=, ?%6Bey=, Authorization: Bearer, "
                                        "subprotocol, ?token=; grep the log",
                    want="no secret in the log at any level",
                    outcome=f"found: {found}; the %6Bey socket: {tries['?%6Bey= (query, encoded)']}",
                    ok=not leaked, healthy=healthy_over(hl, t0),
                    details={"leaked": leaked, "tries": tries, "secrets": dict(secrets)}), server)


# ---- case 7: small ones -----------------------------------------------------------------------------


def case_small(ctx: Context) -> None:
    s = ctx.sizes
    with serving(ctx, "small") as (server, hl):
        p = server.port
        ws = RawWS(p, "/ws/broadcaster/main%0A")
        accepted, words = ws.outcome()
        ids = [st["stream_id"] if "stream_id" in st else st.get("id") for st in
               json.loads(http_request(p, "GET", "/api/streams")[2])["streams"]]
        ws.close()
        ctx.add(Row("7 stream_id_newline", "broadcaster on /ws/broadcaster/main%0A",
                    want="refused 1008 (the whole id must match)",
                    outcome=f"{words}; /api/streams ids: {ids}", ok=not accepted), server)

        def config_flood() -> dict[str, Any]:
            ws = RawWS(p, "/ws/broadcaster/cfg")
            ws.messages(1.0, until=1)
            pad = "x" * 990  # prompts of the longest legal size (1000 characters): what the log line repeats
            burst = b"".join(ws_frame(json.dumps({"type": "config", "prompt": f"{i:09d} {pad}"}))
                             for i in range(s.config_messages))
            log0 = server.log_bytes()
            started = time.monotonic()
            sent = 0  # a server that reads at its own pace pushes back: send what TCP takes in 5 s
            ws.sock.settimeout(0.5)
            while sent < len(burst) and time.monotonic() - started < 5.0:
                with contextlib.suppress(TimeoutError):
                    sent += ws.sock.send(burst[sent:sent + (1 << 20)])
            sent_s = time.monotonic() - started
            got = ws.messages(5.0)
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.sock.close()  # a reset: what is still queued in TCP is never read
            texts = [json.loads(pl) for op, pl in got if op == 0x1]
            time.sleep(0.5)
            return {"replies": sum(m.get("type") == "config" for m in texts), "sent_s": round(sent_s, 2),
                    "sent": sent * s.config_messages // len(burst), "log_bytes": server.log_bytes() - log0,
                    "errors": [m.get("message", "")[:80] for m in texts if m.get("type") == "error"][:3]}

        result, stats = timed(ctx, hl, config_flood)
        ctx.add(Row("7 config_flood", f"{s.config_messages} config messages at once on one socket",
                    want="rate-limited per socket, logging capped (< 1 MB)",
                    outcome=f"{result['sent']} sent in {result['sent_s']} s; {result['replies']} replies, "
                            f"{len(result['errors'])} errors {result['errors'][:1]}; "
                            f"log +{result['log_bytes'] / 1e6:.1f} MB",
                    ok=result["log_bytes"] < 1_000_000, healthy=stats, details=result), server)

        tiny = [ws_frame(camera_jpeg(64, 64, seed=i)) for i in range(4)]
        counts, stats = timed(ctx, hl, paced_streams, p, ["flood"], tiny, None, s.attack_s)
        ctx.add(Row("7 frame_flood", f"one socket sends 64x64 JPEGs unpaced, {s.attack_s:g} s",
                    want="healthy ≥ 27 fps",
                    outcome=f"{counts.get('sent', 0) / s.attack_s:.0f} frames/s sent",
                    healthy=stats, details=counts), server)


def case_stuck_processor(ctx: Context) -> None:
    ctx.add(Row("8 stuck_processor", "a processing timeout: is the stuck processor entered again?",
                outcome="not measured here (needs a processor that hangs); tests/test_backends.py covers it"))


CASES = {
    "baseline": case_baseline,
    "api_process_flood": case_api_process_flood,
    "big_frames": case_big_frames,
    "unrunnable_processor": case_unrunnable_processor,
    "cross_origin": case_cross_origin,
    "connections": case_connections,
    "leaks": case_leaks,
    "small": case_small,
    "stuck_processor": case_stuck_processor,
}


# ---- main -------------------------------------------------------------------------------------------


def server_tree(rev: str, workdir: Path) -> Path:
    """The committed tree at `rev`, exported (git archive) under `workdir`: a server of that commit, whatever the
    working tree holds. Returns its directory."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    out = workdir / f"server-{commit}"
    if not out.exists():
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def header(argv: list[str], sizes: Sizes, server_root: Path, rev: str | None) -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    if rev:
        server = f"{git('rev-parse', '--short', rev)} (git archive of {rev}, run from {server_root})"
    else:
        dirty = " + uncommitted changes in service/" if git("status", "--porcelain", "--", "service") else ""
        server = f"the working tree {ROOT}: {git('rev-parse', '--short', 'HEAD')}{dirty}"
    return "\n".join([
        "# benchmarks/abuse.py: issue 16's attacks against a real `dreamstream serve --processor filter`",
        f"# date:    {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"# server:  {server}",
        f"# script:  benchmarks/abuse.py of {git('log', '-1', '--format=%h', '--', 'benchmarks/abuse.py')}"
        f"{' + local changes' if git('status', '--porcelain', '--', 'benchmarks/abuse.py') else ''}",
        f"# command: {' '.join(['python', 'benchmarks/abuse.py', *argv])}",
        f"# machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"# healthy stream: 320x240 JPEG at {HEALTHY_FPS:g} fps + one viewer; fps / worst gap / p50 latency "
        f"(send -> styled frame back) over each attack's window; a row fails under {PASS_FPS:g} fps",
        f"# sizes: {json.dumps(asdict(sizes))}",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", metavar="NAME",
                        help=f"run only these (repeat or comma-separate): {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="fewer connections and ids, shorter attacks")
    parser.add_argument("--json", metavar="OUT", help="also save the rows as JSON")
    parser.add_argument("--at", metavar="REV", help="serve the committed tree of this git revision (exported with "
                                                    "git archive) instead of the working tree")
    parser.add_argument("--workdir", help="where the server logs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    names = [n for arg in (args.case or list(CASES)) for n in arg.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    sizes = Sizes.quick() if args.quick else Sizes()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of client sockets
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dreamstream-abuse-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server_root = server_tree(args.at, workdir) if args.at else ROOT
    ctx = Context(sizes, workdir, server_root)
    head = header(argv, sizes, server_root, args.at)
    print(head, flush=True)
    progress(f"server logs under {workdir}")
    started = time.monotonic()
    for name in names:
        try:
            CASES[name](ctx)
        except Exception as exc:  # one broken case must not lose the others' rows
            progress(f"{name} failed: {type(exc).__name__}: {exc}")
            ctx.rows.append(Row(name, "(case did not complete)", outcome=f"{type(exc).__name__}: {str(exc)[:300]}",
                                ok=False))
    print(f"# took {time.monotonic() - started:.0f} s\n")
    print_table(ctx.rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": head, "rows": [asdict(r) for r in ctx.rows]},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
