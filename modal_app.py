"""DreamStream on Modal: one CPU gateway holds the sockets, an autoscaling pool of GPUs restyles the frames.

    modal secret create dreamstream-keys DREAMSTREAM_STREAM_KEYS=studio:change-me DREAMSTREAM_VIEWER_TOKEN=t0ken
    modal run modal_app.py::download_models        # once: the model weights into a Volume
    DREAMSTREAM_MODAL_GPU=L4 modal deploy modal_app.py

This file wraps the same FastAPI app that `dreamstream serve` runs (`service.app.create_app`); there is
no second implementation. The one difference is where frames are processed: the gateway's processor
backend sends each frame, as a `FrameJob`, to the GPU class below, which runs the same `Engine` the
local server runs in its worker thread. Frames of several streams that reach one GPU container
together are restyled in one `Engine.run` call, each with its own prompt, strength and seed.

It reads top to bottom: deploy-time knobs, the images, the weights volume and its download, the GPU
class, the gateway. Importing it needs neither a Modal token nor a network (the tests do). The numbers
behind the defaults are in docs/SCALING.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import modal
import numpy as np
from fastapi import FastAPI

from service import codec
from service.app import create_app
from service.backends import CallableBackend
from service.config import Settings
from service.engine import Engine, FrameJob

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


# ## Deploy-time knobs
#
# Read when `modal deploy` imports this file. Every DREAMSTREAM_* variable set then (model options,
# limits, DREAMSTREAM_PROCESSOR...) is forwarded to both containers, so a deployment is configured the
# way the local server is. The secrets are the exception: they come from a modal.Secret, never from here.
#
# GPU: an L4 by default. It is Modal's cheapest 24 GB GPU, and PERF.md measures both processors together
# under 20 GB, so one L4 holds the lightning and the standard pipeline at once. Its rated dense fp16
# rate (~121 TFLOP/s) matches an A10G's at ~70% of the price: the cheapest frames of the 24 GB tier. What
# it lacks is headroom for one fast stream (SDXL-Lightning 4 steps + ControlNet stays under 25 fps on it).
# For that, deploy with DREAMSTREAM_MODAL_GPU=H100 (or L40S); a comma list ("L40S,A100") gives fallbacks.
GPU = [g.strip() for g in os.environ.get("DREAMSTREAM_MODAL_GPU", "L4").split(",") if g.strip()]
GPU_LABEL = "/".join(GPU)
GPU_BATCH = _env_int("DREAMSTREAM_MODAL_GPU_BATCH", 8)  # frames per Engine.run: PERF.md's 8-stream target
# The gateway fans a round of frames out at once, so they reach a container within a few ms of each
# other; 10 ms is enough to regroup them and costs every frame at most a third of a 30 fps frame time.
BATCH_WAIT_MS = _env_int("DREAMSTREAM_MODAL_BATCH_WAIT_MS", 10)
MIN_GPUS = _env_int("DREAMSTREAM_MODAL_MIN_GPUS", 0)  # 1 = no cold start for the first stream: $27/day on L4
MAX_GPUS = _env_int("DREAMSTREAM_MODAL_MAX_GPUS", 8)  # the bill's ceiling
GPU_IDLE_S = _env_int("DREAMSTREAM_MODAL_GPU_IDLE_S", 300)  # outlives a scene switch, not a lunch break
GPU_STARTUP_S = 20 * 60  # image pull + weights from the volume + torch.compile warm-up
# One gateway container: every socket of a stream must meet in one process (the hub is in memory).
GATEWAY_SOCKETS = _env_int("DREAMSTREAM_MODAL_GATEWAY_SOCKETS", 1000)  # concurrent requests + sockets
SOCKET_LIFETIME_S = 24 * 3600  # Modal's longest input; clients reconnect when a socket ends
SECRET_NAME = os.environ.get("DREAMSTREAM_MODAL_SECRET", "dreamstream-keys")  # "" = no keys (open server)
SECRET_VARS = ("DREAMSTREAM_STREAM_KEYS", "DREAMSTREAM_BROADCAST_KEY", "DREAMSTREAM_VIEWER_TOKEN")
MODELS_DIR = "/models"

FORWARDED_ENV = {
    name: value for name, value in os.environ.items()
    if name.startswith("DREAMSTREAM_") and name not in SECRET_VARS
}
# Both containers: weights and torch.compile caches live on the volume, so a fresh container neither
# downloads nor recompiles what another container already did.
CONTAINER_ENV = {
    "HF_HOME": f"{MODELS_DIR}/hf",
    "TORCHINDUCTOR_CACHE_DIR": f"{MODELS_DIR}/torch-cache/inductor",
    "TRITON_CACHE_DIR": f"{MODELS_DIR}/torch-cache/triton",
    # a round of frames fills the GPU pool once (see GpuPool below)
    "DREAMSTREAM_MAX_BATCH": str(GPU_BATCH * MAX_GPUS),
    **FORWARDED_ENV,
}
# GPU containers only read the volume: a model missing there fails fast with a message naming it,
# instead of each container downloading gigabytes on its own.
GPU_ENV = {**CONTAINER_ENV, "HF_HUB_OFFLINE": "1"}

app = modal.App(os.environ.get("DREAMSTREAM_MODAL_APP", "dreamstream"))


# ## Images
#
# The gateway's image has the server's own dependencies and nothing else, so it starts in seconds;
# the GPU image adds the diffusion stack on top. Versions come from constraints.txt, the one pinned set
# that `make serve`, `make test` and CI install too.
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
                      "opencv-python-headless", "simplejpeg", "prometheus-client")
GPU_PACKAGES = pinned("torch", "torchvision", "diffusers", "transformers", "accelerate", "controlnet-aux",
                      "safetensors", "huggingface-hub",
                      "hf-xet",  # the hub's fast transfer backend, for download_models
                      "tqdm")


def _with_project(image: modal.Image) -> modal.Image:
    """The project's code and the overlay pages, added last: editing them redeploys in seconds, no rebuild."""
    return image.add_local_python_source("service", "obs_plugin").add_local_dir(
        ROOT / "overlays", "/root/overlays", ignore=["**/.*", "**/__pycache__"]
    )


