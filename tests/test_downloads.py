"""service/processors/downloads.py: which repos and which of their files the processors load."""

from __future__ import annotations

import os

import pytest

from service.config import Settings
from service.processors.downloads import download_patterns, download_plan, select_files

SD15_LISTING = [  # the shape of stable-diffusion-v1-5's file list on the hub
    "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.fp16.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors", "scheduler/scheduler_config.json",
]


def test_download_plan_follows_the_processors_defaults(monkeypatch):
    from service.processors.models import DEFAULTS

    for key in [k for k in os.environ if k.startswith("DREAMSTREAM_")]:
        monkeypatch.delenv(key)
    plan = {item.repo: item for item in download_plan(["lightning", "standard"])}
    assert set(plan) == {repo for options in DEFAULTS.values() for repo in options.values()}
    assert "sdxl_lightning_4step_unet.safetensors" in plan["ByteDance/SDXL-Lightning"].patterns
    sdxl = plan["stabilityai/stable-diffusion-xl-base-1.0"].patterns
    assert "text_encoder_2/*.safetensors" in sdxl and "unet/*.safetensors" not in sdxl  # Lightning brings its UNet
    assert "unet/*.safetensors" in plan["stable-diffusion-v1-5/stable-diffusion-v1-5"].patterns
    assert "lightning depth_model" in plan[DEFAULTS["lightning"]["depth_model"]].label  # shared, fetched once

    # a model variable set at deploy time changes what is fetched (through Settings, as the server reads it);
    # a local path is not fetched
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_BASE_MODEL", "someone/sdxl-finetune")
    monkeypatch.setenv("DREAMSTREAM_DEPTH_MODEL", "/opt/models/depth")
    repos = {item.repo for item in download_plan(["lightning"], Settings.from_env().processor_options)}
    assert "someone/sdxl-finetune" in repos and "stabilityai/stable-diffusion-xl-base-1.0" not in repos
    assert DEFAULTS["lightning"]["depth_model"] not in repos
    with pytest.raises(ValueError, match="processors"):
        download_plan(["filter"])


def test_download_picks_fp16_variants_where_the_repo_has_them():
    patterns = download_patterns("standard", "base_model", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    fp16 = select_files(SD15_LISTING, patterns, "fp16")
    assert [f for f in fp16 if f.endswith(".safetensors")] == [
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]  # one precision per weight; no safety checker, single-file checkpoints, .bin or non-EMA copies
    assert {"model_index.json", "unet/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(fp16)
    full = select_files(SD15_LISTING, patterns, None)
    assert [f for f in full if f.endswith(".safetensors")] == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    # a weight stored only once (the Lightning UNets, already fp16; most VAEs) is fetched as it is
    lightning = ["sdxl_lightning_4step_unet.safetensors", "sdxl_lightning_4step_lora.safetensors", "README.md"]
    assert select_files(lightning, download_patterns("lightning", "lightning_unet", "ByteDance/SDXL-Lightning"),
                        "fp16") == ["sdxl_lightning_4step_unet.safetensors"]
