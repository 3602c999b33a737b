"""The OBS companion against a REAL OBS Studio (headless, Xvfb) and a REAL DreamStream server.

What a user sees is what is asserted: the frames a viewer receives (their colour, their layout),
the messages the companion prints, its exit code, and that secrets never show up in its output.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from websockets.sync.client import connect

from obs_plugin.capture import Mailbox
from obs_plugin.obs_client import CLOSE_SESSION_INVALIDATED, ObsSessionKicked, ObsUnavailable, _closed_error
from obs_plugin.overlay import overlay_url, redact
from obs_plugin.server_link import broadcaster_url
from obs_plugin.status import Frame, Stats
from tests.helpers import running_server
from tests.obs_harness import PASSWORD, Obs, companion, running_obs

BROADCAST_KEY = "bk-5ecret-91"
RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 200, 40), (20, 40, 230), (240, 220, 20)


# --- a real OBS and a real server, shared by the tests that only read from them ---------------------

@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("obs-home")
    with running_obs(home) as obs:
        obs.color_scene("Cam", RED, "Cam colour")
        picture = home / "halves.png"
        halves = np.zeros((720, 1280, 3), np.uint8)
        halves[:, :640] = BLUE
        halves[:, 640:] = YELLOW
        Image.fromarray(halves).save(picture)
        obs.image_scene("Picture", picture, "Halves image")
        # "Show" holds the camera scene and, one scene deeper, something named like our overlay
        obs.color_scene("Deco", GREEN, "DreamStream Overlay")
        obs.color_scene("Show", BLUE, "Show backdrop")
        obs.nest("Show", "Cam")
        obs.nest("Show", "Deco")
        obs.color_scene("Studio B", GREEN, "Studio B colour")
        yield obs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    env = {"DREAMSTREAM_BROADCAST_KEY": BROADCAST_KEY}
    with running_server(tmp_path_factory.mktemp("server"), "filter", env=env) as srv:
        yield srv


def obs_args(obs: Obs, *extra: str) -> list[str]:
    return ["--obs-port", str(obs.port), *extra]


def viewer_frames(url: str, timeout: float = 20.0):
    """Yield the JPEG frames a `format=binary` viewer receives, as RGB arrays, until `timeout`."""
    deadline = time.monotonic() + timeout
    with connect(url, open_timeout=5, max_size=None, proxy=None) as ws:
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = ws.recv(timeout=left)
            except TimeoutError:
                return
            if isinstance(message, bytes):
                yield simplejpeg.decode_jpeg(message, colorspace="RGB")


def wait_for_colour(url: str, rgb: tuple[int, int, int], timeout: float = 20.0) -> np.ndarray:
    """The first frame whose mean colour is within 30 per channel of `rgb` (stale frames may come first)."""
    seen = []
    for frame in viewer_frames(url, timeout):
        mean = frame.reshape(-1, 3).mean(0)
        if np.abs(mean - rgb).max() < 30:
            return frame
        seen.append(mean.round().tolist())
    raise AssertionError(f"no frame of colour {rgb} within {timeout} s; mean colours seen: {seen[-5:]}")


def viewer_url(server, stream: str, source: str = "original") -> str:
    return f"{server.ws}/ws/viewer/{stream}?source={source}&format=binary"


def assert_no_secrets(text: str) -> None:
    assert PASSWORD not in text
    assert BROADCAST_KEY not in text


# --- streaming ----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_streams_a_colour_source_and_follows_changes_live(tmp_path, obs, server):
    args = obs_args(obs, "--source", "Cam", "--stream", "obs-colour", "--server", server.ws, "--key", BROADCAST_KEY)
    with companion(tmp_path, args) as comp:
        comp.wait_for("capturing scene 'Cam' at 15 fps, 512 px wide")
        frame = wait_for_colour(viewer_url(server, "obs-colour"), RED)
        assert frame.shape[:2] == (288, 512), "512 px wide, the canvas's 16:9 kept"

        obs.set_color("Cam colour", GREEN)
        wait_for_colour(viewer_url(server, "obs-colour"), GREEN, timeout=10)

        styled = next(viewer_frames(viewer_url(server, "obs-colour", "styled"), timeout=10), None)
        assert styled is not None, "the filter processor's output reached a styled viewer"

        at = comp.wait_for("status: OBS: capturing | capture ")
        comp.wait_for("audio sync offset +", after=at)
        comp.wait_for("Sync Offset (Edit > Advanced Audio Properties)")
        assert comp.stop() == 0
    out = comp.output()
    assert "server ready for stream 'obs-colour'" in out
    assert_no_secrets(out)


@pytest.mark.integration
def test_streams_an_image_source_keeping_its_layout(tmp_path, obs, server):
    args = obs_args(obs, "--source", "Picture", "--stream", "obs-picture", "--server", server.ws,
                    "--key", BROADCAST_KEY, "--width", "320", "--fps", "10")
    with companion(tmp_path, args) as comp:
        comp.wait_for("capturing scene 'Picture' at 10 fps, 320 px wide")
        frame = next(viewer_frames(viewer_url(server, "obs-picture")), None)
        assert frame is not None, comp.output()
        assert frame.shape[:2] == (180, 320)
        left, right = frame[:, 20:140].reshape(-1, 3).mean(0), frame[:, 180:300].reshape(-1, 3).mean(0)
        assert np.abs(left - BLUE).max() < 30, left
        assert np.abs(right - YELLOW).max() < 30, right


# --- configuration errors end at once, with a message that says what to do -----------------------------

def run_to_exit(tmp_path: Path, args: list[str], password: str | None = PASSWORD, timeout: float = 15.0):
    started = time.monotonic()
    with companion(tmp_path, args, password=password) as comp:
        code = comp.wait_exit(timeout)
    return code, comp.output(), time.monotonic() - started


@pytest.mark.integration
def test_wrong_password_is_a_clear_error(tmp_path, obs, server):
    code, out, took = run_to_exit(tmp_path, obs_args(obs, "--source", "Cam", "--stream", "s", "--server", server.ws),
                                  password="not-the-password")
    assert code == 2 and took < 10, out
    assert "refused the password" in out and "OBS_PASSWORD" in out
    assert "not-the-password" not in out


@pytest.mark.integration
def test_missing_password_is_a_clear_error(tmp_path, obs, server):
    code, out, _ = run_to_exit(tmp_path, obs_args(obs, "--source", "Cam", "--stream", "s", "--server", server.ws),
                               password=None)
    assert code == 2, out
    assert "requires a password: set OBS_PASSWORD" in out


@pytest.mark.integration
def test_missing_source_lists_what_exists(tmp_path, obs, server):
    code, out, took = run_to_exit(tmp_path, obs_args(obs, "--source", "Camera 2", "--stream", "s",
                                                     "--server", server.ws))
    assert code == 2 and took < 10, out
    assert "OBS has no scene or input named 'Camera 2'" in out
    for name in ("'Cam'", "'Picture'", "'Show'", "'Cam colour'", "'Halves image'"):
        assert name in out
    assert "server ready" not in out, "a companion that is about to stop must not take the stream over"


@pytest.mark.integration
def test_feedback_loop_is_refused_even_in_nested_scenes(tmp_path, obs, server):
    code, out, _ = run_to_exit(tmp_path, obs_args(obs, "--source", "Show", "--stream", "s", "--server", server.ws))
    assert code == 2, out
    assert "refusing to capture 'Show'" in out and "feedback loop" in out
    assert "'Show' > 'Deco' > 'DreamStream Overlay'" in out


@pytest.mark.integration
def test_overlay_added_while_capturing_stops_the_loop(tmp_path, obs, server):
    args = obs_args(obs, "--source", "Studio B", "--stream", "obs-b", "--server", server.ws, "--key", BROADCAST_KEY)
    with companion(tmp_path, args) as comp:
        comp.wait_for("status: OBS: capturing")
        obs.nest("Studio B", "Deco")  # the user drops the overlay's scene into the captured one
        assert comp.wait_exit(15) == 2
    assert "refusing to capture 'Studio B'" in comp.output() and "feedback loop" in comp.output()


@pytest.mark.integration
def test_install_overlay_reports_that_this_obs_has_no_browser_source(tmp_path, obs, server):
    code, out, _ = run_to_exit(tmp_path, obs_args(obs, "--source", "Cam", "--stream", "s", "--server", server.ws,
                                                  "--install-overlay", "--overlay-scene", "Show"))
    assert code == 2, out
    assert "this OBS has no Browser Source" in out and "browser_source" in out
    assert "obsproject.com" in out and "obs-browser" in out
    with obs.client() as c:
        inputs = [i["inputName"] for i in c.send("GetInputList", raw=True)["inputs"]]
    assert not [name for name in inputs if name.startswith("DreamStream") and name != "DreamStream Overlay"]


@pytest.mark.integration
def test_refused_stream_key_is_a_clear_error(tmp_path, obs, server):
    code, out, _ = run_to_exit(tmp_path, obs_args(obs, "--source", "Cam", "--stream", "s", "--server", server.ws,
                                                  "--key", "wrong-key-123"))
    assert code == 2, out
    assert "the server refused the broadcaster socket" in out and "--key" in out
    assert "wrong-key-123" not in out


@pytest.mark.integration
def test_a_second_broadcaster_takes_over_and_the_first_stops(tmp_path, obs, server):
    args = obs_args(obs, "--source", "Cam", "--stream", "obs-dup", "--server", server.ws, "--key", BROADCAST_KEY)
    with companion(tmp_path, args, name="first") as first:
        first.wait_for("server ready for stream 'obs-dup'")
        with companion(tmp_path, args, name="second") as second:
            second.wait_for("server ready for stream 'obs-dup'")
            assert first.wait_exit(10) == 3
            assert second.proc.poll() is None, "the newer one keeps streaming"
    assert "another broadcaster took over this stream" in first.output()


def test_bad_stream_id_is_refused_before_connecting(tmp_path):
    code, out, _ = run_to_exit(tmp_path, ["--source", "Cam", "--stream", "no spaces please"])
    assert code == 2 and "not a valid stream id" in out


# --- resilience: OBS not there yet, OBS crashing, the server restarting -----------------------------------

@pytest.mark.integration
def test_waits_for_obs_and_survives_obs_and_server_restarts(tmp_path):
    with running_obs(tmp_path / "obs-home") as obs2, running_server(tmp_path, "filter") as srv:
        obs2.color_scene("Cam", RED, "Cam colour")
        obs2.stop()  # saves the scene collection; the companion starts while OBS is away
        with companion(tmp_path, obs_args(obs2, "--source", "Cam", "--stream", "survivor", "--server", srv.ws)) as comp:
            at = comp.wait_for("waiting for OBS: cannot reach OBS")
            obs2.start()
            at = comp.wait_for("capturing scene 'Cam'", after=at)
            wait_for_colour(viewer_url(srv, "survivor"), RED)

            obs2.kill()  # a crash: SIGKILL
            at = comp.wait_for("reconnecting to OBS", after=at)
            obs2.start()
            at = comp.wait_for("connected to OBS", after=at)
            obs2.set_color("Cam colour", BLUE)
            wait_for_colour(viewer_url(srv, "survivor"), BLUE)

            srv.restart()
            at = comp.wait_for("lost the server connection", after=at)
            comp.wait_for("connected to the server", after=at)
            wait_for_colour(viewer_url(srv, "survivor"), BLUE)
            assert comp.proc.poll() is None
            assert comp.stop() == 0
        assert PASSWORD not in comp.output()


# --- small parts, no OBS needed -----------------------------------------------------------------------------

def test_a_session_kicked_by_obs_is_not_retried():
    kicked = _closed_error(CLOSE_SESSION_INVALIDATED.to_bytes(2, "big") + b"kicked", "ws://127.0.0.1:4455")
    assert isinstance(kicked, ObsSessionKicked) and "not reconnecting" in str(kicked)
    assert isinstance(_closed_error(b"", "ws://127.0.0.1:4455"), ObsUnavailable)


def test_urls_and_redaction():
    assert overlay_url("ws://127.0.0.1:8000", "s1") == "http://127.0.0.1:8000/overlay/s1"
    assert overlay_url("wss://ds.example/", "s1", "t&k") == "https://ds.example/overlay/s1?token=t%26k"
    assert redact("https://ds.example/overlay/s1?token=abc") == "https://ds.example/overlay/s1?token=***"
    assert broadcaster_url("http://h:1", "s", "k y") == ("ws://h:1/ws/broadcaster/s?key=k%20y", "ws://h:1/ws/broadcaster/s")


def test_mailbox_hands_out_only_the_newest_frame():
    async def scenario() -> tuple[bytes, int]:
        stats = Stats()
        box = Mailbox(stats)
        box.bind(asyncio.get_running_loop())
        for i in range(3):
            box.put(Frame(bytes([i]), time.monotonic(), 1.0))
        frame = await asyncio.wait_for(box.get(), 1)
        return frame.data, stats.replaced

    assert asyncio.run(scenario()) == (b"\x02", 2)
