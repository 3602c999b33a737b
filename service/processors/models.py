"""Where each model comes from (option, env var or default; hub id or local path) and loading it.

Every model option takes a Hugging Face hub id or a local path in the standard `save_pretrained`
layout. The order of looking is: a local path; the Hugging Face cache; a download (with the hub's
own tqdm progress bars). A model that is none of these fails fast with `ModelUnavailableError`,
whose message says which option and env var point at a local copy: a first run on a machine
without internet should end in a sentence that fixes it, not in a 10-minute hang or a stack trace.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.config import FALSE_WORDS, TRUE_WORDS, option_env_var

log = logging.getLogger("dreamstream.processors")

T = TypeVar("T")

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
MIDAS_REPO = "lllyasviel/Annotators"
DEFAULTS: dict[str, dict[str, str]] = {
    "standard": {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "controlnet_model": "lllyasviel/control_v11f1p_sd15_depth",
        "depth_model": DEFAULT_DEPTH_MODEL,
        "tiny_vae": "madebyollin/taesd",
    },
    "lightning": {
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "controlnet_model": "diffusers/controlnet-depth-sdxl-1.0-small",
        "depth_model": DEFAULT_DEPTH_MODEL,
        "lightning_unet": "ByteDance/SDXL-Lightning",
        "tiny_vae": "madebyollin/taesdxl",
        # SDXL's own VAE says force_upcast and runs in fp32 (slower, twice the memory); this one runs in fp16.
        "vae_model": "madebyollin/sdxl-vae-fp16-fix",
    },
}
# Model options a processor takes that have no default model: unset unless given. Standard's `vae_model`
# unset means the base model's own VAE (its `vae` subfolder).
UNSET_BY_DEFAULT: dict[str, tuple[str, ...]] = {"standard": ("vae_model",), "lightning": ()}
REACHABILITY_TIMEOUT_S = 15.0


class ModelUnavailableError(RuntimeError):
    """A model is neither a local path, nor in the Hugging Face cache, nor downloadable right now."""


def env_var(processor: str, option: str) -> str:
    """The env var of a model option, e.g. (`lightning`, `base_model`) -> DREAMSTREAM_LIGHTNING_BASE_MODEL."""
    return option_env_var(processor, option)


@dataclass(frozen=True)
class ModelSource:
    """One resolved model option: what to load and how the user chose it (for logs and errors)."""

    processor: str
    option: str
    value: str
    origin: str  # "option" (given: an argument, or its env var read at the edge) or "default"
    offline: bool = False  # never ask the hub (option `offline`, env HF_HUB_OFFLINE): local paths and the cache only

    @property
    def env_var(self) -> str:
        return env_var(self.processor, self.option)

    @property
    def path(self) -> Path:
        return Path(self.value).expanduser()

    @property
    def is_local(self) -> bool:
        return self.path.exists()

    @property
    def looks_like_path(self) -> bool:
        """Hub ids are `owner/name`; anything else with slashes, dots or drive letters is a path."""
        v = self.value
        return v.startswith(("/", ".", "~")) or "\\" in v or ":" in v or v.count("/") > 1

    def describe(self) -> str:
        how = {"option": f"option {self.option} / {self.env_var}", "default": "default"}
        return f"{self.value} ({how[self.origin]})"

    def unavailable(self, why: str) -> ModelUnavailableError:
        return ModelUnavailableError(
            f"{self.option} {self.value!r} for the {self.processor} processor is unavailable: {why}. "
            f"Pass {self.option}=<local path or hub id> or set {self.env_var} to a local copy "
            f"(e.g. one made with `hf download {self.value if not self.looks_like_path else 'ID'} --local-dir DIR`)."
        )


def model_source(processor: str, option: str, value: Any = None, offline: bool = False) -> ModelSource | None:
    """Resolve an option: the value given (an argument, or its env var read at the edge), else the default.

    `tiny_vae` is off unless asked for: `True` (or "1"/"true") means the default tiny VAE, a string means that hub
    id or path. An option in UNSET_BY_DEFAULT (standard's `vae_model`) is unset unless given. Returns None for an
    option that is off or unset.
    """
    origin = "option" if value is not None else "default"
    if option == "tiny_vae":
        text = str(value).strip().lower() if value is not None else ""
        if value is None or value is False or text in FALSE_WORDS:
            return None
        if value is True or text in TRUE_WORDS:
            value = DEFAULTS[processor]["tiny_vae"]
    if value is None:
        if option in UNSET_BY_DEFAULT.get(processor, ()):
            return None
        value = DEFAULTS[processor][option]
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{option} must be a hub id or a local path, got {value!r}")
    return ModelSource(processor, option, str(value).strip(), origin, offline)


def hub_offline(source: ModelSource) -> bool:
    """Whether `source` may not be downloaded: its `offline` option, or huggingface_hub's own offline mode."""
    from huggingface_hub import constants

    return source.offline or constants.HF_HUB_OFFLINE


def _check_reachable(source: ModelSource) -> None:
    """Ask the hub about the repo in a thread we can stop waiting for: DNS lookups ignore timeouts."""
    from huggingface_hub import HfApi

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            HfApi().model_info(source.value, timeout=REACHABILITY_TIMEOUT_S - 5)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(REACHABILITY_TIMEOUT_S)
    if not outcome:
        raise source.unavailable(f"the Hugging Face hub did not answer within {REACHABILITY_TIMEOUT_S:.0f} s")
    if outcome[0] is not None:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        exc = outcome[0]
        if isinstance(exc, GatedRepoError):
            why = "the hub says it is gated: accept its licence on huggingface.co and log in (`hf auth login`)"
        elif isinstance(exc, RepositoryNotFoundError):
            why = "the hub has no such repo (or it is private: log in with `hf auth login`)"
        else:
            why = f"it is not in the local cache and the hub is unreachable ({type(exc).__name__}: {exc})"
        raise source.unavailable(why)


NO_SUCH_PATH = "no such file or directory"
OFFLINE_NOT_CACHED = "it is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading"


def _in_hub_cache(source: ModelSource) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source.value, local_files_only=True)
        return True
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return False


