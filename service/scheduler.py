"""The loop between the hub and the backend: take the newest frame of each waiting stream, style them in
one batch, hand the results back. One batch at a time, so the processor is never shared."""

from __future__ import annotations

import asyncio
import logging

from service import protocol
from service.backends import ProcessorBackend
from service.codec import FrameError
from service.engine import FrameJob
from service.hub import StreamHub

log = logging.getLogger("dreamstream.scheduler")


class Scheduler:
    def __init__(self, hub: StreamHub, backend: ProcessorBackend, max_batch: int = 8) -> None:
        self.hub = hub
        self.backend = backend
        self.max_batch = max_batch
        self.in_flight: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="dreamstream-scheduler")

    async def stop(self, timeout: float = 10.0) -> None:
        """Let the batch in flight finish and reach its viewers (up to `timeout`), then stop.

        The loop itself publishes the batch and then sees `_stopping`; cancelling it while a batch is
        in flight would throw the styled frames away.
        """
        self._stopping = True
        task = self._task
        if task is None or task.done():
            return
        if self.in_flight is not None:
            done, _ = await asyncio.wait([task], timeout=timeout)
            if done:
                return
            log.warning("the batch in flight did not finish within %.0f s of shutdown", timeout)
        task.cancel()  # idle (waiting for work), or out of time
        await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        while not self._stopping:
            await self.hub.wait_for_work()
            jobs = self.hub.take_batch(self.max_batch)
            if not jobs:
                continue
            self.hub.metrics.batch_size.observe(len(jobs))
            batch = [FrameJob(job.stream.id, job.frame.data, job.config) for job in jobs]
            self.in_flight = asyncio.ensure_future(self.backend.process(batch))
            try:
                results = await self.in_flight
            except Exception as exc:  # the backend promises not to raise; be safe anyway
                log.exception("backend failed")
                results = [exc] * len(jobs)
            finally:
                self.in_flight = None
            for job, result in zip(jobs, results, strict=True):
                if isinstance(result, bytes):
                    self.hub.publish_styled(job, result)
                elif isinstance(result, FrameError):
                    self.hub.tell_broadcaster(job.stream, protocol.error(result.code, result.message))
                else:
                    message = f"processing failed: {result}" if str(result) else "processing failed"
                    self.hub.tell_broadcaster(job.stream, protocol.error("processing_failed", message))
