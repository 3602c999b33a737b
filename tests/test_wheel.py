"""A real wheel in a real fresh venv, outside the checkout, serves every page with its JS and CSS (issue 14).

The wheel is built from a copy of the source tree (so a stale `build/` or another run building at the
same time cannot leak into it) and installed with --no-deps into a new venv in a temp folder. The
dependencies come from this test's own environment through a .pth line, which appends that
site-packages after the new venv's own: `service` and `overlays` must come from the wheel, and the
test checks they do before starting `dreamstream serve` from the venv's console script, in a temp
cwd and without PYTHONPATH, so nothing of the checkout can stand in for a missing file.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.integration

PAGES = ["/", "/view/x", "/overlay/x", "/overlay/x/compare", "/dock/x"]
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",)}
# what the pages reference: <script src="/static/..."> and <link href="/static/...">
ASSET_REF = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
# what a module imports: `import ... from "./x.js"`, `import "./x.js"`, `import("./x.js")`
JS_IMPORT = re.compile(r"""(?:\bfrom|\bimport)\s*\(?\s*["']([^"']+)["']""")
# top-level things that are no part of a build: venvs, VCS and tool caches, earlier build outputs
SKIP_AT_ROOT = {"build", "dist", "venv", "test-artifacts"}


def _ignore(root: Path):
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if Path(folder) == root:
            skipped |= {n for n in names if n.startswith(".") or n in SKIP_AT_ROOT or n.endswith(".egg-info")}
        return skipped

    return ignore


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    command = " ".join(map(str, cmd))
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _can_build_offline() -> bool:
    """This interpreter's setuptools builds wheels by itself (>= 70.1 has bdist_wheel): no build isolation,
    so no download of setuptools from the index; otherwise pip's isolated build fetches it."""
    try:
        major, minor = (int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """(the fresh venv, the environment to run it in): the wheel installed there, the checkout nowhere."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(ROOT.resolve()), f"temp dir {tmp} is inside the checkout"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "DREAMSTREAM_OVERLAYS_DIR")}
    env.update(PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("VIRTUAL_ENV", None)

    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore(ROOT), symlinks=True)
    wheels = tmp / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)]
    if _can_build_offline():
        build.insert(4, "--no-build-isolation")
    _run(build, cwd=tmp, env=env)
    (wheel,) = wheels.glob("dreamstream-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp, env=env)
    # the dependencies: this environment's site-packages, searched after the venv's own (plain paths in a
    # .pth are appended; the .pth files in them, such as an editable install's finder, are not run)
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp, env=env).strip())
    (purelib / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    yield venv, env


def test_wheel_holds_the_pages_and_imports_from_the_venv(wheel_venv):
    venv, env = wheel_venv
    tmp = venv.parent
    out = _run([str(venv / "bin" / "python"), "-c",
                "import service, overlays, service.pages as p; "
                "print(service.__file__); print(overlays.__file__); print(p.overlays_dir())"], cwd=tmp, env=env)
    service_file, overlays_file, overlays_dir = (Path(line) for line in out.split())
    for path in (service_file, overlays_file, overlays_dir):
        assert path.resolve().is_relative_to(venv.resolve()), f"{path} is not inside the fresh venv {venv}"
    shipped = {p.relative_to(overlays_dir).as_posix() for p in overlays_dir.rglob("*") if p.is_file()}
    source = ROOT / "overlays"
    for sub in ("templates", "static"):
        for f in (source / sub).rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                assert f"{sub}/{f.relative_to(source / sub).as_posix()}" in shipped, f"{f} is not in the wheel"


def test_wheel_install_serves_every_page_with_its_js_and_css(wheel_venv):
    venv, env = wheel_venv
    tmp = venv.parent
    port = free_port()
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(venv / "bin" / "dreamstream"), "serve", "--processor", "filter",
                                 "--port", str(port)], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 45
            while True:
                assert proc.poll() is None, f"server exited ({proc.returncode}):\n{log_path.read_text()}"
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"no /healthz in 45 s:\n{log_path.read_text()}"
                time.sleep(0.1)

            assets: set[str] = set()
            for page in PAGES:
                r = client.get(page)
                assert r.status_code == 200, f"{page}: {r.status_code}\n{r.text[:500]}"
                assert r.headers["content-type"].startswith("text/html"), (page, r.headers["content-type"])
                refs = {urljoin(base + page, ref)[len(base):] for ref in ASSET_REF.findall(r.text)
                        if urljoin(base + page, ref).startswith(base + "/static/")}
                assert any(ref.endswith(".js") for ref in refs), f"{page} references no script: {refs}"
                assert any(ref.endswith(".css") for ref in refs), f"{page} references no stylesheet: {refs}"
                assets |= refs

            # every asset, and every module those scripts import in turn
            todo, seen = sorted(assets), set()
            while todo:
                path = todo.pop()
                if path in seen:
                    continue
                seen.add(path)
                r = client.get(path)
                assert r.status_code == 200, f"{path}: {r.status_code}"
                assert r.content, f"{path} is empty"
                suffix = Path(path).suffix
                if suffix in CONTENT_TYPES:
                    assert r.headers["content-type"].startswith(CONTENT_TYPES[suffix]), (path, r.headers)
                # the file the wheel shipped is the one in overlays/
                assert r.content == (ROOT / "overlays" / path.lstrip("/")).read_bytes(), f"{path} differs"
                if suffix == ".js":
                    todo += [urljoin(base + path, ref)[len(base):] for ref in JS_IMPORT.findall(r.text)
                             if ref.endswith(".js")]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
