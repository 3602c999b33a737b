"""The real `dreamstream serve` as streamers get it: closed-loop WebSocket streams, start-up, batches, memory.

    python benchmarks/gpu_server.py                                     # every config, 1/2/4/8 streams
    python benchmarks/gpu_server.py --configs defaults --streams 1,8 --seconds 10 --budget-s 480
    python benchmarks/gpu_server.py --tiny --device cpu --streams 1,2 --seconds 3 --out /tmp/gs.json  # smoke
    python benchmarks/gpu_processors.py --quick --server "--configs no-controlnet-tiny-vae"  # after its cases

Method: real-size random-weight models (benchmarks/real_models.py; `--tiny`: tests/tiny_models.py, 64 px, CPU)
reach `python -m service.cli serve --processor lightning` (a subprocess on a free port) through the DREAMSTREAM_*
env vars. Ready = spawn to /healthz "ok"; optimised = until its `optimise.state` stops being "running". The first
config starts on an empty TORCHINDUCTOR_CACHE_DIR (cold), then again on the same cache (warm); later configs share
it. Each of N streams is a broadcaster (binary 512x512 JPEGs, 8 distinct frames rotated) and a viewer
(`?format=binary`) in a closed loop: the next frame goes when the viewer got the last one styled (after 2 s it is
counted lost and sent again). After a warm-up, over --seconds: frames/s in total and per stream, round trip
send -> viewer (p50/p95), the scheduler's batches (diff of /metrics' `dreamstream_batch_size`), GPU memory
(nvidia-smi). DREAMSTREAM_MAX_FPS=0 (--max-fps): the 60 fps per-stream limit would drop closed-loop frames.
Then `Engine.run` on 8 streams' jobs in this process, as the no-controlnet-tiny-vae server, and the server's share.
JSON goes to --out after each step (a later run adds its configs to it), a plot beside it, a table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import Server, build_models, gpu_memory, http_get, make_frames, progress, shell  # noqa: E402
from benchmarks.real_models import hub_cache  # noqa: E402

# name -> (serve flags after `--processor lightning`, tiny VAE, most streams)
CONFIGS: dict[str, tuple[list[str], bool, int]] = {
    "defaults": (["--steps", "2"], False, 64),
    "no-controlnet-tiny-vae": (["--steps", "2", "--no-controlnet"], True, 64),
    "one-step-tiny-vae": (["--steps", "1", "--no-controlnet"], True, 1),
    "four-step-controlnet-tiny-vae": (["--steps", "4", "--strength", "0.7"], True, 1),
}
TARGETS = {"defaults": (1, 35.0, 35.0), "no-controlnet-tiny-vae": (8, 120.0, 80.0)}  # streams, fps, p50 ms
MODEL_VARS = {"DREAMSTREAM_LIGHTNING_BASE_MODEL": "sdxl", "DREAMSTREAM_LIGHTNING_UNET": "lightning",
              "DREAMSTREAM_LIGHTNING_CONTROLNET_MODEL": "sdxl_controlnet", "DREAMSTREAM_DEPTH_MODEL": "depth"}
RESEND_S = 2.0


def batch_histogram(metrics: str) -> dict[str, float]:
    """The `dreamstream_batch_size` histogram of /metrics: {'1.0': cumulative count, ..., 'sum':, 'count':}."""
    lines = [line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("dreamstream_batch_size_")]
    return {(k.split('le="')[1][:-2] if 'le="' in k else k.rsplit("_", 1)[1]): float(v) for k, v in lines}


def batch_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batches run between two snapshots per bucket ("4": 3 or 4 frames; 16 and 32 only when used), and the mean."""
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    edges = sorted((k for k in diff if k[0].isdigit()), key=float)  # not +Inf, sum, count, created
    counts = {str(int(float(k))): int(diff[k] - (diff[edges[i - 1]] if i else 0)) for i, k in enumerate(edges)}
    batches = int(diff.get("count", 0))
    return {"counts": {k: v for k, v in counts.items() if v or int(k) <= 8}, "batches": batches,
            "mean": round(diff.get("sum", 0) / batches, 2) if batches else 0.0}


