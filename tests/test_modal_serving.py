"""modal_app.py served for real: the pool mode's gateway and the shard app, each in a real uvicorn server.

The gateway's pool call pickles each call both ways (as Modal does) and runs the GPU class in-process through
`.local()`; the shard is the GPU class's own ASGI app with the filter processor. Offline, no Modal token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import modal_app
from service.config import Settings
from service.engine import FrameJob
from tests.helpers import ROOT, free_port, mean_rgb, solid_jpeg

pytest_plugins = ["tests.fixtures_diffusion"]  # tiny_models, tiny_env
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*executing locally:UserWarning"),  # no volume mounted here
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers + numpy 2
]
PICKLE_PROTOCOL = 4  # what Modal's cloudpickle writes; for importable classes its bytes are pickle's
OFFLINE_ENV = {  # a process of its own: no Modal token, no Modal server, no deploy-time settings of this shell
    **{k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "DREAMSTREAM_"))},
    "HOME": "/nonexistent", "MODAL_SERVER_URL": "https://127.0.0.1:9", "PYTHONPATH": str(ROOT),
}


# ---- the gateway, end to end, over a real server --------------------------------------------------

class InProcessPool:
    """`Restyler().restyle.remote.aio` in-process: each call pickled both ways, one container running one call
    at a time (Modal sends a container one input at a time: the class has no @modal.concurrent)."""

    def __init__(self, restyler) -> None:
        self.restyle = restyler.restyle.local
        self.calls: list[list[str]] = []  # stream ids per call
        self._container = ThreadPoolExecutor(1)

    async def __call__(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        payload = pickle.dumps((jobs,), protocol=PICKLE_PROTOCOL)
        (arrived,) = pickle.loads(payload)
        self.calls.append([job.stream_id for job in arrived])
        results = await asyncio.get_running_loop().run_in_executor(self._container, self.restyle, arrived)
        return pickle.loads(pickle.dumps(results, protocol=PICKLE_PROTOCOL))


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """A real uvicorn server on a free port, in a thread of this process (so the pool can be inspected)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def wait_healthy(base: str) -> dict:
    deadline = time.monotonic() + 60
    while (health := json.loads(get(f"http://{base}/healthz")))["status"] == "loading":
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def open_broadcaster(sockets: contextlib.ExitStack, base: str, stream_id: str, prompt: str):
    ws = sockets.enter_context(connect(f"ws://{base}/ws/broadcaster/{stream_id}", max_size=None))
    assert json.loads(ws.recv(timeout=10))["type"] == "ready"
    ws.send(json.dumps({"type": "config", "prompt": prompt, "strength": 1.0}))
    while (reply := json.loads(ws.recv(timeout=10)))["type"] != "config":
        pass
    assert reply["config"]["prompt"] == prompt
    return ws


def next_error(ws, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while (message := json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))["type"] != "error":
        pass
    return message


def styled_frames(sockets, base: str, streams: dict[str, str], until, timeout: float = 30) -> dict[str, list]:
    """Send a red frame from each stream's broadcaster until `until(got)`; mean RGB of each frame its viewer gets."""
    red = solid_jpeg((220, 40, 40))
    red_url = "data:image/jpeg;base64," + base64.b64encode(red).decode()
    viewers = {name: sockets.enter_context(connect(f"ws://{base}/ws/viewer/{name}?format=binary", max_size=None))
               for name in streams}
    broadcasters = {name: open_broadcaster(sockets, base, name, prompt) for name, prompt in streams.items()}
    got: dict[str, list] = {name: [] for name in streams}
    deadline = time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, {k: len(v) for k, v in got.items()}
        for i, ws in enumerate(broadcasters.values()):
            ws.send(red if i % 2 == 0 else json.dumps({"type": "frame", "frame": red_url}))
        for name, viewer in viewers.items():
            with contextlib.suppress(TimeoutError):
                while True:
                    if isinstance(message := viewer.recv(timeout=0.05), bytes):
                        got[name].append(mean_rgb(message))
    return got


