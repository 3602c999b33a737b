"""Shared test helpers: a REAL uvicorn server in a subprocess, frames, and the integration-skip rule."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_INTEGRATION = os.environ.get("DREAMSTREAM_REQUIRE_INTEGRATION") == "1"


def require_or_skip(condition: bool, why: str) -> None:
    """Skip when an external part (OBS, Chromium) is missing; under DREAMSTREAM_REQUIRE_INTEGRATION=1, fail."""
    if condition:
        return
    if REQUIRE_INTEGRATION:
        pytest.fail(f"integration test cannot run: {why} (DREAMSTREAM_REQUIRE_INTEGRATION=1)")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def solid_jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (256, 256), quality: int = 90) -> bytes:
    """A frame of one colour (width, height): easy to recognise in what viewers receive."""
    img = np.empty((size[1], size[0], 3), np.uint8)
    img[:] = rgb
    return simplejpeg.encode_jpeg(img, quality=quality, colorspace="RGB")


def gradient_jpeg(size: tuple[int, int] = (256, 256), seed: int = 0) -> bytes:
    """A frame with structure (edges, colours) so filters have something to restyle."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x ^ y) & 0xFF], -1).astype(np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)
    return simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB")


def mean_rgb(jpeg: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB").reshape(-1, 3).mean(0)


@dataclass
class Server:
    port: int
    env: dict[str, str]
    args: list[str]
    log_path: Path
    command: list[str] | None = None  # how it is started (default: `dreamstream serve`)
    proc: subprocess.Popen | None = None
    _log_file: object = field(default=None, repr=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self._log_file = open(self.log_path, "ab")
        command = self.command or [sys.executable, "-m", "service.cli", "serve"]
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.http + "/healthz", timeout=1) as resp:
                    if json.loads(resp.read())["status"] in ("ok", "error"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready in {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file:
            self._log_file.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running_server(
    tmp_path: Path,
    processor: str = "filter",
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    launcher: str = "dreamstream serve",
) -> Iterator[Server]:
    """A real `dreamstream serve` on a free port; its log at server.log in tmp_path.

    `launcher="uvicorn"` starts the same app with plain `uvicorn service.app:app` instead (settings from env)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if launcher == "uvicorn":
        assert not args, "plain uvicorn takes the app's settings from the environment"
        full_env["DREAMSTREAM_PROCESSOR"] = processor
        command, args = [sys.executable, "-m", "uvicorn", "service.app:app"], []
    else:
        command, args = None, ["--processor", processor, *(args or [])]
    server = Server(free_port(), full_env, args, tmp_path / "server.log", command)
    server.start(timeout)
    try:
        yield server
    finally:
        server.stop()


def run(coro, timeout: float = 60):
    """Run a test's coroutine, failing it after `timeout` seconds rather than hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv_json(ws, kind: str | None = None, timeout: float = 10.0) -> dict:
    """The next JSON message (of `kind`, skipping others such as stats and binary frames)."""
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            if kind is None or msg["type"] == kind:
                return msg
