"""`dreamstream` as a user runs it: the installed console script in a subprocess, on real ports."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import websockets

from service import server, version
from service.config import Settings
from tests.helpers import ROOT, free_port

DREAMSTREAM = str(Path(sys.executable).with_name("dreamstream"))


def dreamstream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DREAMSTREAM, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@contextmanager
def port_taken() -> Iterator[int]:
    """A port another program listens on (the usual case: a second `dreamstream serve`)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early: {proc.communicate()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if json.loads(resp.read())["status"] == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not healthy in {timeout} s")


def test_version():
    result = dreamstream("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dreamstream {importlib.metadata.version('dreamstream')}"
    # the fallback for a checkout that is not installed must not drift from the package's version
    assert version.__version__ == importlib.metadata.version("dreamstream")


def test_no_arguments_prints_usage_and_exits_2():
    result = dreamstream()
    assert result.returncode == 2
    assert result.stderr.startswith("usage: dreamstream")
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_cleanly_and_viewers_get_1001():
    port = free_port()
    proc = subprocess.Popen(
        [DREAMSTREAM, "serve", "--processor", "filter", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_healthy(port, proc)

        async def viewer_close_code() -> int | None:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/viewer/x") as viewer:
                assert json.loads(await viewer.recv())["type"] == "status"
                proc.send_signal(signal.SIGINT)
                try:
                    while True:
                        await asyncio.wait_for(viewer.recv(), 15)
                except websockets.ConnectionClosed as exc:
                    return exc.rcvd.code if exc.rcvd else None

        code = asyncio.run(viewer_close_code())
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 1001, err
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "Application shutdown complete" in err


def test_busy_port_says_so_at_once_and_exits_2():
    with port_taken() as port:
        start = time.monotonic()
        result = dreamstream("serve", "--processor", "filter", "--port", str(port))
        took = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # before the app loads: no startup log, no traceback
    assert f"port {port} on 127.0.0.1 is in use" in lines[0]
    assert "--port " in lines[0] and 'make serve ARGS="--port ' in lines[0]
    assert took < 10


def test_port_lost_after_the_check_gets_the_same_line(capsys):
    """The race: the port was free at the check and taken before uvicorn bound it. A real uvicorn server on a
    port another socket holds, run the way `serve` runs it after its check."""
    from service.app import create_app

    with port_taken() as port:
        settings = Settings.from_env(host="127.0.0.1", port=port, processor="filter")
        app = create_app(settings)
        status = server.serve(app, settings, log_level="warning")
    assert status == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])  # 192.0.2.1: TEST-NET-1, never local
def test_address_that_cannot_be_listened_on_exits_2(host: str):
    result = dreamstream("serve", "--processor", "filter", "--host", host)
    assert result.returncode == 2
    assert result.stderr.startswith(f"dreamstream serve: cannot listen on {host} port 8000")
    assert "Traceback" not in result.stderr
