"""The synchronous heart of processing: encoded frames of several streams in, JPEG bytes out.

One Engine owns its processors and is driven by one thread at a time (diffusion pipelines are not
thread-safe). The local backend runs it in a worker thread; the Modal GPU class runs it in a
container. Both hand it the same `FrameJob`s, so the rest of the service never knows which.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import codec
from service.config import PROCESSORS, StreamConfig
from service.processors import FrameRequest, Processor, create_processor

log = logging.getLogger("dreamstream.engine")

LOAD_RETRY_S = 60.0


@dataclass(frozen=True, eq=False)
class FrameJob:
    """One frame crossing the backend seam: plain, picklable data (equal only to itself: a job is one frame)."""

    stream_id: str
    data: bytes  # an encoded JPEG/PNG/WebP whose header passed the limits
    config: StreamConfig


class ProcessorLoadError(RuntimeError):
    pass


def style_to_jpeg(proc: Processor, requests: list[FrameRequest], quality: int) -> list[bytes]:
    """The processor's styled frames as JPEG: encoded on its GPU (nvJPEG) when it says `gpu_jpeg`, else on the CPU.
    The server's Engine and the Python API both end here."""
    if proc.gpu_jpeg:
        return to_jpeg(proc, proc.process_batch_on_device(requests), quality)
    return to_jpeg(proc, proc.process_batch(requests), quality)


def to_jpeg(proc: Processor, images: list[Any], quality: int) -> list[bytes]:
    """Styled frames as JPEG: (H, W, 3) uint8 on the processor's GPU (nvJPEG, when it says `gpu_jpeg`) or numpy."""
    if proc.gpu_jpeg:
        from service.processors import gpu_jpeg  # imports torch: only reached when a processor runs on CUDA

        return gpu_jpeg.encode(images, quality) if images else []
    return [codec.encode_jpeg(np.asarray(out), quality) for out in images]


@dataclass
class Prepared:
    """A batch between `Engine.prepare` (CPU decoding) and `Engine.run_prepared` (GPU decoding, styling, encoding)."""

    jobs: list[FrameJob]
    images: list[Any]  # RGB uint8 (H, W, 3): numpy from the CPU decoder, None where the GPU decodes
    results: list[bytes | Exception | None]  # a frame error from prepare, then the outcome


