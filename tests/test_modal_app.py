"""modal_app.py, offline and with no Modal token: what each mode declares, and the GPU class's code.

Modal's machinery (containers, `.remote`) needs the cloud; everything else runs here: what each mode declares
(through Modal's public `FunctionInfo`), the images' pins, the download job, and the GPU class's enter hooks and
method through `.local()`. Both modes served for real: tests/test_modal_serving.py. Nothing here reads Modal's
private attributes.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import modal_app
from service.codec import FrameError
from service.config import StreamConfig
from service.engine import FrameJob
from service.gpu_pool import GpuPool
from service.processors.downloads import download_patterns, select_files
from tests.helpers import ROOT, gradient_jpeg, mean_rgb, solid_jpeg
from tests.test_downloads import SD15_LISTING

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
    assert found["env"]["DREAMSTREAM_ALLOWED_HOSTS"] == "*.modal.run"  # the pages work from the app's address
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
    # the GPU processors run in fp16 and read the fp16 files where a repo has them: only those are fetched
    sd15 = fetched["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in sd15
    assert "unet/diffusion_pytorch_model.safetensors" not in sd15
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
    back = over_the_wire(job)
    assert (back.stream_id, back.data, back.config) == (job.stream_id, job.data, job.config)
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


# ---- the weights in the memory snapshot ----------------------------------------------------------------

def tiny_lightning_jobs() -> list[FrameJob]:
    frame = gradient_jpeg((96, 72))
    return [FrameJob(name, frame, StreamConfig(prompt=prompt, processor_type="lightning", num_steps=2, seed=seed))
            for name, prompt, seed in (("a", "a watercolor", 1), ("b", "neon city", 2))]


def test_gpu_class_serves_the_processor_its_snapshot_loaded_on_the_cpu(tiny_env, monkeypatch, caplog):
    """`prepare` (snap=True) builds the processor on the CPU, `load` (after the restore) moves it to the device and
    warms it up: the frames are those of a processor loaded as `dreamstream serve` loads it."""
    for name, value in {"PROCESSOR": "lightning", "WIDTH": "64", "HEIGHT": "64"}.items():
        monkeypatch.setenv(f"DREAMSTREAM_{name}", value)
    caplog.set_level("INFO", logger="dreamstream.modal")
    a, b = modal_app.Restyler().restyle.local(tiny_lightning_jobs())  # both enter hooks, then one call
    assert isinstance(a, bytes) and a[:2] == b"\xff\xd8" and a != b, (a, b)
    stages = [r.getMessage() for r in caplog.records if r.name == "dreamstream.modal"]
    assert any("weights on the CPU in" in m for m in stages) and any("weights to cpu in" in m for m in stages), stages
    served = modal_app.make_engine(modal_app.modal_settings(), "lightning").run(tiny_lightning_jobs())
    assert [a, b] == served  # the same JPEG bytes


def test_without_weights_the_snapshot_holds_none_and_the_log_says_what_to_run(tiny_env, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("DREAMSTREAM_LIGHTNING_BASE_MODEL", str(tmp_path / "not-downloaded"))
    monkeypatch.setenv("DREAMSTREAM_PROCESSOR", "lightning")
    assert modal_app.load_on_cpu(modal_app.modal_settings(), "lightning") is None
    assert "modal run modal_app.py::download_models" in caplog.text
    assert modal_app.load_on_cpu(modal_app.modal_settings(), "filter") is None  # nothing to hold
    (a, _) = modal_app.Restyler().restyle.local(tiny_lightning_jobs())  # the container still starts, and says why
    assert isinstance(a, Exception) and "not-downloaded" in str(a)
