"""The processors and how one is chosen. Diffusion processors import torch lazily: the filter path never does."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from service.config import DEFAULT_STEPS
from service.processors.base import (
    FrameRequest,
    IdentityProcessor,
    Processor,
    check_lightning_steps,
    check_settings,
)
from service.processors.models import ModelUnavailableError

log = logging.getLogger("dreamstream.processors")

_REGISTRY = {
    "filter": "service.processors.filter:FilterProcessor",
    "identity": "service.processors.base:IdentityProcessor",
    "standard": "service.processors.standard:StandardProcessor",
    "lightning": "service.processors.lightning:LightningProcessor",
}

__all__ = ["FrameRequest", "IdentityProcessor", "Processor", "create_processor", "resolve_auto", "cuda_available"]


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


def processor_class(processor_type: str) -> type[Processor]:
    if processor_type not in _REGISTRY:
        raise ValueError(
            f"processor_type must be one of standard, lightning, filter; got {processor_type!r}"
        )
    module_name, _, cls_name = _REGISTRY[processor_type].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


DIFFUSION_FIX = ("install the diffusion extra: .venv/bin/pip install -e '.[diffusion]' "
                 "(and run it on a CUDA GPU for live rates)")


def create_processor(processor_type: str, **kwargs: Any) -> Processor:
    """A new processor. Its arguments are checked before its module is imported, so a bad call fails the same
    way with or without the diffusion stack; a missing stack is a ModelUnavailableError that says what to install."""
    if processor_type not in _REGISTRY:
        processor_class(processor_type)  # raises the ValueError naming the choices
    steps = kwargs.get("num_steps")
    steps = DEFAULT_STEPS[processor_type] if steps is None else steps
    check_settings(kwargs.get("style_prompt", "Van Gogh style painting"), kwargs.get("strength", 0.7), steps)
    if processor_type == "lightning":
        check_lightning_steps(steps)
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
