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

from service.processors import FrameRequest, create_processor
from service.processors.accel import Accelerator, parse_batch_sizes, parse_mode
from tests.fixtures_diffusion import textured_frame

pytest_plugins = ["tests.fixtures_diffusion"]
SIZE = {"width": 64, "height": 64}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_mode_defaults_env_and_errors(monkeypatch):
    monkeypatch.delenv("DREAMSTREAM_COMPILE", raising=False)
    assert parse_mode(None, CPU)[0] == "off"
    assert parse_mode(None, CUDA)[0] == "full"  # served from CUDA graphs at once, compiled in the background
    assert parse_mode("on", CUDA)[0] == "regional" and parse_mode(True, CPU)[0] == "off"
    assert parse_mode("false", CUDA)[0] == "off" and parse_mode("graphs", CUDA)[0] == "graphs"
    monkeypatch.setenv("DREAMSTREAM_COMPILE", "full")
    assert parse_mode(None, CUDA) == ("full", "env DREAMSTREAM_COMPILE=full")
    assert parse_mode("off", CUDA)[0] == "off"  # the option wins over the env var
    with pytest.raises(ValueError, match="compile must be one of"):
        parse_mode("max-autotune", CUDA)


def test_batch_sizes(monkeypatch):
    monkeypatch.delenv("DREAMSTREAM_BATCH_SIZES", raising=False)
    assert parse_batch_sizes(None) == (1, 2, 4, 8)
    assert parse_batch_sizes("4, 1,2") == (1, 2, 4)
    assert parse_batch_sizes([3]) == (3,)
    monkeypatch.setenv("DREAMSTREAM_BATCH_SIZES", "1,16")
    assert parse_batch_sizes(None) == (1, 16)
    for bad in ("0,1", "a", "", [True]):
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

    from service.processors.accel import inductor_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache_dir()  # what importing inductor does: torch writes its own default into the variable
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()
    assert inductor_cache_dir() == tmp_path / "dreamstream" / "inductor"
    assert cache_dir() == str(tmp_path / "dreamstream" / "inductor")  # and inductor now writes there
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == tmp_path / "mine"
