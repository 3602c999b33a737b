"""modal_app.py, offline and with no Modal token: what it declares, and the real code paths it runs.

Modal's own machinery (containers, `.remote`) needs the cloud; everything else runs here: the GPU
class's enter hook and batched method through `.local()`, and the gateway app in a real uvicorn server
whose GPU pool is `LocalPool` below: what `Restyler().restyle.remote.aio` does on Modal (serialize the
job, regroup concurrent calls into one batch like `@modal.batched`, run them in one container), in-process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from modal._serialization import deserialize, serialize  # the wire format of .remote calls
from modal._utils.async_utils import synchronizer
from websockets.sync.client import connect

import modal_app
from service.codec import FrameError
from service.config import Settings, StreamConfig
from service.engine import FrameJob
from tests.helpers import ROOT, free_port, gradient_jpeg, mean_rgb, solid_jpeg

pytest_plugins = ["tests.fixtures_diffusion"]  # tiny_models, tiny_env
# `.local()` says the volume is not mounted here; the tests know
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*executing locally:UserWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers + numpy 2
]

OFFLINE_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "DREAMSTREAM_"))},
    "HOME": "/nonexistent",  # no ~/.modal.toml: no token to find
    "MODAL_SERVER_URL": "https://127.0.0.1:9",  # and no Modal server to reach
    "PYTHONPATH": str(ROOT),
}


def import_in_subprocess(code: str, env: dict[str, str] | None = None, prelude: str = "") -> dict:
    """Import modal_app in a fresh interpreter (deploy-time env vars are read at import) and return `code`'s JSON."""
    script = f"{prelude}\nimport json, modal_app\nprint(json.dumps({code}))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**OFFLINE_ENV, **(env or {})},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def autoscaler(obj) -> dict:
    """min/max containers and scaledown window as given to `app.function`/`app.cls`.

    The public `FunctionInfo` has no autoscaler fields; modal 1.6 keeps them in the loader's closure.
    """
    fn = synchronizer._translate_in(obj)
    if hasattr(fn, "_get_class_service_function"):
        fn = fn._get_class_service_function()
    names = ("min_containers", "max_containers", "buffer_containers", "scaledown_window")
    return {k: v for k, v in inspect.getclosurevars(fn._load).nonlocals.items() if k in names}


# ---- what the app declares -------------------------------------------------------------------

def test_import_needs_no_token_and_no_network():
    found = import_in_subprocess(
        "{'app': modal_app.app.name, 'gpu': modal_app.GPU, 'cls': type(modal_app.Restyler).__name__}"
    )
    assert found == {"app": "dreamstream", "gpu": ["L4"], "cls": "Cls"}


def test_gateway_image_needs_no_diffusion_stack():
    """The gateway's image has no torch: importing this file and building the app must not need it."""
    block = (
        "import sys\n"
        "class NoDiffusion:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'diffusers', 'transformers', 'controlnet_aux'):\n"
        "            raise ImportError(name + ' is not in the gateway image')\n"
        "sys.meta_path.insert(0, NoDiffusion())"
    )
    found = import_in_subprocess("type(modal_app.web.local().state.dreamstream.backend).__name__", prelude=block)
    assert found == "GpuPool"


def test_gpu_type_and_pool_size_are_chosen_at_deploy_time():
    found = import_in_subprocess(
        "{'gpus': modal_app.Restyler().restyle.info().gpus, 'label': modal_app.GPU_LABEL,"
        " 'max': modal_app.MAX_GPUS, 'env': modal_app.CONTAINER_ENV}",
        env={
            "DREAMSTREAM_MODAL_GPU": "H100", "DREAMSTREAM_MODAL_MAX_GPUS": "3",
            "DREAMSTREAM_STREAM_KEYS": "studio:secret-key", "DREAMSTREAM_LIGHTNING_TINY_VAE": "1",
        },
    )
    assert found["gpus"] == [["H100", 1]] and found["max"] == 3
    # deploy-time DREAMSTREAM_* settings reach the containers; keys only ever come from the modal.Secret
    assert found["env"]["DREAMSTREAM_LIGHTNING_TINY_VAE"] == "1"
    assert found["env"]["DREAMSTREAM_MODAL_GPU"] == "H100"  # so the gateway reports the right device
    assert "DREAMSTREAM_STREAM_KEYS" not in found["env"]
    assert "secret-key" not in json.dumps(found)
    fallbacks = import_in_subprocess("modal_app.Restyler().restyle.info().gpus", {"DREAMSTREAM_MODAL_GPU": "L40S,A100"})
    assert fallbacks == [["L40S", 1], ["A100", 1]]


