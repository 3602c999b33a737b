"""The sending side: the broadcaster socket to the DreamStream server, reconnected for as long as we run.

Frames go out as binary messages (the raw JPEG: no base64, no JSON). The server's `ready`, `stats`,
`error` and `pong` replies feed the status line; a ping each second measures the round trip.
The URL carries the stream key, so only `safe_url` (without the query) is ever logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from obs_plugin.capture import Mailbox
from obs_plugin.retry import Backoff, StateLog
from obs_plugin.status import Stats

log = logging.getLogger("dreamstream.obs")

CLOSE_MEANINGS = {1000: "closed", 1001: "going away", 1006: "connection dropped", 1011: "server error",
                  1012: "server restarting"}
CLOSE_POLICY_VIOLATION = 1008  # the server refused us: bad stream id or stream key
CLOSE_REPLACED = 4000  # another broadcaster took this stream over
_ERROR_LOG_EVERY_S = 10.0


class LinkEnded(Exception):
    """The server link stopped for a reason reconnecting cannot fix."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def ws_base(server: str) -> str:
    """`http://host:8000` -> `ws://host:8000` (https -> wss); ws(s) URLs pass through."""
    parts = urlsplit(server.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


def broadcaster_url(server: str, stream_id: str, key: str | None) -> tuple[str, str]:
    """(the URL to connect to, the same without the key, for logs)."""
    safe = f"{ws_base(server)}/ws/broadcaster/{stream_id}"
    return (f"{safe}?key={quote(key, safe='')}" if key else safe), safe


def http_base(server: str) -> str:
    """`ws://host:8000` -> `http://host:8000` (wss -> https); http(s) URLs pass through."""
    parts = urlsplit(ws_base(server))
    return urlunsplit(({"ws": "http", "wss": "https"}[parts.scheme], parts.netloc, parts.path, "", ""))


def check_server(server: str, stream_id: str, key: str | None, timeout: float = 3.0) -> None:
    """At start, before OBS: is the server there, and does it take this stream key?

    Asks `POST /api/streams/{id}/config` with the key and an empty body: the server checks the key
    before anything else (401 when wrong) and then refuses the empty body (400) or the stream not
    being live (404), so nothing changes and no broadcaster is replaced. A refused key raises
    `LinkEnded` (exit 2); a server that is not up yet is only logged, since the link waits for it.
    """
    base = http_base(server)
    request = urllib.request.Request(f"{base}/api/streams/{stream_id}/config", data=b"", method="POST",
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # like the socket: proxy=None
    try:
        with no_proxy.open(request, timeout=timeout) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        shown = "connection refused" if isinstance(reason, ConnectionRefusedError) else str(reason)
        log.warning("the server at %s is not reachable yet (%s); streaming starts when it is", base, shown)
        return
    if status == 401:
        how = "the stream key given with --key is wrong" if key else "it needs a stream key: pass --key"
        raise LinkEnded(f"the server at {base} refused stream {stream_id!r}: {how} (the key set with "
                        "DREAMSTREAM_STREAM_KEYS / DREAMSTREAM_BROADCAST_KEY)", 2)
    if status in (400, 404, 422):
        log.info("the server at %s is up and accepts stream %r%s", base, stream_id, " with this key" if key else "")
    else:
        log.info("the server at %s answered the key check with HTTP %d; going on", base, status)


class ServerLink:
    def __init__(self, url: str, safe_url: str, mailbox: Mailbox, stats: Stats, link_up: threading.Event):
        self.url = url
        self.safe_url = safe_url
        self.mailbox = mailbox
        self.stats = stats
        self.link_up = link_up
        self._state = StateLog(log)
        self._pings: deque[float] = deque(maxlen=8)
        self._errors_logged: dict[str, float] = {}

    def _set_state(self, key: str, message: str, level: int, short: str) -> None:
        self._state.enter(key, message, level)
        self.stats.set_server_state(short)

    async def run(self) -> None:
        """Connect, send, reconnect; returns only by raising `LinkEnded` (or being cancelled)."""
        backoff = Backoff()
        while True:
            try:
                async with connect(
                    self.url, open_timeout=5, compression=None, proxy=None,
                    ping_interval=10, ping_timeout=10, close_timeout=2, max_size=1 << 20,
                ) as ws:
                    backoff.reset()
                    self._set_state("connected", f"connected to the server at {self.safe_url}", logging.INFO,
                                    "connected")
                    await self._session(ws)
                self._closed(ws.close_code, ws.close_reason)  # the server closed cleanly
            except LinkEnded:
                raise
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    raise self._refused(f"HTTP {status}") from None
                self._set_state(f"http {status}", f"the server at {self.safe_url} answered HTTP {status}; "
                                "retrying", logging.WARNING, f"HTTP {status}")
            except ConnectionClosed as exc:
                self._closed(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else (
                    f"{type(exc).__name__}: {exc}".rstrip(": "))
                self._set_state(f"unreachable {reason}", f"waiting for the server at {self.safe_url} ({reason}); "
                                "retrying", logging.WARNING, "waiting")
            except InvalidURI as exc:
                raise LinkEnded(f"--server is not a WebSocket URL: {exc}", 2) from None
            except Exception as exc:  # a bug or a surprise must not end a live stream: report it, reconnect
                log.exception("unexpected error on the server link")
                self._set_state(f"error {exc!r}", f"server link error ({exc!r}); reconnecting", logging.WARNING,
                                "reconnecting")
            finally:
                self.link_up.clear()
            await asyncio.sleep(backoff.next())

    def _refused(self, how: str) -> LinkEnded:
        return LinkEnded(
            f"the server refused the broadcaster socket {self.safe_url} ({how}): check --key "
            "(the stream key set with DREAMSTREAM_STREAM_KEYS / DREAMSTREAM_BROADCAST_KEY) and --stream", 2)

    def _closed(self, code: int | None, reason: str | None) -> None:
        if code == CLOSE_POLICY_VIOLATION:
            raise self._refused(f"close {code}{': ' + reason if reason else ''}") from None
        if code == CLOSE_REPLACED:
            raise LinkEnded(
                f"another broadcaster took over this stream ({self.safe_url}, close {code}); stopping so the two "
                "do not keep replacing each other", 3) from None
        meaning = reason or CLOSE_MEANINGS.get(code or 0, "no reason given")
        shown = f"close {code}: {meaning}" if code else "connection dropped"
        self._set_state(f"lost {shown}", f"lost the server connection ({shown}); reconnecting", logging.WARNING,
                        "reconnecting")

    async def _session(self, ws: ClientConnection) -> None:
        """Send, receive and ping until the socket closes: returns on a clean close, raises otherwise."""
        self.mailbox.take()  # a capture made before this connection is stale by now
        self._pings.clear()
        self.link_up.set()
        tasks = [asyncio.create_task(coro) for coro in (self._send(ws), self._receive(ws), self._ping(ws))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise ConnectionClosed and friends
            await ws.wait_closed()
        finally:
            self.link_up.clear()
            self.stats.on_server_stats({})  # the last numbers are from a session that is gone
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, ws: ClientConnection) -> None:
        while True:
            frame = await self.mailbox.get()
            await ws.send(frame.data)
            self.stats.on_sent(frame, time.monotonic())

    async def _ping(self, ws: ClientConnection) -> None:
        while True:
            self._pings.append(time.monotonic())
            await ws.send('{"type":"ping"}')
            await asyncio.sleep(1.0)

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            kind = message.get("type")
            if kind == "pong" and self._pings:
                self.stats.on_rtt((time.monotonic() - self._pings.popleft()) * 1000)
            elif kind == "stats":
                self.stats.on_server_stats(message)
            elif kind == "ready":
                config = message.get("config") or {}
                log.info("server ready for stream %r (processor %s, prompt %r)", message.get("stream_id"),
                         config.get("processor_type", "?"), config.get("prompt", ""))
            elif kind == "error":
                self._server_error(str(message.get("code")), str(message.get("message")))

    def _server_error(self, code: str, text: str) -> None:
        """Log each kind of server error at most every 10 s: one per frame would flood the terminal."""
        now = time.monotonic()
        if now - self._errors_logged.get(code, -_ERROR_LOG_EVERY_S) >= _ERROR_LOG_EVERY_S:
            self._errors_logged[code] = now
            log.warning("the server reported %s: %s", code, text)