def check_available(sources: list[ModelSource]) -> None:
    """Fail before loading anything when models certainly cannot load, naming every one of them: local paths that
    do not exist, and hub ids that are neither cached nor downloadable (HF_HUB_OFFLINE). A hub id that may still
    download is left to `load_model`, which asks the hub (seconds each)."""
    missing = []
    for source in sources:
        if source.is_local:
            continue
        if source.looks_like_path:
            missing.append(source.unavailable(NO_SUCH_PATH))
        elif hub_offline(source) and not _in_hub_cache(source):
            missing.append(source.unavailable(OFFLINE_NOT_CACHED))
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise ModelUnavailableError(f"{len(missing)} models are unavailable:\n" + "\n".join(f"- {m}" for m in missing))


_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)


def load_model(source: ModelSource, loader: Callable[[str, bool], T], what: str = "") -> T:
    """Load with `loader(ref, local_files_only)`: local path, then the cache, then a download.

    Errors that mean "the files are not there" become ModelUnavailableError; the rest stay what they are.
    """
    label = f"{source.option}{' ' + what if what else ''}"
    if source.is_local:
        log.info("%s: loading %s from the local path", label, source.describe())
        try:
            return loader(str(source.path), True)
        except _LOAD_ERRORS as exc:
            raise source.unavailable(f"the local path is incomplete or not a {what or 'model'} ({exc})") from exc
    if source.looks_like_path:
        raise source.unavailable(NO_SUCH_PATH)
    try:
        model = loader(source.value, True)
        log.info("%s: loaded %s from the Hugging Face cache", label, source.describe())
        return model
    except _LOAD_ERRORS:
        pass
    if hub_offline(source):
        raise source.unavailable(OFFLINE_NOT_CACHED)
    _check_reachable(source)
    log.info("%s: downloading %s from the Hugging Face hub (progress below)", label, source.describe())
    try:
        return loader(source.value, False)
    except _LOAD_ERRORS as exc:
        raise source.unavailable(f"the download failed ({exc})") from exc


def fetch_file(source: ModelSource, filename: str) -> Path:
    """One file of a model: `filename` inside a local folder or hub repo, or the local file itself."""
    if source.is_local and source.path.is_file():
        return source.path

    def loader(ref: str, local_only: bool) -> Path:
        if Path(ref).is_dir():
            path = Path(ref) / filename
            if not path.is_file():
                raise FileNotFoundError(f"{filename} is not in {ref}")
            return path
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref, filename, local_files_only=local_only))

    return load_model(source, loader, what=filename)


def resolve_device_dtype(device: Any = None, dtype: Any = None) -> tuple[Any, Any, str]:
    """(torch.device, torch.dtype, why): cuda + fp16 when a GPU is present, else cpu + fp32."""
    import torch

    device = device or None
    dtype = dtype or None
    if device is None:
        device, why = ("cuda", "a CUDA GPU is present") if torch.cuda.is_available() else (
            "cpu", "no CUDA GPU found")
    else:
        why = "asked for"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cuda' or 'cpu', got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA GPU; pass device='cpu'")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif not isinstance(dtype, torch.dtype):
        names = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
        if str(dtype).lower() not in names:
            raise ValueError(f"dtype must be one of fp16, bf16, fp32, got {dtype!r}")
        dtype = names[str(dtype).lower()]
    return device, dtype, why


WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight files


def has_variant(ref: str, subfolder: str | None, variant: str) -> bool:
    """Whether a model folder (a local path, or a hub id in the Hugging Face cache) holds `variant` weights, e.g.
    `unet/diffusion_pytorch_model.fp16.safetensors` (or its sharded index): then those are loaded, half the bytes."""
    names = [f"{name}.{variant}.safetensors" for name in WEIGHT_NAMES]
    names += [f"{name}.safetensors.index.{variant}.json" for name in WEIGHT_NAMES]
    if Path(ref).expanduser().is_dir():
        folder = Path(ref).expanduser() / (subfolder or "")
        return any((folder / name).is_file() for name in names)
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(ref, f"{subfolder}/{name}" if subfolder else name), str)
               for name in names)
