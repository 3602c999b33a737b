"""Where frames are processed: in this process (LocalBackend) or elsewhere (e.g. a Modal GPU pool).

The scheduler only sees `ProcessorBackend.process(jobs)`. A backend answers each job with JPEG
bytes or the exception that stopped it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from service.engine import Engine, FrameJob
from service.processors import availability

log = logging.getLogger("dreamstream.backend")


class ProcessorBackend(ABC):
    processor: str  # the default processor type
    device: str
    reason: str  # why that processor was chosen (shown in the log and the UI)
    # How many batches the scheduler may have in flight at once. A remote pool serves several, and a stream's fps
    # would otherwise be capped by one round trip per frame.
    max_in_flight: int = 1
    # Whether a second round may carry frames of a processor that batches (else it waits for the one in flight)
    split_batches: bool = True

    async def start(self) -> None:
        """Load and warm up the default processor before the first frame arrives."""

    def availability(self, processor_type: str) -> str:
        """"" when this backend can run `processor_type`, else why not (for the processors a server offers)."""
        return ""

    def is_loaded(self, processor_type: str) -> bool:
        """Whether frames of `processor_type` run at once (a stream switching to one that is not waits for `load`)."""
        return True

    async def load(self, processor_type: str) -> None:
        """Load and warm up `processor_type` without holding up the frames of the processors already loaded."""

    def processor_state(self, processor_type: str) -> dict[str, Any]:
        """SPEC §7's state of one offered processor: ready | loading | unavailable, with progress and reason."""
        return {"state": "ready", "progress": 1.0}

    @abstractmethod
    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]: ...

    async def advance(self, jobs: list[FrameJob]) -> list[tuple[FrameJob, bytes | Exception]]:
        """Hand `jobs` in and get back every job that finished, these or earlier ones (a stream-batched processor
        returns a frame `steps` calls after it went in). A backend without pipelines finishes them all now."""
        return list(zip(jobs, await self.process(jobs), strict=True))

    def in_pipeline(self) -> int:
        """Frames handed to `advance` and not yet returned: the scheduler keeps calling while there are any."""
        return 0

    async def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"processor": self.processor, "device": self.device, "reason": self.reason}

    def optimise_progress(self) -> dict[str, Any] | None:
        """The default processor's background optimisation (compile=full), if it has one: for /healthz."""
        return None


