"""`standard`: Stable Diffusion 1.5 img2img guided by a depth ControlNet, with classifier-free guidance.

The components of `StableDiffusionControlNetImg2ImgPipeline` (tokenizer, CLIP text encoder, UNet,
VAE, depth ControlNet) driven by the shared loop in `diffusion.py` instead of the pipeline's
`__call__`, which re-encodes the prompt, re-draws noise and re-validates everything on every frame.
Default 25 steps; at strength 0.7 a frame runs the last 18 of them, each one UNet + ControlNet on a
batch of 2 per frame (unconditional and prompted halves). `use_controlnet=False` is plain img2img.

Extra options: `guidance_scale` (7.5; <= 1 turns CFG off and halves the work) and `negative_prompt`.
"""

from __future__ import annotations

from typing import Any

import torch

from service.processors.diffusion import DiffusionProcessor


class StandardProcessor(DiffusionProcessor):
    name = "standard"
    default_steps = 25
    extra_options = ("guidance_scale", "negative_prompt")

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
