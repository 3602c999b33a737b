"""service/engine.py with the real filter processor on the CPU: a batch of several streams' frames in, JPEG bytes
(or the error that stopped a frame) out, in the same order. `run` is `prepare` (the host half, which the local
backend may run on another thread while the worker styles the previous batch) then `run_prepared`."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from service import codec
from service.config import StreamConfig
from service.engine import Engine, FrameJob
from tests.helpers import gradient_jpeg, mean_rgb, solid_jpeg

FILTER = StreamConfig(processor_type="filter", num_steps=2)
IDENTITY = StreamConfig(processor_type="identity", num_steps=1)
SIZES = [(320, 240), (200, 120), (96, 160)]  # width, height


def size_of(jpeg: bytes) -> tuple[int, int]:
    height, width = simplejpeg.decode_jpeg(jpeg, colorspace="RGB").shape[:2]
    return width, height


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(FILTER)


def test_a_bad_frame_fails_alone_and_the_rest_of_the_batch_is_styled(engine):
    jobs = [
        FrameJob("first", gradient_jpeg(SIZES[0], seed=1), FILTER),
        FrameJob("broken", b"this is not an image", FILTER),
        FrameJob("last", gradient_jpeg(SIZES[2], seed=3), FILTER),
    ]
    first, broken, last = engine.run(jobs)
    assert isinstance(broken, codec.FrameError) and broken.code == "bad_frame"
    for out, job, size in [(first, jobs[0], SIZES[0]), (last, jobs[2], SIZES[2])]:
        assert isinstance(out, bytes) and out[:2] == b"\xff\xd8"
        assert size_of(out) == size
        styled = simplejpeg.decode_jpeg(out, colorspace="RGB").astype(int)
        original = simplejpeg.decode_jpeg(job.data, colorspace="RGB").astype(int)
        assert np.abs(styled - original).mean() > 3  # restyled, not passed through


def test_prepare_on_another_thread_then_run_prepared_gives_what_run_gives(engine):
    jobs = [FrameJob(f"s{n}", gradient_jpeg(size, seed=n), FILTER) for n, size in enumerate(SIZES)]
    jobs.insert(1, FrameJob("broken", gradient_jpeg((64, 64))[:40], FILTER))  # a truncated JPEG
    expected = engine.run(jobs)

    prepared = []
    worker = threading.Thread(target=lambda: prepared.append(engine.prepare(jobs)))
    worker.start()
    worker.join(30)
    results = engine.run_prepared(prepared[0])

    assert [type(r) for r in results] == [bytes, codec.FrameError, bytes, bytes]
    assert [r for r in results if isinstance(r, bytes)] == [r for r in expected if isinstance(r, bytes)]
    assert results[1].code == expected[1].code == "bad_frame"
    assert [size_of(r) for r in results if isinstance(r, bytes)] == SIZES


def test_frames_over_the_limits_are_refused_as_too_large():
    small = Engine(FILTER, max_frame_bytes=50_000, max_frame_side=256)
    ok = gradient_jpeg((128, 128))
    wide = gradient_jpeg((300, 100))
    heavy = np.random.default_rng(0).integers(0, 255, (250, 250, 3), np.uint8)
    heavy_jpeg = simplejpeg.encode_jpeg(heavy, quality=100, colorspace="RGB")
    assert len(heavy_jpeg) > 50_000
    results = small.run([FrameJob(n, d, FILTER) for n, d in [("ok", ok), ("wide", wide), ("heavy", heavy_jpeg)]])
    assert isinstance(results[0], bytes)
    assert [(r.code if isinstance(r, codec.FrameError) else None) for r in results] == [None, "too_large", "too_large"]


def test_one_batch_mixes_processors_and_image_formats():
    """Streams on different processors share one Engine call; PNG and WebP frames come out as JPEG."""
    engine = Engine(FILTER)
    blue = (30, 60, 200)

    def pillow(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (120, 80), blue).save(buf, fmt)
        return buf.getvalue()

    jobs = [
        FrameJob("filter", gradient_jpeg((160, 120)), FILTER),
        FrameJob("jpeg", solid_jpeg(blue, (120, 80)), IDENTITY),
        FrameJob("png", pillow("PNG"), IDENTITY),
        FrameJob("webp", pillow("WEBP"), IDENTITY),
    ]
    results = engine.run(jobs)
    assert all(isinstance(r, bytes) and r[:2] == b"\xff\xd8" for r in results), results
    assert size_of(results[0]) == (160, 120)
    for out in results[1:]:
        assert size_of(out) == (120, 80)
        assert np.abs(mean_rgb(out) - blue).max() < 8  # identity: the colour the broadcaster sent
