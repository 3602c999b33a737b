"""Hostile and broken clients for the hardening tests: bomb images, stalled sockets, a healthy stream
to measure alongside, and the server's memory as the kernel sees it."""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import socket
import struct
import time
import zlib
from pathlib import Path

import websockets

# ---- images whose headers lie ------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, idat: bytes | None = None, extra_chunks: int = 0) -> bytes:
    """A PNG whose IHDR says width x height; the pixel data is whatever `idat` is (default: a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    filler = _png_chunk(b"teXt", b"") * extra_chunks
    body = idat if idat is not None else zlib.compress(b"\0" * 64)
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    return head + filler + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_zip_bomb(width: int = 1024, height: int = 1024, inflated: int = 256 * 1024 * 1024) -> bytes:
    """An honest-sized PNG whose pixel stream inflates to `inflated` bytes (far more than the image needs)."""
    compressor = zlib.compressobj(9)
    block = b"\0" * (1 << 20)
    idat = b"".join(compressor.compress(block) for _ in range(inflated >> 20)) + compressor.flush()
    return png_claiming(width, height, idat)


def jpeg_claiming(width: int, height: int) -> bytes:
    """SOI + a baseline SOF0 header for width x height + a scan start: no real pixel data."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    sos = b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return (
        b"\xff\xd8"
        + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
        + b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos
        + b"\x00" * 16 + b"\xff\xd9"
    )


def jpeg_with_segments(jpeg: bytes, count: int) -> bytes:
    """A real JPEG with `count` empty APP5 segments before its frame header (a parser-time bomb)."""
    return jpeg[:2] + b"\xff\xe5\x00\x02" * count + jpeg[2:]


def webp_claiming(width: int, height: int) -> bytes:
    """A VP8X (extended) WebP header for width x height, with no image chunk after it."""
    vp8x = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def b64_frame(data: bytes, ts: float | None = None) -> str:
    msg: dict = {"type": "frame", "frame": base64.b64encode(data).decode()}
    if ts is not None:
        msg["ts"] = ts
    return json.dumps(msg)


# ---- sockets that misbehave ----------------------------------------------------------------------


def stalled_viewer(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket handshake, then never a read: its receive window fills and the server must cope."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(b"0123456789abcdef").decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock


async def send_until_closed(ws: websockets.ClientConnection, message: str | bytes) -> int | None:
    """Send a message the server may close the socket over, mid-send; the close code it sent."""
    try:
        await ws.send(message)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    return await close_code(ws)


async def close_code(ws: websockets.ClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the server closes; the close code it sent."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def refused_with(url: str, code: int = 1008, **kwargs) -> str:
    """Connect, expect the server to close the socket with `code` straight away; the close reason."""
    async with websockets.connect(url, **kwargs) as ws:
        try:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == code, f"{url}: closed with {exc.rcvd}, not {code}"
            return exc.rcvd.reason
    raise AssertionError(f"{url} was not refused")


async def recv_frame(ws, timeout: float = 5.0) -> bytes:
    """The next binary frame of a `format=binary` viewer, skipping status messages."""
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            if isinstance(raw, bytes):
                return raw


# ---- a well-behaved stream to measure beside the hostile ones ----------------------------------


class HealthyStream:
    """A broadcaster at `fps` and one binary viewer, in a process of their own.

    Their own process, so that whatever the test's process does (hypothesis, hundreds of clients)
    cannot starve them: a dip in `arrivals` is the server's doing. Receive times are
    time.monotonic(), which is one clock for every process on Linux.
    """

    def __init__(self, ws_url: str, stream_id: str, frame: bytes, fps: float = 30.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._results: multiprocessing.Queue = ctx.Queue()
        self._proc = ctx.Process(
            target=_healthy_main, args=(ws_url, stream_id, frame, fps, self._stop, self._results), daemon=True
        )
        self.arrivals: list[float] = []
        self.sent = 0
        self.error: str | None = None

    def __enter__(self) -> HealthyStream:
        self._proc.start()
        started = self._results.get(timeout=30)
        if started != "live":
            raise RuntimeError(f"healthy stream did not start: {started}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.arrivals, self.sent, self.error = self._results.get(timeout=30)
        self._proc.join(10)

    def fps_between(self, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.arrivals) / (end - start)

    def worst_window_fps(self, start: float, end: float, window: float = 2.0) -> float:
        """The lowest frame rate over any `window`-second stretch of [start, end)."""
        worst = float("inf")
        t = start
        while t + window <= end:
            worst = min(worst, self.fps_between(t, t + window))
            t += 0.5
        return worst


def _healthy_main(ws_url, stream_id, frame, fps, stop, results) -> None:
    arrivals: list[float] = []
    sent = 0

    async def main() -> None:
        nonlocal sent
        base = f"{ws_url}/ws"
        async with websockets.connect(f"{base}/viewer/{stream_id}?format=binary") as viewer, \
                websockets.connect(f"{base}/broadcaster/{stream_id}") as bc:

            async def read() -> None:
                async for message in viewer:
                    if isinstance(message, bytes):
                        arrivals.append(time.monotonic())

            async def discard() -> None:
                async for _ in bc:
                    pass

            tasks = [asyncio.create_task(read()), asyncio.create_task(discard())]
            begin = time.monotonic()
            announced = False
            while not stop.is_set():
                await bc.send(frame)
                sent += 1
                if not announced and len(arrivals) >= 3:
                    results.put("live")
                    announced = True
                await asyncio.sleep(max(0.0, begin + sent / fps - time.monotonic()))
            for task in tasks:
                task.cancel()

    try:
        asyncio.run(main())
        results.put((arrivals, sent, None))
    except BaseException as exc:  # reported to the test
        results.put(repr(exc))
        results.put((arrivals, sent, repr(exc)))


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB, from /proc (what the OOM killer looks at)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
