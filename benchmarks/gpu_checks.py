"""The measuring cases of benchmarks/gpu_processors.py that are not frame timings: the device's ceilings,
FLOP and weight-byte counts (for the floors), equivalence of the fast path, memory, and JPEG on the GPU."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.harness import Case, Run
from service import codec
from service.processors import FrameRequest
from service.processors.schedule import steps_to_run


def _events_ms(fn: Any, warm: int, count: int) -> float:
    import torch

    for _ in range(warm):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(count):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def device_peak(run: Run, case: Case) -> dict[str, Any]:
    """The two ceilings, measured here: a large matrix product's rate, a large copy's bandwidth."""
    import torch

    if not run.cuda:
        return {"matmul_bf16_tflops": None, "note": "no CUDA device"}
    n = 8192
    out: dict[str, Any] = {}
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        ms = _events_ms(lambda a=a, b=b: a @ b, 5, 20)
        out[f"matmul_{label}_tflops"] = round(2 * n**3 / ms / 1e9, 1)
        del a, b
    src = torch.randint(0, 255, (2**30,), device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = _events_ms(lambda: dst.copy_(src), 3, 20)
    out["copy_tb_s"] = round(2 * src.numel() / ms / 1e9, 2)  # bytes read + written
    return out


def _count(fn: Any) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0


def flops_case(run: Run, case: Case) -> dict[str, Any]:
    """FLOPs of each model call of one frame (batch 1), counted on the eager path, and the weight bytes each reads."""
    import torch
    from diffusers import AutoencoderTiny

    proc = run.get(case.resources[0]).proc
    image = codec.decode(run.frames[0])
    with torch.inference_mode():
        pixels = proc.to_pixels([image])
        latents = proc.encode(pixels)
        control = proc.control_image(pixels)
        cond = proc.conditioning([case.processor])
        sample = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(proc.device, proc.dtype)
        t = proc.schedule(case.steps, steps_to_run(case.steps, 0.7)).timesteps[:1]
    tiny_key = "taesdxl" if case.processor == "lightning" else "taesd"
    tiny = AutoencoderTiny.from_pretrained(str(run.paths[tiny_key]), torch_dtype=proc.dtype).to(proc.device)
    out: dict[str, Any] = {
        "step_cn": _count(lambda: proc.denoise(sample, t, cond, control)),
        "step_nocn": _count(lambda: proc.denoise(sample, t, cond, None)),
        "vae_encode": _count(lambda: proc.vae_encode(pixels)),
        "vae_decode": _count(lambda: proc.vae_decode(latents)),
        "taesd_encode": _count(lambda: tiny.encode(pixels * 2 - 1)),
        "taesd_decode": _count(lambda: tiny.decode(latents.to(proc.dtype))),
        "depth": _count(lambda: proc.estimate_depth(pixels)),
        "bytes_unet": _param_bytes(proc.unet), "bytes_controlnet": _param_bytes(proc.controlnet),
        "bytes_vae": _param_bytes(proc.vae), "bytes_taesd": _param_bytes(tiny),
        "bytes_depth": _param_bytes(getattr(proc.depth, "model", None)),
    }
    if case.processor == "standard" and proc.uses_cfg:  # one pass of batch 1, as CFG-free modes would run
        out["step_cn_single_pass"] = _count(lambda: proc.unet_with_control(sample, t, cond[1:], control[:1]))
    # Check on a whole frame that the parts add up (4 x 0.7 -> 3 steps for lightning, 18 for standard).
    run_steps = steps_to_run(case.steps, 0.7)
    request = FrameRequest(image, case.processor, 0.7, case.steps, 1, True)
    out["frame_cn_vae"] = _count(lambda: proc.process_batch([request]))
    out["frame_cn_vae_from_parts"] = (run_steps * out["step_cn"] + out["vae_encode"] + out["vae_decode"]
                                      + out["depth"])
    out["tflop_per_frame_cn_vae"] = round(out["frame_cn_vae"] / 1e12, 3)
    return out


def _rel(a: Any, ref: Any) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    return float((a - ref).norm() / ref.norm()) if ref.norm() > 0 else float("nan")


def _path(proc: Any, request: FrameRequest) -> dict[str, Any]:
    """One frame's way through `proc`, keeping one step's model output and the final latents."""
    import torch

    run_steps = steps_to_run(request.num_steps, request.strength)
    with torch.inference_mode():
        proc.prepare_steps(request.num_steps)
        pixels = proc.to_pixels([request.image])
        latents = proc.encode(pixels)
        noise = proc.noise(request.seed, tuple(latents.shape[1:]))
        control = proc.control_image(pixels) if request.use_controlnet else None
        cond = proc.conditioning([request.prompt])
        schedule = proc.schedule(request.num_steps, run_steps)
        sigma = schedule.sigmas[0]
        model_in = ((latents + sigma * noise) / (sigma * sigma + 1) ** 0.5).to(proc.dtype)
        step = proc.denoise(model_in, schedule.timesteps[:1], cond, control).float()
        final = proc.sample(latents, noise, schedule, cond, control)
        image = proc.decode(final)[0].cpu().numpy()  # (H, W, 3) uint8, as the engine encodes it
    return {"step": step.cpu(), "latents": final.float().cpu(), "image": image}


def equivalence_case(run: Run, case: Case) -> dict[str, Any]:
    """Same seed, frame and prompt through the fast path, the eager fp16 path and (if loaded) eager fp32."""
    paths = {name.split("@")[-1] if "@" in name else "fast": _path(run.get(name).proc, FrameRequest(
        codec.decode(run.frames[3]), "a watercolor", 0.7, case.steps, 7, case.controlnet)) for name in case.resources}
    fast, eager = paths["fast"] if "fast" in paths else paths["graphs"], paths["eager"]
    out: dict[str, Any] = {}
    for what in ("step", "latents"):
        out[f"{what}_rel_fast_vs_eager16"] = _rel(fast[what], eager[what])
        if "fp32" in paths:
            out[f"{what}_rel_fast_vs_fp32"] = _rel(fast[what], paths["fp32"][what])
            out[f"{what}_rel_eager16_vs_fp32"] = _rel(eager[what], paths["fp32"][what])
        out[f"{what}_finite"] = bool(all(np.isfinite(p[what].numpy()).all() for p in paths.values()))
    diff = np.abs(fast["image"].astype(int) - eager["image"].astype(int))
    out["image_absdiff_fast_vs_eager16"] = {"mean": round(float(diff.mean()), 3), "max": int(diff.max())}
    if "fp32" in paths:
        ref = out["latents_rel_eager16_vs_fp32"]
        out["within_fp16_tolerance"] = bool(out["latents_rel_fast_vs_fp32"] <= 2 * ref + 1e-3)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def memory_case(run: Run, case: Case) -> dict[str, Any]:
    """Both processors loaded in one process, each having served a frame (every lightning graph captured)."""
    import torch

    if not run.cuda:
        return {"note": "no CUDA device"}
    lightning, standard = (run.get(name) for name in case.resources)
    torch.cuda.reset_peak_memory_stats()
    frame = codec.decode(run.frames[0])
    lightning.proc.process_batch([FrameRequest(frame, "x", 0.7, 2, 1, False)] * 8)
    standard.proc.process_batch([FrameRequest(frame, "x", 0.7, 25, 1, True)])
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 2),
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "reserved_gb": round(torch.cuda.memory_reserved() / 2**30, 2),
            "device_used_gb": round((total - free) / 2**30, 2),
            "lightning_resident_gb": round(run.resident.get(case.resources[0], 0) / 2**30, 2),
            "standard_resident_gb": round(run.resident.get(case.resources[1], 0) / 2**30, 2),
            "lightning_graphs": lightning.proc.accel.graph_count(),
            "standard_graphs": standard.proc.accel.graph_count()}


def jpeg_case(run: Run, case: Case) -> dict[str, Any]:
    """libjpeg-turbo on one CPU core (the engine's codec) against nvJPEG through torchvision, 1 and 8 frames."""
    rgb = [codec.decode(d) for d in run.frames]
    out: dict[str, Any] = {}
    for n in (1, 8):
        start = time.perf_counter()
        for _ in range(10):
            [codec.decode(d) for d in run.frames[:n]]
        out[f"cpu_decode_{n}_ms"] = round((time.perf_counter() - start) * 100, 2)
        start = time.perf_counter()
        for _ in range(10):
            [codec.encode_jpeg(img, 85) for img in rgb[:n]]
        out[f"cpu_encode_{n}_ms"] = round((time.perf_counter() - start) * 100, 2)
    if not run.cuda:
        return out
    try:
        import torch
        from torchvision.io import decode_jpeg, encode_jpeg
    except ImportError as exc:
        return {**out, "gpu": f"torchvision unavailable: {exc}"}
    data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in run.frames]
    tensors = [torch.from_numpy(img).permute(2, 0, 1).contiguous().cuda() for img in rgb]
    for n in (1, 8):
        def dec(n: int = n) -> None:
            decode_jpeg(data[:n], device="cuda")
            torch.cuda.synchronize()

        def enc(n: int = n) -> None:
            [e.cpu() for e in encode_jpeg(tensors[:n], quality=85)]

        for name, fn in (("decode", dec), ("encode", enc)):
            for _ in range(3):
                fn()
            start = time.perf_counter()
            for _ in range(10):
                fn()
            out[f"gpu_{name}_{n}_ms"] = round((time.perf_counter() - start) * 100, 2)
    return out
