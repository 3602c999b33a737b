"""The OBS overlay pages in a real headless Chromium, against a real server with real sockets.

Frames come from a Python broadcaster through the `identity` processor, so a frame's colour reaches
the page untouched and a screenshot (transparent background kept) shows exactly where it landed.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from urllib.parse import quote

import numpy as np
import pytest

from tests.browser import (
    FramePusher,
    browser_fixture,  # noqa: F401  (the `browser` fixture)
    frames_drawn,
    healthz_processors,
    open_page,
    screenshot_rgba,
    wait_for_frames,
)
from tests.helpers import running_server, solid_jpeg

pytestmark = pytest.mark.integration

RED = (220, 40, 40)
BLUE = (30, 60, 210)
TOLERANCE = 14  # JPEG moves a flat colour by a few levels
HOSTILE = "</script><script>window.pwned=1</script>"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("overlay-server"), processor="identity") as srv:
        yield srv


def near(pixel: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return pixel[3] == 255 and bool(np.all(np.abs(pixel[:3].astype(int) - rgb) <= TOLERANCE))


def show_colour(
    page, rgb: tuple[int, int, int], at: tuple[int, int] = (960, 540), timeout_s: float = 10.0
) -> np.ndarray:
    """Screenshot until the pixel `at` (x, y) shows `rgb`, i.e. the newest frame has been drawn."""
    deadline = time.monotonic() + timeout_s
    while True:
        img = screenshot_rgba(page)
        if near(img[at[1], at[0]], rgb) or time.monotonic() > deadline:
            return img
        time.sleep(0.2)


def test_contain_pillarboxes_a_square_frame_on_a_transparent_page(browser, server):
    errors: list[str] = []
    with (
        FramePusher(server.ws, "contain", solid_jpeg(RED, (512, 512))),
        open_page(browser, f"{server.http}/overlay/contain?fit=contain", errors=errors) as page,
    ):
        wait_for_frames(page, at_least=3)
        img = show_colour(page, RED)
        assert page.locator("#hud").count() == 0  # no HUD without debug=1
    # a 512x512 frame in 1920x1080: 1080x1080 in the middle, columns 420..1499
    assert near(img[540, 960], RED)
    for y in (5, 540, 1074):
        for x in (425, 960, 1494):
            assert near(img[y, x], RED), (x, y, img[y, x])
    assert np.all(img[:, :410, 3] == 0), "left pillar must be transparent"
    assert np.all(img[:, 1510:, 3] == 0), "right pillar must be transparent"
    assert not errors, errors


@pytest.mark.parametrize("fit", ["cover", "fill"])
def test_cover_and_fill_fill_the_whole_source(browser, server, fit):
    with (
        FramePusher(server.ws, f"fill-{fit}", solid_jpeg(BLUE, (512, 512))),
        open_page(browser, f"{server.http}/overlay/fill-{fit}?fit={fit}") as page,
    ):
        wait_for_frames(page, at_least=3)
        img = show_colour(page, BLUE)
    assert np.all(img[:, :, 3] == 255), "every pixel opaque"
    for y in (0, 540, 1079):
        for x in (0, 960, 1919):
            assert near(img[y, x], BLUE), (x, y, img[y, x])


def test_nothing_shows_until_live_and_a_restarted_stream_comes_back_without_reload(browser, server):
    with open_page(browser, f"{server.http}/overlay/comeback?fade=200") as page:
        page.wait_for_function("() => document.querySelector('#frame').dataset.state === 'waiting'")
        assert np.all(screenshot_rgba(page)[:, :, 3] == 0), "waiting: the page must be fully transparent"

        with FramePusher(server.ws, "comeback", solid_jpeg(RED, (640, 360))):
            wait_for_frames(page, at_least=3)
            assert near(show_colour(page, RED)[540, 960], RED)

        page.wait_for_function("() => document.querySelector('#frame').dataset.state === 'offline'")
        page.wait_for_function("() => !document.querySelector('#frame').classList.contains('showing')")
        time.sleep(0.4)  # the 200 ms fade-out
        assert np.all(screenshot_rgba(page)[:, :, 3] == 0), "offline: the last frame must disappear"

        before = frames_drawn(page)
        with FramePusher(server.ws, "comeback", solid_jpeg(BLUE, (640, 360))):
            wait_for_frames(page, at_least=before + 3)
            assert near(show_colour(page, BLUE)[540, 960], BLUE)


def test_debug_hud_shows_state_fps_and_latency(browser, server):
    with (
        FramePusher(server.ws, "hud", solid_jpeg(RED, (320, 240)), fps=20),
        open_page(browser, f"{server.http}/overlay/hud?debug=1&fit=contain") as page,
    ):
        wait_for_frames(page, at_least=10)
        page.wait_for_function("() => parseFloat(document.querySelector('[data-hud=fps]').textContent) > 0")
        hud = page.locator("#hud")
        assert hud.is_visible()
        assert page.text_content("[data-hud=state]") == "live"
        assert float(page.text_content("[data-hud=fps]")) > 3
        assert page.text_content("[data-hud=latency]").endswith(" ms")
        assert page.text_content("[data-hud=size]").startswith("320×240")
        assert page.text_content("[data-hud=reconnects]") == "0"


def test_debug_hud_shows_the_streams_processor_and_its_loading_progress(browser, server):
    with (
        FramePusher(server.ws, "hud-proc", solid_jpeg(RED, (320, 240)), fps=10),
        open_page(browser, "about:blank") as page,
        healthz_processors(page, {"identity": {"state": "ready", "progress": 1.0}}) as processors,
    ):
        page.goto(f"{server.http}/overlay/hud-proc?debug=1")
        page.wait_for_function("() => document.querySelector('[data-hud=processor]').textContent === 'identity'")
        processors["identity"] = {"state": "loading", "progress": 0.5, "reason": "compiling"}
        page.wait_for_function(
            "() => document.querySelector('[data-hud=processor]').textContent === 'loading identity… 50 %'",
            timeout=10_000,
        )


def test_page_reconnects_after_a_server_restart(tmp_path, browser):
    with (
        running_server(tmp_path, processor="identity") as srv,
        FramePusher(srv.ws, "restart", solid_jpeg(RED, (512, 288))) as pusher,
        open_page(browser, f"{srv.http}/overlay/restart?debug=1") as page,
    ):
        wait_for_frames(page, at_least=3)
        assert near(show_colour(page, RED)[540, 960], RED)
        page.wait_for_function("() => document.querySelector('[data-hud=latency]').textContent.endsWith(' ms')")
        srv.stop()
        # while it reconnects, the HUD shows no latency from before (it would look live when it is not)
        page.wait_for_function("() => document.querySelector('[data-hud=state]').textContent.includes('reconnecting')")
        assert page.text_content("[data-hud=latency]") == "–"
        assert page.text_content("[data-hud=server]") == "–"
        srv.start()  # same port; the pusher and the page must both find it again
        pusher.frame = solid_jpeg(BLUE, (512, 288))
        page.wait_for_function("() => window.dreamstream.view.feed.socket.reconnects >= 1", timeout=20_000)
        before = frames_drawn(page)
        wait_for_frames(page, at_least=before + 3, timeout_ms=20_000)
        assert near(show_colour(page, BLUE)[540, 960], BLUE)
        assert int(page.text_content("[data-hud=reconnects]")) >= 1
        assert page.text_content("[data-hud=state]") == "live"


def test_obs_inactive_source_pauses_drawing(browser, server):
    with (
        FramePusher(server.ws, "obs", solid_jpeg(RED, (256, 256)), fps=20),
        open_page(browser, f"{server.http}/overlay/obs") as page,
    ):
        wait_for_frames(page, at_least=3)
        fire = "a => window.dispatchEvent(new CustomEvent('obsSourceActiveChanged', {detail: {active: a}}))"
        page.evaluate(fire, False)
        time.sleep(0.2)
        paused_at = frames_drawn(page)
        time.sleep(0.8)
        assert frames_drawn(page) == paused_at, "no drawing while the source is inactive"
        page.evaluate(fire, True)
        wait_for_frames(page, at_least=paused_at + 3)


def test_compare_shows_original_and_styled_side_by_side(browser, server):
    with (
        FramePusher(server.ws, "cmp", solid_jpeg(RED, (512, 512))),
        open_page(browser, f"{server.http}/overlay/cmp/compare") as page,
    ):
        wait_for_frames(page, "#original", at_least=3)
        wait_for_frames(page, "#styled", at_least=3)
        labels = page.locator("figcaption.label")
        assert [t.split()[0] for t in labels.all_inner_texts()] == ["original", "styled"]
        left = page.locator("#panel-original").bounding_box()
        right = page.locator("#panel-styled").bounding_box()
        assert left["x"] + left["width"] <= right["x"], "side by side, original on the left"
        centres = [(int(b["x"] + b["width"] / 2), int(b["y"] + b["height"] / 2)) for b in (left, right)]
        img = show_colour(page, RED, at=centres[0])
    for x, y in centres:
        assert near(img[y, x], RED), (x, y, img[y, x])


def test_viewer_page_shows_the_stream_and_its_state(browser, server):
    with open_page(browser, f"{server.http}/view/watch") as page:
        page.wait_for_function("() => document.querySelector('#state').textContent === 'waiting'")
        assert page.locator("#waiting").is_visible()
        with FramePusher(server.ws, "watch", solid_jpeg(BLUE, (640, 360))):
            wait_for_frames(page, at_least=5)
            page.wait_for_function("() => document.querySelector('#state').textContent === 'live'")
            page.wait_for_function("() => parseFloat(document.querySelector('#fps').textContent) > 0")
            assert page.locator("#waiting").is_hidden()
            assert near(show_colour(page, BLUE)[540, 960], BLUE)


def test_hostile_query_values_are_inert_and_the_token_passes_through(tmp_path, browser):
    # the viewer token itself is the hostile string: it must reach the socket byte for byte, and do nothing else
    env = {"DREAMSTREAM_VIEWER_TOKEN": HOSTILE}
    with (
        running_server(tmp_path, processor="identity", env=env) as srv,
        FramePusher(srv.ws, "safe", solid_jpeg(RED, (256, 256))),
    ):
        with open_page(browser, f"{srv.http}/overlay/safe?debug=1&token={quote(HOSTILE)}") as page:
            wait_for_frames(page, at_least=3)
            assert page.evaluate("typeof window.pwned") == "undefined"
            assert page.locator("script").count() == 2  # the config block and overlay.js, nothing injected
            config_token = "JSON.parse(document.getElementById('page-config').textContent).token"
            assert page.evaluate(config_token) == HOSTILE

        with open_page(browser, f"{srv.http}/overlay/safe?debug=1&token=wrong") as page:
            page.wait_for_function(
                "() => document.querySelector('[data-hud=state]').textContent.includes('wrong viewer token')",
                timeout=10_000,
            )
            assert frames_drawn(page) == 0

        hostile_fit = quote("<img src=x onerror=window.pwned=1>")
        with open_page(browser, f"{srv.http}/overlay/safe?fit={hostile_fit}&token={quote(HOSTILE)}") as page:
            assert "fit must be cover, contain or fill" in page.text_content("#error-message")
            assert page.locator("img").count() == 0
            time.sleep(0.2)
            assert page.evaluate("typeof window.pwned") == "undefined"


def _get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.mark.parametrize(
    ("path", "complaint"),
    [
        ("/overlay/x?fit=sideways", "fit must be cover, contain or fill"),
        ("/overlay/x?fade=soon", "fade must be a whole number"),
        ("/overlay/x?fade=99999", "fade must be a whole number"),
        ("/overlay/x?debug=maybe", "debug must be 1 or 0"),
        ("/overlay/bad%20id", "stream id must be 1-64"),
        ("/overlay/bad%20id/compare", "stream id must be 1-64"),
        ("/view/x?fit=%3Cb%3E", "fit must be cover, contain or fill"),
        ("/dock/bad%20id", "stream id must be 1-64"),
        ("/dock/x?token=" + "t" * 600, "token must be at most 512 characters"),
    ],
)
def test_bad_options_get_a_readable_400(server, path, complaint):
    status, headers, body = _get(server.http + path)
    assert status == 400
    assert complaint in body
    assert "<b>" not in body.split("<main", 1)[1]  # echoed values are escaped
    assert "script-src 'self'" in headers["content-security-policy"]


def test_pages_send_a_strict_content_security_policy(server):
    for path in ("/", "/view/x", "/overlay/x?fit=contain&fade=250&debug=1", "/overlay/x/compare", "/dock/x?key=k"):
        status, headers, body = _get(server.http + path)
        assert status == 200, path
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["referrer-policy"] == "no-referrer"
        assert 'id="page-config"' in body