def test_volume_and_download_function():
    info = modal_app.download_models.info()
    assert info.volumes[modal_app.MODELS_DIR].name == "dreamstream-models"
    assert not info.gpus  # downloading needs no GPU
    assert info.timeout >= 3600
    assert modal_app.CONTAINER_ENV["HF_HOME"].startswith(modal_app.MODELS_DIR + "/")


def test_gpu_class_settings():
    info = modal_app.Restyler().restyle.info()
    assert info.gpus == [("L4", 1)]
    assert info.batching_info.max_batch_size == modal_app.GPU_BATCH == 8
    assert info.batching_info.wait_ms == modal_app.BATCH_WAIT_MS == 10
    assert info.volumes[modal_app.MODELS_DIR].name == "dreamstream-models"
    assert info.startup_timeout >= 10 * 60  # loading + torch.compile warm-up
    assert info.cpu >= 2 and info.memory_mib >= 16 * 1024  # JPEG work and weights in host memory
    assert modal_app.GPU_ENV["HF_HUB_OFFLINE"] == "1"  # weights from the volume only
    assert autoscaler(modal_app.Restyler) == {
        "min_containers": 0, "max_containers": 8, "buffer_containers": None, "scaledown_window": 300,
    }


def test_gateway_settings():
    info = modal_app.web.info()
    assert info.web_info is not None and info.web_info.unauthenticated  # public URL; keys guard it
    assert info.concurrency_info.max_inputs == 1000  # sockets share one event loop
    assert info.timeout == 24 * 3600  # a socket lives as long as a Modal input may
    assert not info.gpus
    assert "modal.Secret.from_name('dreamstream-keys')" in info.secrets
    assert info.startup_timeout <= 10 * 60  # a gateway that cannot start says so in minutes, not a day
    # one container: a stream's broadcaster and viewers always meet in the same hub
    assert autoscaler(modal_app.web)["max_containers"] == 1
    # the endpoint's factory builds the server's own app, with the GPU pool as its backend
    backend = modal_app.web.local().state.dreamstream.backend
    assert isinstance(backend, modal_app.GpuPool)
    assert (backend.processor, backend.device) == ("lightning", "modal:L4")  # auto = lightning on CUDA


def test_images_pin_every_dependency_of_the_project():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}

    assert all("==" in p for p in modal_app.WEB_PACKAGES + modal_app.GPU_PACKAGES)
    assert names(project["dependencies"]) <= names(modal_app.WEB_PACKAGES)
    assert names(project["optional-dependencies"]["diffusion"]) <= names(modal_app.GPU_PACKAGES)


