"""DreamStream on Modal: the FastAPI app of `dreamstream serve`, deployed two ways (DREAMSTREAM_MODAL_MODE).

- `pool` (default): one CPU gateway holds every socket and serves the pages; each round of frames goes to an
  autoscaled pool of GPU containers (`Restyler`) and back. Many streams share the GPUs; two Modal hops a frame.
- `shard`: one GPU container (`Shard`) serves its streams' sockets itself, with the same app and a LocalBackend,
  as Modal's own real-time example does (`07_web_endpoints/websockets_yolo`). No hop between sockets and GPU;
  one GPU per shard; each shard is its own deployment and URL.

    modal secret create dreamstream-keys DREAMSTREAM_STREAM_KEYS=studio:change-me DREAMSTREAM_VIEWER_TOKEN=t0ken
    modal run modal_app.py::download_models        # once: the model weights into a Volume
    modal run modal_app.py::warm_up                # once per GPU type: compiled kernels into the Volume
    modal deploy modal_app.py                      # pool mode
    DREAMSTREAM_MODAL_MODE=shard DREAMSTREAM_MODAL_APP=dreamstream-shard-0 modal deploy modal_app.py

This file only deploys: the knobs, the images, the Volume, the GPU classes, the gateway. The gateway's backend
is `service.gpu_pool.GpuPool`; what to download is `service.processors.downloads`; the frame path is the
server's own (`service.app.create_app`). Importing it needs neither a Modal token nor a network (the tests
do). README "Deploy on Modal" says which mode to use when; docs/SCALING.md has the numbers behind the knobs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import modal
from fastapi import FastAPI

from service import codec
from service.app import create_app
from service.backends import LocalBackend
from service.config import Settings
from service.engine import Engine, FrameJob
from service.gpu_pool import GpuPool, WakeOnBroadcaster

log = logging.getLogger("dreamstream.modal")

ROOT = Path(__file__).resolve().parent


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None


def _env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# ## Deploy-time knobs
#
# Read when `modal deploy` imports this file. Every DREAMSTREAM_* variable set then (model options, limits,
# DREAMSTREAM_PROCESSOR...) is forwarded to the containers, so a deployment is configured the way the local
# server is. The secrets are the exception: they come from a modal.Secret, never from here.
MODES = ("pool", "shard")
MODE = os.environ.get("DREAMSTREAM_MODAL_MODE", "").strip() or "pool"
if MODE not in MODES:
    raise ValueError(f"DREAMSTREAM_MODAL_MODE must be pool or shard, got {MODE!r}")
APP_NAME = os.environ.get("DREAMSTREAM_MODAL_APP", "").strip()
# GPU: an L4 by default, Modal's cheapest 24 GB GPU: it holds both processors (PERF.md: under 20 GB together).
# DREAMSTREAM_MODAL_GPU=H100 for one fast stream (4-step Lightning + ControlNet at 25 fps); "L40S,A100" = fallbacks.
GPU = _env_list("DREAMSTREAM_MODAL_GPU", "L4")
GPU_LABEL = "/".join(GPU)
# Frames per GPU call (pool mode): a scheduler round is split into calls of at most this many, one Engine.run
# each. 8 = PERF.md's 8-stream target and the largest batch the processors prepare CUDA graphs for.
CALL_SIZE = _env_int("DREAMSTREAM_MODAL_GPU_BATCH", 8)
MIN_GPUS = _env_int("DREAMSTREAM_MODAL_MIN_GPUS", 0)  # 1 = no cold start for the first stream: $30/day on L4
MAX_GPUS = _env_int("DREAMSTREAM_MODAL_MAX_GPUS", 8)  # the bill's ceiling
GPU_IDLE_S = _env_int("DREAMSTREAM_MODAL_GPU_IDLE_S", 300)  # outlives a scene switch, not a lunch break
GPU_STARTUP_S = 20 * 60  # image pull + weights from the volume + CUDA graphs (first start: + compiling)
# Region of every container (gateway, GPUs, shards), e.g. "us-east" (where Modal routes every function input)
# or "us". Unset: anywhere, at list price; set: Modal's region multiplier applies (1.5x broad, 1.75x narrow).
REGION = _env_list("DREAMSTREAM_MODAL_REGION") or None
# One gateway container: every socket of a stream must meet in one process (the hub is in memory).
GATEWAY_SOCKETS = _env_int("DREAMSTREAM_MODAL_GATEWAY_SOCKETS", 1000)  # concurrent requests + sockets
SHARD_SOCKETS = _env_int("DREAMSTREAM_MODAL_SHARD_SOCKETS", 200)  # a shard's streams are few (one GPU)
SHARD_IDLE_S = _env_int("DREAMSTREAM_MODAL_SHARD_IDLE_S", 120)  # a shard's GPU stops this long after its last request
SOCKET_LIFETIME_S = 24 * 3600  # Modal's longest input; clients reconnect when a socket ends
# Modal carries a function input, output or ASGI message over 2 MiB through blob storage (an upload and a
# download more per frame). A 1.5 MB JPEG is 2.0 MB as base64 JSON, under 2 MiB with ~95 KB to spare for the
# message around it: every frame stays in one message. (The server's own default, 4 MiB, would not.)
FRAME_BYTES = 1_500_000
SECRET_NAME = os.environ.get("DREAMSTREAM_MODAL_SECRET", "dreamstream-keys")  # "" = no keys (open server)
SECRET_VARS = ("DREAMSTREAM_STREAM_KEYS", "DREAMSTREAM_BROADCAST_KEY", "DREAMSTREAM_VIEWER_TOKEN")
SECRETS = [modal.Secret.from_name(SECRET_NAME)] if SECRET_NAME else []
SHARED_GPU_APP = os.environ.get("DREAMSTREAM_MODAL_GPU_APP", "")  # pool mode: send frames to this app's pool

FORWARDED_ENV = {
    name: value for name, value in os.environ.items() if name.startswith("DREAMSTREAM_") and name not in SECRET_VARS
}
if int(FORWARDED_ENV.get("DREAMSTREAM_MAX_FRAME_BYTES", FRAME_BYTES)) > FRAME_BYTES:
    log.warning("DREAMSTREAM_MAX_FRAME_BYTES over 1.5 MB: larger frames go through Modal's blob storage (slower)")

# ## The weights and the compiled kernels
#
# One Volume holds the Hugging Face cache, filled once by `download_models` from a CPU container, and the
# compiled kernels, written once per GPU type by `warm_up`. Serving containers only read it: each copies the
# kernels for its GPU to a local folder at start, so nothing they compile is committed by many writers at once.
models = modal.Volume.from_name("dreamstream-models", create_if_missing=True)
MODELS_DIR = "/models"
KERNELS_DIR = f"{MODELS_DIR}/compiled"  # /models/compiled/<gpu>/{inductor,triton}, written by warm_up only
LOCAL_KERNELS = "/tmp/dreamstream-compiled"  # each container's working copy (TORCHINDUCTOR/TRITON_CACHE_DIR)
CONTAINER_ENV = {
    "HF_HOME": f"{MODELS_DIR}/hf",
    "TORCHINDUCTOR_CACHE_DIR": f"{LOCAL_KERNELS}/inductor",
    "TRITON_CACHE_DIR": f"{LOCAL_KERNELS}/triton",
    "DREAMSTREAM_MAX_FRAME_BYTES": str(FRAME_BYTES),
    # The pages are served from the app's own *.modal.run address (a Modal-owned name: no rebinding risk).
    "DREAMSTREAM_ALLOWED_HOSTS": "*.modal.run",
    **FORWARDED_ENV,
}
# The gateway's scheduler: a round fills the pool once (a shard keeps the server's own batch, one GPU's).
GATEWAY_ENV = {"DREAMSTREAM_MAX_BATCH": str(CALL_SIZE * MAX_GPUS), **CONTAINER_ENV}
# GPU containers never download: a model missing from the volume fails fast, naming it.
GPU_ENV = {**CONTAINER_ENV, "HF_HUB_OFFLINE": "1"}


# ## Images
#
# The gateway's image has the server's own dependencies and nothing else, so it starts in seconds; the GPU
# image adds the diffusion stack. Every package, direct or not, is held to constraints.txt, the one pinned set
# that `make serve`, `make test` and CI install too. That set has opencv-python-headless only (controlnet-aux
# 0.0.10 requires the headless build); the build fails if anything brings the GUI opencv-python beside it,
# since the two overwrite each other's cv2 files.
def pinned(*names: str) -> list[str]:
    """`name==version` for each name (extras kept: `uvicorn[standard]`), the version from constraints.txt."""
    versions = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            versions[name.strip().lower().replace("_", "-")] = version.strip()
    out = []
    for name in names:
        bare = name.split("[")[0].lower().replace("_", "-")
        if bare not in versions:
            raise RuntimeError(f"{bare} is not pinned in constraints.txt: add it (pip freeze) before deploying")
        out.append(f"{name}=={versions[bare]}")
    return out


WEB_PACKAGES = pinned("fastapi", "uvicorn[standard]", "websockets", "jinja2", "numpy", "pillow",
                      "opencv-python-headless", "simplejpeg", "prometheus-client", "pydantic", "fastapi-offline")
GPU_PACKAGES = pinned("torch", "torchvision", "diffusers", "transformers", "accelerate", "controlnet-aux",
                      "safetensors", "huggingface-hub",
                      "hf-xet",  # the hub's fast transfer backend, for download_models
                      "tqdm")
CONSTRAINTS = "/root/constraints.txt"
PIN_ALL = f"--constraint {CONSTRAINTS}"
ONE_OPENCV = (
    "python -c \"import importlib.metadata as m, sys; names = {d.metadata['Name'].lower() for d in m.distributions()};"
    " sys.exit('opencv-python is installed beside opencv-python-headless: find what requires it (uv pip tree)"
    " and pin a version of it that requires the headless build') if 'opencv-python' in names else None\""
)


def _with_project(image: modal.Image) -> modal.Image:
    """The project's code and the overlay pages, added last: editing them redeploys in seconds, no rebuild."""
    return image.add_local_python_source("service", "obs_plugin").add_local_dir(
        ROOT / "overlays", "/root/overlays", ignore=["**/.*", "**/__pycache__"]
    )


