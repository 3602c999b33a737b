"""Errors that say what to do, with and without the diffusion stack (torch) installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.diffusion_processor import get_diffusion_processor

REPO = Path(__file__).resolve().parents[1]


def test_bad_arguments_fail_before_any_model_loads():
    for kwargs, named in (({"num_steps": 3}, "num_steps"), ({"strength": 0}, "strength"),
                          ({"num_steps": 0}, "num_steps"), ({"style_prompt": 5}, "style_prompt")):
        with pytest.raises(ValueError, match=named):
            get_diffusion_processor("lightning", **kwargs)  # no model env set: a load would fail differently
    with pytest.raises(ValueError, match="processor_type must be one of"):
        get_diffusion_processor("sdxl-turbo")


def test_without_torch_the_error_names_the_fix_and_arguments_are_still_checked():
    """A Python where `import torch` fails (as on an install without the diffusion extra)."""
    script = textwrap.dedent("""
        import asyncio, sys
        sys.modules["torch"] = None  # `import torch` now raises ModuleNotFoundError
        from service import codec
        from service.diffusion_processor import ModelUnavailableError, apply_diffusion, get_diffusion_processor
        import numpy as np

        try:
            get_diffusion_processor("lightning", num_steps=3)
        except ValueError as exc:
            print("steps:", exc)
        for kind in ("lightning", "standard"):
            try:
                get_diffusion_processor(kind)
            except ModelUnavailableError as exc:
                print(kind + ":", exc)
        jpeg = codec.encode_jpeg(np.full((32, 32, 3), 100, np.uint8))
        try:
            asyncio.run(apply_diffusion(jpeg, processor_type="lightning", num_steps=2))
        except ModelUnavailableError as exc:
            print("apply:", type(exc).__name__)
        print("filter:", type(get_diffusion_processor("filter")).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert "num_steps must be 1, 2, 4 or 8" in lines["steps"]
    for kind in ("lightning", "standard"):
        assert "torch" in lines[kind] and ".venv/bin/pip install -e '.[diffusion]'" in lines[kind], lines
    assert lines["apply"] == "ModelUnavailableError"
    assert lines["filter"] == "FilterProcessor"
