"""The baseline: the plain diffusers pipelines, built from the same saved models, called once per frame.

What a first version does: JPEG -> PIL, a depth map from transformers' depth-estimation pipeline (when the
ControlNet is on), `pipe(prompt, image, ...)` (which re-encodes the prompt and re-validates everything),
PIL -> JPEG. The pipelines run `int(steps * strength)` steps; the strength passed here makes that the
same count our processors run (`ceil`), so both do the same work (1 x 0.7 would otherwise be 0 steps).
"""

from __future__ import annotations

import io
import itertools
import warnings
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import PROMPT, Case, Run, summary, timed_median
from service.processors.schedule import steps_to_run


@dataclass
class Plain:
    base: Any  # the img2img pipeline as loaded
    controlnet: Any
    tiny_vae: Any
    depth: Any  # transformers depth-estimation pipeline
    sdxl: bool


def plain_strength(steps: int, strength: float) -> float:
    """A strength for which the pipelines' int(steps * s) equals our ceil(steps * strength)."""
    run = steps_to_run(steps, strength)
    value = min(1.0, (run + 0.01) / steps)
    assert min(int(steps * value), steps) == run
    return value


def load(run: Run, key: str) -> Plain:
    import torch
    from diffusers import AutoencoderTiny, ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import pipeline

    dtype = torch.float16 if run.cuda else torch.float32
    device = run.args.device
    paths = run.paths
    sdxl = key == "plain/sdxl"
    if sdxl:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        from service.processors.lightning import CHECKPOINTS

        unet = UNet2DConditionModel.from_pretrained(str(paths["sdxl"]), subfolder="unet", torch_dtype=dtype)
        unet.load_state_dict(load_file(str(paths["lightning"] / CHECKPOINTS[4])))  # the Lightning weights
        base = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(paths["sdxl"]), unet=unet, torch_dtype=dtype,
                                                                add_watermarker=False)
    else:
        from diffusers import StableDiffusionImg2ImgPipeline

        base = StableDiffusionImg2ImgPipeline.from_pretrained(str(paths["sd15"]), torch_dtype=dtype,
                                                              safety_checker=None, requires_safety_checker=False)
    base.to(device)
    controlnet = ControlNetModel.from_pretrained(str(paths["sdxl_controlnet" if sdxl else "sd15_controlnet"]),
                                                 torch_dtype=dtype).to(device)
    tiny = AutoencoderTiny.from_pretrained(str(paths["taesdxl" if sdxl else "taesd"]), torch_dtype=dtype).to(device)
    depth = pipeline("depth-estimation", model=str(paths["depth"]), device=device, dtype=dtype)
    return Plain(base, controlnet, tiny, depth, sdxl)


def pipeline_for(plain: Plain, case: Case) -> Any:
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    components = dict(plain.base.components)
    if case.vae == "taesd":
        components["vae"] = plain.tiny_vae
    if plain.sdxl:
        components["scheduler"] = EulerDiscreteScheduler.from_config(
            plain.base.scheduler.config, timestep_spacing="trailing",
            prediction_type="sample" if case.steps == 1 else "epsilon")
        cls = StableDiffusionXLControlNetImg2ImgPipeline if case.controlnet else StableDiffusionXLImg2ImgPipeline
        pipe = cls(**components, add_watermarker=False, **({"controlnet": plain.controlnet} if case.controlnet else {}))
    else:
        components["scheduler"] = EulerDiscreteScheduler.from_config(plain.base.scheduler.config)
        components.update(safety_checker=None, feature_extractor=None)
        if case.controlnet:
            pipe = StableDiffusionControlNetImg2ImgPipeline(**components, controlnet=plain.controlnet,
                                                            requires_safety_checker=False)
        else:
            pipe = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_case(run: Run, case: Case) -> dict[str, Any]:
    from PIL import Image

    plain = run.get(case.resources[0])
    pipe = pipeline_for(plain, case)
    strength = plain_strength(case.steps, case.strength)
    counter = itertools.count()

    def once() -> None:
        data = run.frames[next(counter) % len(run.frames)]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        kwargs: dict[str, Any] = {}
        if case.controlnet:
            control = plain.depth(image)["depth"].convert("RGB")
            kwargs = {"control_image": control, "controlnet_conditioning_scale": 0.5 if plain.sdxl else 1.0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: NaNs in the cast to uint8
            out = pipe(PROMPT, image=image, strength=strength, num_inference_steps=case.steps,
                       guidance_scale=0.0 if plain.sdxl else 7.5, **kwargs).images[0]
        buffer = io.BytesIO()
        out.save(buffer, "JPEG", quality=85)

    times = timed_median(once, 2, run.args.plain_frames, run.sync)
    return {**summary(times), "pipeline": type(pipe).__name__, "plain_strength": round(strength, 4)}
