"""The cases of benchmarks/gpu_processors.py: what each one loads, runs and records.

Case names say what runs: `lightning/4step/cn/taesd` is the lightning processor at 4 steps (strength 0.7
unless named), depth ControlNet on, tiny VAE, one stream; `streams/8/lightning-2step/nocn/taesd` is 8
streams in one `Engine.run`; a suffix `@eager` / `@graphs` / `@full` names a compile mode other than the
default; `plain/<case>` is the plain diffusers pipeline doing the same work once per frame.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from benchmarks import gpu_checks, gpu_plain
from benchmarks.harness import PROMPT, Case, Run, summary, timed_median
from service import codec
from service.config import StreamConfig
from service.processors import FrameRequest
from service.processors.schedule import steps_to_run


@dataclass(frozen=True)
class EngineSpec:
    processor: str
    vae: str
    compile: str | None = None  # None: the processor's default (regional on CUDA) or --compile
    batch_sizes: str = "1"
    dtype: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    controlnet: bool = True  # loaded (and its graphs captured) at start-up


ENGINES = {
    "lightning/taesd": EngineSpec("lightning", "taesd", batch_sizes="1,2,4,8"),
    "lightning/vae": EngineSpec("lightning", "vae"),
    "standard/vae": EngineSpec("standard", "vae"),
    "standard/taesd": EngineSpec("standard", "taesd"),
    "standard/vae/nocfg": EngineSpec("standard", "vae", extra=(("guidance_scale", 1.0),)),
    "lightning/taesd@eager": EngineSpec("lightning", "taesd", "off"),
    "lightning/vae@eager": EngineSpec("lightning", "vae", "off"),
    "standard/vae@eager": EngineSpec("standard", "vae", "off"),
    "lightning/vae@fp32": EngineSpec("lightning", "vae", "off", dtype="fp32"),
    "standard/vae@fp32": EngineSpec("standard", "vae", "off", dtype="fp32"),
    "lightning/taesd@graphs": EngineSpec("lightning", "taesd", "graphs"),
    "lightning/taesd@full": EngineSpec("lightning", "taesd", "full"),  # minutes per shape
    "lightning/taesd@full8": EngineSpec("lightning", "taesd", "full", batch_sizes="8", controlnet=False),
}


def all_cases() -> list[Case]:
    """Every case, in the order they run: the targets' own first, then checks, baselines, extras."""
    cases = [Case("device/peak", "device", quick=True), *gpu_jpeg_cases()]
    for steps in (1, 2, 4, 8):
        for cn in (False, True):
            quick = (steps, cn) in ((1, False), (4, True))
            cases.append(_frames("lightning", steps, cn, "taesd", ("lightning/taesd",), quick=quick))
        if steps == 2:
            for cn in (False, True):
                for n in (1, 2, 4, 8):
                    cases.append(_frames("lightning", 2, cn, "taesd", ("lightning/taesd",), streams=n,
                                         quick=not cn, as_streams=True))
    cases += [
        Case("equivalence/lightning/1step/nocn/taesd", "equivalence", ("lightning/taesd",
             "lightning/taesd@eager"), "lightning", 1, vae="taesd", quick=True),
        _eager(_frames("lightning", 1, False, "taesd", ()), "lightning/taesd@eager", quick=True),
        _eager(_frames("lightning", 2, False, "taesd", (), streams=8, as_streams=True), "lightning/taesd@eager",
               quick=True),
        _frames("standard", 25, True, "vae", ("standard/vae",), quick=True),
        Case("memory/both-processors", "memory", ("lightning/taesd", "standard/vae"), quick=True),
        _frames("standard", 25, True, "taesd", ("standard/taesd",)),
        replace(_frames("standard", 25, True, "vae", ("standard/vae/nocfg",)),
                name="standard/25step/cn/vae/nocfg", equivalent=False),
    ]
    for steps in (1, 2, 4, 8):
        for cn in (False, True):
            cases.append(_frames("lightning", steps, cn, "vae", ("lightning/vae",), quick=(steps, cn) == (4, True)))
    cases += [
        Case("equivalence/lightning/4step/cn/vae", "equivalence", ("lightning/vae", "lightning/vae@eager",
             "lightning/vae@fp32"), "lightning", 4, controlnet=True, quick=True),
        Case("equivalence/standard/25step/cn/vae", "equivalence", ("standard/vae", "standard/vae@eager",
             "standard/vae@fp32"), "standard", 25, controlnet=True, quick=True),
        Case("flops/lightning", "flops", ("lightning/vae@eager",), "lightning", quick=True),
        Case("flops/standard", "flops", ("standard/vae@eager",), "standard", 25, quick=True),
        _eager(_frames("lightning", 4, True, "vae", ()), "lightning/vae@eager", quick=True),
        _eager(_frames("standard", 25, True, "vae", ()), "standard/vae@eager", quick=True),
        Case("jpeg/cpu-vs-gpu", "jpeg", quick=True),
    ]
    for steps in (1, 2, 4, 8):
        for cn in (False, True):
            for vae in ("taesd", "vae"):
                quick = (steps, cn, vae) in ((1, False, "taesd"), (2, False, "taesd"), (4, True, "taesd"),
                                             (4, True, "vae"))
                cases.append(_plain(_frames("lightning", steps, cn, vae, ()), quick))
    cases.append(_plain(_frames("standard", 25, True, "vae", ()), True))
    full = [_frames("lightning", 1, False, "taesd", ("lightning/taesd@full",)),
            _frames("lightning", 4, True, "taesd", ("lightning/taesd@full",)),
            _frames("lightning", 2, False, "taesd", ("lightning/taesd@full8",), streams=8, as_streams=True)]
    for case in full[:2]:
        graphs = replace(case, resources=("lightning/taesd@graphs",))
        cases.append(replace(graphs, name=f"{case.name}@graphs"))
    for case in full:  # everything compiled whole; then also JPEG on the GPU: the fastest combination measured
        cases.append(replace(case, name=f"{case.name}@full"))
        cases.append(replace(case, name=f"{case.name}@full+gpujpeg", kind="gpujpeg"))
    return cases


