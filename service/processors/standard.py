"""`standard`: Stable Diffusion 1.5 img2img guided by a depth ControlNet, with classifier-free guidance.

The components of `StableDiffusionControlNetImg2ImgPipeline` (tokenizer, CLIP text encoder, UNet,
VAE, depth ControlNet) driven by the shared loop in `diffusion.py` instead of the pipeline's
`__call__`, which re-encodes the prompt, re-draws noise and re-validates everything on every frame.
Default 25 steps; at strength 0.7 a frame runs the last 18 of them, each one UNet + ControlNet on a
batch of 2 per frame (unconditional and prompted halves). `use_controlnet=False` is plain img2img.

Extra options: `guidance_scale` (7.5; <= 1 turns CFG off and halves the work), `negative_prompt`, and how a
server runs it live (env DREAMSTREAM_STANDARD_<OPTION>):
- `stream_batch` (on): the server keeps a stream's frames in flight and advances them together, one batched
  UNet+ControlNet pass per finished frame (`stream_batch.StreamBatcher`, exact); the batch sizes it pads to
  default to `STREAM_BATCH_SIZES` (one stream at 25 x 0.7 keeps 18 frames in flight, two keep 36).
- `cfg_every` (1): the opt-in fast mode. N > 1 computes a frame's unconditional half only at every N-th of its
  steps and reuses it in between (residual CFG), so a pass runs ~1 + 1/N samples a frame instead of 2; not exact
  (benchmarks/stream_batch_cpu.py reports the latent error). Only stream batching uses it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from service.processors.base import FrameRequest
from service.processors.diffusion import DiffusionProcessor, _flag
from service.processors.schedule import steps_to_run

log = logging.getLogger("dreamstream.processors")

# The sizes a stream-batched pass is padded to: the pipeline of one stream fills through 1..18 frames (25 x 0.7),
# two streams keep 36 in flight; bigger counts split into passes of 36.
STREAM_BATCH_SIZES = "1,2,4,8,12,18,24,36"


class StandardProcessor(DiffusionProcessor):
    name = "standard"
    default_steps = 25
    extra_options = ("guidance_scale", "negative_prompt", "stream_batch", "cfg_every")
    # On CUDA the img2img input is encoded by TAESD's encoder (vae.load_encoder): 13.5 -> ~1 ms a frame on an H200
    # (the full encoder was 6 % of a stream-batched round); at 25 x 0.7 the sampler starts at sigma ~3.1, so the
    # input latents are under a third of what the UNet sees and their small error drowns in the noise. The full VAE
    # decodes.
    tiny_encoder_default = True

    def __init__(self, *args: Any, **options: Any) -> None:
        self.stream_batch = _flag(options, "stream_batch", True)
        every = options.get("cfg_every", 1)
        every = int(every) if isinstance(every, str) and every.strip().isdigit() else every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"cfg_every must be a whole number >= 1 (1: exact CFG), got {every!r}")
        self.cfg_every = every
        if self.stream_batch and options.get("batch_sizes") in (None, ""):
            options["batch_sizes"] = STREAM_BATCH_SIZES
        super().__init__(*args, **options)
        if self.stream_batch:
            log.info("standard: stream batching on (a stream's frames in flight advance together, one batched pass "
                     "per styled frame; DREAMSTREAM_STANDARD_STREAM_BATCH=0 turns it off), CFG %s", "exact"
                     if self.cfg_every == 1 else f"fast: unconditional half every {self.cfg_every} steps (not exact)")
        elif self.cfg_every > 1:
            log.warning("standard: cfg_every=%d needs stream batching (stream_batch on); exact CFG", self.cfg_every)

    def load_models(self) -> None:
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        guidance = self.options.get("guidance_scale", 7.5)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance!r}")
        negative = self.options.get("negative_prompt", "")
        if not isinstance(negative, str):
            raise ValueError("negative_prompt must be a string")
        self.guidance_scale, self.negative_prompt = float(guidance), negative
        self.tokenizer = self.load_component("base_model", CLIPTokenizer, "tokenizer")
        self.text_encoder = self.load_component("base_model", CLIPTextModel, "text_encoder", "dtype")
        self.unet = self.load_component("base_model", UNet2DConditionModel, "unet", "torch_dtype")
        # SD 1.5 ships a PNDM config; its betas, offset and spacing carry over to the Euler sampler.
        self.scheduler_config = self.load_component("base_model", EulerDiscreteScheduler, "scheduler").config

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def warm_shape(self, request: FrameRequest, size: int) -> None:
        """Stream batching runs the passes at every batch size, but encodes, estimates depth and decodes a few
        frames at a time: warm exactly that (a whole sequential batch of 36 would capture VAE graphs nobody uses).
        The pass one stream runs all the time (`steady_size`) is warmed first: the background compile (compile=full)
        takes the shapes in the order they were first seen, so that pass is compiled first (each takes minutes)."""
        if not self.stream_batch:
            return super().warm_shape(request, size)
        steady = self.steady_size()
        if size == self.accel.batch_sizes[0] and size != steady and self.accel.recording:
            self._warm_passes(request, steady)
        elif size == steady and self.accel.recording and size != self.accel.batch_sizes[0]:
            return  # warmed first, above
        if size == 1:
            self.process_batch([request])  # the sequential path (/api/process) and the batch-1 model calls
        self._warm_passes(request, size)

    def _warm_passes(self, request: FrameRequest, size: int) -> None:
        from service.processors.stream_batch import StreamBatcher

        batcher = StreamBatcher(self)
        for i in range(size):
            batcher.submit(request, i, stream=i)  # streams of their own: none waits for another
        if self.cfg_every > 1 and self.uses_cfg:
            recording, self.accel.recording = self.accel.recording, False  # every frame new: not the steady shape
            batcher.step()
            self.accel.recording = recording
        batcher.step()  # the pass at `size` frames (fast mode: fewer unconditional samples than frames)
        if size <= 4:
            batcher.flush()  # and decode `size` frames at once, as that many streams do
        batcher.abandon()

    def steady_size(self) -> int:
        """The batch size a pass of one stream at the default steps and strength pads to (18 at 25 x 0.7)."""
        run = steps_to_run(self.num_steps, self.strength)
        return next((s for s in self.accel.batch_sizes if s >= run), self.accel.batch_sizes[-1])

    def uncond_slots(self, frames: int) -> int:
        """The fast mode's unconditional samples in a pass of `frames` (static, for the CUDA graphs)."""
        return math.ceil(frames / self.cfg_every)

    def make_scheduler(self, num_steps: int) -> Any:
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(self.scheduler_config)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, D) prompt embeddings; with CFG the negative prompt's copies come first: (2B, 77, D)."""
        return self.conditioning_from([self.prompt_embeds(p) for p in prompts])

    def conditioning_from(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        """`conditioning` of prompt embeddings (1, 77, D) already encoded: the stream batcher keeps each frame's own."""
        prompted = torch.cat(embeds)
        if not self.uses_cfg:
            return prompted
        negative = self.prompt_embeds(self.negative_prompt).expand(len(embeds), -1, -1)
        return torch.cat([negative, prompted])

    def control_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Depth once per frame; with CFG both halves of the batch see it (doubled once, not per step)."""
        return self.control_for_cfg(super().control_image(pixels))

    def control_for_cfg(self, control: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) depth maps -> what `denoise` takes: both CFG halves see them."""
        return torch.cat([control, control]) if self.uses_cfg else control

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                control: torch.Tensor | None) -> torch.Tensor:
        if not self.uses_cfg:
            return self.unet_with_control(sample, t, cond, control)
        output = self.unet_with_control(torch.cat([sample, sample]), torch.cat([t, t]), cond, control)
        unconditional, prompted = output.chunk(2)
        return unconditional + self.guidance_scale * (prompted - unconditional)
