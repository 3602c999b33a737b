"""The OBS companion against a REAL OBS Studio (headless, Xvfb) and a REAL DreamStream server.

What a user sees is what is asserted: the frames a viewer receives (their colour, their layout),
the messages the companion prints, its exit code, and that secrets never show up in its output.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from websockets.sync.client import connect

from obs_plugin.audio_sync import next_offset
from obs_plugin.capture import Mailbox
from obs_plugin.obs_client import CLOSE_SESSION_INVALIDATED, ObsSessionKicked, ObsUnavailable, _closed_error
from obs_plugin.overlay import overlay_url, redact
from obs_plugin.server_link import broadcaster_url, http_base
from obs_plugin.status import Frame, Snapshot, Stats
from tests.helpers import free_port, running_server
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
        obs.audio_input("Audio", "Mic")
        yield obs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    env = {"DREAMSTREAM_BROADCAST_KEY": BROADCAST_KEY}
    with running_server(tmp_path_factory.mktemp("server"), "filter", env=env) as srv:
        yield srv


def obs_args(obs: Obs, *extra: str) -> list[str]:
    return ["--obs-port", str(obs.port), *extra]


def keyed(obs: Obs, server, *extra: str) -> list[str]:
    """Flags for a companion the server accepts (the key is checked first), so OBS's own errors show."""
    return obs_args(obs, "--server", server.ws, "--key", BROADCAST_KEY, *extra)


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
        measured = comp.wait_for("audio sync offset +", after=at)
        advice = comp.wait_for("Sync Offset (Edit > Advanced Audio Properties)")
        assert comp.stop() == 0
    out = comp.output()
    assert measured < advice, "the advice comes once the latency is measured, with its number"
    assert out.count("Sync Offset (Edit > Advanced Audio Properties)") == 1
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
    code, out, took = run_to_exit(tmp_path, keyed(obs, server, "--source", "Cam", "--stream", "s"),
                                  password="not-the-password")
    assert code == 2 and took < 10, out
    assert "refused the password" in out and "OBS_PASSWORD" in out
    assert "not-the-password" not in out


@pytest.mark.integration
def test_missing_password_is_a_clear_error(tmp_path, obs, server):
    code, out, _ = run_to_exit(tmp_path, keyed(obs, server, "--source", "Cam", "--stream", "s"),
                               password=None)
    assert code == 2, out
    assert "requires a password: set OBS_PASSWORD" in out


@pytest.mark.integration
def test_missing_source_lists_what_exists(tmp_path, obs, server):
    code, out, took = run_to_exit(tmp_path, keyed(obs, server, "--source", "Camera 2", "--stream", "s"))
    assert code == 2 and took < 10, out
    assert "OBS has no scene or input named 'Camera 2'" in out
    for name in ("'Cam'", "'Picture'", "'Show'", "'Cam colour'", "'Halves image'"):
        assert name in out
    assert "server ready" not in out, "a companion that is about to stop must not take the stream over"


@pytest.mark.integration
def test_feedback_loop_is_refused_even_in_nested_scenes(tmp_path, obs, server):
    code, out, _ = run_to_exit(tmp_path, keyed(obs, server, "--source", "Show", "--stream", "s"))
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
    code, out, _ = run_to_exit(tmp_path, keyed(obs, server, "--source", "Cam", "--stream", "s",
                                                  "--install-overlay", "--overlay-scene", "Show"))
    assert code == 2, out
    assert "this OBS has no Browser Source" in out and "browser_source" in out
    assert "obsproject.com" in out and "obs-browser" in out
    with obs.client() as c:
        inputs = [i["inputName"] for i in c.send("GetInputList", raw=True)["inputs"]]
    assert not [name for name in inputs if name.startswith("DreamStream") and name != "DreamStream Overlay"]


@pytest.mark.integration
def test_refused_stream_key_is_a_clear_error_before_obs(tmp_path, obs, server):
    code, out, took = run_to_exit(tmp_path, obs_args(obs, "--source", "Cam", "--stream", "s", "--server", server.ws,
                                                     "--key", "wrong-key-123"))
    assert code == 2 and took < 10, out
    assert out.count("\n") == 1, f"one line:\n{out}"
    assert "refused stream 's': the stream key given with --key is wrong" in out
    assert "wrong-key-123" not in out
    assert "connected to OBS" not in out, "checked at start, before OBS"


@pytest.mark.integration
def test_missing_stream_key_is_a_clear_error_without_obs(tmp_path, server):
    code, out, _ = run_to_exit(tmp_path, ["--obs-port", str(free_port()), "--stream", "s", "--server", server.ws])
    assert code == 2, out
    assert out.count("\n") == 1 and "needs a stream key: pass --key" in out, out


@pytest.mark.integration
def test_status_is_printed_when_it_changes_not_every_second(tmp_path, server):
    """OBS is not running: one status line and one "waiting" line, however long it waits; no audio advice,
    since nothing is measured."""
    args = ["--obs-port", str(free_port()), "--stream", "idle", "--server", server.ws, "--key", BROADCAST_KEY]
    with companion(tmp_path, args) as comp:
        comp.wait_for("status: OBS: waiting")
        time.sleep(4.5)
        assert comp.stop() == 0
    out = comp.output()
    assert "is up and accepts stream 'idle' with this key" in out
    assert out.count("status: ") == 1, out
    assert out.count("waiting for OBS") == 1, out
    assert "Sync Offset" not in out and "audio sync offset +" not in out, out


