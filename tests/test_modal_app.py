"""modal_app.py and its backend (service/gpu_pool.py), offline and with no Modal token.

Modal's machinery (containers, `.remote`) needs the cloud; everything else runs here: what each mode declares
(through Modal's public `FunctionInfo`), the GPU classes' enter hooks and methods through `.local()`, the gateway
app in a real uvicorn server whose pool call pickles each call both ways and runs the GPU class in-process, and
the shard app served by a real uvicorn server. Nothing here reads Modal's private attributes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import modal_app
from service.codec import FrameError
from service.config import Settings, StreamConfig
from service.engine import FrameJob
from service.gpu_pool import GpuPool, split_round
from service.processors.downloads import download_patterns, download_plan, select_files
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
MODAL_RELAY_BYTES = 2 * 1024 * 1024  # Modal carries payloads over 2 MiB through blob storage
PICKLE_PROTOCOL = 4  # what Modal's cloudpickle writes; for importable classes its bytes are pickle's


def import_in_subprocess(code: str, env: dict[str, str] | None = None, prelude: str = "") -> object:
    """Import modal_app in a fresh interpreter (deploy-time env vars are read at import) and return `code`'s JSON."""
    script = f"{prelude}\nimport json, modal_app\nprint(json.dumps({code}))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**OFFLINE_ENV, **(env or {})},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- what each mode declares -------------------------------------------------------------------

def test_import_needs_no_token_and_no_network_in_either_mode():
    pool = import_in_subprocess("[modal_app.app.name, modal_app.MODE, modal_app.app is modal_app.pool_app]")
    assert pool == ["dreamstream", "pool", True]
    shard = import_in_subprocess(
        "[modal_app.app.name, modal_app.MODE, modal_app.app is modal_app.shard_app]",
        {"DREAMSTREAM_MODAL_MODE": "shard", "DREAMSTREAM_MODAL_APP": "dreamstream-shard-3"},
    )
    assert shard == ["dreamstream-shard-3", "shard", True]
    done = subprocess.run([sys.executable, "-c", "import modal_app"], cwd=ROOT, capture_output=True, text=True,
                          env={**OFFLINE_ENV, "DREAMSTREAM_MODAL_MODE": "sideways"}, timeout=120)
    assert done.returncode != 0 and "DREAMSTREAM_MODAL_MODE must be pool or shard" in done.stderr


def test_gateway_image_needs_no_diffusion_stack():
    """The gateway's image has no torch: importing this file and building the gateway app must not need it."""
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


def test_pool_mode_declarations():
    gpu = modal_app.Restyler().restyle.info()
    assert gpu.gpus == [("L4", 1)]
    assert gpu.batching_info is None  # no @modal.batched: nothing waits to regroup a lone stream's frame
    assert gpu.volumes[modal_app.MODELS_DIR].name == "dreamstream-models"
    assert gpu.startup_timeout >= 10 * 60  # weights from the volume + CUDA graphs, minutes on a first start
    # two 5.1 GB Lightning state dicts stay in host RAM, a third passes through while switching step counts
    assert gpu.memory_mib * 2**20 >= 3 * 5.1e9 and gpu.cpu >= 2
    assert gpu.regions is None  # no region pinned unless asked: Modal's region price multiplier
    assert modal_app.GPU_ENV["HF_HUB_OFFLINE"] == "1"  # weights from the volume only

    gateway = modal_app.web.info()
    assert gateway.web_info is not None and gateway.web_info.unauthenticated  # public URL; keys guard it
    assert gateway.nonpreemptible  # hours-long sockets are not cut by a preemption
    assert gateway.concurrency_info.max_inputs == 1000  # sockets share one event loop
    assert gateway.timeout == 24 * 3600  # a socket lives as long as a Modal input may
    assert not gateway.gpus and gateway.memory_mib <= 4096
    assert "modal.Secret.from_name('dreamstream-keys')" in gateway.secrets
    backend = modal_app.web.local().state.dreamstream.backend
    assert isinstance(backend, GpuPool)
    assert (backend.processor, backend.device) == ("lightning", "modal:L4")  # auto = lightning on CUDA


