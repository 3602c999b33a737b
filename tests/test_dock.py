"""The OBS dock (/dock/{id}) in a real headless Chromium at a dock's size, against a real server.

A Python broadcaster sends a colourful picture through the CPU `filter` processor; a Python viewer
watches the stream. What the dock changes must reach the stream: the viewer's `status` carries the new
config and the styled pixels change (noir at full strength turns the picture grey).
"""

from __future__ import annotations

import json
import time
import urllib.request
from urllib.parse import quote

import pytest
import simplejpeg

from tests.browser import (
    FramePusher,
    ViewerThread,
    browser_fixture,  # noqa: F401  (the `browser` fixture)
    open_page,
    stream_summary,
    wait_for_frames,
)
from tests.helpers import gradient_jpeg, running_server

pytestmark = pytest.mark.integration

DOCK = {"width": 350, "height": 700}  # OBS docks are 300-450 px wide
NOIR = "film noir, black and white"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("dock-server"), processor="filter") as srv:
        yield srv


def colourfulness(jpeg: bytes) -> float:
    """How far the picture is from grey: the mean spread between its colour channels."""
    rgb = simplejpeg.decode_jpeg(jpeg, colorspace="RGB").astype(int)
    return float((rgb.max(-1) - rgb.min(-1)).mean())


