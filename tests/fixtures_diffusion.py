"""Fixtures for tests that run the diffusion processors on tiny models.

Import them into a test module (`from tests.fixtures_diffusion import tiny_env, tiny_models  # noqa: F401`).
`tiny_models` builds once per session (~6 s); set DREAMSTREAM_TINY_MODELS=DIR to keep one build across
sessions. `tiny_env` points every DREAMSTREAM_* model variable at it with HF_HUB_OFFLINE=1, and clears
the ones the tiny set has no model for, so a developer's own settings cannot leak into a test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import processors
from service.config import processor_options_from_env
from service.processors import Processor
from tests.tiny_models import build_tiny_models, model_env

MODEL_ENV_VARS = (
    "DREAMSTREAM_STANDARD_BASE_MODEL", "DREAMSTREAM_LIGHTNING_BASE_MODEL",
    "DREAMSTREAM_STANDARD_CONTROLNET_MODEL", "DREAMSTREAM_LIGHTNING_CONTROLNET_MODEL",
    "DREAMSTREAM_DEPTH_MODEL", "DREAMSTREAM_LIGHTNING_UNET",
    "DREAMSTREAM_STANDARD_TINY_VAE", "DREAMSTREAM_LIGHTNING_TINY_VAE",
    "DREAMSTREAM_STANDARD_VAE_MODEL", "DREAMSTREAM_LIGHTNING_VAE_MODEL",
    "DREAMSTREAM_DEVICE", "DREAMSTREAM_DTYPE", "DREAMSTREAM_WIDTH", "DREAMSTREAM_HEIGHT",
)


def create_processor(processor_type: str, **options: Any) -> Processor:
    """A processor as a server started in this environment builds it: its DREAMSTREAM_* env vars read here, at the
    edge (as `Settings.from_env` and the Python API do), under the options given. Processors never read the env."""
    from_env = processor_options_from_env().get(processor_type, {})
    return processors.create_processor(processor_type, **{**from_env, **options})


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = os.environ.get("DREAMSTREAM_TINY_MODELS")
    return build_tiny_models(Path(root) if root else tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def tiny_env(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The env vars (already set for this test) that make both processors load the tiny models offline."""
    for name in MODEL_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    env = model_env(tiny_models)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def textured_frame(height: int = 72, width: int = 96, seed: int = 0) -> np.ndarray:
    """An RGB frame with edges and colour (not square, so the crop/resize runs too)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x ^ y) & 0xFF], -1).astype(np.uint8)
    img[height // 4: height // 2, width // 4: width // 2] = rng.integers(0, 255, 3)
    return img
