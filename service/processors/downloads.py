"""Which files of which hub repos the processors load: what `modal_app.py::download_models` fetches.

The repos come from the processors' model table (`models.DEFAULTS`, `models.model_source`: the option the
server passes down, else the default), so what is downloaded is what the processors will ask for. Of each
repo only the parts a processor loads are fetched:

- `standard` loads SD 1.5's text encoder, UNet and VAE; `lightning` loads SDXL's two text encoders only
  (its UNet comes from the Lightning files, its VAE from `vae_model`), plus every part's config/tokenizer;
- `lightning_unet`: the four ByteDance UNet files (already fp16, 5.1 GB each);
- a `vae_model`: the diffusers AutoencoderKL at the root, not the single-file copies VAE repos add;
- controlnet-aux's MiDaS: one checkpoint of the large `lllyasviel/Annotators` repo;
- nothing of the single-file checkpoints, `.bin`, ONNX, OpenVINO, Flax or TF copies (SKIP_FILES).

Precision: many repos ship each weight twice, `name.safetensors` (fp32) and `name.fp16.safetensors`.
`select_files(repo_files, patterns, variant)` keeps, folder by folder, the `variant` file where the repo
has one and the default file elsewhere; `variant=None` keeps only the default files. `LOADED_VARIANT` is
the precision the processors load: a half-precision processor passes `variant="fp16"` to `from_pretrained`
wherever the folder has such files (`DiffusionProcessor.load_component`, `models.has_variant`), so fetching
only those halves what the diffusion repos cost to download and to read at each cold start. (An fp32
processor, e.g. on a CPU, then needs the repos' default files: download with variant=None for it.)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

LOADED_VARIANT: str | None = "fp16"
BASE_MODEL_PARTS: dict[str, tuple[str, ...]] = {
    "standard": ("text_encoder", "unet", "vae"),
    "lightning": ("text_encoder", "text_encoder_2"),
}
SKIP_FILES = ["*non_ema*", "*.bin", "*.ckpt", "*.onnx*", "*openvino*", "*.msgpack", "*.h5"]
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class RepoDownload:
    """One hub repo to fetch: who needs it (for the progress lines) and which of its files."""

    repo: str
    label: str  # e.g. "lightning depth_model, standard depth_model"
    patterns: tuple[str, ...]  # snapshot_download allow_patterns, before the variant is chosen


def download_patterns(processor: str, option: str, repo: str) -> list[str]:
    """The files of `repo` that `processor` loads as its `option`, as snapshot_download allow_patterns.

    Weight patterns match both precisions (`unet/*.safetensors` matches `…model.fp16.safetensors` too):
    `select_files` then picks one per weight.
    """
    from service.processors.depth import MIDAS_FILE
    from service.processors.lightning import CHECKPOINTS

    if option == "base_model":
        weights = [f"{part}/*{WEIGHT_SUFFIX}" for part in BASE_MODEL_PARTS[processor]]
        return ["model_index.json", "*/*.json", "*/*.txt", *weights]
    if option == "lightning_unet":
        return sorted(CHECKPOINTS.values())
    if option == "vae_model":  # an AutoencoderKL at the root; not the single-file copies some VAE repos add
        return ["*.json", f"diffusion_pytorch_model*{WEIGHT_SUFFIX}"]
    if option == "depth_model" and any(word in repo.lower() for word in ("annotators", "midas")):
        return [MIDAS_FILE]  # controlnet-aux's MiDaS: one checkpoint of a large repo
    return ["*.json", "*.txt", f"*{WEIGHT_SUFFIX}"]


def download_plan(processors: list[str], options: dict[str, dict[str, Any]] | None = None) -> list[RepoDownload]:
    """The repos the processors load, each once, with the files each needs.

    `options`: each processor type's options as the server passes them down (`Settings.processor_options`, read
    from the DREAMSTREAM_* variables at the edge); a model option there replaces the default. Options set to a
    local path (a folder on the volume) are not fetched: they are there already.
    """
    from service.processors.models import DEFAULTS, UNSET_BY_DEFAULT, model_source

    plan: dict[str, tuple[str, set[str]]] = {}
    for processor in processors:
        if processor not in DEFAULTS:
            raise ValueError(f"processors must be among {', '.join(DEFAULTS)}; got {processor!r}")
        given = (options or {}).get(processor, {})
        for option in (*DEFAULTS[processor], *UNSET_BY_DEFAULT.get(processor, ())):
            source = model_source(processor, option, given.get(option))
            if source is None and option == "tiny_vae":
                # the tiny VAE is off unless asked for, but it is a few MB: fetch it so it can be turned on
                source = model_source(processor, option, True)
            if source is None or source.looks_like_path:
                continue
            label, patterns = plan.get(source.value, ("", set()))
            plan[source.value] = (
                f"{label}, {processor} {option}" if label else f"{processor} {option}",
                patterns | set(download_patterns(processor, option, source.value)),
            )
    return [RepoDownload(repo, label, tuple(sorted(patterns))) for repo, (label, patterns) in plan.items()]


def _matches(path: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def variant_of(path: str) -> tuple[str, str | None]:
    """`unet/diffusion_pytorch_model.fp16.safetensors` -> (`unet/diffusion_pytorch_model.safetensors`, "fp16")."""
    name = PurePosixPath(path)
    parts = name.name.removesuffix(WEIGHT_SUFFIX).split(".")
    if not name.name.endswith(WEIGHT_SUFFIX) or len(parts) < 2:
        return path, None
    return str(name.with_name(".".join(parts[:-1]) + WEIGHT_SUFFIX)), parts[-1]


def select_files(repo_files: list[str], patterns: tuple[str, ...] | list[str], variant: str | None) -> list[str]:
    """The files of a repo to fetch: those `patterns` allow, and of each weight one precision.

    A weight stored as both `x.safetensors` and `x.<variant>.safetensors` is fetched as the variant; one
    stored only as `x.safetensors` (the Lightning UNets, most VAEs and depth models) as itself; other
    variants (`x.fp16.safetensors` when `variant` is None, `x.bf16.safetensors`) never. Sharded weights
    (`x-00001-of-00002.safetensors`; none of the default repos has them) are fetched in default precision.
    """
    wanted = [f for f in repo_files if _matches(f, patterns) and not _matches(f, SKIP_FILES)]
    replaced = {variant_of(f)[0] for f in wanted if variant is not None and variant_of(f)[1] == variant}
    return sorted(f for f in wanted if variant_of(f)[1] == variant or (variant_of(f)[1] is None and f not in replaced))
