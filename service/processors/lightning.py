"""`lightning`: SDXL with the SDXL-Lightning distilled UNet, 1, 2, 4 or 8 steps, no guidance.

Everything but the UNet and the VAE comes from `base_model` (SDXL base: two text encoders, scheduler
config; only the UNet's *config* is read from it, so its 10 GB of UNet weights are never fetched).
The VAE is `vae_model`, by default `madebyollin/sdxl-vae-fp16-fix`: SDXL's own VAE says `force_upcast`
and would run in fp32; this one runs in fp16 (`tiny_vae`, when set, replaces either).
The UNet weights come from `lightning_unet`, one ByteDance checkpoint per step count:
`sdxl_lightning_{2,4,8}step_unet.safetensors`, and for 1 step `sdxl_lightning_1step_unet_x0.safetensors`,
which predicts the clean latents (`prediction_type="sample"`) instead of the noise.

Sampler: `EulerDiscreteScheduler(timestep_spacing="trailing")` as ByteDance prescribes, so 4 steps are
t = 999, 749, 499, 249; img2img at strength s runs the last ceil(4 * s) of those (0.7 -> 749, 499,
249), never an in-between timestep the checkpoint was not distilled on.

Changing `num_steps` copies the other checkpoint's tensors into the same UNet in place: text encoders,
VAE and ControlNet stay loaded, and (for whoever compiles the UNet) its parameters keep their storage.
The last two checkpoints' state dicts stay in host RAM so toggling between two step counts is a copy,
not a disk read. `use_controlnet=True` adds an SDXL depth ControlNet (default conditioning scale 0.5,
as for `diffusers/controlnet-depth-sdxl-1.0-small`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from service.processors.base import check_lightning_steps
from service.processors.diffusion import LRU, MODEL_OPTIONS, DiffusionProcessor
from service.processors.fusion import fused_keys
from service.processors.models import ModelSource, fetch_file, load_model
from service.processors.vae import cast

log = logging.getLogger("dreamstream.processors")

CHECKPOINTS = {
    1: "sdxl_lightning_1step_unet_x0.safetensors",
    2: "sdxl_lightning_2step_unet.safetensors",
    4: "sdxl_lightning_4step_unet.safetensors",
    8: "sdxl_lightning_8step_unet.safetensors",
}


class LightningCheckpoints:
    """Which Lightning UNet file serves each step count; files fetched on first use, two kept in RAM.

    `lightning_unet` is a repo or folder holding ByteDance's files, or one `.safetensors` file. A single
    file that names its step count (`..._4step_...`) serves only that count.
    """

    def __init__(self, source: ModelSource, cache_size: int = 2) -> None:
        self.source = source
        self.single_file = source.is_local and source.path.is_file()
        self._states: LRU = LRU(cache_size)

    def filename(self, num_steps: int) -> str:
        if not self.single_file:
            return CHECKPOINTS[num_steps]
        name = self.source.path.name
        named = re.search(r"(\d+)step", name)
        if named and int(named.group(1)) != num_steps:
            raise ValueError(
                f"num_steps={num_steps} needs the {num_steps}-step Lightning UNet, but lightning_unet is the "
                f"single file {name}; point lightning_unet (or {self.source.env_var}) at a folder or repo "
                "holding all of sdxl_lightning_{1step_unet_x0,2step_unet,4step_unet,8step_unet}.safetensors"
            )
        return name

    def prediction_type(self, num_steps: int) -> str:
        return "sample" if "_x0" in self.filename(num_steps) else "epsilon"

    def state_dict(self, num_steps: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        name = self.filename(num_steps)
        return self._states.get_or_make(name, lambda: load_file(str(self._path(name))))

    def _path(self, name: str) -> Path:
        return self.source.path if self.single_file else fetch_file(self.source, name)


class LightningProcessor(DiffusionProcessor):
    name = "lightning"
    default_steps = 4
    extra_options = ("lightning_unet",)
    model_options = MODEL_OPTIONS + ("lightning_unet",)
    default_controlnet_scale = 0.5
    upcast_vae = True
    tiny_encoder_default = True

    def check_steps(self, num_steps: int) -> None:
        check_lightning_steps(num_steps)

    def load_models(self) -> None:
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.tokenizers = (self.load_component("base_model", CLIPTokenizer, "tokenizer"),
                           self.load_component("base_model", CLIPTokenizer, "tokenizer_2"))
        self.text_encoders = (self.load_component("base_model", CLIPTextModel, "text_encoder", "dtype"),
                              self.load_component("base_model", CLIPTextModelWithProjection, "text_encoder_2", "dtype"))
        base = self.sources["base_model"]
        assert base is not None
        self.unet_config = load_model(
            base, lambda ref, local: UNet2DConditionModel.load_config(ref, subfolder="unet", local_files_only=local),
            what="unet config")
        self.scheduler_config = self.load_component("base_model", EulerDiscreteScheduler, "scheduler").config
        unet_source = self.sources["lightning_unet"]
        assert unet_source is not None
        self.checkpoints = LightningCheckpoints(unet_source)
        self.unet: Any = None
        self.unet_file: str | None = None
        # SDXL's micro-conditioning: original size, crop offset, target size (all the frame's own).
        self.time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]],
                                     device=self.device, dtype=self.dtype)
        self.prepare_steps(self.num_steps)

    def prepare_steps(self, num_steps: int) -> None:
        """Put the checkpoint for `num_steps` into the UNet, in place when one is already loaded."""
        name = self.checkpoints.filename(num_steps)
        if name == self.unet_file:
            return
        state = self.checkpoints.state_dict(num_steps)
        if self.unet is None:
            from diffusers import UNet2DConditionModel

            with torch.device("meta"):  # no random init of 2.6 B parameters that are overwritten at once
                unet = UNet2DConditionModel.from_config(self.unet_config)
            self.unet = cast(unet, self.dtype).to_empty(device=self.device).eval().requires_grad_(False)
        # copy_ into the existing parameters; the fast path's fused q/k/v weights (accel.fuse_projections) are
        # not in any checkpoint, but the separate q/k/v weights are views of them, so they are filled too
        fused = fused_keys(self.unet)
        try:
            missing, unexpected = self.unet.load_state_dict(state, strict=False)
            missing = [k for k in missing if k not in fused]
            if missing or unexpected:
                raise RuntimeError(f"missing keys {missing[:5]} ({len(missing)}), unexpected keys "
                                   f"{unexpected[:5]} ({len(unexpected)})")
        except RuntimeError as exc:
            raise RuntimeError(
                f"lightning_unet file {name} does not fit base_model's UNet config "
                f"({self.sources['base_model'].value if self.sources['base_model'] else '?'}): {exc}"
            ) from exc
        log.info("lightning_unet: %s active for %d step(s) (%s prediction)", name, num_steps,
                 self.checkpoints.prediction_type(num_steps))
        self.unet_file = name

    def make_scheduler(self, num_steps: int) -> Any:
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(
            self.scheduler_config, timestep_spacing="trailing",
            prediction_type=self.checkpoints.prediction_type(num_steps))

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's penultimate hidden states of both encoders side by side, and encoder 2's pooled output."""
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out.text_embeds

    def conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = [self.prompt_embeds(p) for p in prompts]
        embeds = torch.cat([e for e, _ in pairs])
        pooled = torch.cat([p for _, p in pairs])
        return embeds, {"text_embeds": pooled, "time_ids": self.time_ids.expand(len(prompts), -1)}

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, dict[str, torch.Tensor]],
                control: torch.Tensor | None) -> torch.Tensor:
        embeds, added = cond
        return self.unet_with_control(sample, t, embeds, control, added)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "unet_checkpoint": self.unet_file}
