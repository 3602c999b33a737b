"""Fan-out on a CPU: one broadcaster at 30 fps of 512x512 JPEG, a growing crowd of viewers.

    python benchmarks/relay.py                              # 1 to 2400 viewers, until both fail
    python benchmarks/relay.py --viewers 1,10,50 --seconds 4

For each crowd size it runs `dreamstream serve --processor identity` and, in the same run, a bare
`websockets` fan-out server written below (every frame passed to `websockets.broadcast`, no parsing, no
decoding, no per-viewer mailbox): the floor that any relay written in Python pays on this machine.

Both get the same binary JPEGs, the way the studio sends them and the overlays receive them. Thirty
distinct frames rotate; a viewer identifies each one it receives by its bytes (the identity processor's
output is computed here with the server's own codec), so latency is `receive time - send time of that
frame`, measured on one clock. A crowd size passes when every viewer got >= 29 fps over the window.

Viewers live in two worker processes and the broadcaster in this one, all on the same cores as the
server: on a small machine the clients' own work is part of the limit, for both servers alike.
Results: a table, benchmarks/results/relay.json and relay.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import free_port  # noqa: E402
from service import codec  # noqa: E402

FPS = 30.0
PASS_FPS = 29.0
ROTATION = 30  # distinct frames; a latency under ROTATION / FPS seconds is unambiguous
WORKERS = 2


# ---- frames ----------------------------------------------------------------------------------------


def make_frames(size: int = 512) -> list[bytes]:
    """Camera-like 512x512 JPEGs (gradients, a moving disc, sensor noise), each one different."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = []
    for i in range(ROTATION):
        rng = np.random.default_rng(i)
        img = np.stack([x * 200 + 30, y * 180 + 40, (1 - x) * 160 + 60 * np.sin(6 * y + i / 5)], -1)
        cx, cy = 0.5 + 0.3 * np.cos(i / 5), 0.5 + 0.3 * np.sin(i / 5)
        img[(x - cx) ** 2 + (y - cy) ** 2 < 0.02] = (230, 200, 40)
        img += rng.normal(0, 4, img.shape)
        frames.append(codec.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=85))
    return frames


def frame_keys(frames: list[bytes]) -> dict[bytes, int]:
    """What a viewer may receive -> which frame it is: the frame itself (bare relay) or the identity
    processor's re-encoding of it (DreamStream, with the server's own codec and quality)."""
    keys = {}
    for i, data in enumerate(frames):
        keys[_key(data)] = i
        keys[_key(codec.encode_jpeg(codec.decode(data), 85))] = i
    return keys