async def drive(url: str, streams: int, frames: list[bytes], warmup_s: float, seconds: float) -> dict[str, Any]:
    """`streams` closed-loop broadcaster/viewer pairs; what the viewers got over the measured window."""
    import websockets

    ws_url = url.replace("http://", "ws://")
    start = time.monotonic() + warmup_s
    end = start + seconds
    trips: list[list[float]] = [[] for _ in range(streams)]
    timeouts, errors = [0] * streams, [0] * streams

    async def next_frame(viewer: Any) -> None:
        deadline = time.monotonic() + RESEND_S
        while not isinstance(await asyncio.wait_for(viewer.recv(), max(0.001, deadline - time.monotonic())),
                             bytes):
            pass  # status messages

    async def read_broadcaster(bc: Any, k: int) -> None:
        async for message in bc:  # ready, stats, errors: read so the socket never backs up
            if isinstance(message, str) and json.loads(message).get("type") == "error":
                errors[k] += 1

    async def stream(k: int) -> None:
        sid = f"bench{k}"
        async with (websockets.connect(f"{ws_url}/ws/viewer/{sid}?format=binary", max_size=None) as viewer,
                    websockets.connect(f"{ws_url}/ws/broadcaster/{sid}", max_size=None) as bc):
            reader = asyncio.create_task(read_broadcaster(bc, k))
            i = k
            while time.monotonic() < end:
                sent = time.monotonic()
                await bc.send(frames[i % len(frames)])
                i += 1
                try:
                    await next_frame(viewer)
                except asyncio.TimeoutError:
                    timeouts[k] += sent >= start
                    continue
                if start <= (now := time.monotonic()) <= end:
                    trips[k].append(now - sent)
            reader.cancel()

    async def at(when: float, fn: Any) -> Any:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        return await asyncio.to_thread(fn)

    metrics = lambda: batch_histogram(http_get(url + "/metrics").decode())  # noqa: E731
    _, before, memory, after = await asyncio.gather(
        asyncio.gather(*(stream(k) for k in range(streams))), at(start, metrics),
        at(start + seconds / 2, gpu_memory), at(end, metrics))
    ms = sorted(t * 1000 for ts in trips for t in ts)
    per_stream = [len(ts) / seconds for ts in trips]
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1) if ms else None  # noqa: E731
    return {"streams": streams, "seconds": seconds, "frames": len(ms), "fps_total": round(len(ms) / seconds, 2),
            "fps_per_stream_min": round(min(per_stream), 2), "fps_per_stream_median":
            round(statistics.median(per_stream), 2), "p50_ms": pick(0.5), "p95_ms": pick(0.95),
            "timeouts": sum(timeouts), "errors": sum(errors), "batches": batch_counts(before, after),
            "gpu_memory": memory}


