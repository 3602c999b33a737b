"""Where frames are processed: in this process (LocalBackend) or elsewhere (e.g. a Modal GPU pool).

The scheduler only sees `ProcessorBackend.process(jobs)`. A backend answers each job with JPEG
bytes or the exception that stopped it.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.engine import Engine, FrameJob

log = logging.getLogger("dreamstream.backend")


class ProcessorBackend(ABC):
    processor: str  # the default processor type
    device: str
    reason: str  # why that processor was chosen (shown in the log and the UI)

    async def start(self) -> None:
        """Load and warm up the default processor before the first frame arrives."""

    @abstractmethod
    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]: ...

    async def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"processor": self.processor, "device": self.device, "reason": self.reason}


class LocalBackend(ProcessorBackend):
    """Runs an Engine in one worker thread: the thread owns the processors (they are not thread-safe)."""

    def __init__(self, engine: Engine, processor: str, reason: str, timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.processor = processor
        self.reason = reason
        self.timeout_s = timeout_s
        self.device = "cpu"
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dreamstream-worker")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        proc = await loop.run_in_executor(self._executor, self.engine.processor, self.processor)
        self.device = proc.device

    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self.engine.run, jobs)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            # The stuck call keeps its thread; later frames get a fresh one so the streams go on.
            log.error("processing took longer than %.0f s; abandoning that call and going on", self.timeout_s)
            self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dreamstream-worker")
            error = TimeoutError(f"processing took longer than {self.timeout_s:.0f} s")
            return [error] * len(jobs)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class CallableBackend(ProcessorBackend):
    """Sends each batch to an async callable: how a remote GPU pool plugs in (see modal_app.py)."""

    def __init__(
        self,
        call: Callable[[list[FrameJob]], Awaitable[list[bytes | Exception]]],
        processor: str,
        device: str,
        reason: str,
    ) -> None:
        self.call = call
        self.processor = processor
        self.device = device
        self.reason = reason

    async def process(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        try:
            return await self.call(jobs)
        except Exception as exc:
            log.exception("remote processing failed for %d frames", len(jobs))
            return [exc] * len(jobs)