def test_download_plan_follows_the_processors_defaults(monkeypatch):
    from service.processors.models import DEFAULTS

    for key in [k for k in os.environ if k.startswith("DREAMSTREAM_")]:
        monkeypatch.delenv(key)
    plan = {repo: (label, patterns) for label, repo, patterns in modal_app.download_plan(["lightning", "standard"])}
    assert set(plan) == {repo for options in DEFAULTS.values() for repo in options.values()}
    assert "sdxl_lightning_4step_unet.safetensors" in plan["ByteDance/SDXL-Lightning"][1]
    sdxl = plan["stabilityai/stable-diffusion-xl-base-1.0"][1]
    assert "text_encoder_2/*.safetensors" in sdxl and "unet/*.safetensors" not in sdxl  # Lightning brings its UNet
    assert "unet/*.safetensors" in plan["stable-diffusion-v1-5/stable-diffusion-v1-5"][1]
    assert "lightning depth_model" in plan[DEFAULTS["lightning"]["depth_model"]][0]  # shared, fetched once

    # a model variable set at deploy time changes what is fetched; a local path is not fetched
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_BASE_MODEL", "someone/sdxl-finetune")
    monkeypatch.setenv("DREAMSTREAM_DEPTH_MODEL", "/opt/models/depth")
    plan = {repo for _, repo, _ in modal_app.download_plan(["lightning"])}
    assert "someone/sdxl-finetune" in plan and "stabilityai/stable-diffusion-xl-base-1.0" not in plan
    assert DEFAULTS["lightning"]["depth_model"] not in plan
    with pytest.raises(ValueError, match="processors"):
        modal_app.download_plan(["filter"])


