"""The standard and lightning processors on tiny random models: steps, strength, batching, model sources."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from service.processors import FrameRequest
from service.processors.models import ModelUnavailableError
from service.processors.schedule import steps_to_run
from tests.fixtures_diffusion import create_processor, textured_frame

SIZE = {"width": 64, "height": 64}

pytest_plugins = ["tests.fixtures_diffusion"]


@pytest.fixture
def lightning(tiny_env):
    return create_processor("lightning", style_prompt="a watercolor", use_controlnet=True, **SIZE)


@pytest.fixture
def standard(tiny_env):
    return create_processor("standard", style_prompt="a watercolor", num_steps=6, **SIZE)


def request(prompt: str = "a watercolor", seed: int = 1, steps: int = 4, strength: float = 0.7,
            controlnet: bool = True, frame_seed: int = 0) -> FrameRequest:
    return FrameRequest(textured_frame(seed=frame_seed), prompt, strength, steps, seed, controlnet)


# --- strength and steps ---------------------------------------------------------------------------

def test_steps_to_run_is_ceil_and_never_zero():
    assert steps_to_run(4, 0.7) == 3
    assert steps_to_run(25, 0.7) == 18
    assert steps_to_run(1, 0.01) == 1
    assert steps_to_run(10, 0.3) == 3  # 10 * 0.3 = 3.0000000000000004 in floats: still 3
    for steps in range(1, 51):
        for strength in np.linspace(0.001, 1.0, 97):
            assert 1 <= steps_to_run(steps, float(strength)) <= steps


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lightning_runs_the_last_distilled_timesteps(lightning, steps):
    trailing = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249], 8: [999, 874, 749, 624, 499, 374, 249, 124]}
    for strength in (0.05, 0.3, 0.5, 0.7, 1.0):
        run = steps_to_run(steps, strength)
        schedule = lightning.schedule(steps, run)
        assert [round(float(t)) for t in schedule.timesteps] == trailing[steps][steps - run:]
        assert schedule.sigmas[-1] == 0 and len(schedule.sigmas) == run + 1
        assert schedule.prediction_type == ("sample" if steps == 1 else "epsilon")


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("controlnet", [True, False])
def test_lightning_every_step_count_with_and_without_controlnet(lightning, steps, controlnet):
    text_encoders = lightning.text_encoders
    [out] = lightning.process_batch([request(steps=steps, strength=0.3, controlnet=controlnet)])
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.std() > 0
    assert lightning.unet_file == lightning.checkpoints.filename(steps)
    assert lightning.text_encoders is text_encoders  # only the UNet weights were swapped


def test_lightning_swaps_unet_weights_in_place(lightning, tiny_models):
    from safetensors.torch import load_file

    param = next(lightning.unet.parameters())
    name = next(iter(lightning.unet.state_dict()))
    for steps in (1, 8, 2):
        lightning.prepare_steps(steps)
        expected = load_file(str(Path(tiny_models["lightning"]) / lightning.checkpoints.filename(steps)))[name]
        assert np.allclose(lightning.unet.state_dict()[name].numpy(), expected.numpy())
    assert next(lightning.unet.parameters()) is param  # same tensors: compiled graphs stay valid


def test_lightning_rejects_other_step_counts(lightning):
    for bad in (3, 5, 0, 16):
        with pytest.raises(ValueError, match="num_steps"):
            lightning.process_batch([request(steps=bad)])
    with pytest.raises(ValueError, match="num_steps"):
        create_processor("lightning", num_steps=3, **SIZE)


def test_standard_with_and_without_controlnet(standard):
    a, b = standard.process_batch([request(steps=6, controlnet=True), request(steps=6, controlnet=False)])
    assert a.shape == b.shape == (64, 64, 3)
    assert not np.array_equal(a, b)
    assert standard.uses_cfg


# --- per-stream state -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["standard", "lightning"])
def test_batch_equals_single_calls(kind, standard, lightning):
    proc = standard if kind == "standard" else lightning
    steps = proc.num_steps
    reqs = [request("a watercolor", seed=1, steps=steps), request("a charcoal sketch", seed=7, steps=steps,
                                                                  frame_seed=3)]
    batched = proc.process_batch(reqs)
    singles = [proc.process_batch([r])[0] for r in reqs]
    for b, s in zip(batched, singles, strict=True):
        assert np.abs(b.astype(int) - s.astype(int)).max() <= 2
    assert not np.array_equal(batched[0], batched[1])


def test_mixed_batch_keeps_order_and_settings(lightning):
    reqs = [request(steps=4), request(steps=1, seed=5), request(steps=4, controlnet=False), request(steps=2)]
    mixed = lightning.process_batch(reqs)
    for r, out in zip(reqs, mixed, strict=True):
        assert np.abs(out.astype(int) - lightning.process_batch([r])[0].astype(int)).max() <= 2


def test_same_seed_same_frame_other_prompt_other_frame(lightning):
    first = lightning.process_batch([request("a watercolor", seed=3)])[0]
    again = lightning.process_batch([request("a watercolor", seed=3)])[0]
    other_prompt = lightning.process_batch([request("neon cyberpunk city", seed=3)])[0]
    other_seed = lightning.process_batch([request("a watercolor", seed=4)])[0]
    assert np.array_equal(first, again)  # a still scene stays still: no fresh noise per frame
    assert not np.array_equal(first, other_prompt)
    assert not np.array_equal(first, other_seed)
    assert len(lightning._prompts) == 2  # the text encoders ran once per prompt


def test_describe_and_warmup(lightning):
    lightning.warmup()
    info = lightning.describe()
    assert info["processor"] == "lightning" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["models"]["lightning_unet"].endswith("lightning")
    assert info["unet_checkpoint"] == "sdxl_lightning_4step_unet.safetensors"


# --- options and model sources --------------------------------------------------------------------

def test_options_win_over_env_vars_and_tiny_vae(tiny_env, tiny_models, monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_BASE_MODEL", "/nonexistent/sdxl")
    proc = create_processor("lightning", base_model=str(tiny_models["sdxl"]), tiny_vae=str(tiny_models["taesdxl"]),
                            use_controlnet=False, **SIZE)
    assert proc.describe()["models"]["base_model"] == str(tiny_models["sdxl"])
    assert type(proc.vae).__name__ == "AutoencoderTiny"
    assert proc.process_batch([request(controlnet=False)])[0].shape == (64, 64, 3)
    monkeypatch.setenv("DREAMSTREAM_STANDARD_TINY_VAE", str(tiny_models["taesd"]))
    proc = create_processor("standard", use_controlnet=False, num_steps=2, **SIZE)
    assert type(proc.vae).__name__ == "AutoencoderTiny"


def vae_weights_of(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(folder / "diffusion_pytorch_model.safetensors")).items()}


def assert_vae_is(proc, folder: Path) -> None:
    """The processor's VAE holds the weights saved in `folder` (not another VAE of the same shape)."""
    saved = vae_weights_of(folder)
    loaded = proc.vae.state_dict()
    assert set(saved) == set(loaded)
    for name, value in saved.items():
        assert np.allclose(loaded[name].float().numpy(), value, atol=1e-3), name


