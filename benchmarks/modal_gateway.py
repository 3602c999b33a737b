"""What the pool mode's gateway path costs a frame on its own, without Modal's network: measured locally.

Two servers, each a real uvicorn process with one stream closed-loop (the next frame leaves when the styled one
reaches the viewer), timed in turns (frame k on one, then on the other), 512x512 JPEG frames, the `identity`
processor (decode, no styling, encode):

- local:   `create_app` with its LocalBackend: the frame path of `dreamstream serve` and of a Modal shard;
- gateway: `modal_app.gateway_app` with `GpuPool`, whose pool call pickles the call (protocol 4, what Modal's
  cloudpickle writes for these importable classes) and sends it over a local pipe to a second process running
  the GPU class's body (`Engine.run`, `modal_app.portable`), which pickles the results back.

The difference is the gateway path's own overhead per frame (serialising both ways, a process hop each way,
GpuPool's bookkeeping), the part of a pool-mode frame that is not network: the median over frames of the paired
difference (gateway - local), robust to a shared machine's load. Also reported: the CPU time per frame of the
server process(es), and pickling alone, in-process.

    python benchmarks/modal_gateway.py [--frames 1000] [--out benchmarks/results/modal_gateway.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import pickle
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repo's packages first
    sys.path.insert(0, str(REPO))

from benchmarks.harness import free_port, make_frames, progress  # noqa: E402

PICKLE_PROTOCOL = 4


# ---- the servers (run as `--serve KIND PORT` in a process of their own) ---------------------------------

def gpu_worker(conn) -> None:
    """The GPU class's body in its own process (what `Restyler.prepare` builds, what `Restyler.restyle` returns):
    a pickled call in, the pickled results out, one call at a time. Modal's own `.local()` wrapper is left out: it
    is not what runs in a container."""
    import modal_app
    from service.config import Settings
    from service.engine import Engine

    settings = Settings.from_env(processor="identity")
    engine = Engine(settings.stream_defaults("identity"), settings.processor_options, settings.max_frame_bytes,
                    settings.max_frame_side, settings.jpeg_quality)
    engine.processor("identity")
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:
            return
        (jobs,) = pickle.loads(payload)
        results = [modal_app.portable(result) for result in engine.run(jobs)]
        conn.send_bytes(pickle.dumps(results, protocol=PICKLE_PROTOCOL))


def serve(kind: str, port: int) -> None:
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    # closed loop runs past the default 60 fps cap, which would drop frames instead of timing them
    settings = Settings.from_env(processor="identity", max_fps=10_000.0)
    if kind == "local":
        app = create_app(settings)
    else:
        import modal_app

        parent, child = multiprocessing.get_context("spawn").Pipe()
        worker = multiprocessing.get_context("spawn").Process(target=gpu_worker, args=(child,), daemon=True)
        worker.start()
        Path(os.environ["GATEWAY_WORKER_PID_FILE"]).write_text(str(worker.pid))
        lock = asyncio.Lock()  # one container takes one call at a time

        def round_trip(payload: bytes) -> bytes:
            parent.send_bytes(payload)
            return parent.recv_bytes()

        async def restyle(jobs):
            payload = pickle.dumps((jobs,), protocol=PICKLE_PROTOCOL)
            async with lock:
                answer = await asyncio.get_running_loop().run_in_executor(None, round_trip, payload)
            return pickle.loads(answer)

        app = modal_app.gateway_app(restyle, settings)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws_per_message_deflate=False)


# ---- the client -----------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(kind: str, port: int, pid_file: Path) -> subprocess.Popen:
    env = {**os.environ, "GATEWAY_WORKER_PID_FILE": str(pid_file), "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("DREAMSTREAM_")}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the {kind} server did not start")


async def paired_loop(ports: dict[str, int], frames: list[bytes], count: int, warm: int,
                      pids: dict[str, object]) -> dict[str, dict]:
    """One stream on each server, frame k on one then frame k on the other, `count` times: the two paths are
    timed in turns, so a busy spell on a shared machine hits both alike (paired samples)."""
    import websockets

    async with contextlib.AsyncExitStack() as stack:
        links = {}
        for kind, port in ports.items():
            base = f"ws://127.0.0.1:{port}/ws"
            viewer = await stack.enter_async_context(
                websockets.connect(f"{base}/viewer/bench?format=binary", max_size=None, compression=None))
            broadcaster = await stack.enter_async_context(
                websockets.connect(f"{base}/broadcaster/bench", max_size=None, compression=None))
            drains.append(asyncio.create_task(_discard(broadcaster)))  # ready, stats
            links[kind] = (broadcaster, viewer)

        async def one(kind: str, i: int) -> float:
            broadcaster, viewer = links[kind]
            started = time.perf_counter()
            await broadcaster.send(frames[i % len(frames)])
            while not isinstance(await asyncio.wait_for(viewer.recv(), 30), bytes):
                pass
            return time.perf_counter() - started

        for i in range(warm):  # the pool's wake-up call, the processor's first frames
            for kind in links:
                await one(kind, i)
        cpu_before = {kind: sum(cpu_seconds(pid) for pid in pids[kind]()) for kind in links}
        times: dict[str, list[float]] = {kind: [] for kind in links}
        for i in range(count):
            for kind in (list(links) if i % 2 == 0 else list(reversed(links))):
                times[kind].append(await one(kind, i))
        cpu = {kind: sum(cpu_seconds(pid) for pid in pids[kind]()) - cpu_before[kind] for kind in links}
        for task in drains:
            task.cancel()
    out = {}
    for kind, samples in times.items():
        ms = sorted(t * 1000 for t in samples)
        out[kind] = {"path": kind, "frames": count, "latency_p50_ms": round(statistics.median(ms), 2),
                     "latency_p90_ms": round(ms[len(ms) * 9 // 10], 2),
                     "server_cpu_ms_per_frame": round(1000 * cpu[kind] / count, 2)}
    diffs = sorted((g - loc) * 1000 for g, loc in zip(times["gateway"], times["local"], strict=True))
    out["paired_difference_p50_ms"] = round(statistics.median(diffs), 2)
    out["paired_difference_p25_p75_ms"] = [round(diffs[len(diffs) // 4], 2), round(diffs[len(diffs) * 3 // 4], 2)]
    return out


drains: list[asyncio.Task] = []


async def _discard(ws) -> None:
    async for _ in ws:
        pass


def measure(frames: list[bytes], count: int, warm: int) -> dict[str, dict]:
    procs, pids = {}, {}
    pid_file = Path(f"/tmp/modal-gateway-bench-{os.getpid()}.pid")
    ports = {"local": free_port(), "gateway": free_port()}
    try:
        for kind, port in ports.items():
            procs[kind] = start(kind, port, pid_file)
        pids["local"] = lambda: [procs["local"].pid]
        pids["gateway"] = lambda: [procs["gateway"].pid, *([int(pid_file.read_text())] if pid_file.exists() else [])]
        return asyncio.run(paired_loop(ports, frames, count, warm, pids))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(15)
        pid_file.unlink(missing_ok=True)


def pickling(frame: bytes, count: int = 2000) -> dict:
    """Pickling alone, in-process: one call of one frame there (the job) and back (the JPEG)."""
    from service.config import StreamConfig
    from service.engine import FrameJob

    job = FrameJob("bench", frame, StreamConfig(processor_type="identity", num_steps=1))
    out = []
    for _ in range(count):
        started = time.perf_counter()
        pickle.loads(pickle.dumps(([job],), protocol=PICKLE_PROTOCOL))
        pickle.loads(pickle.dumps([frame], protocol=PICKLE_PROTOCOL))
        out.append(time.perf_counter() - started)
    return {"round_trip_us_p50": round(statistics.median(out) * 1e6, 1),
            "call_bytes": len(pickle.dumps(([job],), protocol=PICKLE_PROTOCOL))}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()}-core {model}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/modal_gateway.json"))
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0

    frames = make_frames(8, args.size)
    progress(f"local and gateway servers, {args.frames} frames each, in turns, closed loop")
    measured = measure(frames, args.frames, args.warm)
    rows = [measured["local"], measured["gateway"]]
    overhead = {
        "latency_p50_ms": measured["paired_difference_p50_ms"],  # median over frames of (gateway - local)
        "latency_p25_p75_ms": measured["paired_difference_p25_p75_ms"],
        "server_cpu_ms_per_frame": round(rows[1]["server_cpu_ms_per_frame"] - rows[0]["server_cpu_ms_per_frame"], 2),
    }
    result = {
        "meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "python": platform.python_version(),
                 "command": " ".join(["python benchmarks/modal_gateway.py", *(argv or sys.argv[1:])]),
                 "frame_bytes_mean": round(statistics.fmean(len(f) for f in frames)), "size": args.size,
                 "load_average": os.getloadavg()[0]},
        "rows": rows,
        "gateway_overhead_per_frame": overhead,
        "pickling_in_process": pickling(frames[0]),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    progress(f"gateway path's own overhead per frame: {overhead}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
