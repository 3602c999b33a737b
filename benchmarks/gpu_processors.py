"""The diffusion processors on a GPU, real-size random models: JPEG bytes in -> JPEG bytes out, per frame.

    python benchmarks/gpu_processors.py                        # everything (resumes: see --out)
    python benchmarks/gpu_processors.py --quick                # the four targets, their baselines, checks
    python benchmarks/gpu_processors.py --only 'lightning/*' --frames 50
    python benchmarks/gpu_processors.py --list                 # the case names
    python benchmarks/gpu_processors.py --tiny --device cpu    # smoke test of this script on tiny models

Method (../shared/PERF.md): models of the real architectures with random weights (benchmarks/real_models.py,
built once under --models, ~26 GB) do the real arithmetic. They are loaded by the project's own processors
from local paths (the real loading path) and driven through `service.engine.Engine.run` with `FrameJob`s,
which is the server's path: decode, processor, JPEG encode. Each case reports the median time per
`Engine.run` after warm-up, over rotating 512x512 frames (gradients, shapes and noise; never zeros), the
stages of that time, peak GPU memory, and beside it, in the same run: the plain diffusers pipeline
called once per frame, and the floor (FLOPs counted with FlopCounterMode over the measured bf16 matmul
rate, or weight bytes over the measured copy bandwidth, whichever is larger).

Results go to --out as each case finishes (JSON), so a killed run keeps what it measured and the next run
skips it; benchmarks/gpu_report.py turns the JSON into the table and the plot (done at the end here too).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_cases  # noqa: E402
from benchmarks.harness import Case, Run, build_models, make_frames, progress  # noqa: E402

log = logging.getLogger("gpu_processors")


def select(cases: list[Case], args: argparse.Namespace) -> list[Case]:
    chosen = [c for c in cases if not args.quick or c.quick]
    if args.only:
        chosen = [c for c in chosen if any(fnmatch.fnmatch(c.name, p) for p in args.only)]
    if args.skip:
        chosen = [c for c in chosen if not any(fnmatch.fnmatch(c.name, p) for p in args.skip)]
    return chosen


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": platform.node(), "device": args.device,
            "command": "python " + " ".join(sys.argv)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="/tmp/real-models", help="the real-size models (built if missing)")
    parser.add_argument("--out", default="benchmarks/results/gpu_processors.json", help="results JSON (appended)")
    parser.add_argument("--resume", help="results JSON to start from (default: --out)")
    parser.add_argument("--plot", help="PNG to write at the end (default: --out with .png)")
    parser.add_argument("--only", nargs="*", help="case name patterns (fnmatch), e.g. 'lightning/*'")
    parser.add_argument("--skip", nargs="*", help="case name patterns to leave out")
    parser.add_argument("--quick", action="store_true", help="only the target cases, their baselines and checks")
    parser.add_argument("--force", action="store_true", help="re-run cases already in the results")
    parser.add_argument("--rerun", nargs="*", default=[], help="re-run the cases these patterns match")
    parser.add_argument("--frames", type=int, default=40, help="timed Engine.run calls per case")
    parser.add_argument("--warmup", type=int, default=4, help="untimed calls before timing")
    parser.add_argument("--plain-frames", type=int, default=6, help="timed calls of each plain pipeline")
    parser.add_argument("--stage-frames", type=int, default=10, help="frames timed stage by stage")
    parser.add_argument("--budget-s", type=float, default=0, help="start no new case after this many seconds")
    parser.add_argument("--compile", help="compile mode of the default engines (default: the processors' own)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64 px: a smoke test of this script")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--server", metavar="ARGS", help="then benchmarks/gpu_server.py with these arguments (one "
                        "string, e.g. \"--configs defaults --streams 1,8\"; '' for its defaults)")
    args = parser.parse_args(argv)
    args.size = 64 if args.tiny else 512
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    cases = select(gpu_cases.all_cases(), args)
    if args.list:
        print("\n".join(f"{c.name}{'  [quick]' if c.quick else ''}" for c in cases))
        return 0
    resume = Path(args.resume or args.out)
    results: dict[str, Any] = json.loads(resume.read_text()) if resume.exists() else {}
    results.setdefault("cases", {})
    env = environment(args)
    results.setdefault("meta", env)
    results["meta"].setdefault("calls", []).append({k: env[k] for k in ("date", "command", "torch")})

    if args.tiny:  # tests/tiny_models.py, run as a program (as gpu_server.py does): nothing here imports tests/
        paths = build_models(args)
    else:
        from benchmarks.real_models import build_real_models

        progress(f"real-size models under {args.models} (built on first use, ~1 min)")
        paths = build_real_models(Path(args.models), device=args.device)
    os.environ["HF_HUB_OFFLINE"] = "1"
    run = Run(args, paths, make_frames(8, args.size), results, gpu_cases.load_resource)
    todo = [c for c in cases if args.force or c.name not in results["cases"]
            or any(fnmatch.fnmatch(c.name, p) for p in args.rerun)]
    progress(f"{len(todo)} of {len(cases)} cases to run ({len(cases) - len(todo)} already in {resume})")
    run.release_unneeded(todo)
    failures = 0
    for i, case in enumerate(todo):
        if args.budget_s and run.elapsed() > args.budget_s:
            progress(f"budget of {args.budget_s:.0f} s spent: stopping before {case.name} (run again to go on)")
            break
        progress(f"[{i + 1}/{len(todo)}] {case.name}")
        try:
            outcome = gpu_cases.run_case(run, case)
            outcome.update(elapsed_s=round(run.elapsed(), 1), call=len(results["meta"]["calls"]))
            results["cases"][case.name] = outcome
            progress(f"    {gpu_cases.one_line(outcome)}")
        except Exception as exc:  # one broken case must not cost the rest of the run
            failures += 1
            logging.exception("case %s failed", case.name)
            results.setdefault("errors", {})[case.name] = f"{type(exc).__name__}: {exc}"
        run.save()
        run.release_unneeded(todo[i + 1:])
    run.save()
    # The report and the server are entry scripts of their own: run as programs, not imported.
    here = Path(__file__).resolve().parent
    png = args.plot or str(Path(args.out).with_suffix(".png"))
    failures += run_script(here / "gpu_report.py", [args.out, "--plot", png])
    if args.server is not None:  # the real server next, with this run's engines released from the GPU
        run.release_unneeded([])
        forwarded = ["--models", args.models, "--device", args.device, *(["--tiny"] if args.tiny else [])]
        failures += run_script(here / "gpu_server.py", [*forwarded, *shlex.split(args.server)])
    return 1 if failures else 0


def run_script(script: Path, argv: list[str]) -> int:
    """`python script argv...` in this directory and environment, its output here; 1 if it failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    return 1 if subprocess.run([sys.executable, str(script), *argv], check=False).returncode else 0


if __name__ == "__main__":
    sys.exit(main())
