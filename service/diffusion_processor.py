"""The original Python API, kept working exactly (SPEC section 2), and kept thin.

    p = get_diffusion_processor(processor_type="lightning", style_prompt="Van Gogh style painting")
    out_b64 = await process_base64_frame(base64_frame=b64, processor=p, prompt="Monet-style watercolor")
    out_jpeg = await apply_diffusion(img_data=jpeg_bytes, processor_type="lightning", prompt="...")

Processors come from `service.processors`, bytes and base64 from `service.codec`; this module only
adapts them to the old call shapes. The async functions run the model in a worker thread so an event
loop keeps serving while a frame is styled, and take a per-processor lock because diffusers models
are not thread-safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import weakref
from typing import Any

import numpy as np

from service import codec
from service.config import processor_options_from_env
from service.engine import style_to_jpeg
from service.processors import IdentityProcessor, Processor, create_processor
from service.processors.base import FrameRequest
from service.processors.models import ModelUnavailableError

__all__ = [
    "ModelUnavailableError",
    "apply_diffusion",
    "cached_processors",
    "clear_processor_cache",
    "get_diffusion_processor",
    "process_base64_frame",
]

_cache: dict[tuple, Processor] = {}
_cache_lock = threading.Lock()
_run_locks: weakref.WeakKeyDictionary[Processor, threading.Lock] = weakref.WeakKeyDictionary()


def get_diffusion_processor(
    processor_type: str = "standard",
    use_controlnet: bool = True,
    style_prompt: str = "Van Gogh style painting",
    strength: float = 0.7,
    num_steps: int | None = None,
    **options: Any,
) -> Processor:
    """A new processor: `standard`, `lightning` or `filter`; `options` are the model options of SPEC 2.

    An option not given here comes from its DREAMSTREAM_* env var (read here, at the API's edge), then its default."""
    options = {**processor_options_from_env().get(processor_type, {}), **options}
    try:
        return create_processor(processor_type, style_prompt=style_prompt, strength=strength,
                                num_steps=num_steps, use_controlnet=use_controlnet, **options)
    except TypeError as exc:  # the filter takes no model options: say which one, as a ValueError
        raise ValueError(f"{processor_type} processor: {exc}") from exc


async def process_base64_frame(base64_frame: str, processor: Processor, prompt: str | None = None) -> str:
    """Bare base64 or a data URL in (JPEG/PNG/WebP), the same form out with a JPEG inside."""
    try:
        data, is_data_url = codec.split_base64(base64_frame)
        image = _decode(processor, data)
    except codec.FrameError as exc:
        raise codec.FrameError(exc.code, f"base64_frame: {exc.message}") from exc
    jpeg = await _styled_jpeg(processor, processor.request(image, prompt), data)
    return codec.jpeg_data_url(jpeg) if is_data_url else codec.jpeg_base64(jpeg)


async def apply_diffusion(
    img_data: bytes,
    processor_type: str = "standard",
    prompt: str | None = None,
    use_controlnet: bool = True,
    strength: float = 0.7,
    num_steps: int | None = None,
    **options: Any,
) -> bytes:
    """Encoded image in, JPEG bytes out. The processor is built once per (type, options) and reused.

    Strength, steps, ControlNet and prompt are per call, so changing them never loads a second copy
    of the models.
    """
    if not isinstance(img_data, (bytes, bytearray, memoryview)):
        raise ValueError(f"img_data must be the bytes of a JPEG, PNG or WebP image, got {type(img_data).__name__}")
    try:
        codec.probe(bytes(img_data))  # a bad frame fails before any model loads
    except codec.FrameError as exc:
        raise codec.FrameError(exc.code, f"img_data: {exc.message}") from exc
    processor = await asyncio.to_thread(_cached_processor, processor_type, options)
    try:
        image = _decode(processor, bytes(img_data))
    except codec.FrameError as exc:
        raise codec.FrameError(exc.code, f"img_data: {exc.message}") from exc
    steps = processor.default_steps if num_steps is None else num_steps
    # The base constructor's argument checks (strength in (0, 1], steps a positive int), loading nothing.
    IdentityProcessor(strength=strength, num_steps=steps)
    processor.check_steps(steps)
    request = FrameRequest(image, processor.style_prompt if prompt is None else prompt, float(strength), steps,
                           processor.seed, bool(use_controlnet))
    return await _styled_jpeg(processor, request, bytes(img_data))


def cached_processors() -> list[Processor]:
    """The processors `apply_diffusion` holds: one per processor type and model options, whatever the steps,
    strength, prompt or ControlNet setting of the calls."""
    with _cache_lock:
        return list(_cache.values())


def clear_processor_cache() -> None:
    """Forget the processors `apply_diffusion` built (frees their GPU memory once nothing else holds them)."""
    with _cache_lock:
        _cache.clear()


def _cached_processor(processor_type: str, options: dict[str, Any]) -> Processor:
    # Keyed on the options the processor is built with, env vars included: they choose the models as much as
    # the arguments do.
    options = {**processor_options_from_env().get(processor_type, {}), **options}
    key = (processor_type, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = get_diffusion_processor(processor_type, **options)
        return _cache[key]


def _decode(processor: Processor, data: bytes) -> np.ndarray | None:
    """The frame's pixels, or None when `processor` decodes this JPEG itself on its GPU (nvJPEG, in `_styled_jpeg`).
    The header checks run here either way, so a bad frame fails before any model work."""
    if processor.gpu_jpeg and codec.probe(data).gpu_decodable:
        return None
    return codec.decode(data)


async def _styled_jpeg(processor: Processor, request: FrameRequest, data: bytes) -> bytes:
    """Style one frame in a worker thread; on a CUDA processor JPEG is decoded and encoded there (nvJPEG), as the
    server's Engine does."""
    with _cache_lock:
        lock = _run_locks.setdefault(processor, threading.Lock())

    def run() -> bytes:
        with lock:
            ready = request
            if request.image is None:  # left for nvJPEG by `_decode`; the CPU decoder if nvJPEG refuses it
                from service.processors import gpu_jpeg

                image = gpu_jpeg.decode_or_none([data], processor.device)[0]
                ready = dataclasses.replace(request, image=codec.decode(data) if image is None else image)
            return style_to_jpeg(processor, [ready], codec.DEFAULT_QUALITY)[0]

    return await asyncio.to_thread(run)
