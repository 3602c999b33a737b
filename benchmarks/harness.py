"""What the benchmarks share: progress lines, frames, model sets, timing, and the types of gpu_processors.py's cases.

The bottom of the benchmarks' imports (tests/test_benchmark_imports.py keeps them a DAG). It imports no other
benchmarks module, and no benchmarks module imports tests/ (the tiny models are built by running
tests/tiny_models.py as a program) or an entry script (gpu_processors.py runs gpu_report.py and gpu_server.py as
programs):

    entry scripts   gpu_processors.py   gpu_server.py   gpu_report.py   relay.py
    cases           gpu_cases.py  ->  gpu_plain.py, gpu_checks.py       real_models.py
    bottom          harness.py (this)

Torch and the processors are imported inside the functions that need them, so gpu_server.py and relay.py start
without them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import codec

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Van Gogh style painting, swirling night sky"


# --- output -----------------------------------------------------------------------------------------

def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- inputs -----------------------------------------------------------------------------------------

def make_frames(count: int, size: int) -> list[bytes]:
    """Distinct JPEGs: a colour gradient, a few shapes and noise, each frame different."""
    frames = []
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        img = np.stack([x * 255, y * 255, (1 - x) * (0.5 + 0.5 * np.sin(8 * y + i)) * 255], -1)
        for _ in range(4):
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        frames.append(codec.encode_jpeg(img, 90))
    return frames


def build_models(args: argparse.Namespace) -> dict[str, Path]:
    """The model set under `args.models` (`--tiny`: tests/tiny_models.py, else real_models.py), built if missing
    in a subprocess, so that this process holds no CUDA context while gpu_server.py measures servers, and imports
    nothing from tests/. Returns {key: path} from the build's manifest."""
    module, keys = (("tests.tiny_models", "tiny_models"), ("benchmarks.real_models", "real_models"))[not args.tiny]
    progress(f"models under {args.models} ({module}; built on first use)")
    subprocess.run([sys.executable, "-m", module, args.models], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                  os.environ.get("PYTHONPATH")]))})
    manifest = json.loads((Path(args.models) / f"{keys}.json").read_text())
    return {k: Path(v) for k, v in manifest["paths"].items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- timing -----------------------------------------------------------------------------------------

def timer(device: str) -> Callable[..., float]:
    """median_ms(fn, count, warm): a call's median time in ms, by CUDA events on a GPU (the host clock on a CPU)."""
    import torch

    def median_ms(fn: Any, count: int = 30, warm: int = 3) -> float:
        for _ in range(warm):
            fn()
        times = []
        for _ in range(count):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
        return round(statistics.median(times), 3)

    return median_ms


# --- a real server -----------------------------------------------------------------------------------

def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def shell(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no nvidia-smi, no git
        return None


def gpu_memory() -> dict[str, Any] | None:
    """MiB in use per GPU and per process, from nvidia-smi (None without it)."""
    if not shutil.which("nvidia-smi"):
        return None
    used = shell("nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits")
    apps = shell("nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    rows = [line.split(",") for line in (apps or "").splitlines() if "," in line]
    return {"used_mib": [int(v) for v in (used or "").split() if v.isdigit()],
            "apps": [{"pid": p.strip(), "mib": m.strip()} for p, m in rows]}


class Server:
    """One `dreamstream serve` subprocess, its log in a file."""

    def __init__(self, processor: str, extra: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url, self.log_path = f"http://127.0.0.1:{self.port}", log_path
        self.cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--processor", processor, *extra]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # its own group: inductor's workers go with it

    def wait(self, done: Any, timeout: float, what: str) -> tuple[float, dict[str, Any]]:
        """Poll /healthz until `done(health)`; (seconds since spawn, health)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before {what}")
            health = None
            with contextlib.suppress(OSError, ValueError):  # not listening yet, or busy
                health = json.loads(http_get(self.url + "/healthz"))
            if health and health.get("status") == "error":
                raise RuntimeError(f"server reports an error: {health.get('error')}")
            if health and done(health):
                return round(time.monotonic() - self.started, 1), health
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {what} after {timeout:.0f} s (last health: {health})")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGINT (a graceful stop), SIGKILL after 15 s; then whatever of its group is left (compile workers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self, lines: int = 50) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()[-lines:] if self.log_path.exists() else []


def timed_median(fn: Callable[[], Any], warm: int, count: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], frames_per_call: int = 1) -> dict[str, Any]:
    ms = sorted(t * 1000 for t in times)
    median = statistics.median(ms)
    return {"median_ms": round(median, 2), "p10_ms": round(ms[len(ms) // 10], 2),
            "p90_ms": round(ms[min(len(ms) - 1, len(ms) * 9 // 10)], 2), "runs": len(ms),
            "fps_total": round(1000 * frames_per_call / median, 2), "fps_per_stream": round(1000 / median, 2)}


def gpu_allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


# --- the cases of gpu_processors.py and the run that holds their resources -----------------------------

@dataclass(frozen=True)
class Case:
    """One case of gpu_processors.py (gpu_cases.py names and lists them all)."""

    name: str
    kind: str  # device | frames | plain | memory | flops | equivalence | jpeg
    resources: tuple[str, ...] = ()
    processor: str = "lightning"
    steps: int = 4
    strength: float = 0.7
    controlnet: bool = False
    vae: str = "vae"  # vae | taesd
    streams: int = 1
    quick: bool = False
    equivalent: bool = True  # False: an opt-in mode that changes the output (reported apart)
    frames: int | None = None  # timed calls, when fewer than --frames will do (the slow eager path)

    def fields(self) -> dict[str, Any]:
        from service.processors.schedule import steps_to_run

        return {"processor": self.processor, "steps": self.steps, "strength": self.strength,
                "run_steps": steps_to_run(self.steps, self.strength), "controlnet": self.controlnet,
                "vae": self.vae, "streams": self.streams, "equivalent": self.equivalent,
                "cfg": self.processor == "standard" and "nocfg" not in self.name}


@dataclass
class Run:
    """One invocation of gpu_processors.py: its arguments, models, frames, results and loaded resources.
    `load(run, key)` loads a resource (gpu_cases.load_resource); `get` calls it once per key."""

    args: argparse.Namespace
    paths: dict[str, Path]
    frames: list[bytes]
    results: dict[str, Any]
    load: Callable[[Run, str], Any]
    started: float = field(default_factory=time.monotonic)
    loaded: dict[str, Any] = field(default_factory=dict)  # resource key -> engine / pipelines / processor
    resident: dict[str, int] = field(default_factory=dict)  # resource key -> bytes it holds on the GPU
    failed: dict[str, str] = field(default_factory=dict)  # resource key -> why it did not load

    @property
    def cuda(self) -> bool:
        return self.args.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(out)

    def get(self, key: str) -> Any:
        """A loaded resource (engine, pipeline set, bare processor), loading it on first use."""
        if key in self.failed:
            raise RuntimeError(f"{key} failed to load earlier: {self.failed[key]}")
        if key not in self.loaded:
            before = gpu_allocated()
            started = time.monotonic()
            progress(f"loading {key} ...")
            try:
                self.loaded[key] = self.load(self, key)
            except Exception as exc:
                self.failed[key] = f"{type(exc).__name__}: {exc}"
                raise
            self.resident[key] = gpu_allocated() - before
            seconds = time.monotonic() - started
            info = self.results.setdefault("loads", {}).setdefault(key, {})
            info.update(seconds=round(seconds, 1), gpu_gb=round(self.resident[key] / 2**30, 2))
            warm = getattr(self.loaded[key], "warmup_seconds", None)
            if warm is not None:
                info["warmup_compile_s"] = round(warm, 1)
            progress(f"loaded {key} in {seconds:.0f} s ({self.resident[key] / 2**30:.1f} GB on the GPU)")
        return self.loaded[key]

    def release_unneeded(self, remaining: Iterable[Case]) -> None:
        needed = {key for case in remaining for key in case.resources}
        for key in [k for k in self.loaded if k not in needed]:
            del self.loaded[key]
            self.resident.pop(key, None)
            progress(f"released {key}")
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
