"""One setting, three ways in: an env var, a CLI flag and an API argument each reach the processor (issue 14).

The setting is the lightning processor's `width`/`height`, visible in the size of the styled frames that come back.
Env vars are read once at the edge (Settings.from_env, the Python API's entry points); processors never read them.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
import simplejpeg
import websockets

from service import cli
from service.diffusion_processor import apply_diffusion, clear_processor_cache
from tests.helpers import gradient_jpeg, recv_json, run, running_server

pytest_plugins = ["tests.fixtures_diffusion"]
FAST = ["--steps", "1", "--no-controlnet"]


def styled_size(tmp_path, env: dict[str, str], args: list[str]) -> tuple[int, int]:
    tmp_path.mkdir()
    with running_server(tmp_path, processor="lightning", env=env, args=FAST + args, timeout=180) as srv:

        async def main():
            async with websockets.connect(f"{srv.ws}/ws/viewer/w") as viewer, \
                    websockets.connect(f"{srv.ws}/ws/broadcaster/w") as bc:
                await recv_json(bc, "ready")
                await bc.send(gradient_jpeg((160, 120)))
                frame = await recv_json(viewer, "frame", timeout=120)
                image = simplejpeg.decode_jpeg(base64.b64decode(frame["frame"].split(",", 1)[1]))
                return image.shape[1], image.shape[0]

        return run(main(), timeout=180)


def test_env_var_then_cli_flag_set_the_width(tiny_env, tmp_path):
    env = {**tiny_env, "DREAMSTREAM_WIDTH": "64", "DREAMSTREAM_HEIGHT": "64"}
    assert styled_size(tmp_path / "env", env, []) == (64, 64)
    flags = ["--option", "width=96", "--option", "lightning.height=80"]
    assert styled_size(tmp_path / "cli", env, flags) == (96, 80)  # the flag wins over the env var


def test_api_argument_sets_the_width(tiny_env, monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_WIDTH", "64")
    monkeypatch.setenv("DREAMSTREAM_HEIGHT", "64")
    clear_processor_cache()
    try:
        from_env = asyncio.run(apply_diffusion(gradient_jpeg((160, 120)), "lightning", num_steps=1,
                                               use_controlnet=False))
        given = asyncio.run(apply_diffusion(gradient_jpeg((160, 120)), "lightning", num_steps=1,
                                            use_controlnet=False, width=72, height=88))
    finally:
        clear_processor_cache()
    assert simplejpeg.decode_jpeg(from_env).shape[:2] == (64, 64)
    assert simplejpeg.decode_jpeg(given).shape[:2] == (88, 72)  # the argument wins over the env var


@pytest.mark.parametrize("bad", ["width", "nosuch=1", "turbo.width=64", "filter.width=64"])
def test_a_bad_option_flag_says_what_it_expects(bad):
    args = cli.argparse.Namespace(host="127.0.0.1", port=8000, processor=None, prompt=None, strength=None, steps=None,
                                  no_controlnet=False, option=[bad])
    with pytest.raises(ValueError, match=r"\[TYPE.\]NAME=VALUE"):
        cli.settings_from_args(args)
