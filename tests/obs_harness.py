"""A REAL OBS Studio for tests: headless under Xvfb, an isolated HOME, a free port, a password.

Recipe and measurements: ../shared/obs/README.md. Debian's OBS 29 (obs-websocket 5.1) renders with
Mesa's software renderer; the preview is off in global.ini because it costs ~25 ms a frame there.
The companion runs as a real subprocess (`python -m obs_plugin`) and tests read what it prints.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import obsws_python

from tests.helpers import ROOT, free_port, require_or_skip

logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 1)  # it logs the password at INFO

PASSWORD = "harness-pw-7f3a"
CANVAS = (1280, 720)

GLOBAL_INI = """\
[General]
FirstRun=true
EnableAutoUpdates=false
Pre19Defaults=false
Pre21Defaults=false
Pre23Defaults=false
Pre24.1Defaults=false
ConfirmOnExit=false

[Basic]
Profile=Untitled
ProfileDir=Untitled
SceneCollection=Untitled
SceneCollectionFile=Untitled

[OBSWebSocket]
FirstLoad=false
ServerEnabled=true
ServerPort={port}
AlertsEnabled=false
AuthRequired=true
ServerPassword={password}

[BasicWindow]
PreviewEnabled=false
"""

BASIC_INI = """\
[General]
Name=Untitled

