"""The fast path's two options, `compile` and `batch_sizes`, and inductor's settings (service/processors/accel.py
says what each mode does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from service.cache_dirs import inductor_cache_dir
from service.config import FALSE_WORDS, TRUE_WORDS

MODES = ("off", "graphs", "regional", "full")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


def parse_mode(value: Any, device: torch.device) -> tuple[str, str]:
    """(mode, why) from the `compile` option (env DREAMSTREAM_COMPILE, read at the edge), or the device's default."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ("full", "default on CUDA") if device.type == "cuda" else ("off", "default on CPU")
    text = str(value).strip().lower()
    if value is True or text in TRUE_WORDS:
        return ("regional" if device.type == "cuda" else "off"), f"compile={value}"
    if value is False or text in FALSE_WORDS or text == "eager":
        return "off", f"compile={value}"
    if text not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)} (or on/off), got {value!r}")
    return text, f"compile={text}"


def parse_batch_sizes(value: Any) -> tuple[int, ...]:
    """The `batch_sizes` option ("1,2,4,8"; env DREAMSTREAM_BATCH_SIZES, read at the edge) or the default: sorted,
    positive, unique."""
    if value is None or value == "":
        value = DEFAULT_BATCH_SIZES
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        sizes = sorted({int(v) for v in items if str(v) != ""})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"batch_sizes must be positive integers such as 1,2,4,8, got {value!r}") from exc
    if not sizes or sizes[0] < 1 or any(isinstance(v, bool) for v in items):
        raise ValueError(f"batch_sizes must be positive integers such as 1,2,4,8, got {value!r}")
    return tuple(sizes)


def configure_inductor() -> Path:
    """Inductor settings for inference, and its on-disk cache where a restart finds it (returns the folder)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    folder = inductor_cache_dir()
    inductor_config.fx_graph_cache = True
    inductor_config.conv_1x1_as_mm = True  # 1x1 convolutions (SD 1.5's attention projections) as matmuls
    # One compiled entry per (block shape, batch size) for two processors: far above the default of 8.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    return folder
