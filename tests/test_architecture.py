"""The layers as a checked contract: import-linter's contracts (pyproject.toml) hold, and no room outgrows itself."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from service import app
from tests.helpers import ROOT

MAX_MODULE_LINES = 450  # "about 400": a module past this holds two things


def test_import_contracts_hold():
    """No import circles in service/ and service/processors/; protocol/codec/config/errors import nothing above them;
    the hub imports no web framework and no processor; processors know nothing of the server."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_no_module_outgrows_one_concept():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for path in sorted((ROOT / "service").rglob("*.py"))}
    too_big = {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_big, f"split these (over {MAX_MODULE_LINES} lines): {too_big}"


def test_create_app_only_wires():
    lines = inspect.getsource(app.create_app).splitlines()
    assert len(lines) < 60, f"create_app is {len(lines)} lines: routes and state belong in api.py / state.py"
