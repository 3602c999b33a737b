"""Where a stream-batched pass of the standard processor spends its time, and what makes it faster (issue 12).

    python benchmarks/stream_batch_kernels.py --device cuda --real --out $OUT/kernels.json

At `--frames` frames in flight (default 18: one stream at 25 x 0.7), one UNet+ControlNet pass with CFG (2 x frames
samples), timed eagerly (at this size the GPU is the bottleneck, not launches) in each variant:
- `channels_last`: the weights as the Accelerator leaves them (cuDNN's NHWC convolutions);
- `contiguous`: the same weights back in NCHW;
- `inductor`: `torch.compile` of the pass (fullgraph, static shapes), as compile=full builds it in the background.
And the per-frame work around a pass at batch 1 (CUDA graphs): VAE encode, depth, VAE decode, and a whole
`StreamBatcher` round (submit + step), so the round's overhead beside its pass is known.
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
from benchmarks.stream_batch_cpu import load, sync  # noqa: E402


def median_ms(device: str, fn: Any, runs: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--models")
    parser.add_argument("--size", type=int)
    parser.add_argument("--frames", type=int, default=18)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--variants", default="channels_last,contiguous,inductor")
    parser.add_argument("--out", default="/tmp/stream_batch_kernels.json")
    args = parser.parse_args(argv)
    import torch

    from service import codec
    from service.processors import FrameRequest
    from service.processors.stream_batch import StreamBatcher

    args.tiny = not args.real
    args.models = args.models or ("/tmp/real-models" if args.real else "/tmp/tiny-models")
    args.size = args.size or (512 if args.real else 64)
    args.steps, args.strength, args.vae = 25, 0.7, "vae"
    args.compile = "graphs" if args.device.startswith("cuda") else None
    paths = build_models(args)
    proc = load(args, paths, [1, args.frames])
    n, dev = args.frames, args.device
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
                              "frames": n, "samples": 2 * n, "variants": {}, "stages_ms": {}}
    if dev.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    fn = proc.accel.functions["unet+controlnet"].fn if proc.accel.enabled else proc.unet_with_control
    with torch.inference_mode():
        embeds = proc.prompt_embeds(PROMPT)
        x = torch.randn(2 * n, 4, args.size // 8, args.size // 8, device=proc.device, dtype=proc.dtype)
        t = torch.full((2 * n,), 500, device=proc.device, dtype=torch.long)
        control = torch.rand(2 * n, 3, args.size, args.size, device=proc.device, dtype=proc.dtype)
        cond = proc.conditioning_from([embeds] * n)
        modules = [m for m in (proc.unet, proc.controlnet) if m is not None]
        for variant in args.variants.split(","):
            started = time.monotonic()
            run = fn
            if variant == "contiguous":
                for m in modules:
                    m.to(memory_format=torch.contiguous_format)
            elif variant == "inductor":
                for m in modules:
                    m.to(memory_format=torch.channels_last)
                run = torch.compile(fn, fullgraph=True, dynamic=False)
                run(x, t, cond, control)
            else:
                for m in modules:
                    m.to(memory_format=torch.channels_last)
            ms = median_ms(dev, lambda run=run: run(x, t, cond, control), args.runs)
            result["variants"][variant] = {"pass_ms": ms, "ms_per_sample": round(ms / (2 * n), 3),
                                           "setup_s": round(time.monotonic() - started, 1)}
            progress(f"{variant:14s}: pass at {n} frames ({2 * n} samples) {ms:.1f} ms, "
                     f"{ms / (2 * n):.2f} ms a sample (set up in {time.monotonic() - started:.0f} s)")
        for m in modules:
            m.to(memory_format=torch.channels_last)
        image = codec.decode(make_frames(1, args.size)[0])
        pixels = proc.to_pixels([image])
        latents = proc.encode(pixels)
        stages = {"to_pixels": lambda: proc.to_pixels([image]), "vae_encode_1": lambda: proc.encode(pixels),
                  "depth_1": lambda: proc.estimate_depth(pixels), "vae_decode_1": lambda: proc.decode(latents)}
        for name, stage in stages.items():
            result["stages_ms"][name] = median_ms(dev, stage, args.runs)
    batcher = StreamBatcher(proc)
    request = FrameRequest(image, PROMPT, 0.7, 25, 42)
    for i in range(n):
        batcher.submit(request, i, stream="s")
        batcher.step()
    result["stages_ms"]["submit"] = median_ms(dev, lambda: batcher.submit(request, 0, stream="s"), 1, warm=0)
    result["stages_ms"]["round_submit_step"] = median_ms(
        dev, lambda: (batcher.submit(request, 0, stream="s"), batcher.step()), args.runs)
    progress(f"stages (ms): {result['stages_ms']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