base_image = modal.Image.debian_slim(python_version="3.11").uv_pip_install(*WEB_PACKAGES)
web_image = _with_project(base_image)
# libGL and glib: controlnet-aux pulls in the full opencv-python, which links against them
gpu_image = _with_project(base_image.apt_install("libgl1", "libglib2.0-0").uv_pip_install(*GPU_PACKAGES))


# ## The weights
#
# One Volume holds the Hugging Face cache (HF_HOME) and the compile caches. It is filled once, from a
# CPU container, by `modal run modal_app.py::download_models`; GPU containers mount it and load from it.
models = modal.Volume.from_name("dreamstream-models", create_if_missing=True)

# What to fetch of each model: the configs and tokenizers of every part, and the weights of only the
# parts the processors load (standard: SD 1.5's text encoder, UNet and VAE; lightning: SDXL's two text
# encoders, as its UNet comes from the Lightning files and its VAE from `vae_model`). Default-precision
# safetensors only: the processors load no fp16 variant, nor the repos' single-file checkpoints, .bin or
# ONNX copies. That skips ~25 GB of the two base repos; a test loads both processors from exactly these files.
BASE_MODEL_WEIGHTS = {
    "standard": ("text_encoder", "unet", "vae"),
    "lightning": ("text_encoder", "text_encoder_2"),
}
SKIP_FILES = ["*.fp16.*", "*non_ema*", "*.bin", "*.ckpt", "*.onnx*", "*openvino*", "*.msgpack", "*.h5"]


def download_patterns(processor: str, option: str, repo: str) -> list[str]:
    """The files of `repo` that `processor` loads as its `option`, as snapshot_download allow_patterns."""
    from service.processors.depth import MIDAS_FILE
    from service.processors.lightning import CHECKPOINTS

    if option == "base_model":
        weights = [f"{part}/*.safetensors" for part in BASE_MODEL_WEIGHTS[processor]]
        return ["model_index.json", "*/*.json", "*/*.txt", *weights]
    if option == "lightning_unet":
        return sorted(CHECKPOINTS.values())
    if option == "vae_model":  # an AutoencoderKL at the root; not the single-file copies some VAE repos add
        return ["*.json", "diffusion_pytorch_model.safetensors"]
    if option == "depth_model" and any(word in repo.lower() for word in ("annotators", "midas")):
        return [MIDAS_FILE]  # controlnet-aux's MiDaS: one checkpoint of a large repo
    return ["*.json", "*.txt", "*.safetensors"]