class _Worker:
    """One daemon thread that runs calls in order.

    Not a ThreadPoolExecutor: the interpreter joins those threads at exit, so one processor call
    that never returns would keep a stopped server from ever exiting.
    """

    def __init__(self, name: str = "dreamstream-worker") -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future, Any] | None]
        self._calls = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((fn, args, future, loop))
        return future

    def stop(self) -> None:
        """Ends the thread after the call it is in, if any."""
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, future, loop = call
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up (timeout)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LocalBackend(ProcessorBackend):
    """Runs an Engine in one worker thread: the thread owns the processors (they are not thread-safe).

    Two rounds in flight, so the next frame is decoded while the worker styles the last one; but only for a
    processor that gains nothing from batching (`split_batches`): a model that batches would see closed-loop
    streams split into two half batches (measured: 2.0 instead of 3.9 frames a call for 4 streams)."""

    max_in_flight = 2
    split_batches = False

    def __init__(self, engine: Engine, processor: str, reason: str, timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.processor = processor
        self.reason = reason
        self.timeout_s = timeout_s
        self.device = "cpu"
        self._worker = _Worker()
        self._lock = asyncio.Lock()  # one call at a time, so the timeout measures processing, not queueing
        # Loads run on a thread of their own: a processor that takes a minute to load (or fails to) never
        # holds up the frames of the processors already serving.
        self._loader = _Worker("dreamstream-loader")
        self._loads: dict[str, asyncio.Future] = {}
        self._load_errors: dict[str, str] = {}
        self._load_progress: dict[str, tuple[float, str]] = {}  # written by the loader thread, read by /healthz

    async def start(self) -> None:
        await self.load(self.processor)
        self.device = self.engine.processors[self.processor].device

    def availability(self, processor_type: str) -> str:
        return availability(processor_type)

    def is_loaded(self, processor_type: str) -> bool:
        return processor_type in self.engine.processors

    async def load(self, processor_type: str) -> None:
        if processor_type in self.engine.processors:
            return
        if processor_type not in self._loads:
            self._loads[processor_type] = self._loader.submit(self._load_now, processor_type)
        future = self._loads[processor_type]
        try:
            await asyncio.shield(future)
        except Exception as exc:
            self._load_errors[processor_type] = str(exc)
            raise
        finally:
            if self._loads.get(processor_type) is future and future.done():
                del self._loads[processor_type]

    def _load_now(self, processor_type: str) -> None:
        def on_progress(fraction: float, stage: str) -> None:
            self._load_progress[processor_type] = (fraction, stage)

        self._load_progress[processor_type] = (0.0, "starting")
        try:
            self.engine.processor(processor_type, on_progress)
        finally:
            gc.collect()  # what a failed load allocated goes back now, not at some later collection

    def processor_state(self, processor_type: str) -> dict[str, Any]:
        if processor_type in self.engine.processors:
            return {"state": "ready", "progress": 1.0, "loaded": True}
        if processor_type in self._loads:
            fraction, stage = self._load_progress.get(processor_type, (0.0, "starting"))
            return {"state": "loading", "progress": round(fraction, 3), "stage": stage, "loaded": False}
        state: dict[str, Any] = {"state": "ready", "progress": 0.0, "loaded": False}
        if processor_type in self._load_errors:
            state["reason"] = f"the last load failed: {self._load_errors[processor_type]}"
        return state

    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        """Style `jobs` on the worker. A processor not loaded yet (a one-off request, or a stream whose switch raced
        its load) loads first, off the worker and outside the processing timeout; frames of a processor that fails
        to load get that failure, and never reach the worker."""
        runnable, failed = await self._loaded(jobs)
        results = await self._run(self.engine.run_prepared, runnable) if runnable else []
        if isinstance(results, TimeoutError):
            results = [results] * len(runnable)
        returned = iter(results)
        return [failed[job] if job in failed else next(returned) for job in jobs]

    async def advance(self, jobs: list[FrameJob]) -> list[tuple[FrameJob, bytes | Exception]]:
        """`process` through `Engine.advance`: stream-batched frames come back in later calls (`in_pipeline`)."""
        runnable, failed = await self._loaded(jobs)
        outcomes: list[tuple[FrameJob, bytes | Exception]] = list(failed.items())
        if runnable or self.engine.in_pipeline:
            done = await self._run(self.engine.advance, runnable)
            # a timeout: the frames in flight were set aside with their processor (the scheduler fails them)
            outcomes += [(job, done) for job in runnable] if isinstance(done, TimeoutError) else done
        return outcomes

    def in_pipeline(self) -> int:
        return self.engine.in_pipeline

    async def _loaded(self, jobs: list[FrameJob]) -> tuple[list[FrameJob], dict[FrameJob, Exception]]:
        """The jobs whose processor is loaded (loading it first, off the worker and outside the processing timeout),
        and the failure of each job whose processor fails to load: those never reach the worker."""
        errors: dict[str, Exception] = {}
        for processor_type in {job.config.processor_type for job in jobs} - self.engine.processors.keys():
            try:
                await self.load(processor_type)
            except Exception as exc:
                errors[processor_type] = exc
        failed = {job: errors[job.config.processor_type] for job in jobs if job.config.processor_type in errors}
        return [job for job in jobs if job not in failed], failed

    async def _run(self, method: Callable[..., Any], jobs: list[FrameJob]) -> Any:
        """`method(prepared, abandoned)` of the Engine on the worker, under the processing timeout: its result, or
        the TimeoutError when it took too long."""
        # Decoding runs in a thread of its own (libjpeg and OpenCV release the GIL), not on the worker that serves
        # everyone: a one-off request's big image or a stream's odd PNG never holds up the worker.
        prepared = await asyncio.to_thread(self.engine.prepare, jobs)
        async with self._lock:
            abandoned = threading.Event()
            future = self._worker.submit(method, prepared, abandoned)
            try:
                return await asyncio.wait_for(future, self.timeout_s)
            except asyncio.TimeoutError:
                # The stuck call keeps its thread and the processors it is in (quarantined: a fresh instance
                # serves the next frames, and their frames in flight are lost); later frames get a fresh thread,
                # so the streams go on.
                log.error("processing took longer than %.0f s; abandoning that call and going on", self.timeout_s)
                abandoned.set()
                self.engine.quarantine({job.config.processor_type for job in jobs} | set(self.engine.batchers))
                self._worker.stop()
                self._worker = _Worker()
                return TimeoutError(f"processing took longer than {self.timeout_s:g} s")

    def optimise_progress(self) -> dict[str, Any] | None:
        proc = self.engine.processors.get(self.processor)
        progress = proc.optimise_progress() if proc is not None else None
        return progress if progress and progress.get("state") != "off" else None

    async def close(self) -> None:
        self._worker.stop()
        self._loader.stop()


class CallableBackend(ProcessorBackend):
    """Sends each batch to an async callable: how a remote GPU pool plugs in (see modal_app.py)."""

    def __init__(
        self,
        call: Callable[[list[FrameJob]], Awaitable[list[bytes | Exception]]],
        processor: str,
        device: str,
        reason: str,
        max_in_flight: int = 4,
    ) -> None:
        self.call = call
        self.processor = processor
        self.device = device
        self.reason = reason
        self.max_in_flight = max_in_flight

    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        try:
            return await self.call(jobs)
        except Exception as exc:
            log.exception("remote processing failed for %d frames", len(jobs))
            return [exc] * len(jobs)
