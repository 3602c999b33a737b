"""`DiffusionProcessor.to(device)`: a processor built on one device, moved, serves as one built there.

Offline, on the CPU, with the tiny models. The only device here is the CPU, so a move is CPU -> CPU, which copies
nothing, or a dtype change (fp32 -> fp64 -> fp32 copies every tensor and rounds none; fp32 -> bf16). Checked: what a
viewer sees (the styled pixels), that the fast path is made anew and wraps the class's own model calls (never an
earlier wrapper), and that nothing is left behind in the old dtype.
modal_app.py uses it to hold the weights in Modal's memory snapshot (tests/test_modal_app.py runs that path).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.fixtures_diffusion import create_processor, textured_frame

pytest_plugins = ["tests.fixtures_diffusion"]  # tiny_models, tiny_env
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2
SIZE = {"width": 64, "height": 64}


def styled(proc, prompt: str = "a watercolor", num_steps: int | None = None, seed: int = 3) -> np.ndarray:
    request = dataclasses.replace(proc.request(textured_frame(), prompt), seed=seed,
                                  num_steps=proc.num_steps if num_steps is None else num_steps)
    return proc.process_batch([request])[0]


def assert_same_frame(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to rounding: a copied weight may sit at another alignment in memory than the loaded one (a view into
    the checkpoint's buffer), and the CPU's matmul kernels may then add in another order (1 level in a few values)."""
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).sum())


@pytest.mark.parametrize("processor", ["lightning", "standard"])
def test_a_moved_processor_styles_frames_exactly_as_before(tiny_env, processor):
    steps = {"lightning": 2, "standard": 4}[processor]
    proc = create_processor(processor, device="cpu", num_steps=steps, compile="graphs", **SIZE)
    before = styled(proc)  # fills the prompt, noise and schedule caches on the old device
    old_accel = proc.accel
    assert proc.to("cpu") is proc
    assert proc.accel is not old_accel  # a new Accelerator, from the options given (compile=graphs)
    assert proc.describe()["compile"]["mode"] == "graphs" and proc.device == "cpu"
    for method in ("unet_with_control", "vae_encode", "vae_decode", "estimate_depth"):
        wrapper = getattr(proc, method)
        assert wrapper.accel is proc.accel  # the new fast path's wrapper ...
        assert wrapper.fn.__func__ is getattr(type(proc), method)  # ... around the class's own method
    np.testing.assert_array_equal(styled(proc), before)
    # CPU -> CPU copies nothing; fp32 -> fp64 -> fp32 copies every tensor twice and rounds none
    proc.to("cpu", torch.float64).to("cpu")  # later moves wrap the original methods again, not earlier wrappers
    assert proc.unet_with_control.fn.__func__ is type(proc).unet_with_control
    assert proc.describe()["dtype"] == "float32"  # the device's own again (no dtype option was given)
    assert_same_frame(styled(proc), before)
    assert not np.array_equal(styled(proc, "neon city"), before)  # the prompt still reaches the frame


def test_lightning_swaps_step_counts_after_a_move(tiny_env):
    """compile=graphs fuses the q/k/v projections into one weight that the separate ones are views of, so that a
    step-count change (a checkpoint copied into the separate names) reaches the fused matmul. A move copies every
    parameter on its own; the views are made again, or the swapped UNet would run with the old fused weights."""
    reference = create_processor("lightning", device="cpu", num_steps=2, compile="graphs", **SIZE)
    moved = create_processor("lightning", device="cpu", num_steps=2, compile="graphs", **SIZE)
    moved.to("cpu", torch.float64).to("cpu")  # every parameter copied (and back, exactly)
    for steps in (4, 2, 8):
        assert_same_frame(styled(moved, num_steps=steps), styled(reference, num_steps=steps))


def test_a_move_to_another_dtype_leaves_nothing_behind(tiny_env):
    """fp32 -> bf16: every model, the depth estimator and the cached noise follow (a part left in fp32 would fail
    with a dtype mismatch); the prompt embeddings are encoded again in bf16; the frame stays close to fp32's."""
    proc = create_processor("lightning", device="cpu", num_steps=2, **SIZE)
    fp32 = styled(proc)
    proc.to("cpu", dtype="bf16")
    assert proc.describe()["dtype"] == "bfloat16" and proc.describe()["vae_dtype"] == "bfloat16"
    bf16 = styled(proc)
    assert bf16.shape == fp32.shape and bf16.dtype == np.uint8
    assert np.abs(bf16.astype(int) - fp32.astype(int)).mean() < 12  # rounding, not another image
    proc.to("cpu", dtype=torch.float32)  # and back: a processor built in fp32 is fp32 again (bf16-rounded weights)
    assert proc.describe()["dtype"] == "float32"
    assert np.abs(styled(proc).astype(int) - fp32.astype(int)).mean() < 12