def wait_until(condition, timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_dock_fits_350_px_without_horizontal_scroll(browser, server):
    errors: list[str] = []
    with (
        FramePusher(server.ws, "fit", gradient_jpeg((640, 360)), fps=10),
        open_page(browser, f"{server.http}/dock/fit", DOCK, errors) as page,
    ):
        wait_for_frames(page, "#preview", at_least=3)
        page.wait_for_function("() => document.querySelector('#state').textContent === 'live'")
        assert page.evaluate("document.documentElement.scrollWidth") <= DOCK["width"]
        assert page.evaluate("document.body.scrollWidth") <= DOCK["width"]
        for selector in ("#state", "#fps", "#latency", "#preview", "#prompt", "#presets", "#strength", "#processor"):
            box = page.locator(selector).bounding_box()
            assert page.locator(selector).is_visible(), selector
            assert box["x"] >= 0 and box["x"] + box["width"] <= DOCK["width"], (selector, box)
            assert box["y"] + box["height"] <= DOCK["height"], f"{selector} needs scrolling at 350x700"
        for button in page.locator("#presets button").all():
            box = button.bounding_box()
            assert box["x"] + box["width"] <= DOCK["width"], button.inner_text()
        page.wait_for_function("() => parseFloat(document.querySelector('#fps').textContent) > 0")
        page.wait_for_function("() => /^[0-9]+$/.test(document.querySelector('#latency').textContent)")
        options = page.locator("#processor option")
        assert options.evaluate_all("els => els.map(o => o.value)") == ["filter", "standard", "lightning"]
        # this CPU server cannot run the diffusion processors: greyed out, with the reason
        assert options.evaluate_all("els => els.map(o => o.disabled)") == [False, True, True]
        assert "needs a CUDA GPU" in page.inner_text("#processor")
    assert not errors, errors


def test_a_change_in_the_dock_reaches_the_stream(browser, server):
    viewer = ViewerThread(f"{server.ws}/ws/viewer/dock1?format=binary")
    with FramePusher(server.ws, "dock1", gradient_jpeg((512, 384)), fps=10):
        viewer.start()
        try:
            wait_until(lambda: len(viewer.frames) >= 3, what="styled frames before the change")
            before = colourfulness(viewer.frames[-1])
            with open_page(browser, f"{server.http}/dock/dock1", DOCK) as page:
                wait_for_frames(page, "#preview", at_least=3)
                page.fill("#strength", "1")
                page.click(f"#presets button[data-prompt='{NOIR}']")
                wait_until(
                    lambda: any(
                        s["config"]["prompt"] == NOIR and s["config"]["strength"] == 1.0 for s in viewer.statuses
                    ),
                    what="the viewer to see the dock's config",
                )
                seen = len(viewer.frames)
                wait_until(lambda: len(viewer.frames) >= seen + 5, what="frames styled with the new config")
                after = colourfulness(viewer.frames[-1])
                page.wait_for_function("() => document.querySelector('#messages').textContent.includes('film noir')")
                assert page.get_attribute(f"#presets button[data-prompt='{NOIR}']", "aria-pressed") == "true"
        finally:
            viewer.stop.set()
            viewer.join(5)
    assert before > 40, before  # the painterly default keeps the colours
    assert after < 8, after  # noir at full strength: grey


def test_the_dock_follows_changes_made_elsewhere(browser, server):
    with (
        FramePusher(server.ws, "follow", gradient_jpeg((320, 240)), fps=10),
        open_page(browser, f"{server.http}/dock/follow", DOCK) as page,
    ):
        page.wait_for_function("() => document.querySelector('#state').textContent === 'live'")
        body = json.dumps({"prompt": "pencil sketch", "strength": 0.35}).encode()
        request = urllib.request.Request(f"{server.http}/api/streams/follow/config", body, method="POST",
                                         headers={"Content-Type": "application/json"})  # a form type gets 415
        urllib.request.urlopen(request, timeout=5).close()
        page.wait_for_function("() => document.querySelector('#prompt').value === 'pencil sketch'")
        assert page.input_value("#strength") == "0.35"
        assert stream_summary(server, "follow")["config"]["prompt"] == "pencil sketch"


def test_dock_key_and_token_handling(tmp_path, browser):
    env = {"DREAMSTREAM_STREAM_KEYS": "keyed:right-key", "DREAMSTREAM_VIEWER_TOKEN": "watch-me"}
    with (
        running_server(tmp_path, processor="filter", env=env) as srv,
        FramePusher(srv.ws, "keyed", gradient_jpeg((320, 240)), fps=10, key="right-key"),
    ):
        # no token: the dock says so where the eye is, instead of "connecting…" forever
        with open_page(browser, f"{srv.http}/dock/keyed", DOCK) as page:
            page.wait_for_function("() => document.querySelector('#state').textContent === 'refused'")
            alert = page.inner_text("#alerts")
            assert "missing or wrong viewer token" in alert and "Viewer token" in alert
            assert page.get_attribute("#stream-key", "placeholder") == "required here"
            page.fill("#viewer-token", "watch-me")
            page.dispatch_event("#viewer-token", "change")
            wait_for_frames(page, "#preview", at_least=3)
            # no key: the change is refused and the dock says what to do; the stream keeps its prompt
            page.click("#presets button[data-prompt='pencil sketch']")
            page.wait_for_function("() => document.querySelector('#alerts').textContent.includes('stream key')")
            assert "Stream key field" in page.inner_text("#alerts")
            assert page.input_value("#prompt") != "pencil sketch"

        # token and key in the URL (as pasted into OBS's dock settings): it works, and nothing asks for them
        url = f"{srv.http}/dock/keyed?token=watch-me&key={quote('right-key')}"
        viewer = ViewerThread(f"{srv.ws}/ws/viewer/keyed?format=binary&token=watch-me")
        viewer.start()
        try:
            with open_page(browser, url, DOCK) as page:
                wait_for_frames(page, "#preview", at_least=3)
                assert page.locator("#stream-key").count() == 0 and page.locator("#viewer-token").count() == 0
                page.click("#presets button[data-prompt='pencil sketch']")
                wait_until(
                    lambda: any(s["config"]["prompt"] == "pencil sketch" for s in viewer.statuses),
                    what="the keyed change to reach the stream",
                )
                assert page.locator("#alerts .alert").count() == 0
        finally:
            viewer.stop.set()
            viewer.join(5)


def test_dock_values_are_inert_and_bad_ids_refused(browser, server):
    hostile = "</script><script>window.pwned=1</script>"
    with open_page(browser, f"{server.http}/dock/safe?token={quote(hostile)}&key={quote(hostile)}", DOCK) as page:
        page.wait_for_function("() => document.querySelector('#state').textContent !== 'connecting'")
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert page.locator("script").count() == 2  # the config block and dock.js, nothing injected
        assert page.evaluate("JSON.parse(document.getElementById('page-config').textContent).key") == hostile
    with open_page(browser, f"{server.http}/dock/bad%20id", DOCK) as page:
        assert "stream id must be 1-64" in page.text_content("#error-message")
    big = "k" * 600
    with open_page(browser, f"{server.http}/dock/x?key={big}", DOCK) as page:
        assert "key must be at most 512 characters" in page.text_content("#error-message")
