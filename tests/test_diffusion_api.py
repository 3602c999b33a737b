"""SPEC section 2 and 6 as a user calls them: `service.diffusion_processor` and the compare example.

Every model comes from the tiny set through the public options or the DREAMSTREAM_* env vars, with
HF_HUB_OFFLINE=1: nothing here can reach the network.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from service import diffusion_processor as api
from service.diffusion_processor import (
    ModelUnavailableError,
    apply_diffusion,
    get_diffusion_processor,
    process_base64_frame,
)
from tests.fixtures_diffusion import MODEL_ENV_VARS, textured_frame
from tests.helpers import ROOT

SIZE = {"width": 64, "height": 64}

pytest_plugins = ["tests.fixtures_diffusion"]


@pytest.fixture(autouse=True)
def fresh_cache():
    api.clear_processor_cache()
    yield
    api.clear_processor_cache()


def jpeg(frame: np.ndarray | None = None) -> bytes:
    return simplejpeg.encode_jpeg(textured_frame() if frame is None else frame, quality=95, colorspace="RGB")


def decoded(data: bytes) -> np.ndarray:
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def test_options_alone_no_env_vars(tiny_models, monkeypatch):
    for name in MODEL_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = get_diffusion_processor(
        processor_type="standard", use_controlnet=True, style_prompt="Van Gogh style painting", strength=0.7,
        num_steps=4, base_model=str(tiny_models["sd15"]), controlnet_model=str(tiny_models["sd15_controlnet"]),
        depth_model=str(tiny_models["depth"]), **SIZE,
    )
    out = p.process(Image.fromarray(textured_frame()))
    assert isinstance(out, Image.Image) and out.size == (64, 64)
    out = asyncio.run(apply_diffusion(
        img_data=jpeg(), processor_type="lightning", prompt="a watercolor", use_controlnet=True, strength=0.7,
        num_steps=4, base_model=str(tiny_models["sdxl"]), controlnet_model=str(tiny_models["sdxl_controlnet"]),
        depth_model=str(tiny_models["depth"]), lightning_unet=str(tiny_models["lightning"]),
        vae_model=str(tiny_models["sdxl_vae_fp16"]), **SIZE))
    assert decoded(out).shape == (64, 64, 3)


@pytest.mark.parametrize("kind", ["standard", "lightning", "filter"])
def test_process_base64_frame_keeps_the_form_it_was_given(tiny_env, kind):
    options = SIZE if kind != "filter" else {}
    p = get_diffusion_processor(processor_type=kind, style_prompt="Van Gogh style painting", num_steps=2, **options)
    b64 = base64.b64encode(jpeg()).decode()
    bare = asyncio.run(process_base64_frame(base64_frame=b64, processor=p, prompt="Monet-style watercolor"))
    assert not bare.startswith("data:")
    url = asyncio.run(process_base64_frame(base64_frame="data:image/jpeg;base64," + b64, processor=p))
    assert url.startswith("data:image/jpeg;base64,")
    png = io.BytesIO()
    Image.fromarray(textured_frame()).save(png, "PNG")
    png_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    from_png = asyncio.run(process_base64_frame(base64_frame=png_url, processor=p))
    assert from_png.startswith("data:image/jpeg;base64,")
    side = 64 if kind != "filter" else 72
    for out in (bare, url.split(",", 1)[1], from_png.split(",", 1)[1]):
        assert decoded(base64.b64decode(out)).shape[0] == side
    # prompt=None means the processor's style_prompt
    same = asyncio.run(process_base64_frame(b64, p, prompt="Van Gogh style painting"))
    assert asyncio.run(process_base64_frame(b64, p)) == same


def test_output_differs_with_prompt(tiny_env):
    a = asyncio.run(apply_diffusion(jpeg(), "standard", prompt="Van Gogh style painting", num_steps=4, **SIZE))
    b = asyncio.run(apply_diffusion(jpeg(), "standard", prompt="a pencil sketch", num_steps=4, **SIZE))
    assert not np.array_equal(decoded(a), decoded(b))


@pytest.mark.parametrize("use_controlnet", [True, False])
def test_apply_diffusion_lightning_all_step_counts_share_one_processor(tiny_env, use_controlnet):
    for steps in (1, 2, 4, 8):
        out = asyncio.run(apply_diffusion(img_data=jpeg(), processor_type="lightning", prompt="a watercolor",
                                          use_controlnet=use_controlnet, strength=0.7, num_steps=steps, **SIZE))
        assert decoded(out).shape == (64, 64, 3)
    assert len(api.cached_processors()) == 1  # steps, strength and ControlNet are per call: one set of models


def test_bad_arguments_raise_value_error_naming_them(tiny_env):
    with pytest.raises(ValueError, match="num_steps"):
        get_diffusion_processor(processor_type="lightning", num_steps=3, **SIZE)
    with pytest.raises(ValueError, match="num_steps"):
        asyncio.run(apply_diffusion(jpeg(), processor_type="lightning", num_steps=3, **SIZE))
    with pytest.raises(ValueError, match="strength"):
        asyncio.run(apply_diffusion(jpeg(), processor_type="lightning", strength=0, **SIZE))
    with pytest.raises(ValueError, match="processor_type"):
        get_diffusion_processor(processor_type="turbo")
    with pytest.raises(ValueError, match="base_model"):
        get_diffusion_processor(processor_type="filter", base_model="x")
    with pytest.raises(ValueError, match="img_data"):
        asyncio.run(apply_diffusion(b"not an image", processor_type="filter"))
    with pytest.raises(ValueError, match="base64_frame"):
        asyncio.run(process_base64_frame("data:image/jpeg;base64,@@@", get_diffusion_processor("filter")))


def test_model_unavailable_is_reexported_and_fast(tiny_env, monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_BASE_MODEL", "dreamstream-tests/not-downloaded")
    with pytest.raises(ModelUnavailableError, match="DREAMSTREAM_LIGHTNING_BASE_MODEL") as info:
        asyncio.run(apply_diffusion(jpeg(), processor_type="lightning", **SIZE))
    assert "base_model" in str(info.value) and "dreamstream-tests/not-downloaded" in str(info.value)


def test_compare_example_writes_its_image(tiny_env, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(textured_frame(120, 160)).save(image)
    out = tmp_path / "compare.png"
    proc = subprocess.run(
        [sys.executable, "examples/compare_processors.py", "--image", str(image), "--prompt", "Van Gogh style",
         "--out", str(out), "--width", "128", "--height", "128", "--standard-steps", "4"],
        cwd=ROOT, env={**os.environ, **tiny_env}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "standard: " in proc.stdout and "lightning: " in proc.stdout and "filter: " in proc.stdout
    with Image.open(out) as sheet:
        assert sheet.width == 4 * 128 and sheet.height > 128  # original | standard | lightning | filter


def test_compare_example_shows_a_processor_that_failed(tiny_env, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import compare_processors
    finally:
        sys.path.remove(str(ROOT / "examples"))
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_BASE_MODEL", str(tmp_path / "missing"))
    image = tmp_path / "in.jpg"
    image.write_bytes(jpeg())
    out = tmp_path / "compare.png"
    assert compare_processors.main(["--image", str(image), "--prompt", "x", "--out", str(out), "--width", "64",
                                    "--height", "64", "--standard-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "lightning failed: ModelUnavailableError" in printed and "standard: " in printed
    assert Image.open(out).size[0] == 4 * 64
