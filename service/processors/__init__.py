"""The processors and how one is chosen. Diffusion processors import torch lazily: the filter path never does."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from typing import Any

from service.config import DEFAULT_STEPS, PROCESSORS, check_steps
from service.processors.base import (
    FrameRequest,
    IdentityProcessor,
    Processor,
    check_settings,
)
from service.processors.models import ModelUnavailableError

log = logging.getLogger("dreamstream.processors")

__all__ = ["FrameRequest", "IdentityProcessor", "Processor", "availability", "create_processor", "cuda_available",
           "resolve_auto"]
DIFFUSION_MODULES = ("torch", "diffusers", "transformers")


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_auto(choice: str) -> tuple[str, str]:
    """`auto` -> (processor type, why). Other choices pass through."""
    if choice != "auto":
        return choice, f"--processor {choice} was asked for"
    if cuda_available():
        return "lightning", "auto: a CUDA GPU is present, so the live diffusion mode (lightning)"
    return "filter", "auto: no CUDA GPU found, so the CPU filter processor (no model weights needed)"


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is installed, asked without importing torch (a second of start-up, 300 MB)."""
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def availability(processor_type: str) -> str:
    """"" when this machine can run `processor_type` at a useful rate, else why not, in words that say what to do."""
    if not PROCESSORS[processor_type].diffusion:
        return ""
    missing = [name for name in DIFFUSION_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs the diffusion extra ({', '.join(missing)} missing): .venv/bin/pip install -e '.[diffusion]'"
    if not nvidia_driver_present():
        return (f"needs a CUDA GPU (set DREAMSTREAM_PROCESSORS=filter,{processor_type} to offer it on the CPU "
                "anyway, at seconds a frame)")
    return ""


def processor_class(processor_type: str) -> type[Processor]:
    if processor_type not in PROCESSORS:
        raise ValueError(
            f"processor_type must be one of standard, lightning, filter; got {processor_type!r}"
        )
    module_name, _, cls_name = PROCESSORS[processor_type].entry.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


DIFFUSION_FIX = ("install the diffusion extra: .venv/bin/pip install -e '.[diffusion]' "
                 "(and run it on a CUDA GPU for live rates)")


def create_processor(processor_type: str, **kwargs: Any) -> Processor:
    """A new processor. Its arguments are checked before its module is imported, so a bad call fails the same
    way with or without the diffusion stack; a missing stack is a ModelUnavailableError that says what to install."""
    if processor_type not in PROCESSORS:
        processor_class(processor_type)  # raises the ValueError naming the choices
    steps = kwargs.get("num_steps")
    steps = DEFAULT_STEPS[processor_type] if steps is None else steps
    check_settings(kwargs.get("style_prompt", "Van Gogh style painting"), kwargs.get("strength", 0.7), steps)
    check_steps(processor_type, steps)
    try:
        cls = processor_class(processor_type)
    except ModuleNotFoundError as exc:
        if processor_type not in ("standard", "lightning"):
            raise
        raise ModelUnavailableError(
            f"the {processor_type} processor needs {exc.name or 'a module'} that is not installed: {DIFFUSION_FIX}"
        ) from exc
    log.info("loading the %s processor", processor_type)
    return cls(**kwargs)
