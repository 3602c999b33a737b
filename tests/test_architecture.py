"""The layers as a checked contract: import-linter's contracts (pyproject.toml) hold, and no room outgrows itself."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from service import app
from tests.helpers import ROOT


def test_import_contracts_hold():
    """No import circles in service/ and service/processors/; protocol/codec/config/errors import nothing above them;
    the hub imports no web framework and no processor; processors know nothing of the server."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_create_app_only_wires():
    lines = inspect.getsource(app.create_app).splitlines()
    assert len(lines) < 60, f"create_app is {len(lines)} lines: routes and state belong in api.py / state.py"