def _key(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data[-48:]


# ---- the bare fan-out server ------------------------------------------------------------------------


async def bare_server(port: int) -> None:
    """The minimal relay: broadcaster on /b, viewers on anything else; each frame goes to every viewer."""
    viewers: set[websockets.ServerConnection] = set()

    async def handler(ws: websockets.ServerConnection) -> None:
        if ws.request.path == "/b":
            async for message in ws:
                websockets.broadcast(viewers, message)
        else:
            viewers.add(ws)
            try:
                await ws.wait_closed()
            finally:
                viewers.discard(ws)

    async with websockets.serve(handler, "127.0.0.1", port, compression=None, max_size=None):
        await asyncio.Future()


# ---- viewers (worker processes) ----------------------------------------------------------------------


def viewer_worker(url: str, count: int, keys: dict[bytes, int], inbox, outbox) -> None:
    asyncio.run(_viewers(url, count, keys, inbox, outbox))


async def _viewers(url: str, count: int, keys: dict[bytes, int], inbox, outbox) -> None:
    window = [float("inf"), float("inf")]
    counts = [0] * count
    seen: list[tuple[int, float]] = []  # (frame index, receive time) inside the window
    unknown = 0

    async def watch(i: int, ws) -> None:
        nonlocal unknown
        async for message in ws:
            now = time.time()
            if isinstance(message, str) or not window[0] <= now < window[1]:
                continue
            counts[i] += 1
            index = keys.get(_key(message))
            if index is None:
                unknown += 1
            else:
                seen.append((index, now))

    conns = []
    for start in range(0, count, 50):
        batch = [websockets.connect(url, max_size=None, compression=None) for _ in range(min(50, count - start))]
        conns += await asyncio.gather(*batch)
    tasks = [asyncio.create_task(watch(i, ws)) for i, ws in enumerate(conns)]
    outbox.put("connected")
    window[:] = await asyncio.get_running_loop().run_in_executor(None, inbox.get)
    await asyncio.sleep(max(0.0, window[1] - time.time() + 0.5))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    outbox.put({"counts": counts, "seen": seen, "unknown": unknown})


# ---- one measurement -----------------------------------------------------------------------------------


def start_server(kind: str, port: int) -> subprocess.Popen:
    if kind == "dreamstream":
        cmd = [sys.executable, "-m", "service.cli", "serve", "--processor", "identity", "--port", str(port),
               "--log-level", "warning"]
    else:
        cmd = [sys.executable, __file__, "--bare-server", str(port)]
    env = {**os.environ, "DREAMSTREAM_MAX_VIEWERS": "100000",  # the default (1000) would refuse big crowds
           "DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS": "0"}  # and every viewer here comes from 127.0.0.1
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            time.sleep(0.3 if kind == "dreamstream" else 0.0)  # the processor loads just after the port opens
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def broadcast(url: str, frames: list[bytes], start: float, end: float) -> list[float]:
    """Send frames at FPS from `start` to `end` (wall clock); the send time of each, in order."""
    sent: list[float] = []
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        drain = asyncio.create_task(_discard(ws))
        await asyncio.sleep(max(0.0, start - time.time()))
        k = 0
        while (due := start + k / FPS) < end:
            await asyncio.sleep(max(0.0, due - time.time()))
            sent.append(time.time())
            await ws.send(frames[k % ROTATION])
            k += 1
        drain.cancel()
    return sent


async def _discard(ws) -> None:
    async for _ in ws:
        pass


def measure(kind: str, viewers: int, frames: list[bytes], keys: dict[bytes, int], args) -> dict[str, Any]:
    port = free_port()
    server = start_server(kind, port)
    ctx = multiprocessing.get_context("spawn")
    try:
        if kind == "dreamstream":
            base = f"ws://127.0.0.1:{port}/ws"
            viewer_url, bc_url = f"{base}/viewer/bench?format=binary", f"{base}/broadcaster/bench"
        else:
            viewer_url, bc_url = f"ws://127.0.0.1:{port}/v", f"ws://127.0.0.1:{port}/b"
        shares = [viewers // WORKERS + (i < viewers % WORKERS) for i in range(WORKERS)]
        inboxes, outbox, procs = [], ctx.Queue(), []
        for share in shares:
            if share:
                inbox = ctx.Queue()
                proc = ctx.Process(target=viewer_worker, args=(viewer_url, share, keys, inbox, outbox), daemon=True)
                proc.start()
                inboxes.append(inbox)
                procs.append(proc)
        for _ in procs:
            assert outbox.get(timeout=120) == "connected"
        start = time.time() + 0.2
        window = (start + args.warmup, start + args.warmup + args.seconds)
        for inbox in inboxes:
            inbox.put(window)
        cpu: dict[str, float] = {}

        async def run_broadcaster() -> list[float]:
            task = asyncio.create_task(broadcast(bc_url, frames, start, window[1] + 0.3))
            await asyncio.sleep(max(0.0, window[0] - time.time()))
            cpu["start"] = cpu_seconds(server.pid)
            await asyncio.sleep(max(0.0, window[1] - time.time()))
            cpu["end"], cpu["rss"] = cpu_seconds(server.pid), rss_mb(server.pid)
            return await task

        sent = asyncio.run(run_broadcaster())
        results = [outbox.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(10)
    finally:
        server.terminate()
        server.wait(15)
    counts = [c for r in results for c in r["counts"]]
    latencies = _latencies([s for r in results for s in r["seen"]], sent)
    fps = [c / args.seconds for c in counts]
    return {
        "server": kind,
        "viewers": viewers,
        "min_fps": round(min(fps), 2),
        "median_fps": round(statistics.median(fps), 2),
        "pass": min(fps) >= PASS_FPS,
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
        "server_cpu": round((cpu["end"] - cpu["start"]) / args.seconds, 2),
        "server_rss_mb": round(cpu["rss"], 1),
        "unidentified": sum(r["unknown"] for r in results),
    }


def _latencies(seen: list[tuple[int, float]], sent: list[float]) -> list[float]:
    """Each receive matched with the latest send of that frame before it."""
    by_index: dict[int, list[float]] = {}
    for k, t in enumerate(sent):
        by_index.setdefault(k % ROTATION, []).append(t)
    out = []
    for index, received in seen:
        times = by_index.get(index, [])
        pos = np.searchsorted(times, received, side="right") - 1
        if pos >= 0:
            out.append((received - times[pos]) * 1000.0)
    return out


# ---- report --------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'viewers':>8} | {'server':<11} | {'min fps':>7} | {'median':>6} | {'p50 ms':>7} | {'p95 ms':>7} | "
        f"{'CPU':>5} | pass"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['viewers']:>8} | {r['server']:<11} | {r['min_fps']:>7.1f} | {r['median_fps']:>6.1f} | "
            f"{_ms(r['latency_p50_ms']):>7} | {_ms(r['latency_p95_ms']):>7} | {r['server_cpu']:>5.2f} | "
            f"{'yes' if r['pass'] else 'no'}"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("dreamstream", "bare"):
        mine = [r for r in rows if r["server"] == kind]
        passing = [r["viewers"] for r in mine if r["pass"]]
        out[kind] = {"max_viewers_at_29fps": max(passing) if passing else 0}
    added = []
    for r in rows:
        if r["server"] != "dreamstream":
            continue
        bare = next((b for b in rows if b["server"] == "bare" and b["viewers"] == r["viewers"]), None)
        if bare and r["latency_p50_ms"] is not None and bare["latency_p50_ms"] is not None:
            added.append({
                "viewers": r["viewers"],
                "added_p50_ms": round(r["latency_p50_ms"] - bare["latency_p50_ms"], 1),
                "added_p95_ms": round(r["latency_p95_ms"] - bare["latency_p95_ms"], 1),
            })
    out["added_latency"] = added
    return out


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, colour in (("dreamstream", "tab:blue"), ("bare", "tab:gray")):
        mine = [r for r in rows if r["server"] == kind]
        n = [r["viewers"] for r in mine]
        ax1.plot(n, [r["min_fps"] for r in mine], "o-", color=colour, label=f"{kind}: slowest viewer")
        ax1.plot(n, [r["median_fps"] for r in mine], "o--", color=colour, alpha=0.5, label=f"{kind}: median viewer")
        ax2.plot(n, [r["latency_p50_ms"] for r in mine], "o-", color=colour, label=f"{kind} p50")
        ax2.plot(n, [r["latency_p95_ms"] for r in mine], "o--", color=colour, alpha=0.6, label=f"{kind} p95")
    ax1.axhline(PASS_FPS, color="tab:red", lw=0.8, ls=":", label=f"{PASS_FPS:g} fps")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("viewers on one stream")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("frames per second received")
    ax2.set_ylabel("send -> receive latency (ms)")
    ax2.set_yscale("log")
    fig.suptitle(f"Relay fan-out, 30 fps of 512x512 JPEG: {meta['machine']} ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()}-core {model}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", default="1,10,50,100,200,400,800,1000,1200,1600,2400", help="crowd sizes")
    parser.add_argument("--seconds", type=float, default=6.0, help="measurement window per size")
    parser.add_argument("--warmup", type=float, default=2.0, help="frames before the window opens")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/relay.json"))
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server:
        asyncio.run(bare_server(args.bare_server))
        return 0
    frames = make_frames()
    keys = frame_keys(frames)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "command": " ".join(["python benchmarks/relay.py", *(argv if argv is not None else sys.argv[1:])]),
        "frame_bytes_mean": int(statistics.mean(len(f) for f in frames)),
        "fps": FPS,
        "window_s": args.seconds,
    }
    print(f"{meta['machine']}; 512x512 JPEG, {meta['frame_bytes_mean'] / 1000:.0f} kB mean, {FPS:g} fps")
    rows: list[dict[str, Any]] = []
    failed: set[str] = set()
    for n in (int(v) for v in args.viewers.split(",")):
        for kind in ("dreamstream", "bare"):
            if kind in failed:
                continue
            print(f"  {n:>4} viewers, {kind:<11} ...", end="", flush=True)
            row = measure(kind, n, frames, keys, args)
            rows.append(row)
            print(f" slowest {row['min_fps']:.1f} fps, p50 {_ms(row['latency_p50_ms'])} ms")
            if not row["pass"]:
                failed.add(kind)  # bigger crowds only fail harder
        if failed == {"dreamstream", "bare"}:
            break
    result = {"meta": meta, "rows": rows, "summary": summary(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(rows, meta, out.with_suffix(".png"))
    print()
    print(table(rows))
    s = result["summary"]
    print(
        f"\nmost viewers with every viewer >= {PASS_FPS:g} fps: "
        f"dreamstream {s['dreamstream']['max_viewers_at_29fps']}, bare websockets {s['bare']['max_viewers_at_29fps']}"
    )
    for a in s["added_latency"]:
        print(
            f"  added by dreamstream at {a['viewers']} viewers: "
            f"p50 {a['added_p50_ms']:+.1f} ms, p95 {a['added_p95_ms']:+.1f} ms"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