def assert_real_frame(out: np.ndarray) -> None:
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out.std() > 1 and len(np.unique(out)) > 16  # an image, not a constant or a NaN-black frame


def test_lightning_vae_model_fp16_safe_runs_in_the_processors_dtype(tiny_env, tiny_models, caplog):
    """A vae_model whose config does not say force_upcast runs in fp16; SDXL's own VAE (it says so) in fp32."""
    caplog.set_level("INFO", logger="dreamstream.processors")
    fix = Path(tiny_models["sdxl_vae_fp16"])
    proc = create_processor("lightning", vae_model=str(fix), dtype="fp16", num_steps=2, use_controlnet=False,
                            **SIZE)
    info = proc.describe()
    assert info["models"]["vae_model"] == str(fix) and info["dtype"] == info["vae_dtype"] == "float16"
    assert type(proc.vae).__name__ == "AutoencoderKL" and proc.vae.dtype == proc.dtype
    assert_vae_is(proc, fix)
    given = "option vae_model / DREAMSTREAM_LIGHTNING_VAE_MODEL"
    assert f"vae: vae_model {fix} ({given}), AutoencoderKL in float16" in caplog.text
    assert_real_frame(proc.process_batch([request(steps=2, controlnet=False)])[0])

    stock = Path(tiny_models["sdxl"]) / "vae"  # the base model's own VAE, as a stand-alone folder
    proc = create_processor("lightning", vae_model=str(stock), dtype="fp16", num_steps=2, use_controlnet=False,
                            **SIZE)
    assert proc.describe()["vae_dtype"] == "float32" and str(proc.vae.dtype) == "torch.float32"
    assert "its config says force_upcast" in caplog.text
    assert_vae_is(proc, stock)
    assert_real_frame(proc.process_batch([request(steps=2, controlnet=False)])[0])