def gpu_jpeg_cases() -> list[Case]:
    """JPEG decoded and encoded on the GPU around the processor's model calls: what Engine.run would do
    with nvJPEG (it uses libjpeg-turbo on the CPU today). Run early: they reuse the default engines."""
    cases = [_frames("lightning", 1, False, "taesd", ("lightning/taesd",)),
             _frames("lightning", 4, True, "taesd", ("lightning/taesd",)),
             _frames("lightning", 2, False, "taesd", ("lightning/taesd",), streams=8, as_streams=True),
             _frames("standard", 25, True, "taesd", ("standard/taesd",))]
    return [replace(c, name=f"{c.name}+gpujpeg", kind="gpujpeg", quick=True) for c in cases]


def _frames(processor: str, steps: int, cn: bool, vae: str, resources: tuple[str, ...], streams: int = 1,
            quick: bool = False, as_streams: bool = False) -> Case:
    what = f"{steps}step/{'cn' if cn else 'nocn'}/{vae}"
    name = f"streams/{streams}/{processor}-{what}" if as_streams else f"{processor}/{what}"
    return Case(name, "frames", resources, processor, steps, 0.7, cn, vae, streams, quick)


def _eager(case: Case, resource: str, quick: bool = False) -> Case:
    return replace(case, name=f"{case.name}@eager", resources=(resource,), quick=quick, frames=8)


def _plain(case: Case, quick: bool) -> Case:
    resource = "plain/sdxl" if case.processor == "lightning" else "plain/sd"
    return replace(case, name=f"plain/{case.name}", kind="plain", resources=(resource,), quick=quick)


# --- resources --------------------------------------------------------------------------------------

@dataclass
class LoadedEngine:
    engine: Any
    proc: Any
    warmup_seconds: float | None


