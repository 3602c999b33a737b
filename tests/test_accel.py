"""The fast-path switches (service/processors/accel.py) on CPU: options, batch padding, regional compile.

CUDA graphs themselves need a GPU: benchmarks/gpu_processors.py checks them there against the eager
path. Here the same code runs minus the graphs, so padding, splitting and inductor stay covered.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from service.processors import FrameRequest
from service.processors.accel import Accelerator
from service.processors.compile_options import parse_batch_sizes, parse_mode
from tests.fixtures_diffusion import create_processor, textured_frame

pytest_plugins = ["tests.fixtures_diffusion"]
SIZE = {"width": 64, "height": 64}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_mode_defaults_and_errors():
    assert parse_mode(None, CPU)[0] == "off"
    assert parse_mode(None, CUDA)[0] == "full"  # served from CUDA graphs at once, compiled in the background
    assert parse_mode("on", CUDA)[0] == "regional" and parse_mode(True, CPU)[0] == "off"
    assert parse_mode("false", CUDA)[0] == "off" and parse_mode("graphs", CUDA)[0] == "graphs"
    assert parse_mode("eager", CUDA)[0] == "off" and parse_mode(" FULL ", CUDA) == ("full", "compile=full")
    with pytest.raises(ValueError, match="compile must be one of"):
        parse_mode("max-autotune", CUDA)


def test_batch_sizes():
    assert parse_batch_sizes(None) == (1, 2, 4, 8) and parse_batch_sizes("") == (1, 2, 4, 8)
    assert parse_batch_sizes("4, 1,2") == (1, 2, 4)
    assert parse_batch_sizes([3]) == (3,) and parse_batch_sizes("1,16") == (1, 16)
    for bad in ("0,1", "a", ",", [True]):
        with pytest.raises(ValueError, match="batch_sizes"):
            parse_batch_sizes(bad)


def test_batches_pad_to_the_next_size_and_split_at_the_largest():
    accel = Accelerator("graphs", (1, 2, 4, 8), CPU)
    assert accel.batches(1) == [(0, 1, 1)]
    assert accel.batches(3) == [(0, 3, 4)]
    assert accel.batches(8) == [(0, 8, 8)]
    assert accel.batches(11) == [(0, 8, 8), (8, 11, 4)]
    assert Accelerator("off", (1, 2, 4, 8), CPU).batches(11) == [(0, 11, 11)]


def test_cpu_default_is_the_untouched_eager_path(tiny_env, monkeypatch):
    monkeypatch.delenv("DREAMSTREAM_COMPILE", raising=False)
    proc = create_processor("lightning", use_controlnet=False, **SIZE)
    assert proc.describe()["compile"] == {"mode": "off", "cuda_graphs": False, "batch_sizes": [1, 2, 4, 8],
                                          "graphs_captured": 0, "optimise": {"state": "off", "mode": "off",
                                                                             "done": 0, "total": 0}}
    assert proc.optimise_progress()["state"] == "off" and proc.wait_optimised(0)
    assert proc.unet_with_control.__func__ is type(proc).unet_with_control  # not wrapped


def test_regional_compile_with_padding_matches_eager(tiny_env):
    """Three frames through batch sizes (2,): split 2 + 1, the 1 padded to 2; inductor on the blocks."""
    requests = [FrameRequest(textured_frame(seed=i), f"prompt {i}", 0.7, 2, 10 + i, i != 1) for i in range(3)]
    eager = create_processor("lightning", num_steps=2, compile="off", **SIZE)
    fast = create_processor("lightning", num_steps=2, compile="regional", batch_sizes="2", **SIZE)
    assert fast.accel.batches(3) == [(0, 2, 2), (2, 3, 2)]
    fast.warmup()
    ours, reference = fast.process_batch(requests), eager.process_batch(requests)
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == b.shape == (64, 64, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_full_mode_serves_at_once_and_swaps_in_compiled_calls_from_the_background(tiny_env, monkeypatch):
    """compile=full: warm-up serves eagerly, a background thread compiles every (call, shape) seen, in the order
    seen, and the frames after it match the eager path. On CPU there are no graphs to swap, so the compiled
    function itself is swapped in: the same bookkeeping the GPU path uses. Dynamo traces for real; inductor's
    C++ code generation is left out (aot_eager), as it takes many minutes on two cores."""
    monkeypatch.setattr("service.processors.accel.COMPILE_BACKEND", "aot_eager")
    requests = [FrameRequest(textured_frame(seed=i), f"prompt {i}", 0.7, 2, 10 + i, True) for i in range(2)]
    eager = create_processor("lightning", num_steps=2, compile="off", **SIZE)
    fast = create_processor("lightning", num_steps=2, compile="full", batch_sizes="1,2", **SIZE)
    assert fast.optimise_progress()["state"] == "pending"
    fast.warmup()  # batch 1 and 2, ControlNet on then off: served eagerly, then the optimiser starts
    assert fast.optimise_progress()["state"] in ("running", "done")
    early = fast.process_batch(requests)  # served while the optimiser may still be compiling
    assert fast.wait_optimised(timeout=900), fast.optimise_progress()
    progress = fast.optimise_progress()
    assert progress["state"] == "done" and progress["done"] == progress["total"] > 0, progress
    assert "errors" not in progress
    unet = fast.accel.functions["unet+controlnet"]
    # the default ControlNet setting (on) is compiled for both batch sizes; "off" stays eager until used
    assert len(unet.better) == 2 and len(unet.fast) == 4
    late, reference = fast.process_batch(requests), eager.process_batch(requests)
    assert len(unet.fast) == 2  # the superseded eager runners are gone after the next batch
    for a, b, c in zip(early, late, reference, strict=True):
        assert a.shape == b.shape == c.shape == (64, 64, 3)
        assert np.abs(a.astype(int) - c.astype(int)).max() <= 2
        assert np.abs(b.astype(int) - c.astype(int)).max() <= 2
    # a frame with the ControlNet off: served eagerly at once, then compiled in the background too
    off = [dataclasses.replace(requests[0], use_controlnet=False)]
    first = fast.process_batch(off)
    assert fast.optimise_progress()["state"] in ("running", "done")
    assert fast.wait_optimised(timeout=900) and fast.optimise_progress()["state"] == "done"
    assert len(unet.better) == 3
    again, reference = fast.process_batch(off), eager.process_batch(off)
    assert np.abs(first[0].astype(int) - reference[0].astype(int)).max() <= 2
    assert np.abs(again[0].astype(int) - reference[0].astype(int)).max() <= 2


def test_inductor_cache_goes_to_our_folder_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from service.cache_dirs import inductor_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache_dir()  # what importing inductor does: torch writes its own default into the variable
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()
    assert inductor_cache_dir() == tmp_path / "dreamstream" / "inductor"
    assert cache_dir() == str(tmp_path / "dreamstream" / "inductor")  # and inductor now writes there
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == tmp_path / "mine"


def test_fused_attention_projections_match_eager_and_follow_a_checkpoint_swap(tiny_env):
    """With the fast path on, every attention's q/k/v (or k/v) run as one matmul; the separate weights are views of
    the fused one, so lightning's in-place checkpoint swap (a different UNet per step count) reaches it too."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    requests = [FrameRequest(textured_frame(seed=i), f"prompt {i}", 0.7, 2, 10 + i, True) for i in range(2)]
    eager = create_processor("lightning", num_steps=2, compile="off", **SIZE)
    fast = create_processor("lightning", num_steps=2, compile="graphs", batch_sizes="2", **SIZE)
    for model in (fast.unet, fast.controlnet):
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert layers and all(isinstance(m.processor, FusedAttnProcessor2_0) for m in layers)
        self_attn = next(m for m in layers if not m.is_cross_attention)
        assert self_attn.to_k.weight.data_ptr() == self_attn.to_qkv.weight.data_ptr() + \
            self_attn.to_q.weight.numel() * self_attn.to_q.weight.element_size()
    assert not any(hasattr(m, "to_qkv") for m in eager.unet.modules())  # the eager path stays as loaded
    for steps in (2, 4, 2):  # 4 steps: another checkpoint copied into the same (fused) parameters, then back
        batch = [dataclasses.replace(r, num_steps=steps) for r in requests]
        ours, reference = fast.process_batch(batch), eager.process_batch(batch)
        assert fast.unet_file == eager.unet_file
        for a, b in zip(ours, reference, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, steps


def test_api_use_without_warmup_still_optimises_in_the_background(tiny_env, monkeypatch):
    """get_diffusion_processor + process_base64_frame never call warmup(): compile=full compiles what they ran."""
    monkeypatch.setattr("service.processors.accel.COMPILE_BACKEND", "aot_eager")
    request = FrameRequest(textured_frame(seed=3), "prompt", 0.7, 2, 10, False)
    fast = create_processor("lightning", num_steps=2, use_controlnet=False, compile="full", batch_sizes="1", **SIZE)
    eager = create_processor("lightning", num_steps=2, use_controlnet=False, compile="off", **SIZE)
    first = fast.process_batch([request])
    assert fast.optimise_progress()["state"] in ("running", "done")
    assert fast.wait_optimised(timeout=900) and fast.optimise_progress()["state"] == "done"
    assert fast.optimise_progress()["done"] >= 3  # unet, vae_encode, vae_decode for batch 1
    late, reference = fast.process_batch([request]), eager.process_batch([request])
    assert np.abs(first[0].astype(int) - reference[0].astype(int)).max() <= 2
    assert np.abs(late[0].astype(int) - reference[0].astype(int)).max() <= 2


def _fake_hub_cache(root, repo: str, folder) -> None:
    """A Hugging Face cache holding `folder` as `repo` (what one download leaves), for an offline test."""
    cached = root / f"models--{repo.replace('/', '--')}"
    snapshot = cached / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)
    for file in folder.iterdir():
        (snapshot / file.name).symlink_to(file)


