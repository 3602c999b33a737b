"""What the standard and lightning processors share: options, the frame <-> latent path, batching, sampling.

One frame's way, written out so it can be read, profiled and compiled piece by piece:

    fit_to (CPU crop/resize) -> uint8 to the device -> VAE encode -> + the stream's fixed noise at the
    first executed sigma -> Euler steps, each one `denoise` (ControlNet + UNet) -> VAE decode -> uint8

Strength and steps: the `num_steps` schedule is built exactly as for text-to-image (so Lightning keeps
the timesteps it was distilled on) and img2img runs its last `steps_to_run(num_steps, strength) =
ceil(num_steps * strength)` steps, never fewer than 1: 4 x 0.7 runs the last 3 of 4, 25 x 0.7 the last
18 of 25, 1 x anything runs the one step. The plain pipelines' `int(num_steps * strength)` runs 0
steps (and crashes) for 1 x 0.7.

Sampler: Euler on the model's sigmas with no churn, i.e. deterministic (DDIM with eta=0 is the same
update): a stream's fixed seed gives the same noise every frame, so a still scene stays still.

Batching: `process_batch` groups requests that run the same timesteps with the same ControlNet
setting (same `num_steps`, same `steps_to_run`, same `use_controlnet`) into one batched call of each
model; prompts, seeds and images stay per request, so streams never see each other's state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from service.codec import fit_to
from service.config import parse_flag
from service.processors import gpu_jpeg
from service.processors.accel import CAPTURE_LOCK
from service.processors.base import FrameRequest, Processor
from service.processors.compile_options import parse_batch_sizes, parse_mode
from service.processors.depth import load_depth_estimator
from service.processors.models import (
    ModelSource,
    check_available,
    has_variant,
    load_model,
    model_source,
    resolve_device_dtype,
)
from service.processors.placement import memory_note, move_models, set_up_fast_path
from service.processors.schedule import Schedule, predicted_x0, steps_to_run
from service.processors.vae import load_encoder, load_vae

log = logging.getLogger("dreamstream.processors")

V = TypeVar("V")
MODEL_OPTIONS = ("base_model", "controlnet_model", "depth_model", "tiny_vae", "vae_model")
LOAD_PARTS, LOAD_SHARE = 8, 0.6  # the load's progress: ~8 model parts make 60 %, the warm-up the rest
COMMON_OPTIONS = MODEL_OPTIONS + ("device", "dtype", "width", "height", "controlnet_scale", "compile", "batch_sizes",
                                   "gpu_jpeg", "tiny_encoder", "offline")


class LRU(OrderedDict):
    """A small least-recently-used cache: prompts and noise of the streams that are live right now."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value


def _pixels(options: dict[str, Any], name: str) -> int:
    """`width`/`height`: the option (env DREAMSTREAM_WIDTH/HEIGHT, read at the edge), else 512."""
    value = options.get(name)
    if isinstance(value, str):
        value = int(value) if value.strip().isdigit() else value
    value = 512 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 64 <= value <= 2048 or value % 8:
        raise ValueError(f"{name} must be a multiple of 8 between 64 and 2048, got {value!r}")
    return value


def _flag(options: dict[str, Any], name: str, default: bool) -> bool:
    """An on/off option (env DREAMSTREAM_<NAME>, read at the edge: 1/0, true/false, on/off), else `default`."""
    return parse_flag(options.get(name), name, default)


