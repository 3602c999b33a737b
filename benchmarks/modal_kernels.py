"""What modal_app's compiled-kernel handling buys a GPU container, measured on a GPU (no Modal needed).

modal_app.py points TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR of every GPU container at one local folder;
`warm_up` compiles there once and copies the folder to the volume, and each serving container copies it back to
the same local path before loading (`seed_kernels`). This runs those steps with plain folders for the volume:

1. `warm_up`: a fresh process loads the lightning processor (`compile=full`), waits for the background compile;
   its local folder is copied to the "volume";
2. `seeded`: the local folder is emptied and refilled from the "volume", and a fresh process does the same;
3. `unseeded`: the local folder is emptied, and a fresh process does the same (a container without warm_up).

Each process also says whether importing the diffusion stack (what `@modal.enter(snap=True)` does before the
memory snapshot, where no GPU may be touched) initialised CUDA. Tiny models of the real architectures
(tests/tiny_models.py, built by running it) keep it to a few minutes; the real models' compile takes longer, and
the ratio is what carries over.

    python benchmarks/modal_kernels.py [--models /tmp/tiny] [--out benchmarks/results/modal_kernels_h200.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repo's packages first
    sys.path.insert(0, str(REPO))

from benchmarks.harness import build_models, progress  # noqa: E402

LOCAL = Path("/tmp/dreamstream-compiled")  # modal_app.LOCAL_KERNELS
MODEL_VARS = {"DREAMSTREAM_LIGHTNING_BASE_MODEL": "sdxl", "DREAMSTREAM_LIGHTNING_UNET": "lightning",
              "DREAMSTREAM_LIGHTNING_VAE_MODEL": "sdxl_vae_fp16", "DREAMSTREAM_DEPTH_MODEL": "depth",
              "DREAMSTREAM_LIGHTNING_CONTROLNET_MODEL": "sdxl_controlnet"}
CONTAINER = r'''
import json, time
started = time.monotonic()
import diffusers, torch, transformers
from service.processors import processor_class
processor_class("lightning")  # modal_app.import_diffusion_stack
cuda_initialised = torch.cuda.is_initialized()
imported = time.monotonic()
from service.config import Settings
from service.engine import Engine
s = Settings.from_env(processor="lightning")
engine = Engine(s.stream_defaults("lightning"), s.processor_options, s.max_frame_bytes, s.max_frame_side,
                s.jpeg_quality)
proc = engine.processor("lightning")
ready = time.monotonic()
proc.wait_optimised()
print("RESULT " + json.dumps({
    "cuda_initialised_by_imports": cuda_initialised, "imports_s": round(imported - started, 1),
    "load_and_graphs_s": round(ready - imported, 1), "compile_after_ready_s": round(time.monotonic() - ready, 1),
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "optimise": proc.optimise_progress(),
}))
'''


def files(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def container(label: str, env: dict[str, str], logs: Path) -> dict:
    progress(f"{label}: a fresh process, {files(LOCAL)} files in {LOCAL}")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CONTAINER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    (logs / f"modal_kernels_{label}.log").write_text(done.stdout[-20000:] + done.stderr[-60000:])
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    result = json.loads(line[len("RESULT "):]) if line else {"error": done.stderr[-2000:]}
    row = {"container": label, "wall_s": round(time.monotonic() - started, 1), **result, "kernel_files": files(LOCAL)}
    progress(f"  {row}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="/tmp/tiny-models")
    parser.add_argument("--volume", default="/tmp/modal-kernels-volume", help="stands for /models/compiled/<gpu>")
    parser.add_argument("--batch-sizes", default="1,2")
    parser.add_argument("--compile", default="full", help="DREAMSTREAM_COMPILE (off: a dry run of the steps on a CPU)")
    parser.add_argument("--logs", default="/tmp")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/modal_kernels.json"))
    args = parser.parse_args(argv)
    args.tiny = True
    paths = build_models(args)
    env = {**os.environ, **{var: str(paths[key]) for var, key in MODEL_VARS.items()}, "HF_HUB_OFFLINE": "1",
           "DREAMSTREAM_COMPILE": args.compile, "DREAMSTREAM_BATCH_SIZES": args.batch_sizes,
           "DREAMSTREAM_WIDTH": "64", "DREAMSTREAM_HEIGHT": "64", "PYTHONPATH": str(REPO),
           "TORCHINDUCTOR_CACHE_DIR": str(LOCAL / "inductor"), "TRITON_CACHE_DIR": str(LOCAL / "triton")}
    volume, logs = Path(args.volume), Path(args.logs)
    for folder in (LOCAL, volume):
        shutil.rmtree(folder, ignore_errors=True)
    rows = [container("warm_up", env, logs)]
    LOCAL.mkdir(parents=True, exist_ok=True)
    shutil.copytree(LOCAL, volume, dirs_exist_ok=True)  # warm_up: local -> volume (modal_app.copy_kernels)
    shutil.rmtree(LOCAL)
    shutil.copytree(volume, LOCAL, dirs_exist_ok=True)  # seed_kernels: volume -> local, same path
    rows.append(container("seeded", env, logs))
    shutil.rmtree(LOCAL)
    rows.append(container("unseeded", env, logs))
    result = {
        "meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": platform.python_version(),
                 "command": " ".join(["python benchmarks/modal_kernels.py", *(argv or sys.argv[1:])]),
                 "models": "tests/tiny_models.py (tiny, real architectures), 64x64", "compile": args.compile,
                 "batch_sizes": args.batch_sizes, "volume_files": files(volume)},
        "containers": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    progress(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
