"""A remote GPU pool as the server's processor backend: the gateway side of `modal_app.py`'s pool mode.

The scheduler hands the backend a round: the newest frame of up to `max_batch` streams that run alike
(same processor, steps, ControlNet). `GpuPool` sends that round to the pool as calls of at most `call_size`
frames, all at once, so the pool's autoscaler can spread a large round over several GPU containers and each
container restyles its call in one `Engine.run`. Nothing waits to regroup frames on the GPU side: batching is
the scheduler's, which waits only for streams about to send (service/scheduler.py), so a lone stream's frame
leaves at once. A round is split into near-equal calls (10 frames, 8 a call: 5 + 5, not 8 + 2), since the
round waits for its slowest call.

Waking the pool: a GPU container is started by the first broadcaster that connects (`wake`, through
`WakeOnBroadcaster`), not when the gateway starts, so page views, `/healthz` probes and crawlers that start
the gateway never start a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from service import codec
from service.backends import CallableBackend
from service.config import Settings
from service.engine import FrameJob

log = logging.getLogger("dreamstream.gpu_pool")

RestyleCall = Callable[[list[FrameJob]], Awaitable[list[bytes | Exception]]]
WARMUP_STREAM = "_warmup"


def split_round(jobs: list[FrameJob], call_size: int) -> list[list[FrameJob]]:
    """`jobs` in order, cut into the fewest calls of at most `call_size`, as equal as they can be."""
    if not jobs:
        return []
    calls = math.ceil(len(jobs) / call_size)
    size, extra = divmod(len(jobs), calls)
    out, start = [], 0
    for i in range(calls):
        end = start + size + (1 if i < extra else 0)
        out.append(jobs[start:end])
        start = end
    return out


class GpuPool(CallableBackend):
    """Frames in, `restyle(jobs)` on a remote pool, one result per frame back: JPEG bytes or what stopped it.

    `restyle` is the pool's batch call: `Restyler().restyle.remote.aio` on Modal, any coroutine function in
    tests and benchmarks. A call that fails or outlasts `settings.processing_timeout_s` fails its own frames,
    never the round.
    """

    def __init__(self, restyle: RestyleCall, processor: str, settings: Settings, *, label: str,
                 max_gpus: int, call_size: int, idle_s: float, max_in_flight: int = 4,
                 warmup_timeout_s: float = 20 * 60) -> None:
        super().__init__(self.restyle_round, processor, f"modal:{label}", "", max_in_flight)
        self.restyle = restyle
        self.call_size = max(1, call_size)
        self.frame_timeout_s = settings.processing_timeout_s
        self.warmup_timeout_s = warmup_timeout_s
        self.idle_s = idle_s  # the pool stops a GPU after this long without work
        self.summary = f"Modal GPU pool ({label}, up to {max_gpus}); the {processor} processor"
        self.warmup_job = FrameJob(
            WARMUP_STREAM, codec.encode_jpeg(np.full((64, 64, 3), 128, np.uint8)), settings.stream_defaults(processor)
        )
        self.state = "cold"  # cold | waking | ready | error
        self.error: str | None = None
        self.answered_at: float | None = None  # monotonic time of the pool's last answer
        self._waking: asyncio.Task | None = None

    @property
    def reason(self) -> str:  # type: ignore[override]
        """What the studio header and /healthz show: the pool, and whether a GPU is up."""
        state = "cold" if self.state == "ready" and not self.gpu_up else self.state
        state = {
            "cold": "no GPU running; the first broadcaster starts one",
            "waking": "a GPU container is starting (the first start loads the models)",
            "ready": "GPU pool answering",
            "error": f"the GPU pool cannot process frames: {self.error}",
        }[state]
        return f"{self.summary}: {state}"

    @reason.setter
    def reason(self, value: str) -> None:  # CallableBackend's __init__ sets it; the text is built above
        pass

    def wake(self) -> None:
        """Start a GPU container now (one tiny frame), so it loads while the broadcaster picks a camera.

        Returns at once; a wake already under way is not repeated. Cheap when a container is up: one call.
        """
        if self._waking is None or self._waking.done():
            self._waking = asyncio.get_running_loop().create_task(self._wake(), name="dreamstream-wake-gpu")

    async def _wake(self) -> None:
        if not self.gpu_up:
            self.state = "waking"
            log.info("waking a GPU container (a cold start loads the models)")
        started = time.monotonic()
        try:
            [result] = await asyncio.wait_for(self.restyle([self.warmup_job]), self.warmup_timeout_s)
        except asyncio.TimeoutError:
            result = RuntimeError(f"no GPU container answered within {self.warmup_timeout_s:.0f} s")
        except Exception as exc:  # the call itself failed (network, Modal)
            result = exc
        if isinstance(result, Exception):
            self.state, self.error = "error", str(result) or type(result).__name__
            log.error("the GPU pool cannot process frames: %s", self.error)
            return
        self.state, self.error, self.answered_at = "ready", None, time.monotonic()
        log.info("GPU pool answered in %.1f s", self.answered_at - started)

    @property
    def gpu_up(self) -> bool:
        """Whether a GPU container answered recently enough to be up still (the pool stops idle ones)."""
        return self.answered_at is not None and time.monotonic() - self.answered_at < self.idle_s

    async def restyle_round(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        """A round: after the pool is awake (frames wait out a cold start under the warm-up timeout, not the
        frame timeout, newest-wins in the hub meanwhile), as near-equal calls of at most `call_size` frames."""
        if not self.gpu_up:
            self.wake()
            assert self._waking is not None
            await asyncio.shield(self._waking)
            if self.state == "error":
                return [RuntimeError(f"the GPU pool cannot process frames: {self.error}")] * len(jobs)
        calls = split_round(jobs, self.call_size)
        answers = await asyncio.gather(*(self._call(call) for call in calls))
        return [result for answer in answers for result in answer]

    async def _call(self, jobs: list[FrameJob]) -> list[bytes | Exception]:
        try:
            results = await asyncio.wait_for(self.restyle(jobs), self.frame_timeout_s)
        except asyncio.TimeoutError:
            return [TimeoutError(f"the GPU pool took longer than {self.frame_timeout_s:g} s")] * len(jobs)
        except Exception as exc:  # a lost call fails its frames, not the round
            log.warning("a call of %d frame(s) failed on the way: %r", len(jobs), exc)
            return [exc] * len(jobs)
        if len(results) != len(jobs):
            error = RuntimeError(f"the GPU pool answered {len(results)} results for {len(jobs)} frames")
            return [error] * len(jobs)
        self.state, self.error, self.answered_at = "ready", None, time.monotonic()
        return list(results)

    async def close(self) -> None:
        if self._waking is not None and not self._waking.done():
            self._waking.cancel()


class WakeOnBroadcaster:
    """ASGI middleware: a broadcaster socket opening wakes the pool; nothing else does (pages, probes, crawlers)."""

    PREFIX = "/ws/broadcaster/"

    def __init__(self, app: Any, pool: GpuPool) -> None:
        self.app = app
        self.pool = pool

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope.get("path", "").startswith(self.PREFIX):
            self.pool.wake()
        await self.app(scope, receive, send)
