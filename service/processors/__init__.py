"""The processors and how one is chosen. Diffusion processors import torch lazily: the filter path never does."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from service.processors.base import FrameRequest, IdentityProcessor, Processor

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


def create_processor(processor_type: str, **kwargs: Any) -> Processor:
    cls = processor_class(processor_type)
    log.info("loading the %s processor", processor_type)
    return cls(**kwargs)
