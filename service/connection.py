"""One socket's outbox: control messages in order, frames through a one-slot mailbox, sent by one pump task.

Every send to a socket goes through its pump, so nothing else ever waits on a slow client. A connection's life
is one `ConnectionState`, as Starlette's `WebSocketState` is the socket's.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service import protocol

log = logging.getLogger("dreamstream.hub")


class Socket(Protocol):
    """What a connection needs of a WebSocket (Starlette's, or a test's stand-in)."""

    async def send_text(self, data: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class ConnectionState(enum.Enum):
    OPEN = "open"  # sending whatever is offered
    FLUSHING = "flushing"  # sending what is queued, then closing the socket with a code (`close_after_flush`)
    CLOSED = "closed"  # stopped: the client left, was replaced, or the server closed it
    EXPIRED = "expired"  # stopped because one send waited past the send timeout (a client that stopped reading)


@dataclass
class OutFrame:
    """A frame ready for viewers. The JSON text is built once and shared by every viewer."""

    jpeg: bytes
    seq: int
    ts: float
    latency_ms: float
    _text: str | None = None

    def text(self) -> str:
        if self._text is None:
            self._text = json.dumps(protocol.frame(self.jpeg, self.seq, self.ts, self.latency_ms))
        return self._text


class Connection:
    def __init__(
        self, ws: Socket, source: str = "styled", binary: bool = False, send_timeout: float | None = None,
        abort: Callable[[], None] | None = None,
    ) -> None:
        self.ws = ws
        self.abort = abort  # drops the connection at once (the host's, when it offers one); see expire_if_stuck
        self.source = source
        self.binary = binary
        self.send_timeout = send_timeout
        self.state = ConnectionState.OPEN
        self.skipped = 0  # frames this viewer never got because a newer one replaced them
        self.finished = asyncio.Event()  # set when the pump has stopped
        self.sending_since: float | None = None  # when the send in progress began (monotonic)
        self._control: deque[str] = deque(maxlen=64)
        self._frame: OutFrame | None = None
        self._wake = asyncio.Event()
        self._close_code: tuple[int, str] = (1000, "")
        self._pump_task: asyncio.Task | None = None

    @property
    def closed(self) -> bool:
        return self.state in (ConnectionState.CLOSED, ConnectionState.EXPIRED)

    @property
    def waiting_frame(self) -> OutFrame | None:
        """The frame in the mailbox, not sent yet."""
        return self._frame

    def send_control(self, message: dict[str, Any]) -> None:
        self._control.append(json.dumps(message))
        self._wake.set()

    def offer(self, frame: OutFrame) -> bool:
        """Put `frame` in the mailbox; True when it replaced one this viewer never got."""
        replaced = self._frame is not None
        if replaced:
            self.skipped += 1
        self._frame = frame
        self._wake.set()
        return replaced

    async def pump(self) -> None:
        """Send until the socket fails, `close` is called, `close_after_flush` has flushed, or `expire_if_stuck`
        finds one send waiting past `send_timeout`."""
        self._pump_task = asyncio.current_task()
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                while self._control:
                    await self._send(self._control.popleft())
                frame, self._frame = self._frame, None
                if frame is not None:
                    await self._send(frame.jpeg if self.binary else frame.text())
                if self.state is ConnectionState.FLUSHING and not self._control and self._frame is None:
                    self.state = ConnectionState.CLOSED
                    await self.ws.close(*self._close_code)
                    return
        except asyncio.CancelledError:
            if self.state is not ConnectionState.EXPIRED:
                raise
            log.info("dropping a viewer that accepted nothing for %.0f s%s", self.send_timeout,
                     "" if self.abort else " (its connection stays open until the client leaves: no abort here)")
        finally:
            self.finished.set()

    async def _send(self, message: str | bytes) -> None:
        self.sending_since = time.monotonic()
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_text(message)
        self.sending_since = None

    def expire_if_stuck(self, now: float) -> None:
        """Stop the pump, free the seat and abort the connection when one send has waited past `send_timeout`.

        For clients that stop reading but keep the connection: their TCP window stays shut, so neither an error
        nor uvicorn's keepalive ping gets through, and they would hold a viewer seat forever. A close would wait
        behind the unsent bytes too (asyncio's close() flushes first), so the connection is aborted: its file
        descriptor and buffers go at once (`abort`, from service/server.py's protocol). Checked from the
        stream's once-a-second tick rather than with a timer per send, which cost a tenth of the fan-out's CPU
        (benchmarks/relay.py).
        """
        if self.send_timeout is None or self.sending_since is None or self._pump_task is None:
            return
        if now - self.sending_since > self.send_timeout and not self.closed:
            self.state = ConnectionState.EXPIRED
            self._pump_task.cancel()
            if self.abort is not None:
                self.abort()

    def close(self) -> None:
        if not self.closed:
            self.state = ConnectionState.CLOSED
        self._wake.set()

    def close_after_flush(self, code: int, reason: str) -> None:
        """Send what is queued (the last frame included), then close the socket with `code`."""
        if not self.closed:
            self.state = ConnectionState.FLUSHING
            self._close_code = (code, reason)
        self._wake.set()