def model_options(paths: dict[str, Any], processor: str, vae: str) -> dict[str, Any]:
    if processor == "lightning":
        options = {"base_model": paths["sdxl"], "controlnet_model": paths["sdxl_controlnet"],
                   "lightning_unet": paths["lightning"], "vae_model": paths["sdxl_vae_fp16"]}
    else:
        options = {"base_model": paths["sd15"], "controlnet_model": paths["sd15_controlnet"]}
    options["depth_model"] = paths["depth"]
    if vae == "taesd":
        options["tiny_vae"] = paths["taesdxl" if processor == "lightning" else "taesd"]
    return {k: str(v) for k, v in options.items()}


def load_resource(run: Run, key: str) -> Any:
    if key.startswith("plain/"):
        return gpu_plain.load(run, key)
    from service.engine import Engine

    spec = ENGINES[key]
    options: dict[str, Any] = {**model_options(run.paths, spec.processor, spec.vae), **dict(spec.extra),
                               "device": run.args.device, "batch_sizes": spec.batch_sizes}
    mode = spec.compile or run.args.compile
    if mode:
        options["compile"] = mode
    if spec.dtype:
        options["dtype"] = spec.dtype
    if run.args.tiny:
        options.update(width=run.args.size, height=run.args.size)
    engine = Engine(StreamConfig(prompt=PROMPT, processor_type=spec.processor, use_controlnet=spec.controlnet),
                    processor_options={spec.processor: options})
    proc = engine.processor(spec.processor)  # loads, then warmup(): captures every batch size
    proc.wait_optimised()  # compile=full compiles in the background: time the finished article
    return LoadedEngine(engine, proc, getattr(proc, "warmup_seconds", None))


# --- running a case ---------------------------------------------------------------------------------

def run_case(run: Run, case: Case) -> dict[str, Any]:
    handler = {"device": gpu_checks.device_peak, "frames": frames_case, "gpujpeg": gpu_jpeg_case,
               "plain": gpu_plain.plain_case,
               "memory": gpu_checks.memory_case, "flops": gpu_checks.flops_case,
               "equivalence": gpu_checks.equivalence_case, "jpeg": gpu_checks.jpeg_case}[case.kind]
    outcome = handler(run, case)
    return {"kind": case.kind, **(case.fields() if case.kind in ("frames", "plain", "gpujpeg") else {}), **outcome}


def stream_configs(case: Case) -> list[StreamConfig]:
    return [StreamConfig(prompt=f"{PROMPT}, stream {k}", strength=case.strength, num_steps=case.steps,
                         processor_type=case.processor, use_controlnet=case.controlnet, seed=k)
            for k in range(case.streams)]


def frames_case(run: Run, case: Case) -> dict[str, Any]:
    """`Engine.run` on `case.streams` streams' frames at once, timed as the server would see it."""
    import torch

    from service.engine import FrameJob

    loaded = run.get(case.resources[0])
    configs = stream_configs(case)
    batches = [[FrameJob(f"s{k}", run.frames[(j + k) % len(run.frames)], cfg) for k, cfg in enumerate(configs)]
               for j in range(len(run.frames))]
    counter = itertools.count()

    def once() -> None:
        outputs = loaded.engine.run(batches[next(counter) % len(batches)])
        for out in outputs:
            if isinstance(out, Exception):
                raise out
            assert out[:2] == b"\xff\xd8", "not a JPEG"

    first = timed_median(once, 0, 1, run.sync)[0]  # may capture graphs for a new shape: reported apart
    before = torch.cuda.memory_allocated() if run.cuda else 0
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    count = min(run.args.frames, case.frames or run.args.frames)
    times = timed_median(once, min(run.args.warmup, count), count, run.sync)
    outcome = {**summary(times, case.streams), "first_call_ms": round(first * 1000, 1)}
    if run.cuda:
        others = before - run.resident.get(case.resources[0], 0)
        outcome["peak_gpu_gb"] = round((torch.cuda.max_memory_allocated() - others) / 2**30, 2)
    outcome["stages_ms"] = stages(run, loaded.proc, case)
    outcome["compile"] = loaded.proc.describe().get("compile")
    return outcome