def test_lightning_vae_model_from_env_and_option_wins(tiny_env, tiny_models, monkeypatch):
    fix, stock = Path(tiny_models["sdxl_vae_fp16"]), Path(tiny_models["sdxl"]) / "vae"
    assert tiny_env["DREAMSTREAM_LIGHTNING_VAE_MODEL"] == str(fix)  # every lightning test loads the fp16-fix stand-in
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_VAE_MODEL", str(stock))
    proc = create_processor("lightning", num_steps=2, use_controlnet=False, **SIZE)
    assert proc.describe()["models"]["vae_model"] == str(stock)
    assert_vae_is(proc, stock)
    assert_real_frame(proc.process_batch([request(steps=2, controlnet=False)])[0])
    proc = create_processor("lightning", vae_model=str(fix), num_steps=2, use_controlnet=False, **SIZE)
    assert_vae_is(proc, fix)


def test_lightning_default_vae_model_is_the_fp16_fix(tiny_env, monkeypatch):
    from service.processors.models import model_source

    monkeypatch.delenv("DREAMSTREAM_LIGHTNING_VAE_MODEL")
    source = model_source("lightning", "vae_model")
    assert (source.value, source.origin) == ("madebyollin/sdxl-vae-fp16-fix", "default")
    assert model_source("standard", "vae_model") is None  # standard: the base model's own VAE
    with pytest.raises(ModelUnavailableError, match="DREAMSTREAM_LIGHTNING_VAE_MODEL") as info:
        create_processor("lightning", num_steps=2, use_controlnet=False, **SIZE)  # offline, not in the cache
    assert "vae_model 'madebyollin/sdxl-vae-fp16-fix'" in str(info.value)


def test_tiny_vae_replaces_vae_model_which_is_then_not_needed(tiny_env, tiny_models, monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_VAE_MODEL", "/nonexistent/vae")
    proc = create_processor("lightning", tiny_vae=str(tiny_models["taesdxl"]), num_steps=2, use_controlnet=False,
                            **SIZE)
    assert type(proc.vae).__name__ == "AutoencoderTiny"
    assert_real_frame(proc.process_batch([request(steps=2, controlnet=False)])[0])
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_TINY_VAE", str(tiny_models["taesdxl"]))
    proc = create_processor("lightning", vae_model="dreamstream-tests/no-such-vae", num_steps=2,
                            use_controlnet=False, **SIZE)
    assert type(proc.vae).__name__ == "AutoencoderTiny"


def test_standard_vae_is_the_base_models_unless_vae_model_is_set(tiny_env, tiny_models, monkeypatch):
    proc = create_processor("standard", num_steps=2, use_controlnet=False, **SIZE)
    assert proc.describe()["models"]["vae_model"] is None
    assert_vae_is(proc, Path(tiny_models["sd15"]) / "vae")
    other = Path(tiny_models["sdxl_vae_fp16"])  # same latent layout as SD 1.5's: any such VAE fits
    monkeypatch.setenv("DREAMSTREAM_STANDARD_VAE_MODEL", str(other))
    proc = create_processor("standard", num_steps=2, use_controlnet=False, **SIZE)
    assert proc.describe()["models"]["vae_model"] == str(other)
    assert_vae_is(proc, other)
    assert_real_frame(proc.process_batch([request(steps=2, controlnet=False)])[0])


def test_single_lightning_file_serves_its_own_step_count(tiny_env, tiny_models):
    single = str(Path(tiny_models["lightning"]) / "sdxl_lightning_2step_unet.safetensors")
    proc = create_processor("lightning", lightning_unet=single, num_steps=2, use_controlnet=False, **SIZE)
    assert proc.process_batch([request(steps=2, controlnet=False)])[0].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="num_steps=4"):
        proc.process_batch([request(steps=4, controlnet=False)])


@pytest.mark.parametrize("bad, match", [
    ({"scheduler": "ddim"}, "scheduler"),
    ({"width": 100}, "width"),
    ({"height": 0}, "height"),
    ({"dtype": "int8"}, "dtype"),
    ({"base_model": ""}, "base_model"),
])
def test_bad_options_name_themselves(tiny_env, bad, match):
    with pytest.raises(ValueError, match=match):
        create_processor("lightning", **{**SIZE, **bad})