class Bench:
    def __init__(self, args: argparse.Namespace, paths: dict[str, Path]) -> None:
        self.args, self.paths, self.started = args, paths, time.monotonic()
        self.frames = make_frames(8, args.size)
        # empty: the first start is cold; --cache-dir keeps it across invocations (one device call, several runs)
        self.cache = args.cache_dir or tempfile.mkdtemp(prefix="dreamstream-inductor-")
        Path(self.cache).mkdir(parents=True, exist_ok=True)
        self.cold = not any(Path(self.cache).iterdir())
        self.out = Path(args.out)
        self.logs = Path(args.logs) if args.logs else self.out.parent / f"{self.out.stem}_logs"
        old = json.loads(self.out.read_text()) if self.out.exists() else {}  # a run adds to the last one's
        self.results: dict[str, Any] = {"configs": {}, **old, "meta": meta(args, self.cache), "targets": TARGETS}
        self.results["calls"] = [*old.get("calls", []), {k: self.results["meta"][k] for k in ("date", "command")}]

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".tmp").write_text(json.dumps(self.results, indent=1, default=str))
        self.out.with_suffix(".tmp").replace(self.out)

    def env(self, tiny_vae: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (*MODEL_VARS, "DREAMSTREAM_LIGHTNING_TINY_VAE",
                                                                "DREAMSTREAM_LIGHTNING_VAE_MODEL")}
        env.update({name: str(self.paths[key]) for name, key in MODEL_VARS.items()})
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TORCHINDUCTOR_CACHE_DIR=self.cache,
                   DREAMSTREAM_DEVICE=self.args.device, DREAMSTREAM_MAX_FPS=str(self.args.max_fps),
                   # the default tiny_encoder (madebyollin/taesdxl) as a cached download: the set's random TAESDXL
                   HF_HUB_CACHE=str(hub_cache(Path(self.args.models), self.paths)))
        if self.args.batch_sizes:  # fewer shapes to compile in a short GPU call (1..N streams pad up to them)
            env["DREAMSTREAM_BATCH_SIZES"] = self.args.batch_sizes
        if (vae := Path(self.args.models) / "sdxl_vae_fp16").is_dir():  # the fp16-fix VAE, where the set has it
            env["DREAMSTREAM_LIGHTNING_VAE_MODEL"] = str(vae)
        if tiny_vae:
            env["DREAMSTREAM_LIGHTNING_TINY_VAE"] = str(self.paths["taesdxl"])
        if self.args.tiny:
            env.update(DREAMSTREAM_WIDTH=str(self.args.size), DREAMSTREAM_HEIGHT=str(self.args.size))
        return env

    def over_budget(self, what: str) -> bool:
        over = bool(self.args.budget_s) and time.monotonic() - self.started > self.args.budget_s
        if over:
            progress(f"budget of {self.args.budget_s:.0f} s spent: not starting {what}")
            self.results.setdefault("skipped", []).append(what)
        return over

    def measure(self, server: Server, streams: int) -> dict[str, Any]:
        progress(f"    {streams} stream(s): {self.args.warmup_s:.0f} s warm-up, {self.args.seconds:.0f} s measured")
        result = asyncio.run(drive(server.url, streams, self.frames, self.args.warmup_s, self.args.seconds))
        progress(f"    {row('', result)}")
        return result

    def run_config(self, name: str, first: bool) -> None:
        extra, tiny_vae, most = CONFIGS[name]
        env = self.env(tiny_vae)
        out: dict[str, Any] = {"serve": extra, "tiny_vae": tiny_vae, "starts": [], "streams": {},
                               "env": {k: v for k, v in env.items() if k.startswith(("DREAMSTREAM_", "TORCHIND"))}}
        self.results["configs"][name] = out
        first_label = "cold" if first and self.cold else "shared-cache"
        labels = [first_label, "warm"] if first and self.args.restart else [first_label]
        for label in labels:
            if label == "warm" and self.over_budget(f"{name} warm restart"):
                break
            progress(f"{name}: starting ({label} inductor cache) ...")
            server = Server("lightning", extra, env, self.logs / f"{name}-{label}.log")
            start: dict[str, Any] = {"cache": label, "log": str(server.log_path), "command": shlex.join(server.cmd)}
            out["starts"].append(start)
            try:
                start["ready_s"], health = server.wait(lambda h: h.get("status") == "ok", self.args.ready_timeout,
                                                       "ready")
                progress(f"    ready after {start['ready_s']} s: {json.dumps(health.get('optimise'))}")
                optimise = health.get("optimise") or {}
                if (optimise.get("state") == "running" and self.args.measure_while_optimising
                        and "while_optimising" not in out):
                    out["while_optimising"] = {**self.measure(server, self.args.while_optimising_streams),
                                               "optimise": optimise}
                    self.save()
                if optimise and self.args.optimise_timeout > 0:
                    start["optimised_s"], start["health"] = server.wait(
                        lambda h: (h.get("optimise") or {}).get("state") != "running", self.args.optimise_timeout,
                        "optimised")
                    progress(f"    optimised after {start['optimised_s']} s: {start['health'].get('optimise')}")
                else:
                    start["health"] = health
                self.save()
                if label == labels[-1]:
                    for n in [n for n in self.args.streams if n <= most] or [1]:
                        out["streams"][str(n)] = self.measure(server, n)
                        self.save()
                    out["gpu_memory_idle"] = gpu_memory()
            except Exception as exc:  # one broken config must not stop the rest
                out["error"] = f"{type(exc).__name__}: {exc}"
                progress(f"    {name} failed: {out['error']}")
                break
            finally:
                server.stop()
                if "error" in out:
                    out["log_tail"] = server.tail()
                self.save()

    def engine(self) -> None:
        """`Engine.run` on 8 streams' jobs with the no-controlnet-tiny-vae server's settings, in this process."""
        os.environ.update(self.env(tiny_vae=True))
        from service.config import Settings
        from service.engine import Engine, FrameJob

        settings = Settings.from_env(processor="lightning", steps=2, use_controlnet=False)
        config = settings.stream_defaults("lightning")
        engine = Engine(config, settings.processor_options, settings.max_frame_bytes, settings.max_frame_side,
                        settings.jpeg_quality)
        out: dict[str, Any] = {"streams": 8, "config": config.to_dict()}
        self.results["engine"] = out
        started = time.monotonic()
        engine.processor("lightning")
        out["load_s"] = round(time.monotonic() - started, 1)
        batches = [[FrameJob(f"s{k}", self.frames[(j + k) % len(self.frames)], config) for k in range(8)]
                   for j in range(len(self.frames))]
        calls = 0

        def call() -> float:
            nonlocal calls
            t = time.perf_counter()
            outputs = engine.run(batches[calls % len(batches)])
            calls += 1
            bad = [o for o in outputs if isinstance(o, Exception)]
            if bad:
                raise bad[0]
            return time.perf_counter() - t

        deadline = time.monotonic() + self.args.optimise_timeout
        while calls < 3 or (optimise_state(engine) == "running" and time.monotonic() < deadline):
            call()
        out.update(warmup_calls=calls, warmup_s=round(time.monotonic() - started, 1), optimise=optimise_state(engine))
        median = statistics.median(call() for _ in range(self.args.engine_calls))
        out.update(median_ms=round(median * 1000, 2), fps_total=round(8 / median, 2), calls=self.args.engine_calls)
        server = self.results["configs"].get("no-controlnet-tiny-vae", {}).get("streams", {}).get("8")
        if server:
            out["server_share"] = round(server["fps_total"] / out["fps_total"], 3)
        progress(f"Engine.run batch 8: {out['fps_total']} frames/s; server keeps {out.get('server_share')}")
        out["equivalence"] = equivalence(engine, batches[0])
        progress(f"equivalence: {out['equivalence']}")