def _fake_service(reply: bytes) -> int:
    """A port where something that is not OBS answers every connection with `reply`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.integration
@pytest.mark.parametrize("what", ["the DreamStream server", "an ssh server"])
def test_a_port_that_is_not_obs_is_a_one_line_error(tmp_path, server, what):
    port = server.port if what == "the DreamStream server" else _fake_service(b"SSH-2.0-OpenSSH_9.2\r\n")
    code, out, took = run_to_exit(tmp_path, ["--obs-port", str(port), "--stream", "s", "--server", server.ws,
                                             "--key", BROADCAST_KEY])
    assert code == 2 and took < 10, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"ws://127.0.0.1:{port} is not OBS's WebSocket server" in errors[0], out
    assert "--obs-port" in errors[0]
    assert ("HTTP 403" if what == "the DreamStream server" else "does not speak HTTP") in errors[0]
    assert "Exception" not in out and "-+-+-" not in out and "Traceback" not in out, out


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


# --- --sync-audio: OBS's audio sync offset follows the latency and is put back on exit ---------------------

SET_RE = re.compile(r"--sync-audio: 'Mic' audio sync offset set to \+(\d+) ms")


def wait_for_offset_set(comp, after: int = 0, timeout: float = 30.0) -> tuple[int, int]:
    """(the offset the companion logged it set, the output offset past that line)."""
    at = comp.wait_for("'Mic' audio sync offset set to", timeout=timeout, after=after)
    comp.wait_for(" ms)", after=at)  # the whole line is out
    match = SET_RE.search(comp.output(), after)
    assert match, comp.output()[-3000:]
    return int(match.group(1)), at


def offsets_set(comp) -> set[int]:
    return {int(ms) for ms in SET_RE.findall(comp.output())}


@pytest.mark.integration
@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sync_audio_keeps_the_offset_at_the_latency_and_restores_it(tmp_path, obs, server, stop_with):
    obs.set_audio_sync_offset("Mic", 2500)  # far above any latency here: it must change
    args = obs_args(obs, "--source", "Cam", "--stream", f"obs-sync-{stop_with.name}", "--server", server.ws,
                    "--key", BROADCAST_KEY, "--sync-audio", "Mic")
    with companion(tmp_path, args) as comp:
        comp.wait_for("'Mic' audio sync offset is +2500 ms now")
        measured, at = wait_for_offset_set(comp)
        assert 1 <= measured < 2000, measured
        in_obs = obs.audio_sync_offset("Mic")  # read before the log: the companion may set a newer value meanwhile
        assert in_obs in offsets_set(comp), "OBS shows the latency the companion measured and set"
        comp.wait_for("| audio sync offset +", after=at)  # the next status line (every few seconds)
        status = re.findall(r"audio sync offset \+(\d+) ms", comp.output())
        assert status, "the status line shows the measured offset too"
        assert "Sync Offset (Edit > Advanced Audio Properties)" not in comp.output(), "no hand advice: it is set"

        obs.set_audio_sync_offset("Mic", 4000)  # changed by hand (or by an old scene collection): put back
        again, _ = wait_for_offset_set(comp, after=at, timeout=10)
        assert 1 <= again < 2000
        assert obs.audio_sync_offset("Mic") in offsets_set(comp)

        comp.proc.send_signal(stop_with)  # Ctrl+C or a service manager's stop
        assert comp.wait_exit(15) == 0
    out = comp.output()
    assert "'Mic' audio sync offset restored to +2500 ms" in out, out[-3000:]
    assert obs.audio_sync_offset("Mic") == 2500, "the offset OBS had before"
    assert_no_secrets(out)


@pytest.mark.integration
@pytest.mark.parametrize("name, why", [("Microphone", "no input named 'Microphone'"),
                                       ("Cam colour", "no audio (so no sync offset) in 'Cam colour'")],
                         ids=["missing", "no-audio"])
def test_sync_audio_names_the_inputs_that_have_audio(tmp_path, obs, server, name, why):
    code, out, took = run_to_exit(tmp_path, obs_args(obs, "--source", "Cam", "--stream", "obs-sync-typo",
                                                     "--server", server.ws, "--key", BROADCAST_KEY,
                                                     "--sync-audio", name))
    assert code == 2 and took < 15, out
    assert f"--sync-audio: OBS has {why}. Inputs with audio: 'Mic'" in out, out
    assert "restored" not in out, "nothing was changed, so nothing is put back"


def test_sync_audio_moves_only_by_a_frame_or_more():
    frame_ms = 1000 / 15
    assert next_offset(0, None, frame_ms) is None, "nothing measured yet: leave it"
    assert next_offset(0, 180.4, frame_ms) == 180
    assert next_offset(180, 230.0, frame_ms) is None, "50 ms of drift is under one frame at 15 fps"
    assert next_offset(180, 250.0, frame_ms) == 250
    assert next_offset(250, 120.0, frame_ms) == 120, "down as well as up"
    assert next_offset(0, 99999.0, frame_ms) == 20000, "OBS's maximum"
    assert next_offset(500, -5.0, frame_ms) == 0


def test_status_changes_worth_a_line():
    base = Snapshot("capturing", "connected", 15.0, 120.0, 15.0, 1)
    frame_ms = 1000 / 15
    same = [Snapshot("capturing", "connected", 14.5, 150.0, 14.6, 1)]
    news = [Snapshot("waiting", "connected", 15.0, 120.0, 15.0, 1), Snapshot("capturing", "connected", 15.0, 120.0,
            15.0, 2), Snapshot("capturing", "connected", 10.0, 120.0, 15.0, 1),
            Snapshot("capturing", "connected", 15.0, 200.0, 15.0, 1), Snapshot("capturing", "connected", 15.0, None,
            15.0, 1)]
    assert not any(s.differs_from(base, frame_ms) for s in same)
    assert all(s.differs_from(base, frame_ms) for s in news)


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
    assert http_base("wss://ds.example/prefix/") == "https://ds.example/prefix"
    assert http_base("http://h:1") == "http://h:1"
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