[Video]
BaseCX={w}
BaseCY={h}
OutputCX={w}
OutputCY={h}
FPSType=0
FPSCommon=30
ScaleType=bicubic
"""


def require_obs() -> None:
    """Skip (or fail under DREAMSTREAM_REQUIRE_INTEGRATION=1) when OBS or Xvfb is missing."""
    missing = [tool for tool in ("obs", "xvfb-run") if shutil.which(tool) is None]
    require_or_skip(
        not missing,
        f"{' and '.join(missing)} not installed (apt-get install -y --no-install-recommends obs-studio xvfb xauth)",
    )


def abgr(rgb: tuple[int, int, int]) -> int:
    """color_source_v3 takes 0xAABBGGRR."""
    r, g, b = rgb
    return 0xFF000000 | (b << 16) | (g << 8) | r


@dataclass
class Obs:
    """One OBS process tree: `xvfb-run` (our child, its own process group) > Xvfb + obs."""

    home: Path
    port: int
    password: str = PASSWORD
    proc: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.home / "obs.log"

    def configure(self) -> None:
        cfg = self.home / ".config" / "obs-studio"
        (cfg / "basic" / "profiles" / "Untitled").mkdir(parents=True, exist_ok=True)
        (cfg / "global.ini").write_text(GLOBAL_INI.format(port=self.port, password=self.password))
        (cfg / "basic" / "profiles" / "Untitled" / "basic.ini").write_text(BASIC_INI.format(w=CANVAS[0], h=CANVAS[1]))

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "HOME": str(self.home), "LIBGL_ALWAYS_SOFTWARE": "1", "QT_QPA_PLATFORM": "xcb"}
        self.proc = subprocess.Popen(
            ["xvfb-run", "-a", "-s", f"-screen 0 {CANVAS[0]}x{CANVAS[1]}x24", "obs", "--minimize-to-tray",
             "--multi", "--disable-missing-files-check"],
            cwd=self.home, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"OBS exited early ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                with self.client():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        raise RuntimeError(f"OBS did not open port {self.port} in {timeout} s:\n{self.log()[-3000:]}")

    def obs_pid(self) -> int | None:
        """The `obs` process itself: xvfb-run keeps running as its parent."""
        if self.proc is None:
            return None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if comm == "obs" and ppid == self.proc.pid:
                return int(entry.name)
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop OBS the way a crash (SIGKILL) or a quit (SIGTERM) would; xvfb-run then ends Xvfb."""
        if self.proc is None:
            return
        pid = self.obs_pid()
        if pid is not None:
            os.kill(pid, sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        # xvfb-run ends Xvfb with SIGTERM, which Xvfb now and then misses (seen here: an orphan Xvfb
        # left asleep); so end whatever is left of the process group we started, and nothing else
        for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(grace)
        self.proc.wait()
        self.proc = None
        if self._log:
            self._log.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> obsws_python.ReqClient:
        """A plain obsws-python client for the test's own set-up requests (not the code under test)."""
        return obsws_python.ReqClient(host="127.0.0.1", port=self.port, password=self.password, timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # set-up helpers, in obs-websocket v5 requests
    def color_scene(self, scene: str, rgb: tuple[int, int, int], input_name: str | None = None) -> str:
        """A scene filled with one colour; returns the colour input's name."""
        input_name = input_name or f"{scene} colour"
        with self.client() as c:
            c.send("CreateScene", {"sceneName": scene})
            c.send("CreateInput", {
                "sceneName": scene, "inputName": input_name, "inputKind": "color_source_v3",
                "inputSettings": {"color": abgr(rgb), "width": CANVAS[0], "height": CANVAS[1]},
                "sceneItemEnabled": True,
            })
        return input_name

    def set_color(self, input_name: str, rgb: tuple[int, int, int]) -> None:
        with self.client() as c:
            c.send("SetInputSettings", {"inputName": input_name, "inputSettings": {"color": abgr(rgb)}})

    def image_scene(self, scene: str, image: Path, input_name: str) -> None:
        with self.client() as c:
            c.send("CreateScene", {"sceneName": scene})
            c.send("CreateInput", {
                "sceneName": scene, "inputName": input_name, "inputKind": "image_source",
                "inputSettings": {"file": str(image)}, "sceneItemEnabled": True,
            })

    def audio_input(self, scene: str, input_name: str) -> None:
        """A Media Source (ffmpeg_source) with no file: an input with audio, so it has an audio sync offset."""
        with self.client() as c:
            c.send("CreateScene", {"sceneName": scene})
            c.send("CreateInput", {"sceneName": scene, "inputName": input_name, "inputKind": "ffmpeg_source",
                                   "inputSettings": {}, "sceneItemEnabled": True})

    def audio_sync_offset(self, input_name: str) -> int:
        with self.client() as c:
            return c.send("GetInputAudioSyncOffset", {"inputName": input_name}, raw=True)["inputAudioSyncOffset"]

    def set_audio_sync_offset(self, input_name: str, offset_ms: int) -> None:
        with self.client() as c:
            c.send("SetInputAudioSyncOffset", {"inputName": input_name, "inputAudioSyncOffset": offset_ms})

    def nest(self, outer: str, inner: str) -> None:
        """Put scene `inner` into scene `outer` as a scene item (nested scene)."""
        with self.client() as c:
            c.send("CreateSceneItem", {"sceneName": outer, "sourceName": inner, "sceneItemEnabled": True})


@contextmanager
def running_obs(home: Path, port: int | None = None) -> Iterator[Obs]:
    require_obs()
    obs = Obs(home=home, port=port or free_port())
    obs.configure()
    obs.start()
    try:
        yield obs
    finally:
        obs.kill(signal.SIGTERM)


@dataclass
class Companion:
    """`python -m obs_plugin ...` as a user would run it; its output in a file the test can wait on."""

    args: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self) -> Companion:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "obs_plugin", *self.args], cwd=ROOT, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0, after: int = 0) -> int:
        """Wait until `text` appears in the output (past offset `after`); returns the offset past it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            at = out.find(text, after)
            if at >= 0:
                return at + len(text)
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"companion never printed {text!r} (exit {self.proc and self.proc.poll()}):\n"
                             f"{self.output()[-4000:]}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def companion(tmp_path: Path, args: list[str], password: str | None = PASSWORD,
              name: str = "companion") -> Iterator[Companion]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OBS_PASSWORD", None)
    if password is not None:
        env["OBS_PASSWORD"] = password
    comp = Companion(args, tmp_path / f"{name}.log", env).start()
    try:
        yield comp
    finally:
        comp.stop()
