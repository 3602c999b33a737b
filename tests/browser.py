"""Headless Chromium for the page tests (and docs/make_screenshots.py), plus a Python broadcaster and viewer.

Chromium is Debian's `/usr/bin/chromium` (apt: chromium chromium-driver fonts-dejavu-core), driven by
Playwright; `playwright install` is never needed. `DREAMSTREAM_CHROMIUM` points at another binary.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.sync.client import connect

from tests.helpers import require_or_skip

CHROMIUM = os.environ.get("DREAMSTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# a fake camera (a moving test pattern) that needs no permission prompt
CHROMIUM_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--no-sandbox"]
FULL_HD = {"width": 1920, "height": 1080}
# Playwright starts Chromium with these, which a user's browser does not have: they keep a background
# tab's timers and renderer at full speed. A test about background tabs must run without them, or it
# could not fail.
KEEP_BACKGROUND_AWAKE = [
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
]


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver fonts-dejavu-core)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


@contextlib.contextmanager
def launch_chromium(extra_args: list[str] | None = None, like_a_user: bool = False) -> Iterator[object]:
    """A headless Chromium Browser (playwright.sync_api.Browser).

    `like_a_user`: without Playwright's switches that keep background tabs awake (KEEP_BACKGROUND_AWAKE),
    so a tab behind another one is slowed down as in the browser a streamer uses."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        args = [*CHROMIUM_ARGS, *(extra_args or [])]
        ignore = KEEP_BACKGROUND_AWAKE if like_a_user else None
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True, ignore_default_args=ignore)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[object]:
    """The `browser` fixture (import `browser_fixture` to use it): one Chromium per test module.

    Per module, not per session: a fixture imported into two modules is two fixtures, and two
    Playwright sessions cannot run at once in one thread.

    Skips, or fails under DREAMSTREAM_REQUIRE_INTEGRATION=1, when Chromium or Playwright is missing.
    """
    why = chromium_missing()
    require_or_skip(why is None, why or "")
    with launch_chromium() as b:
        yield b


@pytest.fixture(scope="module", name="browser")
def user_browser_fixture() -> Iterator[object]:
    """The `browser` fixture as a streamer's Chromium: a tab behind another is slowed down (`like_a_user`)."""
    why = chromium_missing()
    require_or_skip(why is None, why or "")
    with launch_chromium(like_a_user=True) as b:
        yield b


@contextlib.contextmanager
def open_page(
    browser, url: str, viewport: dict[str, int] | None = None, errors: list[str] | None = None, init_script: str = ""
):
    """A fresh page (its own context) at `url`; JS errors and console errors go to `errors`.

    `init_script` runs before the page's own scripts (e.g. to take an API away and test a fallback)."""
    context = browser.new_context(viewport=viewport or FULL_HD, device_scale_factor=1, accept_downloads=True)
    page = context.new_page()
    if init_script:
        page.add_init_script(init_script)
    if errors is not None:
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and errors.append(f"console: {msg.text}"))
    try:
        page.goto(url)
        yield page
    finally:
        context.close()


@contextlib.contextmanager
def healthz_processors(page, processors: dict[str, dict]) -> Iterator[dict[str, dict]]:
    """The page's /healthz answers with `processors` (SPEC §7's block) in place of the server's own; the rest
    is the server's. Change the dict to change what the page is told next."""
    from playwright.sync_api import Error as PlaywrightError

    def handle(route) -> None:
        try:
            health = json.loads(route.fetch().text())
            route.fulfill(json={**health, "processors": processors})
        except PlaywrightError:
            pass  # the page went away during the request

    page.route("**/healthz", handle)
    try:
        yield processors
    finally:
        page.unroute_all(behavior="ignoreErrors")


def wait_for_frames(page, selector: str = "#frame", at_least: int = 1, timeout_ms: int = 15_000) -> int:
    """Wait until the page has drawn `at_least` frames into the canvas (its data-frames counter)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([sel, n]) => { const el = document.querySelector(sel); return el && Number(el.dataset.frames) >= n; }",
            arg=[selector, at_least],
            timeout=timeout_ms,
        )
    except PlaywrightTimeout:
        raise AssertionError(
            f"{selector}: fewer than {at_least} frames drawn; page state: {page_state(page)}"
        ) from None
    return frames_drawn(page, selector)


def page_state(page) -> object:
    """What the page's stream views know (sockets, stream state, frame counts), for failure messages."""
    return page.evaluate(
        """() => {
        const ds = window.dreamstream || {};
        const views = ds.views || {main: ds.view || ds.preview};
        const out = {};
        for (const [name, v] of Object.entries(views)) {
          if (!v) continue;
          const s = v.feed.socket;
          out[name] = {link: s.link, lastClose: s.lastClose, reconnects: s.reconnects, state: v.state,
                       received: v.feed.received, decoded: v.feed.decoded, drawn: v.frames, active: v.active};
        }
        return out;
      }"""
    )


def frames_drawn(page, selector: str = "#frame") -> int:
    return int(page.eval_on_selector(selector, "el => Number(el.dataset.frames)"))


def screenshot_rgba(page, **kwargs) -> np.ndarray:
    """The page as an (H, W, 4) uint8 array; transparent where nothing was drawn."""
    from PIL import Image

    png = page.screenshot(omit_background=True, **kwargs)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


class FramePusher:
    """A Python broadcaster: sends `frame` (JPEG bytes, changeable) to a stream at `fps` in a thread.

    It reconnects on its own, like the OBS companion does, so it survives a server restart.
    """

    def __init__(self, ws_base: str, stream_id: str, frame: bytes, fps: float = 15.0, key: str = "") -> None:
        self.url = f"{ws_base}/ws/broadcaster/{stream_id}" + (f"?key={key}" if key else "")
        self.frame = frame
        self.fps = fps
        self.sent = 0
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pusher-{stream_id}", daemon=True)

    def __enter__(self) -> FramePusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.url, open_timeout=5, max_size=None) as ws:
                    self.connections += 1
                    while not self._stop.is_set():
                        ws.send(self.frame)
                        self.sent += 1
                        with contextlib.suppress(TimeoutError):
                            while True:  # drain ready/stats so the server's outbox never fills
                                ws.recv(timeout=0)
                        time.sleep(1.0 / self.fps)
            except Exception:  # server gone or restarting: try again shortly
                self._stop.wait(0.3)


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
