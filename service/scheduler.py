"""The loop between the hub and the backend: take the newest frame of each waiting stream, style them in
one batch, hand the results back.

A local backend takes one batch at a time (its one worker owns the processor). A remote pool takes
`max_in_flight` batches at once, so a stream's frame rate is not capped by one round trip per frame;
results that come back after a newer frame of the same stream are dropped by the hub, so viewers never
see a stream go back in time.

Filling a batch: when the processor frees up and fewer streams are ready than are sending (streams whose
styled frame just went out and whose next frame is on its way), the scheduler waits a little for them
rather than running a small batch and making the late ones wait a whole batch. The wait ends as soon as
every sending stream is ready, and is bounded by `batch_wait_s` (DREAMSTREAM_BATCH_WAIT_MS, default 15 ms)
and a quarter of the last batch's time; a lone stream, or all streams ready, never waits.

A stream-batched processor (`standard`, service/processors/stream_batch.py) returns a frame ~18 rounds after it went
in: each round hands the backend the newest frame of each ready stream and runs one batched pass, and the results
are whichever frames finished (`ProcessorBackend.advance`). While frames are in flight the loop runs rounds even
when no new frame came, so a stream that stops sending still gets its last frames; `stop` finishes them too.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service import protocol
from service.backends import ProcessorBackend
from service.config import PROCESSORS
from service.engine import FrameJob
from service.errors import ClientError
from service.hub import Job, StreamHub

log = logging.getLogger("dreamstream.scheduler")


class Scheduler:
    SENDING_WINDOW_S = 1.0  # a stream that sent within this long is expected to send again

    def __init__(self, hub: StreamHub, backend: ProcessorBackend, max_batch: int = 8,
                 batch_wait_s: float = 0.015) -> None:
        self.hub = hub
        self.backend = backend
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_in_flight = max(1, backend.max_in_flight)
        self.batch_seconds = 0.0  # the last batch's processing time
        self.streams_in_flight: dict[str, int] = {}  # stream id -> its frames in the rounds in flight
        self.pipelined: dict[FrameJob, Job] = {}  # frames a round left in the backend's pipeline (stream batching)
        self.rounds: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def in_flight(self) -> bool:
        return bool(self.rounds)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="dreamstream-scheduler")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking frames, let the batches in flight finish and reach their viewers (up to `timeout`)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()  # it only ever waits for work or for a free slot
            await asyncio.gather(self._task, return_exceptions=True)
        deadline = time.monotonic() + timeout
        if self.rounds:
            _, late = await asyncio.wait(self.rounds, timeout=timeout)
            if late:
                log.warning("%d batch(es) in flight did not finish within %.0f s of shutdown", len(late), timeout)
                for task in late:
                    task.cancel()
        if self.backend.in_pipeline():
            log.info("finishing the %d frames in the stream-batching pipeline", self.backend.in_pipeline())
        while self.backend.in_pipeline() and time.monotonic() < deadline:
            await self._round([], asyncio.Semaphore(1))  # steps only: the frames in flight reach their viewers

    async def run(self) -> None:
        slots = asyncio.Semaphore(self.max_in_flight)
        while not self._stopping:
            if not self.backend.in_pipeline():
                await self.hub.wait_for_work()
            await slots.acquire()
            if self.rounds and not self.backend.split_batches and self._batches(self.hub.head_key()):
                # a model that batches takes every ready stream in one call: wait for the round in flight, so the
                # streams are not split into half batches (the second slot is for the CPU filter's decode overlap);
                # a pipeline's next step also waits for its last
                await asyncio.wait(set(self.rounds))
            await self.fill()
            jobs = self.hub.take_batch(self.max_batch)
            step_only = not jobs and self.backend.in_pipeline() and not self.rounds  # frames in flight, none new
            if not jobs and not step_only:
                slots.release()
                if self.rounds and self.hub.head_key() is None:
                    await asyncio.wait(set(self.rounds))  # a round is running and nothing waits: wait for it
                continue
            task = asyncio.create_task(self._round(jobs, slots))
            self.rounds.add(task)
            task.add_done_callback(self.rounds.discard)

    @staticmethod
    def _batches(key: tuple[str, int, bool] | None) -> bool:
        kind = PROCESSORS.get(key[0]) if key is not None else None
        return kind is None or kind.batches

    async def fill(self) -> None:
        """Wait (bounded, see the module docstring) for the streams that are about to send."""
        limit = min(self.batch_wait_s, self.batch_seconds / 4)
        deadline = time.monotonic() + limit
        while True:
            now = time.monotonic()
            key = self.hub.head_key()
            if key is None:
                return
            # only streams that could join this batch; a stream with a frame in flight is expected only if
            # it has a newer one ready already
            ready = self.hub.ready_ids(key)
            expected = self.hub.sending(now, self.SENDING_WINDOW_S, key) - (self.streams_in_flight.keys() - ready)
            if len(ready) >= min(self.max_batch, len(expected)) or now >= deadline:
                return
            await self.hub.wait_for_submit(deadline - now)

    async def _round(self, jobs: list[Job], slots: asyncio.Semaphore) -> None:
        ids = [job.stream.id for job in jobs]
        for stream_id in ids:
            self.streams_in_flight[stream_id] = self.streams_in_flight.get(stream_id, 0) + 1
        try:
            if jobs:  # a round of a pipeline alone (no new frame) is no batch
                self.hub.metrics.batch_size.observe(len(jobs))
            batch = [FrameJob(job.stream.id, job.frame.data, job.config) for job in jobs]
            started = time.monotonic()
            waiting = dict(zip(batch, jobs, strict=True))
            try:
                outcomes = await self.backend.advance(batch)
            except Exception as exc:  # the backend promises not to raise; be safe anyway
                log.exception("backend failed")
                outcomes = [(frame_job, exc) for frame_job in batch]
            self.batch_seconds = time.monotonic() - started
            for frame_job, result in outcomes:
                job = waiting.pop(frame_job, None) or self.pipelined.pop(frame_job, None)
                if job is not None:
                    self._deliver(job, result)
            self.pipelined.update(waiting)  # in a pipeline: they come back from a later round
            if self.pipelined and not self.backend.in_pipeline():  # lost with a processor that was set aside
                lost, self.pipelined = self.pipelined, {}
                for job in lost.values():
                    self._deliver(job, RuntimeError("the frame was lost with a processor that timed out"))
            if self.backend.in_pipeline():
                self.hub.wake()  # the loop may be waiting for a frame: a lone frame in flight must still come out
        finally:
            for stream_id in ids:
                if self.streams_in_flight.get(stream_id, 0) <= 1:
                    self.streams_in_flight.pop(stream_id, None)
                else:
                    self.streams_in_flight[stream_id] -= 1
            slots.release()

    def _deliver(self, job: Job, result: bytes | Exception) -> None:
        if isinstance(result, bytes):
            self.hub.publish_styled(job, result)
        elif isinstance(result, ClientError):
            self.hub.tell_broadcaster(job.stream, result.to_message())
        else:
            message = f"processing failed: {result}" if str(result) else "processing failed"
            self.hub.tell_broadcaster(job.stream, protocol.error("processing_failed", message))
