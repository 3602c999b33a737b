"""Backoff with jitter for reconnecting to OBS and to the server, and log lines only on change."""

from __future__ import annotations

import logging
import random


class Backoff:
    """0.5 s, 1 s, 2 s ... up to `cap`, each scaled by a random 50-100 %.

    The jitter keeps several companions (or a companion and the studio page) from hammering a
    restarting server in lock-step; the cap keeps the wait after OBS comes back short.
    """

    def __init__(self, first: float = 0.5, cap: float = 5.0):
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 16)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class StateLog:
    """Logs a state once when it is entered; repeats of the same state go to DEBUG.

    A companion left waiting for OBS overnight should say so once, not every few seconds.
    """

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.state: str | None = None

    def enter(self, state: str, message: str, level: int = logging.INFO) -> None:
        if state == self.state:
            self.logger.debug(message)
            return
        self.state = state
        self.logger.log(level, message)