def equivalence(engine: Any, jobs: list[Any]) -> dict[str, Any]:
    """The served path (compiled graphs + nvJPEG) against the eager path with CPU JPEG, same jobs and seeds:
    mean/max absolute difference of the decoded output pixels (0-255). JPEG alone (quality 85) moves pixels
    by a few levels; fp16 kernel differences by less."""
    import numpy as np

    from service import codec

    proc = engine.processors["lightning"]

    def images() -> list[Any]:
        return [codec.decode(o).astype(np.int16) for o in engine.run(jobs)]

    served = images()
    gpu_jpeg, proc.gpu_jpeg = proc.gpu_jpeg, False
    served_cpu_jpeg = images()
    proc.accel.bypass(True)
    eager_cpu_jpeg = images()
    proc.gpu_jpeg = gpu_jpeg
    eager_gpu_jpeg = images()
    proc.accel.bypass(False)

    def diff(a: list[Any], b: list[Any]) -> dict[str, float]:
        d = np.abs(np.stack(a) - np.stack(b))
        return {"mean": round(float(d.mean()), 3), "max": int(d.max())}

    return {"served_vs_eager_cpu_jpeg": diff(served, eager_cpu_jpeg),
            "compiled_vs_eager_both_cpu_jpeg": diff(served_cpu_jpeg, eager_cpu_jpeg),
            "nvjpeg_vs_cpu_jpeg_both_eager": diff(eager_gpu_jpeg, eager_cpu_jpeg)}


def optimise_state(engine: Any) -> str | None:
    """The background optimisation state of the engine's processor, where it reports one."""
    states = [p.optimise_progress().get("state") for p in engine.processors.values() if hasattr(p, "optimise_progress")]
    return next((s for s in states if s), None)


def meta(args: argparse.Namespace, cache: str) -> dict[str, Any]:
    from importlib import metadata

    def ver(name: str) -> str | None:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
        return None

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpu": shell("nvidia-smi", "--query-gpu=name",
            "--format=csv,noheader"), "torch": ver("torch"), "diffusers": ver("diffusers"),
            "python": platform.python_version(), "host": platform.node(), "commit": shell("git", "rev-parse", "HEAD"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "inductor_cache": cache,
            "tiny": args.tiny, "frame_px": args.size, "max_fps": args.max_fps,
            "inherited_env": {k: v for k, v in os.environ.items() if k.startswith("DREAMSTREAM_")}}


def row(name: str, r: dict[str, Any]) -> str:
    counts = " ".join(f"{k}:{v}" for k, v in r["batches"]["counts"].items())
    return (f"{name:<30} {r['streams']:>3} {r['fps_total']:>8.1f} {r['fps_per_stream_min']:>6.1f}/"
            f"{r['fps_per_stream_median']:<6.1f} {r['p50_ms'] or 0:>7.1f} {r['p95_ms'] or 0:>7.1f}  "
            f"{counts} (mean {r['batches']['mean']}) lost {r['timeouts']}")