def gpu_jpeg_case(run: Run, case: Case) -> dict[str, Any]:
    """Bytes -> nvJPEG decode -> the processor's own model calls -> nvJPEG encode -> bytes (a prototype)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    if not run.cuda:
        return {"note": "no CUDA device"}
    proc = run.get(case.resources[0]).proc
    configs = stream_configs(case)
    schedule = proc.schedule(case.steps, steps_to_run(case.steps, case.strength))
    counter = itertools.count()

    def once() -> list[bytes]:
        j = next(counter)
        data = [torch.frombuffer(bytearray(run.frames[(j + k) % len(run.frames)]), dtype=torch.uint8)
                for k in range(case.streams)]
        with torch.inference_mode():
            proc.prepare_steps(case.steps)
            pixels = torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")).to(proc.dtype) / 255
            latents = proc.encode(pixels)
            noise = torch.cat([proc.noise(c.seed, tuple(latents.shape[1:])) for c in configs])
            control = proc.control_image(pixels) if case.controlnet else None
            x = proc.sample(latents, noise, schedule, proc.conditioning([c.prompt for c in configs]), control)
            images = proc.vae_decode(x).permute(0, 3, 1, 2)
            return [bytes(e.cpu().numpy()) for e in encode_jpeg([i.contiguous() for i in images], quality=85)]

    assert all(out[:2] == b"\xff\xd8" for out in once())
    count = min(run.args.frames, case.frames or run.args.frames)
    return summary(timed_median(once, run.args.warmup, count, run.sync), case.streams)


def stages(run: Run, proc: Any, case: Case) -> dict[str, float]:
    """Where the time of one `Engine.run` goes: the processor's own steps, synchronised one by one."""
    import time

    import torch

    configs = stream_configs(case)
    run_steps = steps_to_run(case.steps, case.strength)
    samples: dict[str, list[float]] = {}

    def lap(name: str, start: float) -> float:
        run.sync()
        now = time.perf_counter()
        samples.setdefault(name, []).append((now - start) * 1000)
        return now

    for j in range(run.args.stage_frames + 2):
        data = [run.frames[(j + k) % len(run.frames)] for k in range(case.streams)]
        t = time.perf_counter()
        images = [codec.decode(d) for d in data]
        t = lap("jpeg_decode", t)
        requests = [FrameRequest(img, c.prompt, c.strength, c.num_steps, c.seed, c.use_controlnet)
                    for img, c in zip(images, configs, strict=True)]
        with torch.inference_mode():
            proc.prepare_steps(case.steps)
            pixels = proc.to_pixels([r.image for r in requests])
            t = lap("upload", t)
            latents = proc.encode(pixels)
            t = lap("vae_encode", t)
            control = proc.control_image(pixels) if case.controlnet else None
            t = lap("depth", t)
            noise = torch.cat([proc.noise(r.seed, tuple(latents.shape[1:])) for r in requests])
            cond = proc.conditioning([r.prompt for r in requests])
            t = lap("prompt_noise", t)
            x = proc.sample(latents, noise, proc.schedule(case.steps, run_steps), cond, control)
            t = lap("steps", t)
            outputs = proc.decode(x)
            t = lap("vae_decode", t)
        for out in outputs:  # device tensors: copied to the host, as process_batch does
            codec.encode_jpeg(out.cpu().numpy(), 85)
        lap("jpeg_encode", t)
    return {name: round(float(np.median(v[2:])), 2) for name, v in samples.items()}


def one_line(outcome: dict[str, Any]) -> str:
    if "median_ms" in outcome:
        text = f"{outcome['median_ms']:.1f} ms per call, {outcome['fps_total']:.1f} frames/s"
        if outcome.get("streams", 1) > 1:
            text += f" ({outcome['fps_per_stream']:.1f} per stream)"
        if "peak_gpu_gb" in outcome:
            text += f", peak {outcome['peak_gpu_gb']:.1f} GB"
        if "stages_ms" in outcome:
            text += " | " + " ".join(f"{k}={v:.1f}" for k, v in outcome["stages_ms"].items())
        return text
    return ", ".join(f"{k}={v}" for k, v in outcome.items() if not isinstance(v, (dict, list)))[:300]
