"""Stream batching, exact: one batched UNet+ControlNet pass advances every in-flight frame by one step.

The standard processor runs 25 x 0.7 = 18 Euler steps a frame, each a CFG pair (batch 2) that leaves a big
GPU mostly idle. `StreamBatcher` keeps several frames in flight, each at its own step of its own img2img
schedule (frame t at its first step, frame t-1 at its second, ...), and each `step()` is ONE batched call of
`denoise` (ControlNet + UNet, both CFG halves: 2 x the frames) that moves every one of them on by one step.
A frame that has run all its `steps_to_run(num_steps, strength)` steps is decoded and handed back.

Exact, not approximate (StreamDiffusion's denoising batch shares one schedule and noise across frames; this
does not): every frame keeps what the sequential loop (`DiffusionProcessor.sample`) gives it — its own prompt
embeddings, depth map, per-stream noise (seed) and its own schedule (timesteps and sigmas of its num_steps and
strength) — so frames of different streams and configs share a batch. The timestep becomes a per-sample
tensor (diffusers' UNet and ControlNet broadcast a (B,) timestep) and the Euler update takes per-sample
sigmas; the arithmetic is that of `sample`, term for term (the per-frame scalars become fp32 tensors of the
same values, kept on the device per schedule, so a pass copies nothing from the host), so a frame's output
equals `proc.process_batch([request])` up to the batch's rounding (CPU fp32, tiny models, 24 frames of 3
configs: final latents within 1.3e-6 relative, output at most 1 uint8 level off in 7 of 294,912 values,
every other value identical; tests/test_stream_batch.py holds every frame to 1 level).

    batcher = StreamBatcher(proc)              # a StandardProcessor
    batcher.submit(request, tag, stream="a")   # encode, depth, prompt, noise: once, at batch 1
    done = batcher.step()                      # one batched pass; [(tag, (H, W, 3) uint8), ...] that finished
    rest = batcher.flush()                     # step until nothing is in flight (a stream that stops sending)
    tags = batcher.abandon("a")                # drop a closed stream's frames (or all, after a failed step)

Order: a stream's frames come back in the order they were submitted. After a live config change a later
frame may need fewer steps than the frames still in flight before it; it is held until they are out, so
no frame of the old config ever reaches a viewer after the first frame of the new one. Frames of
different `stream`s do not wait for each other. A config change never touches frames in flight: each
finishes with the prompt, steps and strength it was submitted with.

Frames with and without the ControlNet cannot share one pass (the residuals are added to all or none): each
`step()` runs one pass per setting present, so one pass in the usual case (every stream alike). With
`compile` on, a pass is padded (copies of its last frame, outputs dropped) to one of the Accelerator's
`batch_sizes`, so the captured CUDA graphs serve it: give the in-flight count as a batch size
(`batch_sizes=1,18` for one stream at 25 x 0.7) or a pass splits into several calls.

How the server drives it (`Engine.advance`, on the worker thread; service/scheduler.py): each round `submit`s the
newest frame of every standard stream that sent one, calls `step()` once and sends the finished frames to their
streams' viewers; while anything is in flight it keeps stepping even when no new frame came, which drains a stream
that stopped sending (`flush()` does the same at once). With one frame entering per call and S = steps_to_run:
- latency = S calls of the batched pass (+ one encode/depth and one decode), vs S calls at batch 1 in sequence;
- throughput = one finished frame per call per stream, vs one per S calls: the batched call is wider (2 x S
  frames instead of 2), and measured on an H200 a frame-step costs 9 ms at batch 6 and up vs 14.7 at batch 1.
A broadcaster that waits for its styled frame before sending the next keeps only one frame in flight: the studio
and the OBS companion send at camera rate, and the hub keeps each stream's newest frame.

The opt-in fast mode (`cfg_every` N > 1 on the processor, `_denoise_fast`) is not exact: a frame's unconditional
prediction is computed at every N-th of its steps and reused in between (residual CFG).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.processors.base import FrameRequest
from service.processors.schedule import Schedule, steps_to_run


@dataclass(eq=False)
class InFlight:
    """One frame between `submit` and its return: its latents and everything its own steps need."""

    tag: Any
    stream: Hashable
    x: torch.Tensor  # (1, C, h, w) fp32 latents at sigmas[step]
    schedule: Schedule
    coef: torch.Tensor  # (steps, 5): `coefficients` of its schedule
    embeds: torch.Tensor  # (1, 77, D) its prompt's embeddings
    control: torch.Tensor | None  # (1, 3, H, W) its depth map, None without the ControlNet
    step: int = 0
    image: Any = None  # (H, W, 3) uint8 once decoded
    uncond: torch.Tensor | None = None  # fast mode (`cfg_every` > 1): its last unconditional prediction
    uncond_step: int = 0  # the step `uncond` was computed at

    @property
    def done(self) -> bool:
        return self.step == len(self.schedule.timesteps)


COLUMNS = ("c_in", "sigma", "ratio", "v_scale", "v_denom")


def coefficients(schedule: Schedule, device: Any) -> torch.Tensor:
    """(steps, 5) fp32 on the device: per step, the scalars `DiffusionProcessor.sample` and `predicted_x0` use
    (sqrt(sigma^2 + 1), sigma, next sigma / sigma, v-prediction's -sigma / sqrt(sigma^2 + 1) and sigma^2 + 1),
    each computed in Python floats as they compute it, then rounded to fp32 as PyTorch rounds a Python scalar
    in `x * scalar`. Built once per schedule, so a pass copies nothing from the host (no sync per step)."""
    sig = schedule.sigmas
    rows = [[math.sqrt(s * s + 1), s, sig[i + 1] / s, -s / math.sqrt(s**2 + 1), s**2 + 1]
            for i, s in enumerate(sig[:-1])]
    return torch.tensor(rows, dtype=torch.float32).to(device)


def predicted_x0_per_sample(output: torch.Tensor, sample: torch.Tensor, coef: dict[str, torch.Tensor],
                            prediction_type: str) -> torch.Tensor:
    """`schedule.predicted_x0` with one sigma per sample (`coef`: (B, 1, 1, 1) columns of `coefficients`)."""
    if prediction_type == "epsilon":
        return sample - coef["sigma"] * output
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return output * coef["v_scale"] + sample / coef["v_denom"]
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")


class StreamBatcher:
    """Frames of any number of standard streams in flight, advanced together one Euler step per `step()`.

    Not thread-safe, like the processor it drives: the thread that owns the processor owns this.
    """

    def __init__(self, proc: Any) -> None:
        if not hasattr(proc, "conditioning_from") or not hasattr(proc, "control_for_cfg"):
            raise TypeError(f"stream batching runs the standard processor, not {type(proc).__name__}")
        self.proc = proc
        self._active: list[InFlight] = []  # denoising, in submission order
        self._streams: dict[Hashable, deque[InFlight]] = {}  # each stream's frames not yet returned, in order
        self._coefficients: dict[tuple[int, int], torch.Tensor] = {}  # (num_steps, run) -> its `coefficients`
        self.passes = 0  # batched model passes run (the UNet+ControlNet calls, before any split by batch size)

    @property
    def in_flight(self) -> int:
        """Frames submitted and not yet returned (denoising, or finished and waiting for an earlier frame)."""
        return sum(len(q) for q in self._streams.values())

    def submit(self, request: FrameRequest, tag: Any = None, stream: Hashable = None) -> None:
        """Take one frame in: its latents with its stream's noise at its first sigma, its depth map and
        prompt embeddings, computed once here at batch 1 (as the sequential path computes them)."""
        proc = self.proc
        proc.check_request(request)
        proc.accel.release_superseded()
        run = steps_to_run(request.num_steps, request.strength)
        with torch.inference_mode():
            proc.prepare_steps(request.num_steps)
            pixels = proc.to_pixels([request.image])
            latents = proc.encode(pixels)
            noise = proc.noise(request.seed, tuple(latents.shape[1:]))
            schedule = proc.schedule(request.num_steps, run)
            control = None
            if request.use_controlnet:
                proc.ensure_controlnet()
                control = proc.estimate_depth(pixels)
            key = (request.num_steps, run)
            if key not in self._coefficients:
                self._coefficients[key] = coefficients(schedule, latents.device)
            frame = InFlight(tag, stream, latents + schedule.sigmas[0] * noise, schedule, self._coefficients[key],
                             proc.prompt_embeds(request.prompt), control)
        self._active.append(frame)
        self._streams.setdefault(stream, deque()).append(frame)

    def step(self, on_device: bool = False) -> list[tuple[Any, Any]]:
        """One batched pass for every frame in flight (one per ControlNet setting present); returns the frames
        that are done and whose stream has nothing earlier still in flight, as (tag, (H, W, 3) uint8): numpy,
        or tensors on the processor's device with `on_device` (for nvJPEG)."""
        proc = self.proc
        proc.accel.release_superseded()
        with torch.inference_mode():
            for use_controlnet in (True, False):
                lane = [f for f in self._active if (f.control is not None) == use_controlnet]
                if lane:
                    self._advance(lane)
            finished = [f for f in self._active if f.done]
            if finished:
                self._decode(finished)
                self._active = [f for f in self._active if not f.done]
        if not getattr(proc, "_warming", False):  # as process_batch: optimise what has run
            proc.accel.allow_optimising()
        return self._release(on_device)

    def flush(self, on_device: bool = False) -> list[tuple[Any, Any]]:
        """Step until nothing is in flight; every frame submitted so far, in each stream's order."""
        out: list[tuple[Any, Any]] = []
        while self._active:
            out += self.step(on_device)
        return out + self._release(on_device)

    def abandon(self, stream: Hashable = ...) -> list[Any]:
        """Take frames out without finishing them: those of `stream` (a stream that closed), or all (after a
        failed `step()`: the caller fails their frames, and the batcher is empty and usable again). Returns
        their tags, in submission order."""
        streams = list(self._streams) if stream is ... else [stream]
        dropped = [f for s in streams for f in self._streams.pop(s, ())]
        gone = {id(f) for f in dropped}
        self._active = [f for f in self._active if id(f) not in gone]
        return [f.tag for f in dropped]

    # --- the batched pass ---------------------------------------------------------------------------

    def _advance(self, frames: list[InFlight]) -> None:
        """One Euler step of each frame, as `DiffusionProcessor.sample` takes it, in batched model calls."""
        proc = self.proc
        self.passes += 1
        for start, stop, size in proc.accel.batches(len(frames)):
            part = frames[start:stop]
            padded = part + [part[-1]] * (size - len(part))  # static shapes for the graphs; outputs dropped
            x = torch.cat([f.x for f in padded])
            rows = torch.stack([f.coef[f.step] for f in padded])  # (B, 5) on the device
            coef = {name: rows[:, i].view(-1, 1, 1, 1) for i, name in enumerate(COLUMNS)}
            kinds = {f.schedule.prediction_type for f in padded}
            assert len(kinds) == 1, f"one processor, one prediction type: {kinds}"
            model_in = (x / coef["c_in"]).to(proc.dtype)
            t = torch.stack([f.schedule.timesteps[f.step] for f in padded])
            if getattr(proc, "cfg_every", 1) > 1 and proc.uses_cfg:
                output = self._denoise_fast(part, padded, model_in, t).float()
            else:
                cond = proc.conditioning_from([f.embeds for f in padded])
                control = None if padded[0].control is None else proc.control_for_cfg(
                    torch.cat([f.control for f in padded]))
                output = proc.denoise(model_in, t, cond, control).float()
            x0 = predicted_x0_per_sample(output, x, coef, kinds.pop())
            x = x0 + coef["ratio"] * (x - x0)
            for i, frame in enumerate(part):
                frame.x = x[i:i + 1]
                frame.step += 1

    def _denoise_fast(self, part: list[InFlight], padded: list[InFlight], model_in: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
        """The opt-in fast mode (`cfg_every` N > 1, residual CFG): a frame's unconditional prediction is computed at
        its first step and every N-th after, and reused in between, so one model call carries every frame's
        prompted half plus `uncond_slots` unconditional samples (a fixed count: the CUDA graphs need one shape;
        padded with copies of frame 0). The guidance arithmetic is `StandardProcessor.denoise`'s. Not exact."""
        proc = self.proc
        every = proc.cfg_every
        new = [i for i, f in enumerate(part) if f.uncond is None]  # a frame's first step computes its own
        due = sorted((i for i, f in enumerate(part) if f.uncond is not None and f.step - f.uncond_step >= every),
                     key=lambda i: part[i].uncond_step)  # the stalest first
        slots = max(proc.uncond_slots(len(padded)), len(new))  # more only when many streams start at once
        fresh = (new + due)[:slots]  # a due frame not picked keeps its unconditional half one step longer
        pick = fresh + [fresh[0] if fresh else 0] * (slots - len(fresh))
        index = torch.tensor(pick, device=model_in.device)
        negative = proc.prompt_embeds(proc.negative_prompt).expand(slots, -1, -1)
        cond = torch.cat([negative, *[f.embeds for f in padded]])
        control = None
        if padded[0].control is not None:
            depth = torch.cat([f.control for f in padded])
            control = torch.cat([depth[index], depth])
        out = proc.unet_with_control(torch.cat([model_in[index], model_in]), torch.cat([t[index], t]), cond, control)
        new_uncond, prompted = out[:slots], out[slots:]
        for j, i in enumerate(fresh):
            part[i].uncond, part[i].uncond_step = new_uncond[j:j + 1].clone(), part[i].step
        unconditional = torch.cat([f.uncond for f in part] + [part[-1].uncond] * (len(padded) - len(part)))
        return unconditional + proc.guidance_scale * (prompted - unconditional)

    def _decode(self, frames: list[InFlight]) -> None:
        proc = self.proc
        for start, stop, size in proc.accel.batches(len(frames)):
            part = frames[start:stop]
            latents = torch.cat([f.x for f in part] + [part[-1].x] * (size - len(part)))
            for frame, image in zip(part, proc.decode(latents), strict=False):
                frame.image = image

    def _release(self, on_device: bool) -> list[tuple[Any, Any]]:
        """Each stream's finished frames from the front of its queue: never one ahead of an earlier frame."""
        ready: list[InFlight] = []
        for stream in list(self._streams):
            queue = self._streams[stream]
            while queue and queue[0].image is not None:
                ready.append(queue.popleft())
            if not queue:
                del self._streams[stream]
        if not ready:
            return []
        if on_device:
            return [(f.tag, f.image) for f in ready]
        host = torch.stack([f.image for f in ready]).cpu().numpy()  # one copy to the host, one sync
        return [(f.tag, np.asarray(image)) for f, image in zip(ready, host, strict=True)]
