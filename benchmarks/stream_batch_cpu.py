"""Stream batching (issue 12): the standard processor's frames/s and latency, sequential vs pipelined.

    python benchmarks/stream_batch_cpu.py                                    # CPU smoke: tiny models, 64x64
    python benchmarks/stream_batch_cpu.py --device cuda --real --out $OUT/stream_batch.json   # the H200

Standard 25 x 0.7 (18 steps), CFG 7.5, depth ControlNet, per stream its own prompt and seed. For each number of
streams k (`--streams 1,2`), one "round" is what a live server does when each of the k streams has sent a frame:
- sequential: `proc.process_batch(k requests)` (the path the server runs today): k frames per round, each
  frame's latency one round;
- pipelined: `StreamBatcher` (service/processors/stream_batch.py): the k frames are submitted and one `step()`
  runs, one batched UNet+ControlNet pass over the k x 18 frames in flight (2 x that with CFG); after 18 rounds
  to fill the pipeline, k finished frames come out of each round, and a frame's latency is ~18 rounds.
Reported per k: round time, frames/s in total and per stream, median and p90 latency (submit to styled frame;
pipelined: of the frames submitted after the fill and warm-up rounds, so no slow first round counts),
the in-flight count and the passes per round, and `max_levels`: the largest uint8 difference between a
pipelined frame and the sequential loop's frame for the same request (0-1 on CPU fp32; fp16 and other batch
shapes on the GPU round differently: report it). The models: tests/tiny_models.py's (CPU), or with `--real`
benchmarks/real_models.py's random weights of the real sizes (the arithmetic of the trained ones, PERF.md).
On CUDA `--compile` (default `graphs`: CUDA graphs captured in seconds; `full` adds inductor, compiled in the
background, waited for) gets batch sizes 1, k and 18k, so every pass replays a graph of its own shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import PROMPT, build_models, make_frames, progress  # noqa: E402


def load(args: argparse.Namespace, paths: dict[str, Path], batch_sizes: list[int]) -> Any:
    from service.processors import create_processor

    options: dict[str, Any] = {"base_model": paths["sd15"], "controlnet_model": paths["sd15_controlnet"],
                               "depth_model": paths["depth"], "device": args.device, "width": args.size,
                               "height": args.size}
    if args.vae == "taesd":
        options["tiny_vae"] = paths["taesd"]
    if args.compile:
        options["compile"] = args.compile
        options["batch_sizes"] = ",".join(str(s) for s in batch_sizes)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    started = time.monotonic()
    proc = create_processor("standard", style_prompt=PROMPT, strength=args.strength, num_steps=args.steps, **options)
    proc.warmup()
    proc.wait_optimised()
    progress(f"standard loaded and warmed up in {time.monotonic() - started:.1f} s: {proc.describe()['compile']}")
    return proc


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def requests_of(args: argparse.Namespace, images: list[Any], streams: int, round_: int) -> list[Any]:
    from service.processors import FrameRequest

    return [FrameRequest(images[(round_ * streams + k) % len(images)], f"{PROMPT}, stream {k}", args.strength,
                         args.steps, 100 + k) for k in range(streams)]


def sequential(args: argparse.Namespace, proc: Any, images: list[Any], streams: int) -> dict[str, Any]:
    for r in range(args.warm):
        proc.process_batch(requests_of(args, images, streams, r))
    times = []
    for r in range(args.rounds):
        start = time.perf_counter()
        proc.process_batch(requests_of(args, images, streams, r))
        sync(args.device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"rounds": len(times), "round_ms": round(median * 1000, 2), "fps_total": round(streams / median, 2),
            "fps_per_stream": round(1 / median, 2), "latency_p50_ms": round(median * 1000, 2),
            "latency_p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))] * 1000, 2)}


def pipelined(args: argparse.Namespace, proc: Any, images: list[Any], streams: int) -> dict[str, Any]:
    from service.processors.schedule import steps_to_run
    from service.processors.stream_batch import StreamBatcher

    batcher = StreamBatcher(proc)
    finals: dict[int, Any] = {}  # tag -> its final latents (the fast mode's error is measured on them)
    decode = batcher._decode

    def keep_latents(frames: list[Any]) -> None:
        for frame in frames:
            if len(finals) < 64:
                finals[frame.tag] = frame.x.float().clone()
        decode(frames)

    batcher._decode = keep_latents  # type: ignore[method-assign]
    depth = steps_to_run(args.steps, args.strength)
    submitted: dict[int, float] = {}
    sent: dict[int, Any] = {}
    latencies: list[float] = []
    outputs: list[tuple[int, Any]] = []
    fill = depth + args.warm
    rounds = max(args.rounds, depth + 6)
    total = fill + rounds
    timed_start, done_timed, in_flight = 0.0, 0, 0
    for r in range(total):
        if r == fill:
            sync(args.device)
            timed_start, done_timed = time.perf_counter(), 0
        for k, request in enumerate(requests_of(args, images, streams, r)):
            tag = r * streams + k
            submitted[tag], sent[tag] = time.perf_counter(), request
            batcher.submit(request, tag, stream=k)
        in_flight = batcher.in_flight
        finished = batcher.step()  # numpy on the host: the copy waits for the GPU
        now = time.perf_counter()
        # latency of the frames that lived their whole life in the timed, steady-state rounds
        latencies += [now - submitted[tag] for tag, _ in finished if tag >= fill * streams]
        if r >= fill:
            done_timed += len(finished)
        if r >= fill and len(outputs) < args.check:  # frames of full, steady-state batches
            outputs += finished[:args.check - len(outputs)]
    elapsed = time.perf_counter() - timed_start
    passes_per_round = batcher.passes / total
    batcher.flush()
    worst, errors, every = 0, [], getattr(proc, "cfg_every", 1)
    for tag, image in outputs:  # the same requests through the sequential loop (exact CFG), one by one
        proc.cfg_every = 1
        [reference] = proc.process_batch([sent[tag]])
        alone = StreamBatcher(proc)  # one frame alone in flight: bit-identical to the sequential loop
        alone._decode = lambda frames: setattr(frames[0], "image", frames[0].x.float().clone())  # type: ignore
        alone.submit(sent[tag], tag)
        [(_, exact)] = alone.flush(on_device=True)
        proc.cfg_every = every
        worst = max(worst, int(abs(image.astype("int16") - reference.astype("int16")).max()))
        if tag in finals:
            errors.append(float((finals[tag] - exact).norm() / exact.norm()))
    lat = sorted(latencies)
    return {"rounds": rounds, "round_ms": round(elapsed / rounds * 1000, 2), "latency_frames": len(lat),
            "fps_total": round(done_timed / elapsed, 2), "fps_per_stream": round(done_timed / elapsed / streams, 2),
            "latency_p50_ms": round(statistics.median(lat) * 1000, 2),
            "latency_p90_ms": round(lat[int(0.9 * (len(lat) - 1))] * 1000, 2),
            "in_flight": in_flight, "passes_per_round": round(passes_per_round, 2),
            "max_levels": worst, "checked_frames": len(outputs), "cfg_every": every,
            "latent_rel_error": round(max(errors), 6) if errors else None,
            "samples_per_frame_step": round(samples_per_frame_step(proc, in_flight), 3)}


def samples_per_frame_step(proc: Any, frames: int) -> float:
    """UNet+ControlNet samples a pass runs per frame in flight: 2 with exact CFG, 1 + 1/N in the fast mode."""
    if not proc.uses_cfg:
        return 1.0
    if proc.cfg_every == 1:
        return 2.0
    return 1 + proc.uncond_slots(frames) / frames


def sweep(args: argparse.Namespace, proc: Any, sizes: list[int]) -> dict[str, Any]:
    """One batched UNet+ControlNet pass (`denoise`, CFG: 2 x n samples) at each frame count n: ms per pass and per
    frame-step, so the batch sizes the pipeline pads to can be picked where the GPU is efficient."""
    import torch

    out = {}
    with torch.inference_mode():
        embeds = proc.prompt_embeds(PROMPT)
        h = w = args.size // 8
        for n in sizes:
            x = torch.randn(n, 4, h, w, device=proc.device, dtype=proc.dtype)
            t = torch.full((n,), 500, device=proc.device, dtype=torch.long)
            control = proc.control_for_cfg(torch.rand(n, 3, args.size, args.size, device=proc.device,
                                                      dtype=proc.dtype))
            cond = proc.conditioning_from([embeds] * n)
            for _ in range(3):
                proc.denoise(x, t, cond, control)
            sync(args.device)
            times = []
            for _ in range(args.sweep_runs):
                start = time.perf_counter()
                proc.denoise(x, t, cond, control)
                sync(args.device)
                times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1000
            out[str(n)] = {"pass_ms": round(ms, 2), "ms_per_frame_step": round(ms / n, 3)}
            progress(f"pass at {n} frames ({2 * n if proc.uses_cfg else n} samples): {ms:.1f} ms, "
                     f"{ms / n:.2f} ms a frame-step")
    return out


KERNEL_CLASSES = (("attention", ("flash", "fmha", "attention", "sdpa", "softmax")), ("conv", ("conv", "implicit_gemm",
                  "winograd", "cudnn")), ("gemm", ("gemm", "cutlass", "sm90", "xmma", "matmul")),
                  ("norm", ("norm",)), ("copy", ("copy", "memcpy", "memset", "cat")))


def profile_pass(args: argparse.Namespace, proc: Any, n: int) -> dict[str, Any]:
    """GPU time of one eager pass at `n` frames by kernel class (CUDA graphs bypassed, so kernels are visible)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        embeds = proc.prompt_embeds(PROMPT)
        x = torch.randn(n, 4, args.size // 8, args.size // 8, device=proc.device, dtype=proc.dtype)
        t = torch.full((n,), 500, device=proc.device, dtype=torch.long)
        control = proc.control_for_cfg(torch.rand(n, 3, args.size, args.size, device=proc.device, dtype=proc.dtype))
        cond = proc.conditioning_from([embeds] * n)
        proc.accel.bypass(True)
        try:
            for _ in range(2):
                proc.denoise(x, t, cond, control)
            sync(args.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    proc.denoise(x, t, cond, control)
                sync(args.device)
        finally:
            proc.accel.bypass(False)
    totals: dict[str, float] = {}
    top: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if not us:
            continue
        name = event.key.lower()
        kind = next((k for k, words in KERNEL_CLASSES if any(w in name for w in words)), "other")
        totals[kind] = totals.get(kind, 0.0) + us / 3000
        top[event.key[:90]] = us / 3000
    result = {"frames": n, "ms_by_class": {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
              "top_kernels_ms": {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]}}
    progress(f"eager pass at {n} frames by kernel class (ms): {result['ms_by_class']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", action="store_true", help="real-size models (benchmarks/real_models.py), 512 px")
    parser.add_argument("--models", help="model folder (default /tmp/tiny-models, or /tmp/real-models with --real)")
    parser.add_argument("--size", type=int, help="frame side (default 64 tiny, 512 real)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--streams", default="1,2", help="comma-separated stream counts")
    parser.add_argument("--vae", choices=("vae", "taesd"), default="vae")
    parser.add_argument("--compile", help="the processor's compile option (default: graphs on CUDA, off on CPU)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default: 6 CPU, 60 CUDA; the pipelined "
                        "case runs at least run_steps + 6, so frames submitted in timed rounds come out in them)")
    parser.add_argument("--warm", type=int, default=2, help="untimed rounds first (after the pipeline's fill)")
    parser.add_argument("--check", type=int, default=4, help="pipelined frames compared with the sequential loop")
    parser.add_argument("--sweep", default="", help="frame counts to time one batched pass at (e.g. 1,6,12,18,36)")
    parser.add_argument("--sweep-runs", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, help="profile one eager pass at this many frames")
    parser.add_argument("--cfg-every", default="1", help="fast-mode settings to run too (1 stream), e.g. 1,3,18")
    parser.add_argument("--out", default="/tmp/stream_batch.json")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.tiny = not args.real  # what harness.build_models reads
    args.models = args.models or ("/tmp/real-models" if args.real else "/tmp/tiny-models")
    args.size = args.size or (512 if args.real else 64)
    args.rounds = args.rounds or (60 if cuda else 6)
    args.compile = args.compile or ("graphs" if cuda else None)
    counts = [int(s) for s in args.streams.split(",")]

    from service import codec
    from service.processors.schedule import steps_to_run

    depth = steps_to_run(args.steps, args.strength)
    paths = build_models(args)
    sizes = [int(s) for s in args.sweep.split(",") if s]
    proc = load(args, paths, sorted({1, *counts, *(depth * k for k in counts), *sizes}))
    images = [codec.decode(jpeg) for jpeg in make_frames(8, args.size)]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
                              "device": args.device, "real": args.real, "size": args.size, "steps": args.steps,
                              "strength": args.strength, "run_steps": depth, "cfg": proc.guidance_scale,
                              "controlnet": True, "vae": args.vae, "compile": args.compile, "cases": {}}
    if cuda:
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    if sizes:
        result["sweep"] = sweep(args, proc, sizes)
    if args.profile and cuda:
        result["profile"] = profile_pass(args, proc, args.profile)
    for every in [int(e) for e in args.cfg_every.split(",") if e and e != "1"]:
        proc.cfg_every = every
        fast = pipelined(args, proc, images, 1)
        proc.cfg_every = 1
        result.setdefault("fast_mode", {})[f"cfg_every={every}"] = fast
        progress(f"fast mode cfg_every={every}, 1 stream: {fast['fps_total']:.2f} frames/s, latency p50 "
                 f"{fast['latency_p50_ms']:.0f} ms, {fast['samples_per_frame_step']} samples a frame-step (exact: 2), "
                 f"final latents {fast['latent_rel_error']} relative off exact CFG, max {fast['max_levels']} levels")
    for k in counts:
        case = {"sequential": sequential(args, proc, images, k), "pipelined": pipelined(args, proc, images, k)}
        case["speedup"] = round(case["pipelined"]["fps_total"] / case["sequential"]["fps_total"], 2)
        result["cases"][f"streams={k}"] = case
        for name in ("sequential", "pipelined"):
            c = case[name]
            progress(f"{k} stream(s), {name:10s}: {c['fps_total']:7.2f} frames/s ({c['fps_per_stream']:.2f} per "
                     f"stream), latency p50 {c['latency_p50_ms']:.0f} ms, p90 {c['latency_p90_ms']:.0f} ms"
                     + (f", {c['in_flight']} in flight, {c['passes_per_round']} passes/round, max "
                        f"{c['max_levels']} uint8 levels off the sequential loop" if name == "pipelined" else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
