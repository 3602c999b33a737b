"""Load against a real server: 500 viewers on one stream with the server's memory flat, and viewers
that stop reading costing the others nothing. About a minute and a half on a 2-core machine."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import simplejpeg
import websockets

from tests.helpers import gradient_jpeg, running_server
from tests.hostile import HealthyStream, rss_mb, stalled_viewer

pytestmark = pytest.mark.slow

VIEWERS = 500
WARMUP_S = 8.0
MEASURE_S = 40.0


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    env = {"DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS": "0"}  # the crowd comes from one address: 127.0.0.1
    with running_server(tmp_path_factory.mktemp("relay"), processor="identity", env=env) as srv:
        yield srv


def test_500_viewers_with_memory_flat(relay):
    """500 viewers (half JSON, half binary) on one 15 fps stream for 40 s: every viewer keeps getting
    frames, and the server's resident memory does not creep."""
    pid = relay.proc.pid
    counts = [0] * VIEWERS

    async def watch(i: int, ws) -> None:
        async for message in ws:
            if isinstance(message, bytes) or message.startswith('{"type": "frame"'):
                counts[i] += 1

    async def main() -> tuple[list[float], list[int], list[int]]:
        urls = [f"{relay.ws}/ws/viewer/crowd" + ("?format=binary" if i % 2 else "") for i in range(VIEWERS)]
        viewers = []
        for start in range(0, VIEWERS, 50):  # connect in waves, as an audience arrives
            viewers += await asyncio.gather(*(websockets.connect(u, max_queue=4) for u in urls[start:start + 50]))
        tasks = [asyncio.create_task(watch(i, ws)) for i, ws in enumerate(viewers)]
        samples: list[float] = []
        with HealthyStream(relay.ws, "crowd", gradient_jpeg((160, 120)), fps=15):
            await asyncio.sleep(WARMUP_S)
            before = list(counts)
            end = time.monotonic() + MEASURE_S
            while time.monotonic() < end:
                samples.append(rss_mb(pid))
                await asyncio.sleep(1.0)
            after = list(counts)
            health = (await asyncio.to_thread(httpx.get, f"{relay.http}/healthz")).json()
            assert health["viewers"] == VIEWERS + 1  # ours and the healthy stream's own viewer
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in viewers), return_exceptions=True)
        return samples, before, after

    samples, before, after = asyncio.run(main())
    got = [a - b for a, b in zip(after, before, strict=True)]
    slope = np.polyfit(np.arange(len(samples)), samples, 1)[0]  # MiB per second
    growth = max(samples[-5:]) - min(samples[:5])
    print(
        f"\nRSS {samples[0]:.1f} -> {samples[-1]:.1f} MiB over {MEASURE_S:.0f} s (slope {slope * 60:+.2f} MiB/min); "
        f"frames per viewer in {MEASURE_S:.0f} s: min {min(got)}, median {int(np.median(got))}"
    )
    assert min(got) >= 0.8 * 15 * MEASURE_S, f"a viewer got only {min(got)} frames in {MEASURE_S:.0f} s"
    assert growth < 16, f"server RSS grew {growth:.1f} MiB under a steady load: {samples}"
    assert slope * 60 < 6, f"server RSS creeps at {slope * 60:.1f} MiB/min: {samples}"


def test_stalled_viewers_cost_the_others_no_frames(relay):
    """20 viewers that never read (4 kB receive buffers, 100 kB frames) beside one that does: it keeps
    30 fps, and the stalled ones hold at most a frame or two of server memory each."""
    noisy = np.random.default_rng(7).integers(0, 255, (384, 512, 3), dtype=np.uint8)
    frame = simplejpeg.encode_jpeg(noisy, quality=80, colorspace="RGB")
    assert len(frame) > 100_000
    pid = relay.proc.pid
    rss_before = rss_mb(pid)
    stalled = [stalled_viewer(relay.port, "/ws/viewer/stall?format=binary") for _ in range(20)]
    try:
        with HealthyStream(relay.ws, "stall", frame, fps=30) as healthy:
            start = time.monotonic()
            time.sleep(10)
            end = time.monotonic()
            streams = httpx.get(f"{relay.http}/api/streams").json()["streams"]
            [summary] = [s for s in streams if s["stream_id"] == "stall"]
            metrics = httpx.get(f"{relay.http}/metrics").text
            rss_during = rss_mb(pid)
    finally:
        for sock in stalled:
            sock.close()
    fps, worst = healthy.fps_between(start, end), healthy.worst_window_fps(start, end)
    received = sum(t < end + 0.3 for t in healthy.arrivals)  # what was published by `end` has landed by then
    print(
        f"\nreading viewer: {received} of {summary['frames_out']} published frames, {fps:.1f} fps "
        f"(worst 2 s: {worst:.1f}); RSS {rss_before:.0f} -> {rss_during:.0f} MiB"
    )
    assert received >= summary["frames_out"] - 1, "the reading viewer missed frames the server published"
    assert fps >= 27 and worst >= 24, f"the reading viewer fell to {fps:.1f} fps (worst 2 s: {worst:.1f})"
    prefix = 'dreamstream_viewer_frames_skipped_total{stream="stall"}'
    skipped = [line for line in metrics.splitlines() if line.startswith(prefix)]
    assert skipped and float(skipped[0].split()[-1]) > 20 * 100, "the stalled viewers should be skipping frames"
    assert rss_during - rss_before < 60, f"20 stalled viewers cost {rss_during - rss_before:.0f} MiB"
