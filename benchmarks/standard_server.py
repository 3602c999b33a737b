"""The standard (quality) processor through the real server, streams at camera rate (issue 12).

    python benchmarks/standard_server.py --out $OUT/standard_server.json                      # the H200
    python benchmarks/standard_server.py --tiny --device cpu --seconds 4 --out /tmp/ss.json   # CPU smoke

Method: real-size random-weight SD 1.5 + depth ControlNet + full VAE (benchmarks/real_models.py; `--tiny`:
tests/tiny_models.py at 64 px on the CPU) reach `python -m service.cli serve --processor standard` through the
DREAMSTREAM_* env vars, with the server's defaults otherwise: 25 steps x strength 0.7 (18 passes a frame), CFG
7.5, ControlNet on, stream batching on, compile=full on CUDA (serves from CUDA graphs at once, compiles with
inductor in the background). Each stream is a broadcaster sending 512x512 JPEGs at `--fps` as a camera does (open
loop: it never waits for styled frames; the server keeps the newest) and a viewer of it. Over `--seconds` after
`--warmup-s`: styled frames/s per stream and in total, and latency = viewer arrival - the frame's `ts` (p50/p95).
A stream-batched frame comes back ~18 passes after it went in, so a closed loop (one frame in flight) would
measure nothing but latency: the studio and `dreamstream obs` send at a fixed rate, as here.

Cases, one server each, all on one inductor cache (the first start compiles; later ones load it):
- `exact`: the defaults. 1 stream while the background compile runs ("serving at once"), then 1 and 2 streams
  after it is done;
- `fast`: DREAMSTREAM_STANDARD_CFG_EVERY=`--fast` (the opt-in residual CFG) and the tiny VAE (TAESD, unless
  `--fast-tiny-vae 0`), 1 stream;
- `sequential`: DREAMSTREAM_STANDARD_STREAM_BATCH=0 (the path before stream batching), 1 stream.
JSON goes to --out after every step; `--budget-s` skips what would not finish in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import Server, build_models, gpu_memory, make_frames, progress, shell  # noqa: E402
from benchmarks.real_models import hub_cache  # noqa: E402

TARGETS = {"exact, 1 stream": "≥ 8 frames/s, latency ≤ 2.5 s", "exact, 2 streams": "≥ 5 frames/s each",
           "fast": "≥ 12 frames/s"}


async def drive(url: str, streams: int, frames: list[bytes], fps: float, warmup_s: float,
                seconds: float) -> dict[str, Any]:
    """`streams` broadcasters at `fps` and one viewer each; what the viewers got in the measured window."""
    import websockets

    ws_url = url.replace("http://", "ws://")
    start = time.monotonic() + warmup_s
    end = start + seconds
    got: list[list[tuple[float, float, float]]] = [[] for _ in range(streams)]  # (arrival, latency s, server ms)
    sent = [0] * streams
    payloads = [f"data:image/jpeg;base64,{base64.b64encode(f).decode()}" for f in frames]

    async def broadcast(bc: Any, k: int) -> None:
        i, next_at = k, time.monotonic()
        while time.monotonic() < end + 1:
            await bc.send(json.dumps({"type": "frame", "frame": payloads[i % len(payloads)],
                                      "ts": time.time() * 1000}))
            sent[k] += start <= time.monotonic() <= end
            i += 1
            next_at += 1 / fps
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def watch(viewer: Any, k: int) -> None:
        async for raw in viewer:
            msg = json.loads(raw)
            if msg.get("type") == "frame":
                now = time.monotonic()
                if start <= now <= end:
                    got[k].append((now, time.time() - msg["ts"] / 1000, msg.get("latency_ms", 0.0)))

    async def drain(bc: Any) -> None:
        async for _ in bc:  # ready, stats, errors: read so the socket never backs up
            pass

    async def stream(k: int) -> None:
        sid = f"std{k}"
        async with (websockets.connect(f"{ws_url}/ws/viewer/{sid}", max_size=None) as viewer,
                    websockets.connect(f"{ws_url}/ws/broadcaster/{sid}", max_size=None) as bc):
            tasks = [asyncio.create_task(watch(viewer, k)), asyncio.create_task(drain(bc))]
            await broadcast(bc, k)
            for task in tasks:
                task.cancel()

    memory = asyncio.create_task(asyncio.sleep(warmup_s + seconds / 2))
    await asyncio.gather(*(stream(k) for k in range(streams)), memory)
    lat = sorted(x[1] * 1000 for g in got for x in g)
    per_stream = [len(g) / seconds for g in got]
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None  # noqa: E731
    return {"streams": streams, "seconds": seconds, "input_fps": fps, "sent": sum(sent), "frames": len(lat),
            "fps_total": round(sum(per_stream), 2), "fps_per_stream": [round(f, 2) for f in per_stream],
            "latency_p50_ms": pick(0.5), "latency_p95_ms": pick(0.95),
            "server_ms_p50": round(statistics.median([x[2] for g in got for x in g]), 1) if lat else None,
            "gpu_memory": gpu_memory()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tests/tiny_models.py at 64 px (a CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", help="model folder (default /tmp/real-models, /tmp/tiny-models with --tiny)")
    parser.add_argument("--fps", type=float, default=20.0, help="each broadcaster's frame rate (a camera)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=8.0)
    parser.add_argument("--streams", default="1,2")
    parser.add_argument("--fast", type=int, default=3, help="cfg_every of the fast case (0: skip it)")
    parser.add_argument("--fast-tiny-vae", type=int, default=1, help="the fast case also uses TAESD (1) or not (0)")
    parser.add_argument("--cases", default="exact,fast,sequential")
    parser.add_argument("--batch-sizes", default="", help="DREAMSTREAM_BATCH_SIZES (default: the processor's)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip cases that would start after this")
    parser.add_argument("--optimise-timeout", type=float, default=300.0, help="for the first case; later cases get "
                        "a third (the compiled code is cached by then)")
    parser.add_argument("--out", default="/tmp/standard_server.json")
    args = parser.parse_args(argv)
    began = time.monotonic()
    args.models = args.models or ("/tmp/tiny-models" if args.tiny else "/tmp/real-models")
    size = 64 if args.tiny else 512
    paths = build_models(args)
    frames = make_frames(8, size)
    cache = tempfile.mkdtemp(prefix="dreamstream-inductor-")
    out = Path(args.out)
    logs = out.parent / f"{out.stem}_logs"
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
                               "commit": shell("git", "rev-parse", "HEAD"),
                               "gpu": shell("nvidia-smi", "--query-gpu=name", "--format=csv,noheader"),
                               "frame_px": size, "targets": TARGETS, "cases": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))

    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": cache,
                "DREAMSTREAM_DEVICE": args.device, "DREAMSTREAM_MAX_FPS": "0", "DREAMSTREAM_PROCESSORS": "standard",
                "DREAMSTREAM_STANDARD_BASE_MODEL": str(paths["sd15"]),
                "DREAMSTREAM_STANDARD_CONTROLNET_MODEL": str(paths["sd15_controlnet"]),
                "DREAMSTREAM_DEPTH_MODEL": str(paths["depth"]),
                # the default tiny_encoder (madebyollin/taesd) as a cached download: the set's random TAESD
                "HF_HUB_CACHE": str(hub_cache(Path(args.models), paths))}
    if args.tiny:
        base_env.update(DREAMSTREAM_WIDTH=str(size), DREAMSTREAM_HEIGHT=str(size))
    if args.batch_sizes:
        base_env["DREAMSTREAM_BATCH_SIZES"] = args.batch_sizes
    cases = {"exact": ({}, [int(s) for s in args.streams.split(",")]),
             "fast": ({"DREAMSTREAM_STANDARD_CFG_EVERY": str(args.fast),
                       **({"DREAMSTREAM_STANDARD_TINY_VAE": str(paths["taesd"])} if args.fast_tiny_vae else {})}, [1]),
             "sequential": ({"DREAMSTREAM_STANDARD_STREAM_BATCH": "0"}, [1])}
    for name in args.cases.split(","):
        if name == "fast" and not args.fast:
            continue
        if args.budget_s and time.monotonic() - began > args.budget_s:
            progress(f"budget spent: skipping {name}")
            results.setdefault("skipped", []).append(name)
            continue
        extra_env, counts = cases[name]
        case: dict[str, Any] = {"env": extra_env, "streams": {}}
        results["cases"][name] = case
        server = Server("standard", [], {**base_env, **extra_env}, logs / f"{name}.log")
        progress(f"{name}: starting {' '.join(server.cmd[2:])} {extra_env or ''}")
        try:
            case["ready_s"], health = server.wait(lambda h: h.get("status") == "ok", 300, "ready")
            optimise = health.get("optimise") or {}
            progress(f"  ready after {case['ready_s']} s; optimise {optimise}")
            if optimise.get("state") == "running" and name == "exact":
                case["while_optimising"] = asyncio.run(drive(server.url, 1, frames, args.fps, args.warmup_s,
                                                             args.seconds))
                progress(f"  1 stream while optimising: {case['while_optimising']}")
                save()
            if optimise:
                limit = args.optimise_timeout if name == "exact" else args.optimise_timeout / 3  # later: cached
                try:
                    case["optimised_s"], health = server.wait(
                        lambda h: (h.get("optimise") or {}).get("state") != "running", limit, "optimised")
                    progress(f"  optimised after {case['optimised_s']} s: {health.get('optimise')}")
                except TimeoutError as exc:  # measure what serves now, and say so
                    case["optimise_unfinished"] = str(exc)
                    progress(f"  {exc}: measuring anyway")
            for n in counts:
                case["streams"][str(n)] = asyncio.run(drive(server.url, n, frames, args.fps, args.warmup_s,
                                                            args.seconds))
                progress(f"  {n} stream(s): {case['streams'][str(n)]}")
                save()
        except Exception as exc:  # one broken case must not stop the rest
            case["error"] = f"{type(exc).__name__}: {exc}"
            progress(f"  {name} failed: {case['error']}")
        finally:
            server.stop()
            case["log_tail"] = server.tail(12)
            save()
    progress(f"done in {time.monotonic() - began:.0f} s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