base_image = (
    modal.Image.debian_slim(python_version="3.11")
    .add_local_file(ROOT / "constraints.txt", CONSTRAINTS, copy=True)
    .uv_pip_install(*WEB_PACKAGES, extra_options=PIN_ALL)
)
web_image = _with_project(base_image)
gpu_image = _with_project(base_image.uv_pip_install(*GPU_PACKAGES, extra_options=PIN_ALL).run_commands(ONE_OPENCV))


# ## What every container shares
def modal_settings() -> Settings:
    """The server's settings inside a container: the DREAMSTREAM_* variables forwarded above, public host."""
    return Settings.from_env(host="0.0.0.0")  # public: the app warns when no stream keys are set


def pool_processor(settings: Settings) -> str:
    """`auto` means lightning here: every GPU container has a CUDA GPU (SPEC §3)."""
    return "lightning" if settings.processor == "auto" else settings.processor


def make_engine(settings: Settings, processor: str) -> Engine:
    """The Engine a GPU container runs, as `dreamstream serve` builds it; no processor loaded yet."""
    return Engine(settings.stream_defaults(processor), settings.processor_options, settings.max_frame_bytes,
                  settings.max_frame_side, settings.jpeg_quality)


def portable(result: bytes | Exception) -> bytes | Exception:
    """What goes back to the gateway: JPEG bytes, a FrameError (its protocol code matters), or a RuntimeError.

    The gateway's image has no torch: a torch or diffusers exception would not unpickle there and would fail
    the whole call. Its message is all the broadcaster is shown anyway.
    """
    if isinstance(result, (bytes, codec.FrameError)):
        return result
    return RuntimeError(str(result) or type(result).__name__)