class Engine:
    def __init__(
        self,
        default_config: StreamConfig,
        processor_options: dict[str, dict[str, Any]] | None = None,
        max_frame_bytes: int = codec.DEFAULT_MAX_BYTES,
        max_frame_side: int = codec.DEFAULT_MAX_SIDE,
        jpeg_quality: int = 85,
        max_frame_pixels: int = codec.DEFAULT_MAX_PIXELS,
        max_process_side: int | None = codec.DEFAULT_PROCESS_SIDE,
    ) -> None:
        self.default_config = default_config
        self.processor_options = dict(processor_options or {})  # processor type -> its options
        self.max_frame_bytes = max_frame_bytes
        self.max_frame_side = max_frame_side
        self.max_frame_pixels = max_frame_pixels
        self.max_process_side = max_process_side  # frames are shrunk to this long side while decoding
        self.jpeg_quality = jpeg_quality
        self.processors: dict[str, Processor] = {}
        self.batchers: dict[str, Any] = {}  # processor type -> its StreamBatcher (`advance`)
        self.in_pipeline = 0  # frames in the batchers after the last `advance` (read by the event loop)
        self._load_failures: dict[str, tuple[float, str]] = {}

    def processor(self, processor_type: str, on_progress: Callable[[float, str], None] | None = None) -> Processor:
        """The loaded processor of this type, loading it on first use (a failure is remembered for a minute).
        `on_progress(fraction, stage)` hears how a diffusion processor's load goes on."""
        if processor_type in self.processors:
            return self.processors[processor_type]
        failed = self._load_failures.get(processor_type)
        if failed and time.monotonic() - failed[0] < LOAD_RETRY_S:
            raise ProcessorLoadError(failed[1])
        cfg = self.default_config
        kwargs: dict[str, Any] = {"style_prompt": cfg.prompt, "strength": cfg.strength, "seed": cfg.seed}
        if processor_type in PROCESSORS and PROCESSORS[processor_type].diffusion:
            kwargs["use_controlnet"] = cfg.use_controlnet
            if on_progress is not None:
                kwargs["on_progress"] = on_progress
        kwargs.update(self.processor_options.get(processor_type, {}))
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

    def stream_batched(self, processor_type: str) -> bool:
        """Whether frames of `processor_type` go through a pipeline (`advance`): the standard processor, loaded, with
        its `stream_batch` option on. A pipelined frame comes back `steps` calls after it went in."""
        proc = self.processors.get(processor_type)
        return bool(getattr(proc, "stream_batch", False))

    def advance(self, prepared: Prepared,
                abandoned: threading.Event | None = None) -> list[tuple[FrameJob, bytes | Exception]]:
        """`run_prepared` for a live server: the jobs of a stream-batched processor enter its pipeline (one frame in
        flight per step it runs, `StreamBatcher`), then every pipeline with frames in flight runs one batched pass;
        the other jobs are styled at once. Returns each job that finished in this call, this call's or an earlier
        one's, with its JPEG or error. Call it with no jobs to keep a pipeline moving (a stream that stopped
        sending still gets its last frames); `in_pipeline` says how many frames are in flight."""
        self._gpu_decode(prepared)
        piped = [i for i, job in enumerate(prepared.jobs) if prepared.results[i] is None
                 and self.stream_batched(job.config.processor_type)]
        rest = [i for i in range(len(prepared.jobs)) if i not in piped]
        outcomes: list[tuple[FrameJob, bytes | Exception]] = []
        if rest:
            part = Prepared([prepared.jobs[i] for i in rest], [prepared.images[i] for i in rest],
                            [prepared.results[i] for i in rest])
            outcomes += zip(part.jobs, self.run_prepared(part, abandoned), strict=True)
        if abandoned is not None and abandoned.is_set():
            return outcomes  # the caller timed out and set our processors aside: touch no pipeline
        for i in piped:
            job = prepared.jobs[i]
            cfg = job.config
            request = FrameRequest(prepared.images[i], cfg.prompt, cfg.strength, cfg.num_steps, cfg.seed,
                                   cfg.use_controlnet)
            try:
                self._batcher(cfg.processor_type).submit(request, job, stream=job.stream_id)
            except Exception as exc:  # this frame only (e.g. a step count the processor refuses)
                outcomes.append((job, exc))
        for processor_type, batcher in list(self.batchers.items()):
            if batcher.in_flight:
                outcomes += self._step(processor_type, batcher)
        if not (abandoned is not None and abandoned.is_set()):
            self.in_pipeline = sum(b.in_flight for b in self.batchers.values())
        return outcomes

    def _batcher(self, processor_type: str) -> Any:
        from service.processors.stream_batch import StreamBatcher  # imports torch: only for a stream-batched one

        batcher = self.batchers.get(processor_type)
        if batcher is None:  # (`quarantine` drops a processor's batcher with it)
            batcher = self.batchers[processor_type] = StreamBatcher(self.processors[processor_type])
            log.info("%s: stream batching: each stream's frames in flight advance together, one batched pass a "
                     "step", processor_type)
        return batcher

    def _step(self, processor_type: str, batcher: Any) -> list[tuple[FrameJob, bytes | Exception]]:
        """One pass of a pipeline; if it fails, every frame in it fails (the pipeline is emptied and goes on)."""
        proc = batcher.proc
        done: list[tuple[FrameJob, Any]] = []
        try:
            done = batcher.step(on_device=proc.gpu_jpeg)
            return list(zip([job for job, _ in done], to_jpeg(proc, [image for _, image in done],
                                                               self.jpeg_quality), strict=True))
        except Exception as exc:
            log.exception("%s pipeline failed a step with %d frames in flight", processor_type, batcher.in_flight)
            return [(job, exc) for job in [job for job, _ in done] + batcher.abandon()]

    def run(self, jobs: list[FrameJob], abandoned: threading.Event | None = None) -> list[bytes | Exception]:
        """Style every job; a job's failure is returned in its place, never raised.

        `abandoned`: set by a caller that gave up waiting (a timeout); the call then enters no further processor.
        """
        return self.run_prepared(self.prepare(jobs), abandoned)

    def prepare(self, jobs: list[FrameJob]) -> Prepared:
        """The CPU half of decoding: every frame, except JPEGs for a processor that decodes on its GPU (nvJPEG),
        which stay bytes for `run_prepared`. Touches no processor state."""
        prepared = Prepared(jobs, [None] * len(jobs), [None] * len(jobs))
        for i, job in enumerate(jobs):
            try:
                info = codec.probe(job.data, self.max_frame_bytes, self.max_frame_side, self.max_frame_pixels)
                proc = self.processors.get(job.config.processor_type)
                if info.gpu_decodable and proc is not None and proc.gpu_jpeg:
                    continue  # decoded on the GPU, batched, in run_prepared
                prepared.images[i] = codec.decode_probed(job.data, info, self.max_process_side)
            except codec.FrameError as exc:
                prepared.results[i] = exc
        return prepared

    def run_prepared(self, prepared: Prepared, abandoned: threading.Event | None = None) -> list[bytes | Exception]:
        """The processor half (the worker thread's): GPU decode where `prepare` left bytes, style, encode."""
        results = prepared.results
        groups: dict[str, list[tuple[int, FrameRequest]]] = defaultdict(list)
        self._gpu_decode(prepared)
        for i, job in enumerate(prepared.jobs):
            if results[i] is not None:
                continue
            cfg = job.config
            groups[cfg.processor_type].append(
                (i, FrameRequest(prepared.images[i], cfg.prompt, cfg.strength, cfg.num_steps, cfg.seed,
                                 cfg.use_controlnet))
            )
        for processor_type, items in groups.items():
            if abandoned is not None and abandoned.is_set():
                break  # the caller timed out and may have handed our processors to another thread
            for i, result in self._run_group(processor_type, items):
                results[i] = result
        return [r if r is not None else RuntimeError("frame was not processed") for r in results]

    def quarantine(self, processor_types: set[str]) -> None:
        """Set aside the processors a stuck call is inside: that thread keeps its instance, and the next frame of
        each type loads a fresh one, so no processor is ever entered by two threads (none is thread-safe)."""
        for processor_type in processor_types:
            self.batchers.pop(processor_type, None)  # its frames in flight are lost with it (the caller fails them)
            if self.processors.pop(processor_type, None) is not None:
                log.error("the %s processor is stuck in a call that timed out: set aside (the stuck thread keeps "
                          "it); the next frames load a fresh one", processor_type)
        self.in_pipeline = sum(b.in_flight for b in self.batchers.values())

    def _gpu_decode(self, prepared: Prepared) -> None:
        """nvJPEG for the frames `prepare` left encoded, one batched call per device; the CPU decoder for any
        frame of a batch nvJPEG refuses (it is the reference path). Frames decoded already are left as they are."""
        indices = [i for i in range(len(prepared.jobs)) if prepared.results[i] is None and prepared.images[i] is None]
        if not indices:
            return
        from service.processors import gpu_jpeg  # imports torch: only reached when a processor runs on CUDA

        by_device: dict[str, list[int]] = defaultdict(list)
        for i in indices:
            by_device[self.processors[prepared.jobs[i].config.processor_type].device].append(i)
        for device, members in by_device.items():
            images = gpu_jpeg.decode_or_none([prepared.jobs[i].data for i in members], device)
            for i, image in zip(members, images, strict=True):
                if image is None:
                    try:
                        data = prepared.jobs[i].data
                        info = codec.probe(data, self.max_frame_bytes, self.max_frame_side, self.max_frame_pixels)
                        image = codec.decode_probed(data, info, self.max_process_side)
                    except codec.FrameError as exc:
                        prepared.results[i] = exc
                        continue
                prepared.images[i] = image

    def _run_group(
        self, processor_type: str, items: list[tuple[int, FrameRequest]]
    ) -> list[tuple[int, bytes | Exception]]:
        """One processor call for the group; if it fails, one call per frame, so only the frames that
        really fail (one stream's, or a batch too big for the GPU) get `processing_failed`."""
        try:
            jpegs = style_to_jpeg(self.processor(processor_type), [req for _, req in items], self.jpeg_quality)
            return [(i, jpeg) for (i, _), jpeg in zip(items, jpegs, strict=True)]
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
