"""examples/compare_processors.py as a user without model weights runs it: a styled filter panel, the diffusion
panels' reasons, and a non-zero exit saying that every diffusion panel failed.

With weights (tiny test models) the script exits 0: tests/test_diffusion_api.py runs that case.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import ROOT
from tests.test_filter_look import scene

SIDE = 96


def run_compare(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, Image.Image]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    image = tmp_path / "in.png"
    Image.fromarray(scene(120, 160)).save(image)
    out = tmp_path / "sheet" / "compare.png"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # no downloads: the diffusion processors fail at once, naming what is missing
        "DREAMSTREAM_STANDARD_BASE_MODEL": str(tmp_path / "no-sd15"),
        "DREAMSTREAM_LIGHTNING_BASE_MODEL": str(tmp_path / "no-sdxl"),
    }
    proc = subprocess.run(
        [sys.executable, "examples/compare_processors.py", "--image", str(image), "--out", str(out),
         "--width", str(SIDE), "--height", str(SIDE), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.exists(), f"no sheet written:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    with Image.open(out) as sheet:
        return proc, sheet.convert("RGB")


def panels(sheet: Image.Image) -> list[np.ndarray]:
    """original, standard, lightning, filter: the picture part of each panel (captions left out)."""
    pixels = np.asarray(sheet)
    return [pixels[:SIDE, i * SIDE:(i + 1) * SIDE].astype(np.float32) for i in range(sheet.width // SIDE)]


def test_without_weights_the_filter_panel_is_styled_and_the_exit_says_why(tmp_path):
    proc, sheet = run_compare(tmp_path, "--prompt", "Van Gogh style painting")
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: every diffusion panel failed"), proc.stderr[-3000:]
    assert "standard failed: ModelUnavailableError" in error and "lightning failed: ModelUnavailableError" in error
    assert "shows the CPU filter only" in error
    # the reasons, with the fix, are on the terminal: the missing path and the variable to set
    assert str(tmp_path / "no-sd15") in proc.stdout and "DREAMSTREAM_LIGHTNING_BASE_MODEL" in proc.stdout
    assert "filter: " in proc.stdout and "ms/frame (painting look x 0.7, cpu" in proc.stdout

    assert sheet.width == 4 * SIDE and sheet.height > SIDE
    original, standard, lightning, styled = panels(sheet)
    for failed in (standard, lightning):  # dark red panels carrying the error text
        red, green, _ = failed.reshape(-1, 3).mean(0)
        assert red > green + 20
    assert np.abs(styled - original).mean() > 12, "the filter panel looks like the original"


def test_the_filter_panel_follows_the_prompt(tmp_path):
    _, painted = run_compare(tmp_path / "a", "--prompt", "Van Gogh style painting")
    proc, sketched = run_compare(tmp_path / "b", "--prompt", "pencil sketch", "--strength", "1")
    assert "ms/frame (pencil look x 1, cpu" in proc.stdout
    sketch = panels(sketched)[3]
    assert np.abs(sketch - panels(painted)[3]).mean() > 20
    assert np.ptp(sketch.reshape(-1, 3).mean(0)) < 3, "a pencil sketch has no colour"
