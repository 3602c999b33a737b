"""Rates per stream and per socket: a token bucket (the fps limit, the pixel budget, how fast a socket is read and
answered) and the decaying measure of how much work a stream has had lately (who goes first in a batch)."""

from __future__ import annotations

import asyncio
import math
import time


class TokenBucket:
    """`rate` tokens a second, holding up to `capacity` (rate <= 0: no limit)."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.at = capacity, time.monotonic()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, amount: float = 1.0, now: float | None = None) -> bool:
        """`amount` tokens if there are (True), else False and nothing taken."""
        if self.rate <= 0:
            return True
        self._refill(time.monotonic() if now is None else now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    async def wait(self) -> None:
        """Take one token, waiting for it if need be. Used before reading a message: a socket sending faster than
        this is simply not read, so TCP holds its flood back and it costs the server nothing."""
        if self.rate <= 0:
            return
        self._refill(time.monotonic())
        if self.tokens < 1:
            await asyncio.sleep((1 - self.tokens) / self.rate)
            self._refill(time.monotonic())
        self.tokens -= 1


class Usage:
    """Pixels a stream has had processed lately (decaying with a 1 s time constant): who goes first in a batch."""

    TAU_S = 1.0

    def __init__(self) -> None:
        self.value, self.at = 0.0, time.monotonic()

    def now(self, now: float) -> float:
        return self.value * math.exp(-(now - self.at) / self.TAU_S)

    def add(self, amount: float, now: float) -> None:
        self.value, self.at = self.now(now) + amount, now