def test_tiny_encoder_encodes_with_taesd_and_decodes_with_the_full_vae(tiny_env, tiny_models, monkeypatch, tmp_path):
    import huggingface_hub.constants
    from diffusers import AutoencoderTiny

    from service.processors.models import ModelUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="madebyollin/taesdxl"):  # asked for, and not to be had
        create_processor("lightning", num_steps=2, use_controlnet=False, tiny_encoder=True, **SIZE)
    default = create_processor("lightning", num_steps=2, use_controlnet=False, **SIZE)
    assert default.describe()["vae_encoder"] == "vae"  # on CPU the default is the full VAE's encoder
    with pytest.raises(ValueError, match="tiny_encoder"):
        create_processor("lightning", num_steps=2, use_controlnet=False, tiny_encoder="maybe", **SIZE)

    _fake_hub_cache(tmp_path, "madebyollin/taesdxl", tiny_models["taesdxl"])
    proc = create_processor("lightning", num_steps=2, use_controlnet=False, tiny_encoder=True, **SIZE)
    assert proc.describe()["vae_encoder"] == "tiny" and type(proc.vae).__name__ == "AutoencoderKL"
    pixels = torch.rand(1, 3, 64, 64)
    taesd = AutoencoderTiny.from_pretrained(str(tiny_models["taesdxl"]))
    with torch.inference_mode():
        expected = taesd.encode(pixels * 2 - 1).latents * taesd.config.scaling_factor
        full = default.encode(pixels)
        assert torch.allclose(proc.encode(pixels), expected, atol=1e-5)
        assert not torch.allclose(full, expected, atol=1e-2)  # the full encoder is another function
    out = proc.process_batch([FrameRequest(textured_frame(), "prompt", 0.7, 2, 10, False)])[0]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
