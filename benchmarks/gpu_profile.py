"""Where the live path's time goes on the GPU, before changing it: start-up pieces and per-stage costs.

    python benchmarks/gpu_profile.py --out $OUT/profile.json --logs $OUT      # on the GPU machine (~4 min)
    python benchmarks/gpu_profile.py --tiny --device cpu --out /tmp/prof.json # smoke test, no GPU

1. Start-up: a child process times `import torch`, CUDA's first context, the diffusers / transformers imports, the
   processor module and inductor's config (twice: the first pays for .pyc files and a cold page cache), then the
   real `dreamstream serve --processor lightning --steps 2` (defaults, batch size 1) is started twice and stopped
   once /healthz says "ok"; its log (timestamped) is kept, so every loading step can be read against the spawn.
2. Stages, in this process, on the lightning processor with the server's defaults (depth ControlNet, full fp16 VAE)
   in `compile=graphs` (the kernels the server serves from at once; inductor's own speed-up comes on top): VAE
   encode, depth, ControlNet+UNet step, UNet step, VAE decode, nvJPEG decode / encode, a whole batch-1 frame, and
   the batch-8 UNet step. Then the same after fusing the attention projections (accel.fuse_projections) and with
   the tiny encoder (`tiny_encoder`), each against the one before in the same run; the fused UNet's output is
   checked against the unfused one's (eager, same inputs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import PROMPT, build_models, free_port, make_frames, progress, timer  # noqa: E402
from benchmarks.real_models import hub_cache  # noqa: E402

IMPORTS = r"""
import json, time
t = {}; s = time.perf_counter()
def lap(name):
    global s
    now = time.perf_counter(); t[name] = round(now - s, 3); s = now
import torch; lap("import torch")
if torch.cuda.is_available():
    torch.empty(1, device="cuda"); torch.cuda.synchronize(); lap("cuda context")
