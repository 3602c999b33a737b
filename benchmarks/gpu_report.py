"""Table, targets and plot from the JSON of benchmarks/gpu_processors.py.

    python benchmarks/gpu_report.py benchmarks/results/gpu_processors_h100.json [--plot out.png]

Per case: the median time of one `Engine.run` (all streams' frames), frames/s, the plain pipeline's time
for the same frames, and the floor: FLOPs (counted per model call on the eager path, times the calls a
frame makes) over the measured bf16 matmul rate, or the weights each call must read over the measured
copy bandwidth, whichever is larger.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGETS = [  # (case, what the target is, frames/s it needs, measured as)
    ("lightning/1step/nocn/taesd", "lightning 1 step (tiny VAE)", 60.0, "fps_total"),
    ("lightning/4step/cn/taesd", "lightning 4 x 0.7 + depth ControlNet (tiny VAE)", 25.0, "fps_total"),
    ("lightning/4step/cn/vae", "lightning 4 x 0.7 + depth ControlNet (full VAE)", 25.0, "fps_total"),
    ("standard/25step/cn/vae", "standard 25 x 0.7, CFG 7.5, depth ControlNet", 8.0, "fps_total"),
    ("streams/8/lightning-2step/nocn/taesd", "8 streams of lightning 2 steps, in all", 120.0, "fps_total"),
]


def floor_ms(case: dict[str, Any], results: dict[str, Any]) -> dict[str, float] | None:
    """The floor of one `Engine.run` of this case, in ms, from the counted FLOPs and weight bytes."""
    cases = results.get("cases", {})
    flops, peak = cases.get(f"flops/{case.get('processor')}"), cases.get("device/peak", {})
    if not flops or not peak.get("matmul_bf16_tflops"):
        return None
    cn, tiny = case["controlnet"], case["vae"] == "taesd"
    step = flops["step_cn" if cn else "step_nocn"]
    if case["processor"] == "standard" and not case["cfg"]:
        step = flops.get("step_cn_single_pass", step)
    vae = flops["taesd_encode"] + flops["taesd_decode"] if tiny else flops["vae_encode"] + flops["vae_decode"]
    total = case["streams"] * (case["run_steps"] * step + vae + (flops["depth"] if cn else 0))
    weights = (case["run_steps"] * (flops["bytes_unet"] + (flops["bytes_controlnet"] if cn else 0))
               + flops["bytes_taesd" if tiny else "bytes_vae"] + (flops["bytes_depth"] if cn else 0))
    compute = total / (peak["matmul_bf16_tflops"] * 1e12) * 1000
    memory = weights / (peak["copy_tb_s"] * 1e12) * 1000
    return {"floor_ms": max(compute, memory), "compute_ms": compute, "weights_ms": memory, "tflop": total / 1e12}


def plain_ms_per_frame(name: str, case: dict[str, Any], results: dict[str, Any]) -> float | None:
    """The plain pipeline's time for one frame of this case (streams: the same pipeline, frame after frame)."""
    cases = results.get("cases", {})
    base = name.split("@")[0].split("+")[0]
    if base.startswith("streams/"):
        n, rest = base.split("/", 2)[1:]
        processor, what = rest.split("-", 1)
        base = f"{processor}/{what}"
    plain = cases.get(f"plain/{base}")
    return plain["median_ms"] if plain else None


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, case in results.get("cases", {}).items():
        if case.get("kind") not in ("frames", "gpujpeg") or "median_ms" not in case:
            continue
        per_frame = case["median_ms"] / case["streams"]
        floor = floor_ms(case, results)
        plain = plain_ms_per_frame(name, case, results)
        out.append({
            "case": name, "ms_per_call": case["median_ms"], "fps": case["fps_total"],
            "fps_per_stream": case["fps_per_stream"], "plain_ms_per_frame": plain,
            "speedup_vs_plain": round(plain / per_frame, 1) if plain else None,
            "floor_ms_per_call": round(floor["floor_ms"], 2) if floor else None,
            "x_floor": round(case["median_ms"] / floor["floor_ms"], 1) if floor else None,
            "peak_gpu_gb": case.get("peak_gpu_gb"), "stages_ms": case.get("stages_ms", {}),
            "equivalent": case.get("equivalent", True),
        })
    return out


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def when(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    calls = meta.get("calls") or [{"date": meta.get("date", "?")}]
    dates = calls[0]["date"] if len(calls) == 1 else f"{calls[0]['date']} to {calls[-1]['date']} ({len(calls)} calls)"
    return f"{meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, diffusers {meta.get('diffusers', '?')}, {dates}"


def markdown(results: dict[str, Any]) -> str:
    lines = [when(results), ""]
    table = {r["case"]: r for r in rows(results)}
    lines += ["| target | case | compile | JPEG | measured | needs | plain pipeline | × plain | floor | × floor "
              "| met |", "| --- |" + " --- |" * 10]
    cpu, gpu = "CPU, in Engine.run", "nvJPEG (prototype)"
    variants = (("", "regional (default)", cpu), ("@full", "full", cpu), ("+gpujpeg", "regional (default)", gpu),
                ("@full+gpujpeg", "full", gpu))
    for name, what, need, _ in TARGETS:
        found = [(table[name + suffix], mode, jpeg) for suffix, mode, jpeg in variants if name + suffix in table]
        if not found:
            lines.append(f"| {what} | `{name}` | | | not measured | ≥ {need:g} fps | | | | | |")
        for r, mode, jpeg in found:
            plain_fps = 1000 / r["plain_ms_per_frame"] if r["plain_ms_per_frame"] else None
            lines.append(f"| {what} | `{r['case']}` | {mode} | {jpeg} | {r['fps']:.1f} fps "
                         f"({r['ms_per_call']:.1f} ms) | ≥ {need:g} fps | {_fmt(plain_fps)} fps | "
                         f"{_fmt(r['speedup_vs_plain'])}× | "
                         f"{_fmt(r['floor_ms_per_call'])} ms | {_fmt(r['x_floor'])}× | "
                         f"{'yes' if r['fps'] >= need else '**no**'} |")
    lines += ["", "| case | ms per Engine.run | frames/s | per stream | plain ms/frame | × plain | floor ms | "
              "× floor | peak GB | decode | upload | VAE enc | depth | steps | VAE dec | encode |",
              "| --- |" + " --- |" * 16]
    for r in table.values():
        s = r["stages_ms"]
        stage = " | ".join(_fmt(s.get(k)) for k in ("jpeg_decode", "upload", "vae_encode", "depth", "steps",
                                                      "vae_decode", "jpeg_encode"))
        name = r["case"] + ("" if r["equivalent"] else " (not equivalent)")
        lines.append(f"| `{name}` | {r['ms_per_call']:.1f} | {r['fps']:.1f} | {r['fps_per_stream']:.1f} | "
                     f"{_fmt(r['plain_ms_per_frame'])} | {_fmt(r['speedup_vs_plain'])} | "
                     f"{_fmt(r['floor_ms_per_call'])} | {_fmt(r['x_floor'])} | {_fmt(r['peak_gpu_gb'])} | {stage} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows(results) if not any(m in r["case"] for m in ("@eager", "@graphs"))]
    if not data:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(18, 0.42 * len(data) + 2.5), gridspec_kw={"width_ratios": [3, 2]})
    names = [r["case"] for r in data]
    y = range(len(data))
    left.barh([i + 0.27 for i in y], [r["fps"] for r in data], height=0.27, label="DreamStream (Engine.run)")
    left.barh(list(y), [1000 / r["plain_ms_per_frame"] if r["plain_ms_per_frame"] else 0 for r in data],
              height=0.27, label="plain diffusers pipeline")
    left.barh([i - 0.27 for i in y],
              [r["fps"] * r["ms_per_call"] / r["floor_ms_per_call"] if r["floor_ms_per_call"] else 0 for r in data],
              height=0.27, label="floor (FLOPs or weight bytes)")
    for name, _, need, _ in TARGETS:
        if name in names:
            i = names.index(name)
            left.plot([need, need], [i - 0.45, i + 0.45], color="red", linewidth=2)
    left.set_xscale("log")
    left.set_yticks(list(y), names, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("frames per second (all streams; red: target)")
    left.legend(loc="lower right", fontsize=8)
    stages = ("jpeg_decode", "upload", "vae_encode", "depth", "prompt_noise", "steps", "vae_decode", "jpeg_encode")
    start = [0.0] * len(data)
    for stage in stages:
        values = [r["stages_ms"].get(stage, 0) for r in data]
        right.barh(list(y), values, left=start, label=stage)
        start = [a + b for a, b in zip(start, values, strict=True)]
    right.set_yticks(list(y), [""] * len(data))
    right.invert_yaxis()
    right.set_xlabel("ms per Engine.run, by stage (synchronised)")
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"DreamStream processors, 512x512, random weights of the real models — {when(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Any], png: Path | None) -> str:
    text = markdown(results)
    extras = {k: v for k, v in results.get("cases", {}).items() if v.get("kind") not in ("frames", "plain")}
    print(json.dumps(extras, indent=1, default=str))
    if results.get("errors"):
        print("errors:", json.dumps(results["errors"], indent=1))
    print(text, flush=True)
    if png:
        plot(results, png)
        print(f"plot: {png}")
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    report(json.loads(Path(args.json).read_text()), Path(args.plot) if args.plot else None)
    sys.exit(0)
