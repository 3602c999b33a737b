"""The explicit per-frame loop computes what the plain diffusers img2img pipelines compute.

Same tiny models, same seed, a (steps, strength) where the pipelines' `int(steps * strength)` and our
`ceil` agree, and the tiny VAE (whose encoder is deterministic, so the pipelines' generator is spent on
the noise alone, as ours is). Differences beyond rounding would mean a wrong sigma, scaling, time id
or text embedding somewhere in our loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.processors import FrameRequest
from tests.fixtures_diffusion import create_processor, textured_frame

torch = pytest.importorskip("torch")

pytest_plugins = ["tests.fixtures_diffusion"]


def _compare(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(np.float32) / 255 - reference).max() <= 1 / 255


def test_lightning_matches_sdxl_img2img_pipeline(tiny_env, tiny_models):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    proc = create_processor("lightning", tiny_vae=str(tiny_models["taesdxl"]), use_controlnet=False,
                            width=64, height=64, num_steps=4)
    frame = textured_frame(64, 64)
    [ours] = proc.process_batch([FrameRequest(frame, "a watercolor", 1.0, 4, 5, False)])
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=proc.vae, text_encoder=proc.text_encoders[0], text_encoder_2=proc.text_encoders[1],
        tokenizer=proc.tokenizers[0], tokenizer_2=proc.tokenizers[1], unet=proc.unet,
        scheduler=EulerDiscreteScheduler.from_config(proc.scheduler_config, timestep_spacing="trailing"),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a watercolor", image=Image.fromarray(frame), strength=1.0, num_inference_steps=4,
                     guidance_scale=0.0, generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    _compare(ours, reference)


def test_standard_matches_sd_img2img_pipeline(tiny_env, tiny_models):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    proc = create_processor("standard", tiny_vae=str(tiny_models["taesd"]), use_controlnet=False,
                            width=64, height=64, num_steps=4)
    frame = textured_frame(64, 64, seed=2)
    [ours] = proc.process_batch([FrameRequest(frame, "a charcoal sketch", 0.5, 4, 11, False)])
    pipe = StableDiffusionImg2ImgPipeline(
        vae=proc.vae, text_encoder=proc.text_encoder, tokenizer=proc.tokenizer, unet=proc.unet,
        scheduler=EulerDiscreteScheduler.from_config(proc.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a charcoal sketch", image=Image.fromarray(frame), strength=0.5, num_inference_steps=4,
                     guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    _compare(ours, reference)