def gpu_slug() -> str:
    """This container's GPU as a folder name ("nvidia-l4"): compiled kernels only fit the GPU they were built on."""
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def copy_kernels(src: Path, dst: Path) -> int:
    """Copy the compiled-kernel caches from `src` to `dst` (merging); the number of files copied."""
    if not src.is_dir():
        return 0
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return sum(1 for f in dst.rglob("*") if f.is_file())


def import_diffusion_stack(processor: str) -> None:
    """Import torch, diffusers, transformers and the processor's module: ~20,000 files, no GPU touched.

    Run in `@modal.enter(snap=True)`, so Modal's memory snapshot holds the imported modules and a restored
    container starts past them (and past the weights: `load_on_cpu`).
    """
    from service.processors import processor_class

    started = time.monotonic()
    if processor in ("standard", "lightning"):
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        processor_class(processor)
    log.info("imports for the %s processor: %.1f s (restored from the snapshot from now on)", processor,
             time.monotonic() - started)


def load_on_cpu(settings: Settings, processor: str):
    """Before the snapshot: the default processor built on the CPU as the Engine builds it, in the dtype it runs in
    on the GPU (fp16 unless `dtype` is set: the volume's files), for the snapshot to hold. None for the filter, or
    when the weights are missing (logged, with what to run)."""
    if processor not in ("standard", "lightning"):
        return None
    from service.processors import create_processor

    started, cfg, options = time.monotonic(), settings.stream_defaults(processor), settings.processor_options
    options = {**options.get(processor, {}), "device": "cpu"}
    options["dtype"] = options.get("dtype") or (None if modal.is_local() else "fp16")  # local: the CPU's own (tests)
    try:
        proc = create_processor(processor, style_prompt=cfg.prompt, strength=cfg.strength, seed=cfg.seed,
                                use_controlnet=cfg.use_controlnet, **options)
    except Exception as exc:  # the first deploy, before download_models: the container still starts and says so
        log.error("%s weights not in the snapshot: %s; run `modal run modal_app.py::download_models`, then redeploy",
                  processor, exc)
        return None
    log.info("%s weights on the CPU in %.1f s (in the memory snapshot)", processor, time.monotonic() - started)
    return proc