def test_shard_mode_declarations():
    info = modal_app.Shard().web.info()
    assert info.gpus == [("L4", 1)] and info.memory_mib == modal_app.GPU_MEMORY_MIB
    assert info.method_details["web"].unauthenticated  # the shard's own URL serves pages and sockets
    assert info.concurrency_info.max_inputs == modal_app.SHARD_SOCKETS
    assert info.timeout == 24 * 3600
    assert "modal.Secret.from_name('dreamstream-keys')" in info.secrets
    assert not info.nonpreemptible  # Modal has no non-preemptible GPUs; clients reconnect on their own


def test_region_gpu_and_settings_are_chosen_at_deploy_time():
    found = import_in_subprocess(
        "{'pool': [modal_app.web.info().regions, modal_app.Restyler().restyle.info().regions],"
        " 'shard': modal_app.Shard().web.info().regions, 'gpus': modal_app.Restyler().restyle.info().gpus,"
        " 'env': modal_app.CONTAINER_ENV, 'batch': modal_app.GATEWAY_ENV['DREAMSTREAM_MAX_BATCH'],"
        " 'shard_batch': 'DREAMSTREAM_MAX_BATCH' in modal_app.GPU_ENV}",
        env={
            "DREAMSTREAM_MODAL_REGION": "us-east", "DREAMSTREAM_MODAL_GPU": "H100", "DREAMSTREAM_MODAL_MAX_GPUS": "3",
            "DREAMSTREAM_STREAM_KEYS": "studio:secret-key", "DREAMSTREAM_LIGHTNING_TINY_VAE": "1",
        },
    )
    assert found["pool"] == [["us-east"], ["us-east"]] and found["shard"] == ["us-east"]  # one region for all
    assert found["gpus"] == [["H100", 1]] and found["batch"] == "24"  # a round fills 3 GPUs' calls of 8
    assert not found["shard_batch"]  # a shard batches as one GPU does (the server's default)
    assert found["env"]["DREAMSTREAM_LIGHTNING_TINY_VAE"] == "1"  # deploy-time settings reach the containers
    assert "DREAMSTREAM_STREAM_KEYS" not in found["env"] and "secret-key" not in json.dumps(found)
    fallbacks = import_in_subprocess("modal_app.Restyler().restyle.info().gpus", {"DREAMSTREAM_MODAL_GPU": "L40S,A100"})
    assert fallbacks == [["L40S", 1], ["A100", 1]]


def test_frame_limit_keeps_every_frame_out_of_modals_blob_relay():
    limit = modal_app.FRAME_BYTES
    assert limit <= 1.5 * 2**20
    # the largest frame as the original README's JSON message (base64) fits in one Modal payload, with room to spare
    data_url = "data:image/jpeg;base64," + base64.b64encode(b"\xff" * limit).decode()
    message = json.dumps({"type": "frame", "frame": data_url, "ts": 1764650000000})
    assert len(message) <= MODAL_RELAY_BYTES - 64 * 1024
    # and so does a GPU call of it, pickled as Modal does
    job = FrameJob("s" * 64, b"\xff" * limit, StreamConfig(prompt="p" * 1000))
    assert len(pickle.dumps(([job],), protocol=PICKLE_PROTOCOL)) <= MODAL_RELAY_BYTES
    # the containers' settings carry it; a deploy that sets its own limit keeps it
    assert import_in_subprocess("modal_app.modal_settings().max_frame_bytes",
                                {k: v for k, v in modal_app.CONTAINER_ENV.items()}) == limit
    assert import_in_subprocess("modal_app.CONTAINER_ENV['DREAMSTREAM_MAX_FRAME_BYTES']",
                                {"DREAMSTREAM_MAX_FRAME_BYTES": "1000000"}) == "1000000"


