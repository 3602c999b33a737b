"""The live path's compiled model calls by inductor setting: what the background compile (compile=full) could buy.

    python benchmarks/gpu_inductor.py --budget-s 900 --out $OUT/inductor.json   # GPU; longer than a 10-min device call
    python benchmarks/gpu_inductor.py --variants default --calls "unet+controlnet b1,vae_decode b1" --no-profile \
        --budget-s 300 --sync-dir $OUT/inductor --out $OUT/inductor.json   # fits one call (~150 s a UNet compile)
    python benchmarks/gpu_inductor.py --tiny --device cpu --variants default,coordinate --out /tmp/ind.json  # smoke

Each setting of VARIANTS runs in a child process of its own (inductor's settings are global): the lightning processor
with the server's defaults (depth ControlNet, fp16-fix VAE, tiny encoder, 2 steps) in compile=graphs, then each call
of CALLS compiled with `torch.compile(fullgraph=True)` under that setting, captured in a CUDA graph as the server
captures it (accel.capture) and timed with CUDA events (median of 50 replays). The children compile side by side on
an inductor cache of their own (cold: the compile seconds are real) and time one at a time, in turns the parent hands
out, so no timing overlaps another child's compile. `default` also times the eager-kernel graphs (what a server serves
before its compile is done) and batch 8 with a symbolic batch dimension (what compile=full builds for the second batch
size and serves every larger one with). Every compiled output is checked against the eager call (relative error).
A child past --budget-s compiles nothing more and times what it has; one still compiling --grace-s later is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import PROMPT, build_models, make_frames, progress, timer  # noqa: E402
from benchmarks.real_models import hub_cache  # noqa: E402

# inductor settings on top of the server's own (compile_options.configure_inductor)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "coordinate": {"coordinate_descent_tuning": True},
    # not in the default run: on the H200 its first call alone (GEMM and convolution templates) took over 8 min
    "autotune": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                 "max_autotune_conv_backends": "ATEN", "coordinate_descent_tuning": True},
}
DEFAULT_VARIANTS = "default,coordinate"
# name -> what it is; in the order compiled (the 1-stream default's calls first)
CALLS = {
    "unet+controlnet b1": "one ControlNet+UNet step, 1 stream with the defaults (2 of them a frame)",
    "vae_decode b1": "the full fp16-fix VAE decoder, 1 frame",
    "unet b8": "one UNet step without ControlNet, 8 frames (8 streams, --no-controlnet)",
    "unet b8 symbolic": "the same with a symbolic batch dimension (compile=full's second batch size)",
    "vae_encode b1": "the tiny encoder (TAESDXL), 1 frame",
    "depth b1": "Depth-Anything-V2-Small, 1 frame",
}


def child(args: argparse.Namespace) -> None:
    import torch
    import torch._inductor.config as inductor_config
    from torch.utils._pytree import tree_flatten

    from service import codec
    from service.processors import create_processor
    from service.processors.accel import capture
    from service.processors.compile_options import configure_inductor

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{args.child}-")
    configure_inductor()
    for key, value in VARIANTS[args.child].items():
        setattr(inductor_config, key, value)
    paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
    os.environ["HF_HUB_CACHE"] = str(hub_cache(Path(args.models), paths))
    size = 64 if args.tiny else 512
    proc = create_processor("lightning", num_steps=2, use_controlnet=True, compile="graphs", batch_sizes="1",
                            base_model=str(paths["sdxl"]), lightning_unet=str(paths["lightning"]),
                            controlnet_model=str(paths["sdxl_controlnet"]), depth_model=str(paths["depth"]),
                            vae_model=str(paths["sdxl_vae_fp16"]), device=args.device, width=size, height=size)
    cuda = torch.device(args.device).type == "cuda"
    median_ms = timer("cuda" if cuda else "cpu")
    fns = {name: fn.fn for name, fn in proc.accel.functions.items()}  # the plain calls, as compile=full compiles them
    with torch.inference_mode():
        frame = torch.from_numpy(codec.decode(make_frames(1, size)[0])).to(args.device)
        pixels = proc.to_pixels([frame])
        latents = fns["vae_encode"](pixels)
        control = fns["depth"](pixels)
        embeds, added = proc.conditioning([PROMPT])
        embeds8, added8 = proc.conditioning([PROMPT] * 8)
        sched = proc.schedule(2, 2)
        sample = (latents + sched.sigmas[0] * torch.randn_like(latents)).div(
            (sched.sigmas[0] ** 2 + 1) ** 0.5).to(proc.dtype)
        sample8 = torch.randn((8, *sample.shape[1:]), device=sample.device).to(proc.dtype)
        t1, t8 = sched.timesteps[0].expand(1).clone(), sched.timesteps[0].expand(8).clone()
        calls = {"unet+controlnet b1": ("unet+controlnet", (sample, t1, embeds, control, added)),
                 "vae_decode b1": ("vae_decode", (latents,)),
                 "unet b8": ("unet+controlnet", (sample8, t8, embeds8, None, added8)),
                 "unet b8 symbolic": ("unet+controlnet", (sample8, t8, embeds8, None, added8)),
                 "vae_encode b1": ("vae_encode", (pixels,)), "depth b1": ("depth", (pixels,))}
        if args.child != "default":
            del calls["unet b8 symbolic"]
        wanted = chosen(args.calls, CALLS) if args.calls else list(CALLS)
        calls = {name: call for name, call in calls.items() if name in wanted}
        pool = torch.cuda.graph_pool_handle() if cuda else None
        runners: dict[str, dict[str, Any]] = {}
        plain: dict[str, tuple[Any, tuple]] = {}  # the compiled calls themselves, for the kernel profile
        out: dict[str, Any] = {"variant": args.child, "settings": VARIANTS[args.child], "calls": {}}
        result = Path(args.sync, f"result-{args.child}.json")

        def runner(fn: Any, fargs: tuple, name: str) -> Any:
            flat, spec = tree_flatten(fargs)
            if not cuda:
                fn(*fargs)
                return lambda: fn(*fargs)
            graph = capture(fn, flat, spec, pool, name)
            return lambda: graph(flat)

        for name, (fn_name, fargs) in calls.items():
            if time.time() > args.deadline:
                out["calls"][name] = {"skipped": "past --budget-s"}
                continue
            started, symbolic = time.monotonic(), "symbolic" in name
            compiled = torch.compile(fns[fn_name], fullgraph=True, dynamic=None if symbolic else False)
            try:
                if symbolic:  # compile here, on the marked arguments: the capture below runs on unmarked copies
                    fargs = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in fargs)
                    for x in tree_flatten(fargs)[0]:
                        if isinstance(x, torch.Tensor) and x.dim():
                            torch._dynamo.maybe_mark_dynamic(x, 0)  # as automatic dynamic: specialised where needed
                    compiled(*fargs)
                runners[name] = {"compiled": runner(compiled, fargs, f"{name} ({args.child})")}
                plain[name] = (compiled, fargs)
                out["calls"][name] = {"compile_s": round(time.monotonic() - started, 1)}
                if args.child == "default" and not symbolic:
                    runners[name]["graphs"] = runner(fns[fn_name], fargs, f"{name} (eager kernels)")
                reference = fns[fn_name](*fargs).float()
                got = runners[name]["compiled"]().float()
                out["calls"][name]["rel_err_vs_eager"] = float((got - reference).norm() / reference.norm())
            except Exception as exc:  # report it, time the rest
                out["calls"][name] = {**out["calls"].get(name, {}), "error": f"{type(exc).__name__}: {exc}"[:400]}
                runners.pop(name, None)
                plain.pop(name, None)
                continue
            finally:
                result.write_text(json.dumps(out))  # what the parent keeps should this child be stopped
            progress(f"[{args.child}] {name}: compiled in {out['calls'][name]['compile_s']} s")
        Path(args.sync, f"ready-{args.child}").write_text("")
        while not Path(args.sync, f"go-{args.child}").exists():
            time.sleep(0.2)
        for name, kinds in runners.items():
            for kind, fn in kinds.items():
                try:
                    out["calls"][name][f"{kind}_ms"] = median_ms(fn, count=50, warm=5)
                except Exception as exc:  # report it, time the rest
                    out["calls"][name][f"{kind}_error"] = f"{type(exc).__name__}: {exc}"[:400]
                progress(f"[{args.child}] {name} {kind}: {out['calls'][name]}")
                result.write_text(json.dumps(out))
        try:
            if args.profile and cuda and "unet+controlnet b1" in plain:
                out["unet+controlnet b1 kernels_ms"] = kernel_classes(*plain["unet+controlnet b1"])
            if args.profile and cuda and args.child == "default":
                out["attention_ms"] = attention(median_ms)
        except Exception as exc:  # keep the timings above
            out["profile_error"] = f"{type(exc).__name__}: {exc}"[:400]
    result.write_text(json.dumps(out))


def chosen(names: str, known: Any) -> list[str]:
    """A comma-separated subset of `known`, checked."""
    picked = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in picked if name not in known]
    if unknown:
        raise SystemExit(f"unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return picked


def kernel_classes(fn: Any, fargs: tuple, runs: int = 10) -> dict[str, float]:
    """GPU time of one compiled call by kernel class (torch.profiler over `runs` calls, per call, ms)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn(*fargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn(*fargs)
        torch.cuda.synchronize()
    classes = {"triton (fused pointwise, norms)": ("triton",), "attention": ("flash", "fmha", "attention"),
               "convolution": ("conv", "fprop", "implicit", "winograd", "cudnn"),
               "gemm": ("gemm", "nvjet", "cublas", "cutlass", "xmma", "matmul", "_mm")}  # first match wins
    out: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        kind = next((k for k, words in classes.items() if any(w in name for w in words)), "other")
        out[kind] = out.get(kind, 0.0) + event.time_range.elapsed_us() / 1000 / runs
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def attention(median_ms: Any) -> dict[str, dict[str, float | str]]:
    """SDPA by backend on the SDXL UNet's attention shapes at 512 px (head dim 64): 10 heads over 32x32 tokens, 20
    over 16x16, self and cross (77 text tokens); batch 1 and 8."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, dict[str, float | str]] = {}
    for batch in (1, 8):
        for heads, tokens, keys in ((10, 1024, 1024), (10, 1024, 77), (20, 256, 256), (20, 256, 77)):
            q = torch.randn(batch, heads, tokens, 64, device="cuda", dtype=torch.float16)
            k = torch.randn(batch, heads, keys, 64, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            row = out[f"b{batch} {heads}x{tokens}x{keys}"] = {}
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                try:
                    with sdpa_kernel([backend]):
                        row[backend.name] = median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
                except Exception as exc:  # a backend this build or shape lacks
                    row[backend.name] = f"{type(exc).__name__}: {exc}"[:120]
            row["default"] = median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models")
    parser.add_argument("--out", default="/tmp/gpu_inductor.json")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="children compile nothing new this long after the start (model build and load included)")
    parser.add_argument("--grace-s", type=float, default=120, help="then a child still compiling is stopped")
    parser.add_argument("--calls", help=f"a subset of: {', '.join(CALLS)} (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sync-dir", help="where the children leave their results (default: a temp dir)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="kernel classes of the compiled step, SDPA by backend")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sync", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = args.models or ("/tmp/tiny-models" if args.tiny else "/tmp/real-models")
    if args.child:
        code = 0
        try:
            child(args)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not a normal exit: inductor's compile-worker pool can hold one up for minutes
    variants = chosen(args.variants, VARIANTS)
    if args.calls:
        chosen(args.calls, CALLS)
    started = time.time()  # the budget counts from here: building and loading the models are part of it
    paths = build_models(args)
    sync = Path(args.sync_dir or tempfile.mkdtemp(prefix="gpu-inductor-"))
    sync.mkdir(parents=True, exist_ok=True)
    if any(sync.iterdir()):
        raise SystemExit(f"--sync-dir {sync} is not empty: an earlier run's files would be taken for this one's")
    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "calls": CALLS,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "variants": {}}
    common = [sys.executable, __file__, "--models", args.models, "--device", args.device, "--sync", str(sync),
              *(["--calls", args.calls] if args.calls else []), *([] if args.profile else ["--no-profile"]),
              "--paths", json.dumps({k: str(v) for k, v in paths.items()}), "--deadline", str(started + args.budget_s)]
    children = {v: subprocess.Popen([*common, "--child", v] + (["--tiny"] if args.tiny else []), cwd=REPO)
                for v in variants}
    while any(not (sync / f"ready-{v}").exists() and proc.poll() is None for v, proc in children.items()):
        time.sleep(0.5)  # every child compiled (or gave up): no timing beside a compile
        if time.time() > started + args.budget_s + args.grace_s:  # a compile that runs on and on: stop it
            for variant, proc in children.items():
                if not (sync / f"ready-{variant}").exists():
                    progress(f"{variant}: still compiling {args.grace_s:.0f} s past --budget-s: stopped")
                    proc.kill()
            break
    for variant, proc in children.items():  # then in turns: no child times while another does
        (sync / f"go-{variant}").write_text("")
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            progress(f"{variant}: still timing after 300 s: stopped")
            proc.kill()
            proc.wait()
        result = sync / f"result-{variant}.json"
        results["variants"][variant] = json.loads(result.read_text()) if result.exists() else {
            "error": f"child exited with {proc.returncode}"}
        progress(f"{variant}: {json.dumps(results['variants'][variant].get('calls'))}")
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
