"""benchmarks/abuse.py (issue 16's attacks) stays runnable: its --help, its WebSocket framing, and one short case
against a real server."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "abuse.py"


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("abuse_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_help_lists_every_case():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("api_process_flood", "big_frames", "unrunnable_processor", "cross_origin", "connections", "leaks",
                 "small", "--quick", "--json"):
        assert name in out.stdout


def test_frames_are_masked_and_parse_back():
    abuse = _load()
    for size in (5, 300, 70_000):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        frame = abuse.ws_frame(payload)
        assert frame[0] == 0x82 and frame[1] & 0x80  # FIN + binary, masked
        head = {5: 2, 300: 4, 70_000: 10}[size]
        mask = np.frombuffer(frame[head:head + 4], np.uint8)
        unmasked = (np.frombuffer(frame[head + 4:], np.uint8) ^ np.resize(mask, size)).tobytes()
        assert unmasked == payload
        # the same frame unmasked, as a server sends it, parses back whole and leaves the rest
        buf = bytearray(bytes([0x82, frame[1] & 0x7F]) + frame[2:head] + payload + b"\x81")
        assert abuse.parse_frames(buf) == [(0x2, payload)] and buf == bytearray(b"\x81")
    close = abuse.ws_close_frame(1008)
    assert close[0] == 0x88
    code = bytes(a ^ b for a, b in zip(close[6:8], abuse.MASK[:2], strict=True))
    assert struct.unpack("!H", code)[0] == 1008


def test_baseline_case_runs(tmp_path):
    """The healthy stream alone (about 10 s): a row with the stream's fps, in the table and the JSON."""
    out_json = tmp_path / "abuse.json"
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--case", "baseline,stuck_processor", "--json",
                          str(out_json), "--workdir", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["case"] for r in rows] == ["baseline", "8 stuck_processor"]
    assert rows[0]["healthy"]["fps"] > 5, rows[0]  # on a loaded machine it may not reach 30
    assert "baseline" in out.stdout and "# command:" in out.stdout
