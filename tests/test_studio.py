"""The studio page in a real headless Chromium with a fake camera, against a real server.

Chromium's `--use-fake-device-for-media-stream` camera is a moving test pattern; the filter
processor restyles it, and both the page's preview and a Python viewer must see the result.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import simplejpeg
from websockets.sync.client import connect

from tests.browser import (
    browser_fixture,  # noqa: F401  (the `browser` fixture)
    open_page,
    screenshot_rgba,
    wait_for_frames,
)
from tests.helpers import running_server

pytestmark = pytest.mark.integration

STUDIO_VIEWPORT = {"width": 1400, "height": 1000}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("studio-server"), processor="filter") as srv:
        yield srv


class ViewerThread(threading.Thread):
    """A Python viewer on a stream, collecting binary frames while the browser broadcasts."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.frames: list[bytes] = []
        self.statuses: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with connect(self.url, max_size=None) as ws:
            while not self.stop.is_set():
                try:
                    message = ws.recv(timeout=0.2)
                except TimeoutError:
                    continue
                if isinstance(message, bytes):
                    self.frames.append(message)
                else:
                    msg = json.loads(message)
                    if msg["type"] == "status":
                        self.statuses.append(msg)


def stream_summary(server, stream_id: str) -> dict | None:
    with urllib.request.urlopen(f"{server.http}/api/streams", timeout=5) as resp:
        streams = json.loads(resp.read())["streams"]
    return next((s for s in streams if s["stream_id"] == stream_id), None)


def messages(page) -> str:
    return page.inner_text("#messages")


def test_autostart_broadcasts_the_fake_camera_and_the_preview_shows_styled_frames(browser, server):
    viewer = ViewerThread(f"{server.ws}/ws/viewer/cam1?format=binary")
    viewer.start()
    errors: list[str] = []
    try:
        with open_page(browser, f"{server.http}/?stream=cam1&autostart=1", STUDIO_VIEWPORT, errors) as page:
            wait_for_frames(page, "#preview", at_least=10, timeout_ms=20_000)
            deadline = time.monotonic() + 10
            while len(viewer.frames) < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            # the preview canvas holds a real picture, not a blank box
            box = page.locator("#preview").bounding_box()
            shot = screenshot_rgba(page, clip=box)
            assert shot[..., :3].std() > 10, "the preview is blank"
            page.wait_for_function("() => parseFloat(document.querySelector('[data-stat=fps_out]').textContent) > 0")
            assert float(page.text_content("[data-stat=sent]")) > 0
            assert page.text_content("#link") == "broadcasting"
            assert page.input_value("#stream-id") == "cam1"
            assert 'connected: broadcasting stream "cam1"' in messages(page)
    finally:
        viewer.stop.set()
        viewer.join(5)
    assert len(viewer.frames) >= 5, "the Python viewer saw no styled frames"
    picture = simplejpeg.decode_jpeg(viewer.frames[-1], colorspace="RGB")
    assert picture.shape[2] == 3 and max(picture.shape[:2]) <= 512  # the studio's default size
    assert np.asarray(picture).std() > 10
    assert not errors, errors


def test_style_controls_change_the_stream_config_live(browser, server):
    with open_page(browser, f"{server.http}/?stream=cam2&autostart=1", STUDIO_VIEWPORT) as page:
        wait_for_frames(page, "#preview", at_least=3, timeout_ms=20_000)
        page.fill("#prompt", "pencil sketch")
        page.fill("#steps", "3")
        page.dispatch_event("#steps", "change")
        page.select_option("#processor", "identity")
        page.wait_for_function("() => document.querySelector('#messages').textContent.includes('identity')")
        config = stream_summary(server, "cam2")["config"]
        assert config["prompt"] == "pencil sketch"
        assert config["processor_type"] == "identity"
        assert page.input_value("#steps") == "1"  # switching processor takes its default steps

        # a value the server refuses: its error is shown and the control shows the stream's real value
        page.fill("#steps", "500")
        page.dispatch_event("#steps", "change")
        page.wait_for_function("() => document.querySelector('#messages').textContent.includes('bad_config')")
        assert "num_steps must be between 1 and 100" in messages(page)
        assert page.input_value("#steps") == "1"


def test_studio_shows_the_processor_the_reason_and_the_links(browser, server):
    with open_page(browser, f"{server.http}/?stream=links", STUDIO_VIEWPORT) as page:
        info = page.inner_text("#processor-info")
        assert "filter" in info and "cpu" in info
        assert "--processor filter was asked for" in info
        assert page.input_value("#url-viewer") == f"{server.http}/view/links"
        assert page.input_value("#url-overlay") == f"{server.http}/overlay/links"
        assert page.input_value("#url-compare") == f"{server.http}/overlay/links/compare"
        page.select_option("#overlay-fit", "contain")
        page.check("#overlay-debug")
        assert page.input_value("#url-overlay") == f"{server.http}/overlay/links?fit=contain&debug=1"
        page.fill("#stream-id", "other_1")
        page.dispatch_event("#stream-id", "change")
        assert page.input_value("#url-viewer") == f"{server.http}/view/other_1"
        assert page.evaluate("location.search") == "?stream=other_1"
        # nothing is sent without a click (no autostart)
        assert page.text_content("#link") == "not broadcasting"
        assert stream_summary(server, "links") is None


def test_a_wrong_stream_key_is_explained_and_the_right_one_broadcasts(tmp_path, browser):
    env = {"DREAMSTREAM_STREAM_KEYS": "studio:right-key"}
    with (
        running_server(tmp_path, processor="filter", env=env) as srv,
        open_page(browser, f"{srv.http}/?stream=studio&autostart=1", STUDIO_VIEWPORT) as page,
    ):
        page.wait_for_function("() => document.querySelector('#messages').textContent.includes('refused')")
        assert "missing or wrong stream key" in messages(page)
        assert page.get_attribute("#stream-key", "placeholder") == "required on this server"
        page.fill("#stream-key", "right-key")
        page.click("#start-camera")
        wait_for_frames(page, "#preview", at_least=3, timeout_ms=20_000)
        assert page.text_content("#link") == "broadcasting"