class DiffusionProcessor(Processor):
    """Base of the standard and lightning processors; subclasses load their models and define `denoise`."""

    extra_options: ClassVar[tuple[str, ...]] = ()
    model_options: ClassVar[tuple[str, ...]] = MODEL_OPTIONS
    default_controlnet_scale: ClassVar[float] = 1.0
    upcast_vae: ClassVar[bool] = False  # run a full VAE that says `force_upcast` in fp32 (SDXL's NaNs in fp16)
    tiny_encoder_default: ClassVar[bool] = False  # on CUDA, encode the input with the tiny VAE (see vae.load_encoder)

    def __init__(
        self,
        style_prompt: str = "Van Gogh style painting",
        strength: float = 0.7,
        num_steps: int | None = None,
        use_controlnet: bool = True,
        seed: int = 42,
        on_progress: Callable[[float, str], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(style_prompt, strength, num_steps, use_controlnet, seed)
        # (fraction 0..1, what) as the load goes on: /healthz, the studio's "loading lightning... n %"
        self.on_progress = on_progress or (lambda fraction, stage: None)
        self._parts_loaded = 0
        known = COMMON_OPTIONS + self.extra_options
        for name in options:
            if name not in known:
                raise ValueError(f"unknown option {name!r} for the {self.name} processor; known: {', '.join(known)}")
        self.options = options
        self.offline = _flag(options, "offline", False)
        self.width, self.height = _pixels(options, "width"), _pixels(options, "height")
        self.controlnet_scale = float(options.get("controlnet_scale", self.default_controlnet_scale))
        self.sources: dict[str, ModelSource | None] = {
            name: model_source(self.name, name, options.get(name), self.offline)
            for name in self.model_options
        }
        device, self.dtype, why = resolve_device_dtype(options.get("device"), options.get("dtype"))
        self.device = str(device)  # a plain string, as Processor promises (the server serialises it)
        log.info("%s processor: %s/%s (%s), %dx%d, %d steps x strength %.2f, controlnet %s", self.name,
                 self.device, str(self.dtype).removeprefix("torch."), why, self.width, self.height,
                 self.num_steps, self.strength, "on" if self.use_controlnet else "off")
        self.controlnet: Any = None
        self.depth: Any = None
        self._prompts: LRU = LRU(64)
        self._noise: LRU = LRU(64)
        self._schedules: dict[tuple[int, int], Schedule] = {}
        self._warming = False  # inside warmup(): the background optimiser waits for its end
        # every model this processor loads now, checked together: one error names all that are missing
        skip = ({"controlnet_model", "depth_model"} if not self.use_controlnet else set()) | (
            {"vae_model"} if self.sources["tiny_vae"] is not None else set())
        check_available([s for name, s in self.sources.items() if s is not None and name not in skip])
        parse_mode(options.get("compile"), device)  # a bad `compile` or `batch_sizes` fails before the load
        parse_batch_sizes(options.get("batch_sizes"))
        self.load_models()
        load_vae(self)
        load_encoder(self)
        set_up_fast_path(self)
        if self.use_controlnet:
            self.ensure_controlnet()

    def to(self, device: str | torch.device | None, dtype: str | torch.dtype | None = None) -> DiffusionProcessor:
        """This processor moved to `device` as if built there (placement.py); call `warmup()` next. Load on the CPU,
        serve on a GPU (modal_app.py). `device`, `dtype` as the options; `dtype` defaults to the option given, else the
        device's own (fp16 on CUDA). Not while a frame is in flight; a background compile is waited for."""
        device, dtype, _ = resolve_device_dtype(device, dtype or self.options.get("dtype"))
        started = time.perf_counter()
        self.accel.wait_optimised()
        move_models(self, device, dtype)
        set_up_fast_path(self)
        log.info("%s processor moved to %s/%s in %.1f s", self.name, self.device, str(dtype).removeprefix("torch."),
                 time.perf_counter() - started)
        return self

    # --- loading ----------------------------------------------------------------------------------

    def load_models(self) -> None:
        """Load the text encoders, UNet and scheduler config (subclasses)."""
        raise NotImplementedError

    def load_component(self, option: str, cls: Any, subfolder: str | None = None, dtype_kw: str | None = None,
                       dtype: torch.dtype | None = None) -> Any:
        """`cls.from_pretrained` of one part of a model source; modules land on the device, frozen."""
        source = self.sources[option]
        assert source is not None
        kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
        if dtype_kw:
            kwargs[dtype_kw] = dtype or self.dtype

        def load(ref: str, local: bool) -> Any:
            # a half-precision processor reads a folder's fp16 files where it has them (half the bytes to fetch
            # and read; service/processors/downloads.py fetches only those), else its default files
            variant = {"variant": "fp16"} if self.dtype == torch.float16 and has_variant(ref, subfolder, "fp16") else {}
            return cls.from_pretrained(ref, local_files_only=local, **kwargs, **variant)

        part = load_model(source, load, what=subfolder or "")
        if isinstance(part, torch.nn.Module):
            part = part.to(self.device).eval().requires_grad_(False)
        self._parts_loaded += 1  # about 8 parts (tokenizers, text encoders, UNet, VAE, ControlNet, depth): 60 %
        self.on_progress(min(self._parts_loaded / LOAD_PARTS, 1.0) * LOAD_SHARE, f"loading {option}")
        return part

    def ensure_controlnet(self) -> None:
        """Load the ControlNet and the depth estimator the first time a frame asks for them."""
        if self.controlnet is not None:
            return
        from diffusers import ControlNetModel

        self.controlnet = self.load_component("controlnet_model", ControlNetModel, dtype_kw="torch_dtype")
        depth_source = self.sources["depth_model"]
        assert depth_source is not None
        self.depth = load_depth_estimator(depth_source, self.device, self.dtype)
        self.accel.optimize(self.controlnet)

    # --- per-request caches -----------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> Any:
        """Text-encoder output for one prompt, batch 1 (subclasses)."""
        raise NotImplementedError

    def prompt_embeds(self, prompt: str) -> Any:
        """Text encoders run once per prompt, not once per frame."""
        return self._prompts.get_or_make(prompt, lambda: self.encode_prompt(prompt))

    def noise(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The stream's fixed noise (drawn on the CPU, so a seed gives the same frames on any device)."""

        def draw() -> torch.Tensor:
            generator = torch.Generator("cpu").manual_seed(seed)
            return torch.randn((1, *shape), generator=generator, dtype=torch.float32).to(self.device)

        return self._noise.get_or_make((seed, shape), draw)

    def make_scheduler(self, num_steps: int) -> Any:
        """An EulerDiscreteScheduler with this processor's spacing and prediction type (subclasses)."""
        raise NotImplementedError

    def schedule(self, num_steps: int, run: int) -> Schedule:
        key = (num_steps, run)
        if key not in self._schedules:
            scheduler = self.make_scheduler(num_steps)
            scheduler.set_timesteps(num_steps, device="cpu")
            timesteps = scheduler.timesteps[num_steps - run:].to(self.device)
            sigmas = tuple(float(s) for s in scheduler.sigmas[num_steps - run:])
            self._schedules[key] = Schedule(timesteps, sigmas, scheduler.config.prediction_type)
        return self._schedules[key]

    # --- the frame path ---------------------------------------------------------------------------

    def check_request(self, request: FrameRequest) -> None:
        image = request.image
        uint8 = image.dtype == (torch.uint8 if isinstance(image, torch.Tensor) else np.uint8)
        if not isinstance(image, (np.ndarray, torch.Tensor)) or image.ndim != 3 or image.shape[2] != 3 or not uint8:
            raise ValueError("image must be an RGB uint8 array of shape (height, width, 3)")
        if not isinstance(request.prompt, str):
            raise ValueError("prompt must be a string")
        if isinstance(request.strength, bool) or not 0 < request.strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1], got {request.strength!r}")
        if isinstance(request.num_steps, bool) or not isinstance(request.num_steps, int) or request.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {request.num_steps!r}")
        self.check_steps(request.num_steps)

    def process_batch(self, requests: list[FrameRequest]) -> list[np.ndarray]:
        images = self.process_batch_on_device(requests)
        return list(torch.stack(images).cpu().numpy()) if images else []  # one copy to the host, one sync

    def process_batch_on_device(self, requests: list[FrameRequest]) -> list[torch.Tensor]:
        """`process_batch`, the styled (H, W, 3) uint8 frames kept on the device (for nvJPEG); images numpy or on it."""
        self.accel.release_superseded()
        for request in requests:
            self.check_request(request)
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.num_steps, steps_to_run(r.num_steps, r.strength), bool(r.use_controlnet))
            groups.setdefault(key, []).append(i)
        results: list[Any] = [None] * len(requests)
        with torch.inference_mode():
            for (num_steps, run, use_controlnet), members in groups.items():
                images = self.run_group([requests[i] for i in members], num_steps, run, use_controlnet)
                for i, image in zip(members, images, strict=True):
                    results[i] = image
        if not self._warming:  # a processor used without warmup() (the Python API): optimise what it has run
            self.accel.allow_optimising()
        return results

    def run_group(self, requests: list[FrameRequest], num_steps: int, run: int,
                  use_controlnet: bool) -> list[torch.Tensor]:
        """Requests that share their timesteps, in batches of the sizes the fast path has graphs for.

        With `compile` on, a group is split at the largest batch size and each part is padded (with copies
        of its last request, whose outputs are dropped) to the next size, so shapes stay static.
        """
        images: list[np.ndarray] = []
        for start, stop, size in self.accel.batches(len(requests)):
            part = requests[start:stop]
            padded = part + [part[-1]] * (size - len(part))
            images += self.run_batch(padded, num_steps, run, use_controlnet)[:len(part)]
        return images

    def run_batch(self, requests: list[FrameRequest], num_steps: int, run: int,
                  use_controlnet: bool) -> list[torch.Tensor]:
        """One batched pass: the whole per-frame work."""
        self.prepare_steps(num_steps)
        pixels = self.to_pixels([r.image for r in requests])
        latents = self.encode(pixels)
        noise = torch.cat([self.noise(r.seed, tuple(latents.shape[1:])) for r in requests])
        control = self.control_image(pixels) if use_controlnet else None
        cond = self.conditioning([r.prompt for r in requests])
        return self.decode(self.sample(latents, noise, self.schedule(num_steps, run), cond, control))

    def prepare_steps(self, num_steps: int) -> None:
        """Hook for step-count dependent weights (lightning swaps its UNet here)."""

    def to_pixels(self, frames: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """RGB uint8 frames of any size -> (B, 3, H, W) in [0, 1] on the device; only uint8 crosses the bus.

        Frames already on the device (decoded by nvJPEG) are cropped and resized there."""
        if all(isinstance(frame, np.ndarray) for frame in frames):
            batch = np.stack([fit_to(frame, self.width, self.height) for frame in frames])
            return torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 255
        chw = [gpu_jpeg.fit(torch.as_tensor(frame).to(self.device), self.width, self.height) for frame in frames]
        return (torch.stack(chw) / 255).to(self.dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae_encode(pixels)

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The latent mean, not a sample: no extra randomness per frame, and the same for TAESD."""
        out = self.encoder_vae.encode(pixels.to(self.encoder_dtype) * 2 - 1)
        latents = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        return (latents.float() - self.encoder_shift) * self.encoder_scale

    def decode(self, latents: torch.Tensor) -> list[torch.Tensor]:
        return list(self.vae_decode(latents))

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, H, W, 3) uint8 on the device: only the finished pixels cross the bus."""
        image = self.vae.decode((latents / self.latent_scale + self.latent_shift).to(self.vae_dtype)).sample
        image = ((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return image.permute(0, 2, 3, 1).contiguous()

    def control_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.ensure_controlnet()
        return self.estimate_depth(pixels)

    def estimate_depth(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.depth(pixels).to(self.dtype)

    def conditioning(self, prompts: list[str]) -> Any:
        """The batched text conditioning of these prompts (subclasses)."""
        raise NotImplementedError

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, cond: Any, control: torch.Tensor | None) -> torch.Tensor:
        """One model evaluation (ControlNet + UNet, and CFG where used) on scaled latents (subclasses)."""
        raise NotImplementedError

    def unet_with_control(self, sample: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                          control: torch.Tensor | None, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """ControlNet then UNet: one function, so the fast path (`accel`) captures the pair as one CUDA graph."""
        residuals: dict[str, Any] = {}
        if control is not None:
            down, mid = self.controlnet(sample, t, encoder_hidden_states=embeds, controlnet_cond=control,
                                        conditioning_scale=self.controlnet_scale, added_cond_kwargs=added,
                                        return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(sample, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False,
                         **residuals)[0]

    def sample(self, latents: torch.Tensor, noise: torch.Tensor, schedule: Schedule, cond: Any,
               control: torch.Tensor | None) -> torch.Tensor:
        """Euler steps from the first executed sigma down to 0; latents stay fp32 between steps."""
        sigmas = schedule.sigmas
        x = latents + sigmas[0] * noise
        batch = x.shape[0]
        for i, t in enumerate(schedule.timesteps):
            sigma = sigmas[i]
            model_in = (x / math.sqrt(sigma * sigma + 1)).to(self.dtype)
            output = self.denoise(model_in, t.expand(batch), cond, control).float()
            x0 = predicted_x0(output, x, sigma, schedule.prediction_type)
            x = x0 + (sigmas[i + 1] / sigma) * (x - x0)
        return x

    # --- Processor API ----------------------------------------------------------------------------

    def warmup(self) -> None:
        """Real frames (a gradient, not zeros) so the first viewer doesn't pay for lazy init.

        With `compile` on, one batch of every padded size, with and without the ControlNet (when it is
        loaded): this is where the CUDA graphs are captured and inductor compiles, with progress in the log.
        """
        ramp = np.linspace(0, 255, self.width, dtype=np.float32)
        image = np.stack([np.tile(ramp, (self.height, 1))] * 3, axis=-1).astype(np.uint8)
        image[..., 1] = image[..., 1].T if self.width == self.height else image[..., 1]
        start = time.perf_counter()
        self.on_progress(LOAD_SHARE, "warming up")
        if not self.accel.enabled:
            self.process_batch([self.request(image)])
            self.on_progress(1.0, "ready")
            self.warmup_seconds = time.perf_counter() - start
            log.info("%s warm-up frame: %.0f ms", self.name, self.warmup_seconds * 1000)
            return
        # The stream's ControlNet setting first, every batch size, then the other: compile=full compiles in that order.
        controlnet = (self.use_controlnet, not self.use_controlnet) if self.controlnet is not None else (False,)
        shapes = [(size, cn) for cn in controlnet for size in self.accel.batch_sizes]
        what = "capturing CUDA graphs" if self.accel.background or self.accel.mode == "graphs" else "compiling"
        hint = "" if len(self.accel.batch_sizes) == 1 or getattr(self, "stream_batch", False) else (
            " (up to ~4 s each on an H200; one stream needs batch 1: DREAMSTREAM_BATCH_SIZES=1 starts sooner)")
        log.info("%s: %s (compile=%s) for %d batch shapes%s", self.name, what, self.accel.mode, len(shapes),
                 "; the first can take minutes" if what == "compiling" else hint)
        self._warming = True
        try:
            for i, (size, cn) in enumerate(shapes, 1):
                step = time.perf_counter()
                self.accel.recording = cn == controlnet[0]  # the other setting is optimised once frames use it
                self.warm_shape(dataclasses.replace(self.request(image), use_controlnet=cn), size)
                log.info("%s: batch %d, controlnet %s ready (%d/%d) in %.1f s", self.name, size,
                         "on" if cn else "off", i, len(shapes), time.perf_counter() - step)
                self.on_progress(LOAD_SHARE + (1 - LOAD_SHARE) * i / len(shapes), f"{what}: {i}/{len(shapes)}")
        finally:
            self._warming = False
        if self.accel.uses_graphs:
            with CAPTURE_LOCK:  # the eager warm-up runs' blocks: the graphs hold what they need
                torch.cuda.empty_cache()
        self.warmup_seconds = time.perf_counter() - start
        log.info("%s warm-up done in %.1f s (%d CUDA graphs)%s", self.name, self.warmup_seconds,
                 self.accel.graph_count(), memory_note(self.device))
        self.accel.recording = True
        self.accel.allow_optimising()

    def warm_shape(self, request: FrameRequest, size: int) -> None:
        """Run what serving runs at batch `size` (warm-up: graph captures, compiles): here a whole batch of frames."""
        self.process_batch([request] * size)

    def wait_optimised(self, timeout: float | None = None) -> bool:
        """Block until the background compile (compile=full) is done; True at once in other modes."""
        return self.accel.wait_optimised(timeout)

    def optimise_progress(self) -> dict[str, Any]:
        return self.accel.progress()

    def describe(self) -> dict[str, Any]:
        return {
            "processor": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
            "vae_encoder": "tiny" if self.encoder_vae is not self.vae else "vae",
            "width": self.width,
            "height": self.height,
            "num_steps": self.num_steps,
            "strength": self.strength,
            "use_controlnet": self.use_controlnet,
            "models": {name: (s.value if s else None) for name, s in self.sources.items()},
            "compile": self.accel.describe(),
            "gpu_jpeg": self.gpu_jpeg,
        }