def test_snapshot_phase_imports_the_stack_without_touching_the_gpu():
    """`@modal.enter(snap=True)` runs before the snapshot, where no GPU may be used: it imports, never inits CUDA."""
    pytest.importorskip("torch")
    code = (
        "import sys, modal_app; modal_app.import_diffusion_stack('lightning'); import json; "
        "print(json.dumps([sorted(m for m in ('torch', 'diffusers', 'transformers', 'service.processors.lightning')"
        " if m in sys.modules), sys.modules['torch'].cuda.is_initialized()]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == [["diffusers", "service.processors.lightning", "torch", "transformers"], False]
    assert modal_app.GPU_OPTIONS["enable_memory_snapshot"]  # Modal refuses snap=True hooks without it


def test_images_pin_every_package_and_install_one_opencv():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import importlib.metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}

    assert all("==" in p for p in modal_app.WEB_PACKAGES + modal_app.GPU_PACKAGES)
    assert names(project["dependencies"]) <= names(modal_app.WEB_PACKAGES)
    assert names(project["optional-dependencies"]["diffusion"]) <= names(modal_app.GPU_PACKAGES)
    assert f"--constraint {modal_app.CONSTRAINTS}" == modal_app.PIN_ALL  # transitive packages pinned too
    pins = {line.split("==")[0].strip().lower().replace("_", "-") for line in (ROOT / "constraints.txt").read_text()
            .splitlines() if "==" in line and not line.startswith("#")}
    assert "opencv-python-headless" in pins and "opencv-python" not in pins
    requires = importlib.metadata.requires("controlnet-aux") or []
    assert not [r for r in requires if r.lower().startswith("opencv-python") and "headless" not in r.lower()]