def download_plan(processors: list[str]) -> list[tuple[str, str, list[str]]]:
    """(label, hub id, file patterns) per model the processors load, each repo once.

    The ids are the processors' own defaults (service.processors.models.DEFAULTS) unless a DREAMSTREAM_*
    model variable says otherwise, so what is downloaded is what the GPU containers will ask for.
    """
    from service.processors.models import DEFAULTS, UNSET_BY_DEFAULT, model_source

    plan: dict[str, tuple[str, list[str]]] = {}
    for processor in processors:
        if processor not in DEFAULTS:
            raise ValueError(f"processors must be among {', '.join(DEFAULTS)}; got {processor!r}")
        for option in (*DEFAULTS[processor], *UNSET_BY_DEFAULT.get(processor, ())):
            source = model_source(processor, option)
            if source is None and option == "tiny_vae":
                # the tiny VAE is off unless asked for, but it is a few MB: fetch it so it can be turned on
                source = model_source(processor, option, True)
            if source is None or source.looks_like_path:
                continue  # a path in the container (e.g. a folder on the volume): not ours to fetch
            label, known = plan.get(source.value, ("", []))
            plan[source.value] = (
                f"{label}, {processor} {option}" if label else f"{processor} {option}",
                sorted({*known, *download_patterns(processor, option, source.value)}),
            )
    return [(label, repo, patterns) for repo, (label, patterns) in plan.items()]


@app.function(image=gpu_image, volumes={MODELS_DIR: models}, env=CONTAINER_ENV, timeout=3 * 3600)
def download_models(processors: str = "lightning,standard") -> None:
    """Fill the volume with the weights the processors load; reruns only fetch what is missing.

    `download_models.local()` fills this machine's Hugging Face cache the same way.
    """
    from huggingface_hub import snapshot_download

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = download_plan([p.strip() for p in processors.split(",") if p.strip()])
    started = time.monotonic()
    for n, (label, repo, patterns) in enumerate(plan, 1):
        print(f"[{n}/{len(plan)}] {repo} ({label})", flush=True)
        path = Path(snapshot_download(repo, allow_patterns=patterns, ignore_patterns=SKIP_FILES))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"      {size / 1e9:.2f} GB in {path}", flush=True)
        if not modal.is_local():
            models.commit()  # each finished repo survives an interrupted run
    print(f"done in {time.monotonic() - started:.0f} s; `modal deploy modal_app.py` next", flush=True)


# ## The GPU class
#
# One container = one GPU = one Engine, loaded once in `@modal.enter`. `@modal.batched` gathers the
# frames that arrive within BATCH_WAIT_MS (up to GPU_BATCH, from any streams and any gateway) into one
# call; the Engine groups them by processor and restyles each group in one batch. Modal starts more
# containers when frames queue up and stops them after GPU_IDLE_S without work.
def pool_processor(settings: Settings) -> str:
    """`auto` means lightning here: every container of the pool has a CUDA GPU (SPEC §3)."""
    return "lightning" if settings.processor == "auto" else settings.processor


def portable(result: bytes | Exception) -> bytes | Exception:
    """What goes back to the gateway: JPEG bytes, a FrameError (its protocol code matters), or a RuntimeError.

    The gateway's image has no torch: a torch or diffusers exception would not unpickle there and would
    fail the whole call. Its message is all the broadcaster is shown anyway.
    """
    if isinstance(result, (bytes, codec.FrameError)):
        return result
    return RuntimeError(str(result) or type(result).__name__)