def test_download_models_runs_locally_with_progress(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    fetched = []

    def fake_snapshot_download(repo: str, allow_patterns: list[str], ignore_patterns: list[str]) -> str:
        fetched.append(repo)
        folder = tmp_path / repo.replace("/", "--")
        folder.mkdir(parents=True)
        (folder / "weights.safetensors").write_bytes(b"\0" * 1000)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    modal_app.download_models.local("lightning")
    out = capsys.readouterr().out
    assert fetched and f"[1/{len(fetched)}]" in out and f"[{len(fetched)}/{len(fetched)}]" in out
    assert "ByteDance/SDXL-Lightning" in fetched and "done in" in out


def downloaded_copy(src: Path, dst: Path, patterns: list[str]) -> Path:
    """What snapshot_download would keep of `src` (hub's own pattern matching), copied to `dst`."""
    from huggingface_hub.utils import filter_repo_objects

    files = [f.relative_to(src).as_posix() for f in src.rglob("*") if f.is_file()]
    for rel in filter_repo_objects(files, allow_patterns=patterns, ignore_patterns=modal_app.SKIP_FILES):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    return dst


def test_gpu_class_runs_both_diffusion_processors_from_the_downloaded_files(
    tiny_env, tiny_models, tmp_path, monkeypatch
):
    """The tiny models, cut down to what download_models fetches, load and restyle a mixed batch."""
    parts = {
        ("standard", "base_model"): "sd15", ("standard", "controlnet_model"): "sd15_controlnet",
        ("lightning", "base_model"): "sdxl", ("lightning", "controlnet_model"): "sdxl_controlnet",
        ("lightning", "lightning_unet"): "lightning", ("lightning", "depth_model"): "depth",
        ("lightning", "vae_model"): "sdxl_vae_fp16",
    }
    from service.processors.models import env_var

    for (processor, option), key in parts.items():
        patterns = modal_app.download_patterns(processor, option, key)
        copy = downloaded_copy(tiny_models[key], tmp_path / processor / key, patterns)
        monkeypatch.setenv(env_var(processor, option), str(copy))
    assert not (tmp_path / "lightning" / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not (tmp_path / "lightning" / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors").exists()
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "lightning")
    monkeypatch.setenv("DREAMSTREAM_WIDTH", "64")
    monkeypatch.setenv("DREAMSTREAM_HEIGHT", "64")

    frame = gradient_jpeg((96, 72))
    jobs = [
        FrameJob("a", frame, StreamConfig(prompt="a watercolor", processor_type="lightning", num_steps=2, seed=1)),
        FrameJob("b", frame, StreamConfig(prompt="neon city", processor_type="lightning", num_steps=2, seed=2)),
        FrameJob("c", frame, StreamConfig(prompt="oil", processor_type="standard", num_steps=4, strength=0.5)),
    ]
    restyler = modal_app.Restyler()
    a, b, c = restyler.restyle.local(jobs)  # one Engine.run: two lightning frames in one batch, one standard
    assert all(isinstance(x, bytes) and x[:2] == b"\xff\xd8" for x in (a, b, c)), (a, b, c)
    assert a != b  # each frame kept its own prompt and seed
    assert set(restyler.engine.processors) == {"lightning", "standard"}


# ---- what crosses between gateway and GPUs ---------------------------------------------------

def test_results_and_jobs_survive_modal_serialization():
    job = FrameJob("s1", gradient_jpeg(), StreamConfig(prompt="Monet", seed=7, processor_type="filter"))
    assert deserialize(serialize(job), None) == job
    error = deserialize(serialize(FrameError("too_large", "frame is 9 MB")), None)
    assert isinstance(error, FrameError) and (error.code, error.message) == ("too_large", "frame is 9 MB")

    class TorchLikeError(Exception):  # a library's exception the gateway could not unpickle
        def __init__(self, message: str, detail: object):
            super().__init__(message)

    plain = deserialize(serialize(modal_app.portable(TorchLikeError("CUDA out of memory", object()))), None)
    assert type(plain) is RuntimeError and str(plain) == "CUDA out of memory"
    assert modal_app.portable(b"jpeg") == b"jpeg"


def test_gpu_class_enter_and_batch_run_locally(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "filter")
    restyler = modal_app.Restyler()
    red = solid_jpeg((220, 40, 40))
    jobs = [
        FrameJob("noir", red, StreamConfig(prompt="film noir", strength=1.0, processor_type="filter", num_steps=2)),
        FrameJob("paint", red, StreamConfig(prompt="Monet painting", processor_type="filter", num_steps=2)),
        FrameJob("raw", red, StreamConfig(processor_type="identity", num_steps=1)),
        FrameJob("broken", red[: len(red) // 2], StreamConfig(processor_type="filter", num_steps=2)),
    ]
    noir, paint, raw, broken = restyler.restyle.local(jobs)  # @modal.enter ran first: the Engine exists
    grey, warm, same = (mean_rgb(x) for x in (noir, paint, raw))
    assert np.ptp(grey) < 12, "the noir stream's own prompt was not used"
    assert warm[0] > warm[1] + 50 and same[0] > same[1] + 100
    assert isinstance(broken, FrameError) and broken.code == "bad_frame"


# ---- the gateway, end to end, over a real server ---------------------------------------------

class LocalPool:
    """`Restyler().restyle.remote.aio` in-process: one container, `@modal.batched` regrouping, pickled wire."""

    def __init__(self, restyler, max_batch: int, wait_ms: int) -> None:
        self.restyle = restyler.restyle.local
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000
        self.batches: list[list[str]] = []  # stream ids per Engine.run call
        self._queue: list[tuple[bytes, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._container = ThreadPoolExecutor(1)  # one GPU container: one batch at a time

    async def __call__(self, job: FrameJob) -> bytes | Exception:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((serialize(job), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return deserialize(await future, None)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            await asyncio.sleep(self.wait_s)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            jobs = [deserialize(data, None) for data, _ in batch]
            self.batches.append([job.stream_id for job in jobs])
            results = await loop.run_in_executor(self._container, self.restyle, jobs)
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(serialize(result))


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """A real uvicorn server on a free port, in a thread of this process (so the pool can be inspected)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def wait_healthy(base: str) -> dict:
    deadline = time.monotonic() + 30
    while (health := get_json(f"http://{base}/healthz"))["status"] == "loading":
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def open_broadcaster(sockets: contextlib.ExitStack, base: str, stream_id: str, prompt: str):
    ws = sockets.enter_context(connect(f"ws://{base}/ws/broadcaster/{stream_id}", max_size=None))
    assert json.loads(ws.recv(timeout=10))["type"] == "ready"
    ws.send(json.dumps({"type": "config", "prompt": prompt, "strength": 1.0}))
    while (reply := json.loads(ws.recv(timeout=10)))["type"] != "config":
        pass
    assert reply["config"]["prompt"] == prompt
    return ws


def next_error(ws, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while (message := json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))["type"] != "error":
        pass
    return message


def test_gateway_streams_through_a_local_gpu_pool(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "filter")
    pool = LocalPool(modal_app.Restyler(), modal_app.GPU_BATCH, modal_app.BATCH_WAIT_MS)
    app = modal_app.gateway_app(pool, Settings.from_env(), warmup_timeout_s=30)
    red = solid_jpeg((220, 40, 40))
    red_url = "data:image/jpeg;base64," + base64.b64encode(red).decode()
    with serve(app) as base, contextlib.ExitStack() as sockets:
        health = wait_healthy(base)
        assert (health["status"], health["processor"], health["device"]) == ("ok", "filter", "modal:L4")
        assert pool.batches[0] == ["_warmup"]  # the gateway woke a GPU container at start-up

        noir_view = sockets.enter_context(connect(f"ws://{base}/ws/viewer/noir?format=binary", max_size=None))
        paint_view = sockets.enter_context(connect(f"ws://{base}/ws/viewer/paint", max_size=None))
        noir = open_broadcaster(sockets, base, "noir", "film noir")
        paint = open_broadcaster(sockets, base, "paint", "Monet painting")
        got: dict[str, list[np.ndarray]] = {"noir": [], "paint": []}
        deadline = time.monotonic() + 30
        while min(len(v) for v in got.values()) < 3 or not any({"noir", "paint"} <= set(b) for b in pool.batches):
            assert time.monotonic() < deadline, (pool.batches[-5:], {k: len(v) for k, v in got.items()})
            noir.send(red)
            paint.send(json.dumps({"type": "frame", "frame": red_url}))
            for name, viewer in (("noir", noir_view), ("paint", paint_view)):
                with contextlib.suppress(TimeoutError):
                    while True:
                        message = viewer.recv(timeout=0.05)
                        if isinstance(message, bytes):
                            got[name].append(mean_rgb(message))
                        elif (frame := json.loads(message))["type"] == "frame":
                            got[name].append(mean_rgb(base64.b64decode(frame["frame"].split(",", 1)[1])))
        # one Engine.run held both streams, and each kept its own prompt
        assert all(np.ptp(rgb) < 12 for rgb in got["noir"])
        assert all(rgb[0] > rgb[1] + 50 for rgb in got["paint"])

        noir.send(red[: len(red) // 2])  # passes the gateway's header check, fails to decode on the GPU
        error = next_error(noir)
        assert error["code"] == "bad_frame", error  # a FrameError's code survived the trip back

        request = urllib.request.Request(f"http://{base}/api/process", data=red, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers["content-type"] == "image/jpeg" and resp.read()[:2] == b"\xff\xd8"


def test_gateway_reports_a_pool_that_cannot_work():
    async def broken(job: FrameJob) -> bytes | Exception:
        return RuntimeError("the lightning processor could not be loaded: model X is unavailable")

    with serve(modal_app.gateway_app(broken, Settings(processor="lightning"), warmup_timeout_s=5)) as base:
        health = wait_healthy(base)
    assert health["status"] == "error" and "model X is unavailable" in health["error"]
    assert health["processor"] == "lightning"


def test_a_slow_pool_fails_its_frames_not_the_round(monkeypatch):
    async def restyle_one(job: FrameJob) -> bytes | Exception:
        if job.stream_id == "stuck":
            await asyncio.sleep(60)
        if job.stream_id == "lost":
            raise ConnectionError("container went away")
        return b"jpeg"

    pool = modal_app.GpuPool(restyle_one, Settings(processor="filter", processing_timeout_s=0.2), 1)
    config = StreamConfig()
    started = time.monotonic()
    stuck, lost, fine = asyncio.run(
        pool.process([FrameJob("stuck", b"x", config), FrameJob("lost", b"x", config), FrameJob("ok", b"x", config)])
    )
    assert time.monotonic() - started < 5
    assert isinstance(stuck, TimeoutError) and isinstance(lost, ConnectionError) and fine == b"jpeg"