import torch._inductor.config; lap("import torch._inductor.config")
import diffusers
from diffusers import UNet2DConditionModel, ControlNetModel, AutoencoderKL, AutoencoderTiny
lap("import diffusers models")
from transformers import CLIPTextModel, CLIPTextModelWithProjection, AutoModelForDepthEstimation
lap("import transformers models")
import service.processors.lightning; lap("import service.processors.lightning (rest)")
import service.app; lap("import service.app")
print(json.dumps(t))
"""


def model_env(paths: dict[str, Path], models: Path, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DREAMSTREAM_LIGHTNING_BASE_MODEL=str(paths["sdxl"]), DREAMSTREAM_LIGHTNING_UNET=str(paths["lightning"]),
               DREAMSTREAM_LIGHTNING_CONTROLNET_MODEL=str(paths["sdxl_controlnet"]),
               DREAMSTREAM_DEPTH_MODEL=str(paths["depth"]), DREAMSTREAM_LIGHTNING_VAE_MODEL=str(paths["sdxl_vae_fp16"]),
               HF_HUB_CACHE=str(hub_cache(models, paths)), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               DREAMSTREAM_BATCH_SIZES="1", DREAMSTREAM_MAX_FPS="0", DREAMSTREAM_DEVICE=args.device,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.tiny:
        env.update(DREAMSTREAM_WIDTH="64", DREAMSTREAM_HEIGHT="64")
    return env


def startup(paths: dict[str, Path], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    env = model_env(paths, Path(args.models), args)
    out: dict[str, Any] = {"imports": []}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", IMPORTS], cwd=REPO, env=env, capture_output=True, text=True)
        out["imports"].append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                              else {"error": done.stderr[-2000:]})
        progress(f"imports: {out['imports'][-1]}")
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="prof-inductor-")
    out["serve"] = []
    for label in ("first", "second"):
        port = free_port()
        log_path = logs / f"serve-{label}.log"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--processor", "lightning", "--steps", "2"]
        started, wall = time.monotonic(), time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        ready = None
        try:
            while time.monotonic() - started < args.ready_timeout and proc.poll() is None:
                with contextlib.suppress(OSError, ValueError), \
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    if json.loads(resp.read()).get("status") == "ok":
                        ready = round(time.monotonic() - started, 2)
                        break
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out["serve"].append({"label": label, "ready_s": ready, "spawned_at": time.strftime(
            "%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}", "log": str(log_path)})
        progress(f"serve ({label}): ready after {ready} s; log {log_path}")
    return out


def stages(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from service.processors import FrameRequest, create_processor, gpu_jpeg
    from service.processors.accel import fuse_projections

    os.environ["HF_HUB_CACHE"] = str(hub_cache(Path(args.models), paths))
    size = 64 if args.tiny else 512
    options = dict(base_model=str(paths["sdxl"]), lightning_unet=str(paths["lightning"]),
                   controlnet_model=str(paths["sdxl_controlnet"]), depth_model=str(paths["depth"]),
                   vae_model=str(paths["sdxl_vae_fp16"]), compile="graphs", batch_sizes="1,8", tiny_encoder=False,
                   device=args.device, width=size, height=size)
    started = time.monotonic()
    from service.processors import accel

    fuse, accel.fuse_projections = accel.fuse_projections, lambda module: 0  # unfused first: the "before"
    try:
        proc = create_processor("lightning", num_steps=2, use_controlnet=True, **options)
    finally:
        accel.fuse_projections = fuse
    out: dict[str, Any] = {"load_s": round(time.monotonic() - started, 1)}
    started = time.monotonic()
    proc.warmup()
    out["warmup_s"] = round(time.monotonic() - started, 1)
    progress(f"processor loaded in {out['load_s']} s, graphs captured in {out['warmup_s']} s")
    median_ms = timer(args.device)
    cuda = args.device == "cuda"
    jpegs = make_frames(8, size)
    from service import codec

    frames = [torch.from_numpy(codec.decode(j)).to(args.device) for j in jpegs]

    def request(i: int) -> FrameRequest:
        return FrameRequest(image=frames[i % 8], prompt=PROMPT, strength=0.7, num_steps=2, seed=42 + i,
                            use_controlnet=True)

    with torch.inference_mode():
        pixels = proc.to_pixels([frames[0]])
        pixels8 = proc.to_pixels(frames)
        latents = proc.vae_encode(pixels)
        control = proc.estimate_depth(pixels)
        embeds, added = proc.conditioning([PROMPT])
        embeds8, added8 = proc.conditioning([PROMPT] * 8)
        sched = proc.schedule(2, 2)
        sample = (latents / (sched.sigmas[0] ** 2 + 1) ** 0.5 + torch.randn_like(latents)).to(proc.dtype)
        sample8 = sample.expand(8, -1, -1, -1).contiguous() + torch.randn_like(sample.expand(8, -1, -1, -1))
        t1, t8 = sched.timesteps[0].expand(1), sched.timesteps[0].expand(8)

        def unet_stages(tag: str) -> dict[str, float]:
            return {f"step_cn{tag}": median_ms(lambda: proc.unet_with_control(sample, t1, embeds, control, added)),
                    f"step{tag}": median_ms(lambda: proc.unet_with_control(sample, t1, embeds, None, added)),
                    f"step_b8{tag}": median_ms(lambda: proc.unet_with_control(sample8, t8, embeds8, None, added8),
                                               count=15),
                    f"frame{tag}": median_ms(lambda: proc.process_batch_on_device([request(0)]))}

        ms: dict[str, float] = {
            "jpeg_decode_nvjpeg": median_ms(lambda: gpu_jpeg.decode([jpegs[0]], args.device)) if cuda else None,
            "jpeg_decode_nvjpeg_b8": median_ms(lambda: gpu_jpeg.decode(jpegs, args.device)) if cuda else None,
            "to_pixels": median_ms(lambda: proc.to_pixels([frames[0]])),
            "vae_encode_full": median_ms(lambda: proc.vae_encode(pixels)),
            "depth": median_ms(lambda: proc.estimate_depth(pixels)),
            "vae_decode_full": median_ms(lambda: proc.vae_decode(latents)),
            "vae_decode_full_b8": median_ms(lambda: proc.vae_decode(latents.expand(8, -1, -1, -1)), count=10),
            "vae_encode_full_b8": median_ms(lambda: proc.vae_encode(pixels8), count=10),
        }
        out_img = proc.process_batch_on_device([request(0)])[0]
        if cuda:
            ms["jpeg_encode_nvjpeg"] = median_ms(lambda: gpu_jpeg.encode([out_img], 85))
        ms["frame_host_wall"] = median_ms(lambda: torch.stack(proc.process_batch_on_device([request(0)])).cpu())
        ms.update(unet_stages(""))
        progress(f"before: {ms}")

        # fused attention projections: the same UNet call, recaptured
        proc.accel.bypass(True)
        reference = proc.unet_with_control(sample, t1, embeds, control, added).float()
        counts = {"unet": fuse_projections(proc.unet), "controlnet": fuse_projections(proc.controlnet)}
        fused_out = proc.unet_with_control(sample, t1, embeds, control, added).float()
        proc.accel.bypass(False)
        out["fused_layers"] = counts
        out["fused_rel_err_vs_unfused"] = float((fused_out - reference).norm() / reference.norm())
        proc.accel.functions["unet+controlnet"].fast.clear()
        ms.update(unet_stages("_fused"))

        # the tiny encoder (TAESDXL's encoder), the full VAE still decoding
        from diffusers import AutoencoderTiny

        tiny = AutoencoderTiny.from_pretrained(str(paths["taesdxl"]), torch_dtype=proc.dtype).to(args.device).eval()
        tiny.decoder = torch.nn.Identity()
        if cuda:
            tiny.to(memory_format=torch.channels_last)
        proc.encoder_vae, proc.encoder_dtype = tiny, proc.dtype
        proc.encoder_scale, proc.encoder_shift = float(tiny.config.scaling_factor), 0.0
        proc.accel.functions["vae_encode"].fast.clear()
        ms["vae_encode_tiny"] = median_ms(lambda: proc.vae_encode(pixels))
        ms["vae_encode_tiny_b8"] = median_ms(lambda: proc.vae_encode(pixels8), count=10)
        ms["frame_fused_tiny_encoder"] = median_ms(lambda: proc.process_batch_on_device([request(0)]))
        ms["frame_host_wall_fused_tiny_encoder"] = median_ms(
            lambda: torch.stack(proc.process_batch_on_device([request(0)])).cpu())
    out["ms"] = ms
    if cuda:
        out["memory_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        out["memory_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    progress(f"after: {ms}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models")
    parser.add_argument("--out", default="/tmp/gpu_profile.json")
    parser.add_argument("--logs", help="server logs (default beside --out)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--no-stages", action="store_true")
    parser.add_argument("--ready-timeout", type=float, default=180)
    args = parser.parse_args(argv)
    args.models = args.models or ("/tmp/tiny-models" if args.tiny else "/tmp/real-models")
    out_path = Path(args.out)
    logs = Path(args.logs) if args.logs else out_path.parent
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    paths = build_models(args)
    results: dict[str, Any] = {"build_s": round(time.monotonic() - started, 1),
                               "command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    progress(f"models ready in {results['build_s']} s")

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1, default=str))

    if not args.no_startup:
        try:
            results["startup"] = startup(paths, args, logs)
        except Exception as exc:  # keep going: the stages are the other half
            results["startup"] = {"error": f"{type(exc).__name__}: {exc}"}
            progress(f"startup failed: {exc}")
        save()
    if not args.no_stages:
        results["stages"] = stages(paths, args)
        save()
    print(json.dumps(results.get("stages", {}).get("ms"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