def test_compiled_kernels_have_one_writer(tmp_path):
    """Serving containers compile into a local folder and never write the volume; warm_up, on the deploy's GPU
    type, is the one writer of the volume's kernels, which every container copies at start."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert not modal_app.CONTAINER_ENV[name].startswith(modal_app.MODELS_DIR + "/")
    assert modal_app.warm_up.info().gpus == modal_app.Restyler().restyle.info().gpus
    assert modal_app.warm_up.info().volumes[modal_app.MODELS_DIR].name == "dreamstream-models"
    src, dst = tmp_path / "volume", tmp_path / "local"
    (src / "inductor" / "fx").mkdir(parents=True)
    (src / "inductor" / "fx" / "graph").write_text("compiled")
    (dst / "triton").mkdir(parents=True)
    (dst / "triton" / "kernel").write_text("mine")
    assert modal_app.copy_kernels(src, dst) == 2  # merged: what the container had stays
    assert (dst / "inductor" / "fx" / "graph").read_text() == "compiled"
    assert modal_app.copy_kernels(tmp_path / "nothing-yet", dst) == 0


def test_the_gpu_image_build_fails_when_gui_opencv_creeps_in(tmp_path):
    """The build step after the installs: passes on this environment's packages, fails naming the fix when
    something installed opencv-python beside the headless build."""
    env = {**OFFLINE_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert subprocess.run(["bash", "-c", modal_app.ONE_OPENCV], env=env, capture_output=True).returncode == 0
    fake = tmp_path / "opencv_python-4.10.0.84.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: opencv-python\nVersion: 4.10.0.84\n")
    done = subprocess.run(["bash", "-c", modal_app.ONE_OPENCV], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0 and "opencv-python is installed beside opencv-python-headless" in done.stderr


# ---- what is downloaded -------------------------------------------------------------------------

SD15_LISTING = [  # the shape of stable-diffusion-v1-5's file list on the hub
    "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.fp16.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors", "scheduler/scheduler_config.json",
]


def test_download_plan_follows_the_processors_defaults(monkeypatch):
    from service.processors.models import DEFAULTS

    for key in [k for k in os.environ if k.startswith("DREAMSTREAM_")]:
        monkeypatch.delenv(key)
    plan = {item.repo: item for item in download_plan(["lightning", "standard"])}
    assert set(plan) == {repo for options in DEFAULTS.values() for repo in options.values()}
    assert "sdxl_lightning_4step_unet.safetensors" in plan["ByteDance/SDXL-Lightning"].patterns
    sdxl = plan["stabilityai/stable-diffusion-xl-base-1.0"].patterns
    assert "text_encoder_2/*.safetensors" in sdxl and "unet/*.safetensors" not in sdxl  # Lightning brings its UNet
    assert "unet/*.safetensors" in plan["stable-diffusion-v1-5/stable-diffusion-v1-5"].patterns
    assert "lightning depth_model" in plan[DEFAULTS["lightning"]["depth_model"]].label  # shared, fetched once

    # a model variable set at deploy time changes what is fetched; a local path is not fetched
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_BASE_MODEL", "someone/sdxl-finetune")
    monkeypatch.setenv("DREAMSTREAM_DEPTH_MODEL", "/opt/models/depth")
    repos = {item.repo for item in download_plan(["lightning"])}
    assert "someone/sdxl-finetune" in repos and "stabilityai/stable-diffusion-xl-base-1.0" not in repos
    assert DEFAULTS["lightning"]["depth_model"] not in repos
    with pytest.raises(ValueError, match="processors"):
        download_plan(["filter"])


def test_download_picks_fp16_variants_where_the_repo_has_them():
    patterns = download_patterns("standard", "base_model", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    fp16 = select_files(SD15_LISTING, patterns, "fp16")
    assert [f for f in fp16 if f.endswith(".safetensors")] == [
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]  # one precision per weight; no safety checker, single-file checkpoints, .bin or non-EMA copies
    assert {"model_index.json", "unet/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(fp16)
    full = select_files(SD15_LISTING, patterns, None)
    assert [f for f in full if f.endswith(".safetensors")] == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    # a weight stored only once (the Lightning UNets, already fp16; most VAEs) is fetched as it is
    lightning = ["sdxl_lightning_4step_unet.safetensors", "sdxl_lightning_4step_lora.safetensors", "README.md"]
    assert select_files(lightning, download_patterns("lightning", "lightning_unet", "ByteDance/SDXL-Lightning"),
                        "fp16") == ["sdxl_lightning_4step_unet.safetensors"]


def test_download_models_runs_locally_with_progress(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    fetched: dict[str, list[str]] = {}

    def fake_snapshot_download(repo: str, allow_patterns: list[str]) -> str:
        fetched[repo] = allow_patterns
        folder = tmp_path / repo.replace("/", "--")
        folder.mkdir(parents=True)
        (folder / "weights.safetensors").write_bytes(b"\0" * 1000)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: SD15_LISTING)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    modal_app.download_models.local("standard")
    out = capsys.readouterr().out
    assert f"[1/{len(fetched)}]" in out and f"[{len(fetched)}/{len(fetched)}]" in out and "done in" in out
    # exact file lists, chosen from each repo's listing: the files the processors load and nothing else
    assert "unet/diffusion_pytorch_model.safetensors" in fetched["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert not any(f.endswith(".bin") for files in fetched.values() for f in files)


def downloaded_copy(src: Path, dst: Path, patterns: tuple[str, ...] | list[str]) -> Path:
    """What download_models would keep of `src` (a local model folder standing in for a hub repo)."""
    files = [f.relative_to(src).as_posix() for f in src.rglob("*") if f.is_file()]
    from service.processors.downloads import LOADED_VARIANT

    for rel in select_files(files, patterns, LOADED_VARIANT):
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
        copy = downloaded_copy(tiny_models[key], tmp_path / processor / key, download_patterns(processor, option, key))
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
    a, b, c = modal_app.Restyler().restyle.local(jobs)  # one Engine.run: two lightning frames batched, one standard
    assert all(isinstance(x, bytes) and x[:2] == b"\xff\xd8" for x in (a, b, c)), (a, b, c)
    assert a != b  # each frame kept its own prompt and seed


# ---- what crosses between gateway and GPUs -----------------------------------------------------

def over_the_wire(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj, protocol=PICKLE_PROTOCOL))


def test_jobs_and_results_survive_the_trip():
    job = FrameJob("s1", gradient_jpeg(), StreamConfig(prompt="Monet", seed=7, processor_type="filter"))
    assert over_the_wire(job) == job
    error = over_the_wire(FrameError("too_large", "frame is 9 MB"))
    assert isinstance(error, FrameError) and (error.code, error.message) == ("too_large", "frame is 9 MB")

    class TorchLikeError(Exception):  # a library's exception the gateway could not unpickle
        def __init__(self, message: str, detail: object):
            super().__init__(message)

    plain = over_the_wire(modal_app.portable(TorchLikeError("CUDA out of memory", object())))
    assert type(plain) is RuntimeError and str(plain) == "CUDA out of memory"
    assert modal_app.portable(b"jpeg") == b"jpeg"


def test_gpu_class_enter_and_batch_run_locally(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "filter")
    red = solid_jpeg((220, 40, 40))
    jobs = [
        FrameJob("noir", red, StreamConfig(prompt="film noir", strength=1.0, processor_type="filter", num_steps=2)),
        FrameJob("paint", red, StreamConfig(prompt="Monet painting", processor_type="filter", num_steps=2)),
        FrameJob("raw", red, StreamConfig(processor_type="identity", num_steps=1)),
        FrameJob("broken", red[: len(red) // 2], StreamConfig(processor_type="filter", num_steps=2)),
    ]
    noir, paint, raw, broken = modal_app.Restyler().restyle.local(jobs)  # both enter hooks ran first
    grey, warm, same = (mean_rgb(x) for x in (noir, paint, raw))
    assert np.ptp(grey) < 12, "the noir stream's own prompt was not used"
    assert warm[0] > warm[1] + 50 and same[0] > same[1] + 100
    assert isinstance(broken, FrameError) and broken.code == "bad_frame"


# ---- GpuPool ---------------------------------------------------------------------------------------

def test_a_round_is_split_into_near_equal_calls():
    jobs = [FrameJob(str(i), b"x", StreamConfig()) for i in range(10)]
    assert [len(c) for c in split_round(jobs, 8)] == [5, 5]  # the round waits for its slowest call
    assert [len(c) for c in split_round(jobs, 3)] == [3, 3, 2, 2]
    assert [j.stream_id for c in split_round(jobs, 4) for j in c] == [j.stream_id for j in jobs]
    assert split_round(jobs[:1], 8) == [jobs[:1]] and split_round([], 8) == []


def make_pool(restyle, timeout_s: float = 5.0, call_size: int = 8) -> GpuPool:
    return GpuPool(restyle, "filter", Settings(processor="filter", processing_timeout_s=timeout_s), label="L4",
                   max_gpus=2, call_size=call_size, idle_s=300, warmup_timeout_s=5)


def test_a_slow_or_lost_call_fails_its_own_frames_not_the_round():
    async def restyle(jobs: list[FrameJob]) -> list[bytes | Exception]:
        if any(j.stream_id == "stuck" for j in jobs):
            await asyncio.sleep(60)
        if any(j.stream_id == "lost" for j in jobs):
            raise ConnectionError("container went away")
        return [j.stream_id.encode() for j in jobs]

    pool = make_pool(restyle, timeout_s=0.3, call_size=1)
    config = StreamConfig()
    jobs = [FrameJob(name, b"x", config) for name in ("stuck", "lost", "ok")]
    started = time.monotonic()
    stuck, lost, fine = asyncio.run(pool.process(jobs))
    assert time.monotonic() - started < 5
    assert isinstance(stuck, TimeoutError) and isinstance(lost, ConnectionError) and fine == b"ok"


def test_a_pool_that_cannot_work_says_why_in_its_frames_and_its_reason():
    async def broken(jobs: list[FrameJob]) -> list[bytes | Exception]:
        return [RuntimeError("the lightning processor could not be loaded: model X is unavailable")] * len(jobs)

    pool = make_pool(broken)
    [result] = asyncio.run(pool.process([FrameJob("s", b"x", StreamConfig())]))
    assert isinstance(result, RuntimeError) and "model X is unavailable" in str(result)
    assert "model X is unavailable" in pool.reason


def test_a_pool_idle_past_its_scaledown_is_woken_again_before_frames():
    calls: list[list[str]] = []

    async def restyle(jobs: list[FrameJob]) -> list[bytes | Exception]:
        calls.append([j.stream_id for j in jobs])
        return [b"jpeg"] * len(jobs)

    async def scenario() -> None:
        pool = make_pool(restyle)
        assert "no GPU running" in pool.reason
        await pool.process([FrameJob("a", b"x", StreamConfig())])
        assert calls == [["_warmup"], ["a"]] and "answering" in pool.reason  # woken first, then the frame
        await pool.process([FrameJob("a", b"x", StreamConfig())])
        assert calls[-1] == ["a"]  # up: no second wake
        pool.idle_s = 0  # the pool has stopped its GPUs since
        assert "no GPU running" in pool.reason
        await pool.process([FrameJob("a", b"x", StreamConfig())])
        assert calls[-2:] == [["_warmup"], ["a"]]

    asyncio.run(scenario())


# ---- the gateway, end to end, over a real server --------------------------------------------------

class InProcessPool:
    """`Restyler().restyle.remote.aio` in-process: each call pickled both ways, one container running one call
    at a time (Modal sends a container one input at a time: the class has no @modal.concurrent)."""

    def __init__(self, restyler) -> None:
        self.restyle = restyler.restyle.local
        self.calls: list[list[str]] = []  # stream ids per call
        self._container = ThreadPoolExecutor(1)

    async def __call__(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        payload = pickle.dumps((jobs,), protocol=PICKLE_PROTOCOL)
        (arrived,) = pickle.loads(payload)
        self.calls.append([job.stream_id for job in arrived])
        results = await asyncio.get_running_loop().run_in_executor(self._container, self.restyle, arrived)
        return pickle.loads(pickle.dumps(results, protocol=PICKLE_PROTOCOL))


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


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def wait_healthy(base: str) -> dict:
    deadline = time.monotonic() + 60
    while (health := json.loads(get(f"http://{base}/healthz")))["status"] == "loading":
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


def styled_frames(sockets, base: str, streams: dict[str, str], until, timeout: float = 30) -> dict[str, list]:
    """Send a red frame from each stream's broadcaster until `until(got)`; mean RGB of each frame its viewer gets."""
    red = solid_jpeg((220, 40, 40))
    red_url = "data:image/jpeg;base64," + base64.b64encode(red).decode()
    viewers = {name: sockets.enter_context(connect(f"ws://{base}/ws/viewer/{name}?format=binary", max_size=None))
               for name in streams}
    broadcasters = {name: open_broadcaster(sockets, base, name, prompt) for name, prompt in streams.items()}
    got: dict[str, list] = {name: [] for name in streams}
    deadline = time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, {k: len(v) for k, v in got.items()}
        for i, ws in enumerate(broadcasters.values()):
            ws.send(red if i % 2 == 0 else json.dumps({"type": "frame", "frame": red_url}))
        for name, viewer in viewers.items():
            with contextlib.suppress(TimeoutError):
                while True:
                    if isinstance(message := viewer.recv(timeout=0.05), bytes):
                        got[name].append(mean_rgb(message))
    return got


