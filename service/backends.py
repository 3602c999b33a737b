"""Where frames are processed: in this process (LocalBackend) or elsewhere (e.g. a Modal GPU pool).

The scheduler only sees `ProcessorBackend.process(jobs)`. A backend answers each job with JPEG
bytes or the exception that stopped it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from service.engine import Engine, FrameJob

log = logging.getLogger("dreamstream.backend")


class ProcessorBackend(ABC):
    processor: str  # the default processor type
    device: str
    reason: str  # why that processor was chosen (shown in the log and the UI)
    # How many batches the scheduler may have in flight at once. One local worker: 1. A remote pool
    # serves several, and a stream's fps would otherwise be capped by one round trip per frame.
    max_in_flight: int = 1

    async def start(self) -> None:
        """Load and warm up the default processor before the first frame arrives."""

    @abstractmethod
    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]: ...

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

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future, Any] | None]
        self._calls = queue.SimpleQueue()
        threading.Thread(target=self._run, name="dreamstream-worker", daemon=True).start()

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
    """Runs an Engine in one worker thread: the thread owns the processors (they are not thread-safe)."""

    def __init__(self, engine: Engine, processor: str, reason: str, timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.processor = processor
        self.reason = reason
        self.timeout_s = timeout_s
        self.device = "cpu"
        self._worker = _Worker()
        self._lock = asyncio.Lock()  # one call at a time, so the timeout measures processing, not queueing

    async def start(self) -> None:
        async with self._lock:
            proc = await self._worker.submit(self.engine.processor, self.processor)
        self.device = proc.device

    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        async with self._lock:
            # A stream that switches to a processor not loaded yet waits for its load and warm-up
            # (minutes of compiling on a GPU) outside the processing timeout; meanwhile its frames
            # queue newest-wins in the hub. A failed load is remembered and reported per frame by run.
            for processor_type in {job.config.processor_type for job in jobs} - self.engine.processors.keys():
                try:
                    await self._worker.submit(self.engine.processor, processor_type)
                except Exception:
                    pass
            abandoned = threading.Event()
            future = self._worker.submit(self.engine.run, jobs, abandoned)
            try:
                return await asyncio.wait_for(future, self.timeout_s)
            except asyncio.TimeoutError:
                # The stuck call keeps its thread and the processors it is in (quarantined: a fresh instance
                # serves the next frames); later frames get a fresh thread, so the streams go on.
                log.error("processing took longer than %.0f s; abandoning that call and going on", self.timeout_s)
                abandoned.set()
                self.engine.quarantine({job.config.processor_type for job in jobs})
                self._worker.stop()
                self._worker = _Worker()
                error = TimeoutError(f"processing took longer than {self.timeout_s:g} s")
                return [error] * len(jobs)

    def optimise_progress(self) -> dict[str, Any] | None:
        proc = self.engine.processors.get(self.processor)
        progress = proc.optimise_progress() if proc is not None else None
        return progress if progress and progress.get("state") != "off" else None

    async def close(self) -> None:
        self._worker.stop()


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