def test_gateway_streams_through_the_pool_and_only_a_broadcaster_wakes_a_gpu(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "filter")
    pool = InProcessPool(modal_app.Restyler())
    app = modal_app.gateway_app(pool, Settings.from_env())
    with serve(app) as base, contextlib.ExitStack() as sockets:
        health = wait_healthy(base)
        assert (health["status"], health["processor"], health["device"]) == ("ok", "filter", "modal:L4")
        for page in ("/", "/view/noir", "/overlay/noir", "/metrics", "/robots.txt", "/wp-login.php"):
            with contextlib.suppress(urllib.error.HTTPError):
                get(f"http://{base}{page}")
        wait_healthy(base)
        assert pool.calls == [], "a page view or probe started a GPU container"
        assert "no GPU running" in health["reason"]

        got = styled_frames(sockets, base, {"noir": "film noir", "paint": "Monet painting"},
                            lambda got: min(len(v) for v in got.values()) >= 3)
        assert pool.calls[0] == ["_warmup"]  # the broadcaster woke a GPU before its first frame
        # (how many frames share a call is the scheduler's choice: the filter takes one frame a call)
        assert all(np.ptp(rgb) < 12 for rgb in got["noir"])  # each stream kept its own prompt through the pool
        assert all(rgb[0] > rgb[1] + 50 for rgb in got["paint"])
        assert "GPU pool answering" in json.loads(get(f"http://{base}/healthz"))["reason"]

        noir = open_broadcaster(sockets, base, "noir", "film noir")
        red = solid_jpeg((220, 40, 40))
        noir.send(red[: len(red) // 2])  # passes the gateway's header check, fails to decode on the GPU
        assert next_error(noir)["code"] == "bad_frame"  # a FrameError's code survived the trip back

        request = urllib.request.Request(f"http://{base}/api/process", data=red, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers["content-type"] == "image/jpeg" and resp.read()[:2] == b"\xff\xd8"


# ---- shard mode, end to end, over a real server ------------------------------------------------------

def test_shard_serves_its_streams_sockets_from_its_own_backend(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "filter")
    app = modal_app.Shard().web.local()  # the class's enter hooks, then its ASGI app
    with serve(app) as base, contextlib.ExitStack() as sockets:
        health = wait_healthy(base)
        assert (health["status"], health["processor"], health["device"]) == ("ok", "filter", "cpu")
        assert "Modal shard" in health["reason"]
        got = styled_frames(sockets, base, {"noir": "film noir", "paint": "Monet painting"},
                            lambda got: min(len(v) for v in got.values()) >= 3)
        assert all(np.ptp(rgb) < 12 for rgb in got["noir"])
        assert all(rgb[0] > rgb[1] + 50 for rgb in got["paint"])


def test_shard_serves_the_processor_its_snapshot_loaded_on_the_cpu(tiny_env, monkeypatch):
    """The diffusion processor built on the CPU before the snapshot, moved and warmed after it, is the one the shard's
    server uses: ready when the server starts (no load in its lifespan), styling frames."""
    for name, value in {"PROCESSOR": "lightning", "WIDTH": "64", "HEIGHT": "64"}.items():
        monkeypatch.setenv(f"DREAMSTREAM_{name}", value)
    app = modal_app.Shard().web.local()
    with serve(app) as base:
        health = json.loads(get(f"http://{base}/healthz"))  # no "loading": the processor came ready
        assert (health["status"], health["processor"], health["device"]) == ("ok", "lightning", "cpu"), health
        red = solid_jpeg((220, 40, 40))
        request = urllib.request.Request(f"http://{base}/api/process", data=red, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            styled = resp.read()
        assert resp.headers["content-type"] == "image/jpeg" and styled[:2] == b"\xff\xd8" and styled != red


def test_a_stopping_shard_closes_its_sockets_with_1001(tmp_path):
    """The shard app under plain uvicorn in a process of its own: a stop (SIGTERM, as a host sends) drains, and
    every socket gets 1001 (going away), so clients reconnect at once to the shard's next container."""
    port = free_port()
    script = (
        "import uvicorn, modal_app\n"
        f"uvicorn.run(modal_app.Shard().web.local(), host='127.0.0.1', port={port}, log_level='warning')\n"
    )
    log = (tmp_path / "shard.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**OFFLINE_ENV, "DREAMSTREAM_PROCESSOR": "filter"})
    try:
        base = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                wait_healthy(base)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "shard.log").read_text()
                time.sleep(0.2)
        with contextlib.ExitStack() as sockets:
            got = styled_frames(sockets, base, {"live": "film noir"}, lambda got: len(got["live"]) >= 1)
            assert got["live"]
            viewer = sockets.enter_context(connect(f"ws://{base}/ws/viewer/live", max_size=None))
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    viewer.recv(timeout=15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