@app.cls(
    gpu=GPU[0] if len(GPU) == 1 else GPU,
    image=gpu_image,
    volumes={MODELS_DIR: models},
    env=GPU_ENV,
    # the thread driving the GPU, JPEG decode/encode (~1.4 ms a 512 px frame) and torch.compile's workers
    cpu=4.0,
    memory=16 * 1024,  # weights pass through host memory on their way to the GPU
    min_containers=MIN_GPUS,
    max_containers=MAX_GPUS,
    scaledown_window=GPU_IDLE_S,
    timeout=10 * 60,  # one batch, including a processor loaded on first use
    startup_timeout=GPU_STARTUP_S,
)
class Restyler:
    @modal.enter()
    def load(self) -> None:
        """Build the Engine and load + warm the default processor before the first frame waits on it."""
        logging.basicConfig(level=logging.INFO)
        settings = Settings.from_env()
        processor = pool_processor(settings)
        self.engine = Engine(
            settings.stream_defaults(processor), settings.processor_options,
            settings.max_frame_bytes, settings.max_frame_side, settings.jpeg_quality,
        )
        try:
            self.engine.processor(processor)
        except Exception as exc:  # frames will carry the message; the container stays up to say it
            log.error("%s; is the volume filled? `modal run modal_app.py::download_models`", exc)
            return
        if not modal.is_local():
            models.commit()  # the compile caches warm-up wrote: the next container starts faster

    @modal.batched(max_batch_size=GPU_BATCH, wait_ms=BATCH_WAIT_MS)
    def restyle(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        """Frames of any streams in, one result per frame out: JPEG bytes or what stopped that frame."""
        return [portable(result) for result in self.engine.run(jobs)]


# ## The gateway
#
# The FastAPI app of `dreamstream serve`, with a backend that sends frames to the GPU class. Each frame
# of a scheduler round is its own `.remote.aio` call, all at once, so Modal can spread one round over
# several containers and `@modal.batched` regroups them there; a round waits for its slowest frame.
RestyleOne = Callable[[FrameJob], Awaitable[bytes | Exception]]


class GpuPool(CallableBackend):
    """The gateway's processor backend: a frame in, `restyle_one(job)` somewhere, JPEG bytes back."""

    def __init__(self, restyle_one: RestyleOne, settings: Settings, warmup_timeout_s: float) -> None:
        processor = pool_processor(settings)
        super().__init__(
            self.restyle_all, processor, f"modal:{GPU_LABEL}",
            f"Modal GPU pool ({GPU_LABEL}, up to {MAX_GPUS}); the {processor} processor",
        )
        self.restyle_one = restyle_one
        self.frame_timeout_s = settings.processing_timeout_s
        self.warmup_timeout_s = warmup_timeout_s
        self.warmup_job = FrameJob(
            "_warmup", codec.encode_jpeg(np.full((64, 64, 3), 128, np.uint8)), settings.stream_defaults(processor)
        )

    async def start(self) -> None:
        """Wake a GPU container now, so it loads while the broadcaster is still choosing a camera."""
        log.info("waiting for a GPU container (the first start loads the models: minutes)")
        try:
            result = await asyncio.wait_for(self.restyle_one(self.warmup_job), self.warmup_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no GPU container answered within {self.warmup_timeout_s:.0f} s") from None
        if isinstance(result, Exception):
            raise RuntimeError(f"the GPU pool cannot process frames: {result}")

    async def restyle_all(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        async def one(job: FrameJob) -> bytes | Exception:
            try:
                return await asyncio.wait_for(self.restyle_one(job), self.frame_timeout_s)
            except asyncio.TimeoutError:
                return TimeoutError(f"the GPU pool took longer than {self.frame_timeout_s:.0f} s")
            except Exception as exc:  # one lost frame, not a lost round
                log.warning("frame of stream %s failed on the way: %r", job.stream_id, exc)
                return exc

        return list(await asyncio.gather(*(one(job) for job in jobs)))


def gateway_app(
    restyle_one: RestyleOne, settings: Settings | None = None, warmup_timeout_s: float = GPU_STARTUP_S
) -> FastAPI:
    """The server's app with its frames sent to `restyle_one`: the GPU class on Modal, anything in tests."""
    settings = settings or Settings.from_env(host="0.0.0.0")  # public: warns when no stream keys are set
    return create_app(settings, backend=GpuPool(restyle_one, settings, warmup_timeout_s))


# One container only (max_containers=1): a stream's broadcaster and its viewers must reach the same hub,
# which lives in that process's memory. It holds GATEWAY_SOCKETS sockets and requests at once (asyncio,
# one event loop). Past one container, shard by stream id: deploy this file once per shard
# (DREAMSTREAM_MODAL_APP=dreamstream-2 ...), give each stream its shard's URL, and point the shards at one
# GPU pool with DREAMSTREAM_MODAL_GPU_APP=dreamstream so their frames batch together. docs/SCALING.md.
SHARED_GPU_APP = os.environ.get("DREAMSTREAM_MODAL_GPU_APP", "")


@app.function(
    image=web_image,
    secrets=[modal.Secret.from_name(SECRET_NAME)] if SECRET_NAME else [],
    env=CONTAINER_ENV,
    cpu=2.0,  # the app's event loop, and Modal's client loop that carries every socket message and GPU call
    memory=2048,
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