def table(results: dict[str, Any]) -> str:
    lines = [f"{'config':<30} {'N':>3} {'fps tot':>8} {'fps/stream':>13} {'p50 ms':>7} {'p95 ms':>7}  batches"]
    for name, c in results["configs"].items():
        lines += [row(name, r) for r in c.get("streams", {}).values()]
        if "while_optimising" in c:
            lines.append(row(f"{name} (optimising)", c["while_optimising"]))
        starts = ", ".join(f"{s['cache']}: ready {s.get('ready_s')} s, optimised {s.get('optimised_s')} s"
                           for s in c["starts"])
        lines.append(f"  {name} start-up: {starts}" + (f"  ERROR {c['error']}" if "error" in c else ""))
    if (e := results.get("engine")) and "fps_total" in e:
        lines.append(f"Engine.run batch 8: {e['fps_total']} frames/s, server keeps {e.get('server_share')}")
    elif e:
        lines.append(f"Engine.run: ERROR {e.get('error')}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        progress("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (fps_ax, rtt_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, c) in enumerate(results["configs"].items()):
        points = sorted((int(n), r) for n, r in c.get("streams", {}).items())
        if points:
            xs = [n for n, _ in points]
            fps_ax.plot(xs, [r["fps_total"] for _, r in points], "o-", color=f"C{i}", label=name)
            rtt_ax.plot(xs, [r["p50_ms"] or 0 for _, r in points], "o-", color=f"C{i}", label=name)
        if name in TARGETS:
            n, fps, p50 = TARGETS[name]
            fps_ax.axhline(fps, ls="--", lw=1, color=f"C{i}", label=f"target {name}: {fps:.0f} at {n}")
            rtt_ax.axhline(p50, ls="--", lw=1, color=f"C{i}", label=f"target {name}: p50 {p50:.0f} ms at {n}")
    for i, name in enumerate(results["configs"]):  # figures measured before a change, if recorded
        for n, before in (results.get("before", {}).get(name) or {}).items():
            fps_ax.plot([int(n)], [before["fps_total"]], "x", ms=9, color=f"C{i}", label=f"{name} before, {n}")
            if before.get("p50_ms"):
                rtt_ax.plot([int(n)], [before["p50_ms"]], "x", ms=9, color=f"C{i}")
    if (e := results.get("engine")) and "fps_total" in e:
        fps_ax.axhline(e["fps_total"], ls=":", color="gray", label="Engine.run batch 8")
    for ax, label in ((fps_ax, "frames/s, all streams"), (rtt_ax, "p50 round trip, ms")):
        ax.set(xscale="log", xticks=[1, 2, 4, 8], xticklabels=["1", "2", "4", "8"], xlabel="closed-loop streams",
               ylabel=label)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"dreamstream serve, lightning: {meta.get('gpu') or 'CPU'}, commit {(meta.get('commit') or '?')[:7]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="the model set, built if missing (default /tmp/real-models, /tmp/tiny-models)")
    parser.add_argument("--out", default="benchmarks/results/gpu_server.json")
    parser.add_argument("--logs", help="server logs (default: <out>_logs beside --out)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--batch-sizes", help="DREAMSTREAM_BATCH_SIZES of the servers and the engine, e.g. 1 or 8")
    parser.add_argument("--cache-dir", help="inductor cache to use and keep (default: a fresh temp dir, removed)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per stream count")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--optimise-timeout", type=float, default=600.0, help="0: measure without waiting for it")
    parser.add_argument("--while-optimising-streams", type=int, default=1, help="its streams")
    parser.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True, help="first config: warm too")
    parser.add_argument("--measure-while-optimising", action="store_true")
    parser.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True, help="Engine.run batch 8")
    parser.add_argument("--engine-calls", type=int, default=30)
    parser.add_argument("--max-fps", type=float, default=0.0, help="DREAMSTREAM_MAX_FPS of the servers")
    parser.add_argument("--budget-s", type=float, default=0, help="start no new config after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64 px frames: a smoke test")
    args = parser.parse_args(argv)
    args.size = 64 if args.tiny else 512
    args.models = args.models or ("/tmp/tiny-models" if args.tiny else "/tmp/real-models")
    args.streams = sorted({int(n) for n in args.streams.split(",")})
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")

    bench = Bench(args, build_models(args))
    for i, name in enumerate(names):
        if bench.over_budget(name):
            break
        bench.run_config(name, first=i == 0)
    if args.engine and not bench.over_budget("the Engine.run comparison"):
        try:
            bench.engine()
        except Exception as exc:
            bench.results.setdefault("engine", {})["error"] = f"{type(exc).__name__}: {exc}"
            progress(f"Engine.run comparison failed: {exc}")
    bench.save()
    if not args.cache_dir:
        shutil.rmtree(bench.cache, ignore_errors=True)
    plot(bench.results, bench.out.with_suffix(".png"))
    print(table(bench.results), flush=True)
    failed = any("error" in bench.results["configs"].get(n, {}) for n in names)
    return 1 if failed or "error" in bench.results.get("engine", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