def on_gpu(proc, processor: str):
    """After the restore: the snapshot's processor copied to the GPU and warmed up (CUDA graphs); None without one or
    when that fails (logged: the Engine then loads it from the volume, as without a snapshot)."""
    if proc is None:
        return None
    import torch

    try:
        started = time.monotonic()
        proc.to("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only when run locally (tests)
        moved = time.monotonic()
        proc.warmup()
        log.info("%s weights to %s in %.1f s, warmed up in %.1f s", processor, proc.device, moved - started,
                 time.monotonic() - moved)
        return proc
    except Exception:
        log.exception("the snapshot's %s processor could not move to the GPU; loading it from the volume", processor)
        return None


def seed_kernels() -> None:
    """The kernels warm_up compiled for this GPU, into this container's local caches (no-op off a GPU)."""
    if modal.is_local():
        return
    found = copy_kernels(Path(KERNELS_DIR) / gpu_slug(), Path(LOCAL_KERNELS))
    log.info("compiled kernels from the volume: %d files%s", found,
             "" if found else " (none yet: `modal run modal_app.py::warm_up` compiles them once)")


pool_app = modal.App(APP_NAME or "dreamstream")
shard_app = modal.App(APP_NAME or "dreamstream-shard")
tools = modal.App(f"{APP_NAME or 'dreamstream'}-tools")  # one-off jobs, run with `modal run`, never deployed
app = {"pool": pool_app, "shard": shard_app}[MODE]  # what `modal deploy modal_app.py` deploys

# What both GPU classes ask for. Memory: the Lightning processor keeps two 5.1 GB UNet state dicts in host RAM
# (switching step counts is a copy, not a disk read) and reads a third before dropping one, the text encoders
# pass through host memory in fp32 on load, and CUDA's host side and torch.compile's workers need theirs:
# about 22 GB at the peak by that count (not measured on Modal), so 32 GiB; 16 GiB could not hold it.
GPU_MEMORY_MIB = 32 * 1024
GPU_OPTIONS = dict(
    gpu=GPU[0] if len(GPU) == 1 else GPU,
    image=gpu_image,
    volumes={MODELS_DIR: models},
    env=GPU_ENV,
    cpu=4.0,  # the thread driving the GPU, JPEG decode/encode (~1.4 ms a 512 px frame), compile workers
    memory=GPU_MEMORY_MIB,
    region=REGION,
    enable_memory_snapshot=True,  # imports and weights restored from a snapshot (import_diffusion_stack, load_on_cpu)
    startup_timeout=GPU_STARTUP_S,
)


# ## Pool mode: the GPU class
#
# One container = one GPU = one Engine. Each call is a batch of frames the gateway's scheduler gathered (same
# processor, steps and ControlNet), restyled in one `Engine.run`. No `@modal.batched`: its `wait_ms` is fixed
# when the class is declared, so a lone stream would wait it out on every frame; the scheduler's own wait
# already adapts (it waits only for streams about to send). Modal starts containers while calls queue and
# stops them after GPU_IDLE_S without work.
@pool_app.cls(
    **GPU_OPTIONS,
    min_containers=MIN_GPUS,
    max_containers=MAX_GPUS,
    scaledown_window=GPU_IDLE_S,
    timeout=10 * 60,  # one call, including a processor loaded on first use
)
class Restyler:
    @modal.enter(snap=True)
    def prepare(self) -> None:
        """Before the snapshot: settings, the Engine, the heavy imports and the default processor on the CPU."""
        logging.basicConfig(level=logging.INFO)
        self.processor = pool_processor(modal_settings())
        self.engine = make_engine(modal_settings(), self.processor)
        import_diffusion_stack(self.processor)
        self.loaded = load_on_cpu(modal_settings(), self.processor)

    @modal.enter()
    def load(self) -> None:
        """After restore: the kernels for this GPU, then the default processor on the GPU, warmed up."""
        seed_kernels()
        ready, self.loaded = on_gpu(self.loaded, self.processor), None
        if ready is not None:
            self.engine.processors[self.processor] = ready
            return
        try:  # no snapshot of the weights: loaded from the volume, as `dreamstream serve` loads it
            self.engine.processor(self.processor)
        except Exception as exc:  # frames will carry the message; the container stays up to say it
            log.error("%s; is the volume filled? `modal run modal_app.py::download_models`", exc)

    @modal.method()
    def restyle(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        """Frames of any streams in, one result per frame out: JPEG bytes or what stopped that frame."""
        return [portable(result) for result in self.engine.run(jobs)]


# ## Pool mode: the gateway
#
# The FastAPI app of `dreamstream serve` with `GpuPool` as its backend. One container (max_containers=1): a
# stream's broadcaster and its viewers must reach the same hub, which lives in that process's memory; it holds
# GATEWAY_SOCKETS sockets and requests at once on one event loop. Non-preemptible (3x the CPU and memory list
# price, ~$0.22/h more), so hours-long sockets are not cut by a preemption; Modal offers that for CPU
# functions only. Past one gateway: more deployments sharing one pool (DREAMSTREAM_MODAL_GPU_APP), or shards.
def gateway_app(restyle, settings: Settings | None = None) -> FastAPI:
    """The server's app with its frames sent to `restyle(jobs)`: the GPU class on Modal, anything in tests."""
    settings = settings or modal_settings()
    pool = GpuPool(restyle, pool_processor(settings), settings, label=GPU_LABEL, max_gpus=MAX_GPUS,
                   call_size=CALL_SIZE, idle_s=GPU_IDLE_S, warmup_timeout_s=GPU_STARTUP_S)
    app = create_app(settings, backend=pool)
    app.add_middleware(WakeOnBroadcaster, pool=pool)  # a broadcaster wakes a GPU; pages and probes never do
    return app


@pool_app.function(
    image=web_image,
    secrets=SECRETS,
    env=GATEWAY_ENV,
    cpu=2.0,  # the app's event loop, and Modal's client loop that carries every socket message and GPU call
    memory=2048,
    region=REGION,
    nonpreemptible=True,
    max_containers=1,
    scaledown_window=5 * 60,
    timeout=SOCKET_LIFETIME_S,
    startup_timeout=5 * 60,
)
@modal.concurrent(max_inputs=GATEWAY_SOCKETS)
@modal.asgi_app()
def web() -> FastAPI:
    """Studio at /, overlays at /overlay/{id}, sockets at /ws/...: `modal deploy` prints the URL."""
    logging.basicConfig(level=logging.INFO)
    pool = modal.Cls.from_name(SHARED_GPU_APP, "Restyler") if SHARED_GPU_APP else Restyler
    return gateway_app(pool().restyle.remote.aio)


# ## Shard mode: a GPU container that serves its own sockets
#
# The app of `dreamstream serve` with its LocalBackend, served from the GPU container: a frame goes socket ->
# hub -> GPU -> hub -> socket inside one process, with no function call in between. One container per shard
# (its hub is in memory); more streams than one GPU serves = more shards, each deployed under its own
# DREAMSTREAM_MODAL_APP with its own URL. The URL is the GPU: any request starts it, so keep shard URLs
# unlisted (give them only to the shard's broadcasters and overlays). Modal has no non-preemptible GPUs: a
# preempted shard's clients reconnect to its replacement on their own.
@shard_app.cls(
    **GPU_OPTIONS,
    secrets=SECRETS,
    min_containers=min(MIN_GPUS, 1),
    max_containers=1,
    scaledown_window=SHARD_IDLE_S,
    timeout=SOCKET_LIFETIME_S,
)
@modal.concurrent(max_inputs=SHARD_SOCKETS)
class Shard:
    @modal.enter(snap=True)
    def prepare(self) -> None:
        """Before the snapshot: the heavy imports and the default processor on the CPU."""
        logging.basicConfig(level=logging.INFO)
        self.processor = pool_processor(modal_settings())
        import_diffusion_stack(self.processor)
        self.ready = load_on_cpu(modal_settings(), self.processor)

    @modal.enter()
    def kernels(self) -> None:
        """After restore: the kernels for this GPU, then the default processor on the GPU, warmed up."""
        seed_kernels()
        self.ready = on_gpu(self.ready, self.processor)

    @modal.asgi_app()
    def web(self) -> FastAPI:
        """The whole server: pages, sockets and the processor (without a snapshot's, loaded by the app's lifespan)."""
        settings = modal_settings()  # after the restore: the keys as the secret holds them now
        engine = make_engine(settings, self.processor)
        if self.ready is not None:
            engine.processors[self.processor] = self.ready
        reason = f"Modal shard {shard_app.name} ({GPU_LABEL}): the {self.processor} processor on this container"
        return create_app(settings, LocalBackend(engine, self.processor, reason, settings.processing_timeout_s))


# ## One-off jobs: `modal run modal_app.py::download_models`, `modal run modal_app.py::warm_up`
@tools.function(image=gpu_image, volumes={MODELS_DIR: models}, env=CONTAINER_ENV, timeout=3 * 3600)
def download_models(processors: str = "lightning,standard") -> None:
    """Fill the volume with the files the processors load; reruns only fetch what is missing.

    `download_models.local()` fills this machine's Hugging Face cache the same way.
    """
    import huggingface_hub

    from service.processors.downloads import LOADED_VARIANT, download_plan, select_files

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = download_plan([p.strip() for p in processors.split(",") if p.strip()], modal_settings().processor_options)
    started = time.monotonic()
    for n, item in enumerate(plan, 1):
        files = select_files(huggingface_hub.list_repo_files(item.repo), item.patterns, LOADED_VARIANT)
        print(f"[{n}/{len(plan)}] {item.repo} ({item.label}): {len(files)} files", flush=True)
        path = Path(huggingface_hub.snapshot_download(item.repo, allow_patterns=files))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"      {size / 1e9:.2f} GB in {path}", flush=True)
        if not modal.is_local():
            models.commit()  # each finished repo survives an interrupted run
    print(f"done in {time.monotonic() - started:.0f} s; `modal run modal_app.py::warm_up` next", flush=True)


@tools.function(**{**GPU_OPTIONS, "enable_memory_snapshot": False}, timeout=2 * 3600)
def warm_up(processors: str = "") -> None:
    """Compile the kernels of each processor for this GPU type once, and put them in the volume.

    The one writer of KERNELS_DIR: serving containers copy it at start and never write it back. Run it again
    after changing the GPU type, torch, or the compile settings (DREAMSTREAM_COMPILE, _BATCH_SIZES).
    """
    logging.basicConfig(level=logging.INFO)
    settings = modal_settings()
    names = [p.strip() for p in processors.split(",") if p.strip()] or [pool_processor(settings)]
    seed_kernels()  # start from what an earlier run compiled
    engine = make_engine(settings, names[0])
    for name in names:
        started = time.monotonic()
        proc = engine.processor(name)  # loads, captures graphs, starts the background compile
        proc.wait_optimised()  # every kernel compiled and on the local disk
        print(f"{name}: ready and compiled in {time.monotonic() - started:.0f} s", flush=True)
    if modal.is_local():  # `warm_up.local()`: the kernels stay in this machine's own compile cache
        return
    target = Path(KERNELS_DIR) / gpu_slug()
    count = copy_kernels(Path(LOCAL_KERNELS), target)
    models.commit()
    print(f"{count} kernel files in {target}; serving containers on this GPU type start from them", flush=True)