def test_gateway_streams_through_the_pool_and_only_a_broadcaster_wakes_a_gpu(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "filter")
    pool = InProcessPool(modal_app.Restyler())
    app = modal_app.gateway_app(pool, Settings.from_env())
    with serve(app) as base, contextlib.ExitStack() as sockets:
        health = wait_healthy(base)
        assert (health["status"], health["processor"], health["device"]) == ("ok", "filter", "modal:L4")
        for page in ("/", "/view/noir", "/overlay/noir", "/metrics", "/robots.txt", "/wp-login.php"):
            with contextlib.suppress(urllib.error.HTTPError):
                get(f"http://{base}{page}")
        wait_healthy(base)
        assert pool.calls == [], "a page view or probe started a GPU container"
        assert "no GPU running" in health["reason"]

        got = styled_frames(sockets, base, {"noir": "film noir", "paint": "Monet painting"},
                            lambda got: min(len(v) for v in got.values()) >= 3 and
                            any({"noir", "paint"} <= set(c) for c in pool.calls))
        assert pool.calls[0] == ["_warmup"]  # the broadcaster woke a GPU before its first frame
        assert all(np.ptp(rgb) < 12 for rgb in got["noir"])  # one call held both streams, each kept its prompt
        assert all(rgb[0] > rgb[1] + 50 for rgb in got["paint"])
        assert "GPU pool answering" in json.loads(get(f"http://{base}/healthz"))["reason"]

        noir = open_broadcaster(sockets, base, "noir", "film noir")
        red = solid_jpeg((220, 40, 40))
        noir.send(red[: len(red) // 2])  # passes the gateway's header check, fails to decode on the GPU
        assert next_error(noir)["code"] == "bad_frame"  # a FrameError's code survived the trip back

        request = urllib.request.Request(f"http://{base}/api/process", data=red, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers["content-type"] == "image/jpeg" and resp.read()[:2] == b"\xff\xd8"


# ---- shard mode, end to end, over a real server ------------------------------------------------------

def test_shard_serves_its_streams_sockets_from_its_own_backend(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "filter")
    app = modal_app.Shard().web.local()  # the class's enter hooks, then its ASGI app
    with serve(app) as base, contextlib.ExitStack() as sockets:
        health = wait_healthy(base)
        assert (health["status"], health["processor"], health["device"]) == ("ok", "filter", "cpu")
        assert "Modal shard" in health["reason"]
        got = styled_frames(sockets, base, {"noir": "film noir", "paint": "Monet painting"},
                            lambda got: min(len(v) for v in got.values()) >= 3)
        assert all(np.ptp(rgb) < 12 for rgb in got["noir"])
        assert all(rgb[0] > rgb[1] + 50 for rgb in got["paint"])


def test_a_stopping_shard_closes_its_sockets_with_1001(tmp_path):
    """The shard app under plain uvicorn in a process of its own: a stop (SIGTERM, as a host sends) drains, and
    every socket gets 1001 (going away), so clients reconnect at once to the shard's next container."""
    port = free_port()
    script = (
        "import uvicorn, modal_app\n"
        f"uvicorn.run(modal_app.Shard().web.local(), host='127.0.0.1', port={port}, log_level='warning')\n"
    )
    log = (tmp_path / "shard.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**OFFLINE_ENV, "DREAMSTREAM_PROCESSOR": "filter"})
    try:
        base = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                wait_healthy(base)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "shard.log").read_text()
                time.sleep(0.2)
        with contextlib.ExitStack() as sockets:
            got = styled_frames(sockets, base, {"live": "film noir"}, lambda got: len(got["live"]) >= 1)
            assert got["live"]
            viewer = sockets.enter_context(connect(f"ws://{base}/ws/viewer/live", max_size=None))
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    viewer.recv(timeout=15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