@pytest.mark.parametrize("kind, option, value, env", [
    ("lightning", "base_model", "dreamstream-tests/no-such-sdxl", "DREAMSTREAM_LIGHTNING_BASE_MODEL"),
    ("standard", "base_model", "/nonexistent/sd15", "DREAMSTREAM_STANDARD_BASE_MODEL"),
    ("standard", "controlnet_model", "dreamstream-tests/no-such-controlnet", "DREAMSTREAM_STANDARD_CONTROLNET_MODEL"),
    ("lightning", "depth_model", "dreamstream-tests/no-such-depth", "DREAMSTREAM_DEPTH_MODEL"),
    ("lightning", "tiny_vae", True, "DREAMSTREAM_LIGHTNING_TINY_VAE"),
    ("lightning", "vae_model", "/nonexistent/sdxl-vae-fp16-fix", "DREAMSTREAM_LIGHTNING_VAE_MODEL"),
    ("lightning", "vae_model", "dreamstream-tests/no-such-vae", "DREAMSTREAM_LIGHTNING_VAE_MODEL"),
    ("standard", "vae_model", "/nonexistent/sd-vae", "DREAMSTREAM_STANDARD_VAE_MODEL"),
])
def test_missing_model_fails_fast_naming_option_and_env_var(tiny_env, kind, option, value, env):
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        create_processor(kind, **{option: value}, **SIZE)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert option in message and env in message
    assert (value if isinstance(value, str) else "madebyollin/taesdxl") in message
    assert isinstance(info.value, RuntimeError)


def test_every_missing_model_is_named_in_one_error(tiny_env, monkeypatch):
    """A new user without weights should learn everything to fetch at once, not one model per try."""
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_CONTROLNET_MODEL", "/nonexistent/controlnet")
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        create_processor("lightning", base_model="/nonexistent/sdxl", depth_model="dreamstream-tests/no-depth",
                         **SIZE)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("3 models are unavailable")
    for option, env in (("base_model", "DREAMSTREAM_LIGHTNING_BASE_MODEL"),
                        ("controlnet_model", "DREAMSTREAM_LIGHTNING_CONTROLNET_MODEL"),
                        ("depth_model", "DREAMSTREAM_DEPTH_MODEL")):
        assert option in message and env in message, message
    # without the ControlNet, its models are not needed and not named
    with pytest.raises(ModelUnavailableError) as info:
        create_processor("lightning", base_model="/nonexistent/sdxl", use_controlnet=False, **SIZE)
    assert "controlnet_model" not in str(info.value) and "base_model" in str(info.value)


def test_lightning_folder_without_a_checkpoint(tiny_env, tmp_path):
    (tmp_path / "sdxl_lightning_4step_unet.safetensors").write_bytes(b"")
    with pytest.raises(ModelUnavailableError, match="sdxl_lightning_2step_unet.safetensors"):
        create_processor("lightning", lightning_unet=str(tmp_path), num_steps=2, **SIZE)


def test_unreachable_hub_fails_within_30_s(tiny_env, monkeypatch):
    """Not offline, not cached, and the hub does not answer: ModelUnavailableError, not a hang."""
    from huggingface_hub import constants

    from tests.helpers import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="DREAMSTREAM_STANDARD_CONTROLNET_MODEL"):
        create_processor("standard", controlnet_model="dreamstream-tests/unreachable", **SIZE)
    assert time.monotonic() - start < 30


def test_depth_model_choice(tiny_models):
    from service.processors.depth import is_midas
    from service.processors.models import model_source

    assert is_midas(model_source("standard", "depth_model", "lllyasviel/Annotators"))
    assert not is_midas(model_source("standard", "depth_model", "depth-anything/Depth-Anything-V2-Small-hf"))
    assert not is_midas(model_source("standard", "depth_model", str(tiny_models["depth"])))


def test_a_half_precision_processor_reads_the_fp16_files_where_a_folder_has_them(tiny_env, tiny_models, tmp_path):
    """A base model whose UNet exists only as diffusion_pytorch_model.fp16.safetensors (what
    service/processors/downloads.py fetches from repos that ship both): an fp16 processor loads it, an fp32 one
    looks for the default file, and says which is missing."""
    import shutil

    from diffusers import UNet2DConditionModel

    from service.processors.models import has_variant

    base = tmp_path / "sd15-fp16"
    shutil.copytree(tiny_models["sd15"], base)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    shutil.rmtree(base / "unet")
    unet.half().save_pretrained(base / "unet", variant="fp16")
    assert has_variant(str(base), "unet", "fp16") and not has_variant(str(base), "vae", "fp16")
    assert not (base / "unet" / "diffusion_pytorch_model.safetensors").exists()

    proc = create_processor("standard", base_model=str(base), dtype="fp16", num_steps=2, use_controlnet=False, **SIZE)
    assert proc.unet.dtype == torch.float16
    for name, value in proc.unet.state_dict().items():
        assert torch.equal(value, unet.state_dict()[name].half()), name
    with pytest.raises(ModelUnavailableError, match="base_model"):
        create_processor("standard", base_model=str(base), dtype="fp32", num_steps=2, use_controlnet=False, **SIZE)
