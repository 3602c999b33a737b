"""The synchronous heart of processing: encoded frames of several streams in, JPEG bytes out.

One Engine owns its processors and is driven by one thread at a time (diffusion pipelines are not
thread-safe). The local backend runs it in a worker thread; the Modal GPU class runs it in a
container. Both hand it the same `FrameJob`s, so the rest of the service never knows which.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import codec
from service.config import StreamConfig
from service.processors import FrameRequest, Processor, create_processor

log = logging.getLogger("dreamstream.engine")

# processor options that only the diffusion processors take
DIFFUSION_TYPES = ("standard", "lightning")
LOAD_RETRY_S = 60.0


@dataclass(frozen=True)
class FrameJob:
    """One frame crossing the backend seam: plain, picklable data."""

    stream_id: str
    data: bytes  # an encoded JPEG/PNG/WebP whose header passed the limits
    config: StreamConfig


class ProcessorLoadError(RuntimeError):
    pass


class Engine:
    def __init__(
        self,
        default_config: StreamConfig,
        processor_options: dict[str, Any] | None = None,
        max_frame_bytes: int = codec.DEFAULT_MAX_BYTES,
        max_frame_side: int = codec.DEFAULT_MAX_SIDE,
        jpeg_quality: int = 85,
    ) -> None:
        self.default_config = default_config
        self.processor_options = dict(processor_options or {})
        self.max_frame_bytes = max_frame_bytes
        self.max_frame_side = max_frame_side
        self.jpeg_quality = jpeg_quality
        self.processors: dict[str, Processor] = {}
        self._load_failures: dict[str, tuple[float, str]] = {}

    def processor(self, processor_type: str) -> Processor:
        """The loaded processor of this type, loading it on first use (a failure is remembered for a minute)."""
        if processor_type in self.processors:
            return self.processors[processor_type]
        failed = self._load_failures.get(processor_type)
        if failed and time.monotonic() - failed[0] < LOAD_RETRY_S:
            raise ProcessorLoadError(failed[1])
        cfg = self.default_config
        kwargs: dict[str, Any] = {"style_prompt": cfg.prompt, "strength": cfg.strength, "seed": cfg.seed}
        if processor_type in DIFFUSION_TYPES:
            kwargs.update(use_controlnet=cfg.use_controlnet, **self.processor_options)
        started = time.monotonic()
        try:
            proc = create_processor(processor_type, **kwargs)
            proc.warmup()
        except Exception as exc:
            message = f"the {processor_type} processor could not be loaded: {exc}"
            log.error("%s", message)
            self._load_failures[processor_type] = (time.monotonic(), message)
            raise ProcessorLoadError(message) from exc
        log.info(
            "%s processor ready on %s in %.1f s", processor_type, proc.device, time.monotonic() - started
        )
        self.processors[processor_type] = proc
        return proc

    def run(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        """Style every job; a job's failure is returned in its place, never raised."""
        results: list[bytes | Exception | None] = [None] * len(jobs)
        groups: dict[str, list[tuple[int, FrameRequest]]] = defaultdict(list)
        for i, job in enumerate(jobs):
            try:
                image = codec.decode(job.data, self.max_frame_bytes, self.max_frame_side)
            except codec.FrameError as exc:
                results[i] = exc
                continue
            cfg = job.config
            groups[cfg.processor_type].append(
                (i, FrameRequest(image, cfg.prompt, cfg.strength, cfg.num_steps, cfg.seed, cfg.use_controlnet))
            )
        for processor_type, items in groups.items():
            for i, result in self._run_group(processor_type, items):
                results[i] = result
        return [r if r is not None else RuntimeError("frame was not processed") for r in results]

    def _run_group(
        self, processor_type: str, items: list[tuple[int, FrameRequest]]
    ) -> list[tuple[int, bytes | Exception]]:
        """One processor call for the group; if it fails, one call per frame, so only the frames that
        really fail (one stream's, or a batch too big for the GPU) get `processing_failed`."""
        try:
            outputs = self.processor(processor_type).process_batch([req for _, req in items])
            return [
                (i, codec.encode_jpeg(np.asarray(out), self.jpeg_quality))
                for (i, _), out in zip(items, outputs, strict=True)
            ]
        except Exception as exc:  # a processor failure fails its frames, not the server
            if isinstance(exc, ProcessorLoadError):
                return [(i, exc) for i, _ in items]
            log.exception("%s processor failed on a batch of %d", processor_type, len(items))
            if len(items) == 1:
                return [(items[0][0], exc)]
        return [result for item in items for result in self._run_group(processor_type, [item])]

    def describe(self) -> dict[str, Any]:
        loaded = {name: proc.describe() for name, proc in self.processors.items()}
        return {"loaded": loaded}
