"""How the app is served: uvicorn's settings, the connections' limits, and the graceful stop, the same whoever
starts it.

`dreamstream serve` runs `serve(app, settings)`. Plain uvicorn runs the same app (`uvicorn service.app:app`) and
gets the same stop, because the app's lifespan installs `drain_before_exit`; for the same limits give uvicorn
the options `uvicorn_options` lists, `--http service.server:HttpProtocol` among them (the README's "Running it
under plain uvicorn" shows the command line). On Modal, and on any ASGI host that runs the lifespan shutdown
before closing connections, the lifespan's drain is enough; the connection limits are then the host's.

The connection limits live in the HTTP protocol, the one place that sees a TCP connection before any request:
`HttpProtocol` is uvicorn's own (httptools, else h11) with a header timeout (a connection whose request head is
not complete within DREAMSTREAM_HEADER_TIMEOUT is closed: slowloris, silent sockets), caps on open connections in
all and per address (the excess is closed at once), and, for the WebSockets it upgrades to, an `abort` the app
can call (`ABORT_EXTENSION` in the ASGI scope): asyncio's `close()` waits for the write buffer to drain, which a
client that stopped reading never lets happen, so a dropped viewer's connection would stay open for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import math
import os
import resource
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.config import Settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without httptools: h11 only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger("dreamstream")
conn_log = logging.getLogger("dreamstream.connections")

GRACEFUL_SHUTDOWN_S = 10
ABORT_EXTENSION = "dreamstream.abort"  # scope["extensions"][ABORT_EXTENSION]["abort"]: drop the connection now
LINGER_S = 15.0  # a WebSocket whose app is done but whose connection is still open this long after is aborted
FD_RESERVE = 256  # open files kept for the server itself when the connection cap comes from the open-file limit
LOG_EVERY_S = 10.0  # one log line per kind of refusal this often; the rest are counted into the next


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for this app (beyond host and port)."""
    return {
        # Bounds the memory one client can make us hold: a bigger message closes its socket (1009). It is above the
        # frame limit, so an oversized frame still gets `too_large` and the socket lives. (The app checks
        # DREAMSTREAM_MAX_MESSAGE_BYTES itself too, for hosts that leave this at their default.)
        "ws_max_size": settings.ws_max_size,
        # Every client offers permessage-deflate, and uvicorn would accept it and compress each frame once per
        # viewer: ~4 ms of CPU per 50 kB JPEG per viewer, for JPEG bytes that barely shrink.
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        # The header timeout, the connection caps and aborting dropped WebSockets (see the module's docstring).
        "http": http_protocol(settings),
    }


# ---- connections: the header timeout, the caps, aborting what close() cannot end ----------------------------


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float  # 0: none
    max_connections: int  # 0: no cap
    max_per_address: int  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        total = settings.max_connections
        if total is None:  # what the process may open, less a reserve for its own files
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            total = 0 if soft == resource.RLIM_INFINITY else max(64, soft - FD_RESERVE)
        return cls(max(0.0, settings.header_timeout_s), max(0, total), max(0, settings.max_connections_per_address))

    def describe(self) -> str:
        """One line for the start-up log: the limits and the env var of each."""
        def cap(n: int) -> str:
            return str(n) if n else "no cap"

        head = f"{self.header_timeout_s:g} s" if self.header_timeout_s else "no timeout"
        return (f"request heads within {head} (DREAMSTREAM_HEADER_TIMEOUT); open at most "
                f"{cap(self.max_connections)} (DREAMSTREAM_MAX_CONNECTIONS), {cap(self.max_per_address)} per address "
                "(DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS; 0 behind a reverse proxy: everyone shares its address)")


class LogEvery:
    """One log line per kind every `interval` seconds: the first at once, the ones in between counted into the
    next line, so a flood of refusals costs a few lines, not one each."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_EVERY_S) -> None:
        self.logger, self.interval = logger, interval
        self.last: dict[str, float] = {}
        self.counts: Counter[str] = Counter()

    def __call__(self, kind: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        self.counts[kind] += 1
        if now - self.last.get(kind, -math.inf) < self.interval:
            return
        self.last[kind] = now
        more = self.counts.pop(kind) - 1
        suffix = f" (and {more} more since the last such line)" if more else ""
        self.logger.log(level, message + suffix, *args)


def address_key(client: tuple[str, int] | None) -> str | None:
    """What the per-address cap counts by: the IP address, or its /64 for IPv6 (one host's usual share); None for
    a Unix socket."""
    if not client:
        return None
    try:
        ip = ipaddress.ip_address(client[0])
    except ValueError:
        return str(client[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ConnectionGuard:
    """One server's open connections: the caps, and who holds how many."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: dict[asyncio.BaseTransport, str | None] = {}  # transport -> its address key
        self.per_address: Counter[str] = Counter()
        self.say = LogEvery(conn_log)

    def admit(self, transport: asyncio.BaseTransport, client: tuple[str, int] | None) -> bool:
        """Count a new connection in; False (logged) when a cap refuses it."""
        limits, key = self.limits, address_key(client)
        where = client[0] if client else "a local socket"
        if limits.max_connections and len(self.open) >= limits.max_connections:
            self.say("total", "refused a connection from %s: %d connections are open (DREAMSTREAM_MAX_CONNECTIONS)",
                     where, len(self.open))
            return False
        if key is not None and limits.max_per_address and self.per_address[key] >= limits.max_per_address:
            self.say("address", "refused a connection from %s: it has %d open already "
                                "(DREAMSTREAM_MAX_CONNECTIONS_PER_ADDRESS)", where, self.per_address[key])
            return False
        self.open[transport] = key
        if key is not None:
            self.per_address[key] += 1
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        if transport not in self.open:
            return
        key = self.open.pop(transport)
        if key is not None:
            self.per_address[key] -= 1
            if self.per_address[key] <= 0:
                del self.per_address[key]

    def header_timeout(self, client: tuple[str, int] | None) -> None:
        self.say("header", "closed a connection from %s: no complete request head within %g s "
                           "(DREAMSTREAM_HEADER_TIMEOUT)", client[0] if client else "a local socket",
                 self.limits.header_timeout_s)


_GUARD_ATTR = "dreamstream_guard"


def guard_of(server_state: Any, limits: ConnectionLimits | None = None) -> ConnectionGuard | None:
    """The server's guard (made on first use, from `limits`): one per uvicorn server, whatever the protocols."""
    guard = getattr(server_state, _GUARD_ATTR, None)
    if guard is None and limits is not None:
        guard = ConnectionGuard(limits)
        setattr(server_state, _GUARD_ATTR, guard)
    return guard


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort the connection with a TCP reset: the fd and every buffer go now. (asyncio's abort() alone closes the
    socket, but the kernel then keeps its unsent bytes, probing a client that stopped reading, for minutes.)"""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def close_now(transport: asyncio.BaseTransport) -> None:
    """Close, or reset when bytes are waiting to be sent (close() would wait for a reader that may never come)."""
    if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
        reset(transport)
    else:
        transport.close()


class _GuardedHttp:
    """Mixed into uvicorn's HTTP protocols (its methods first): the caps when a connection is made, the header
    timeout until its request head is complete, and `guarded_ws` for the WebSockets it upgrades to."""

    limits: ConnectionLimits | None = None  # None: from the environment, on first use (plain uvicorn --http)

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        self.guard = guard_of(server_state, type(self).connection_limits())
        if self.ws_protocol_class is not None:
            self.ws_protocol_class = guarded_ws(self.ws_protocol_class)
        self._head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def connection_limits(cls) -> ConnectionLimits:
        if cls.limits is None:
            cls.limits = ConnectionLimits.from_settings(Settings.from_env())
        return cls.limits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        if not self.guard.admit(transport, self.client):
            transport.close()
            return
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)  # type: ignore[misc]
        self.guard.release(self.transport)

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._head_done()  # the WebSocket protocol takes the connection over (and releases it when it ends)
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _wait_for_head(self) -> None:
        timeout = self.guard.limits.header_timeout_s
        if timeout and self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.transport.get_protocol() is self:
            self.guard.header_timeout(self.client)
            close_now(self.transport)


class GuardedH11Protocol(_GuardedHttp, H11Protocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.get_protocol() is not self:
            return  # upgraded
        if self.conn.their_state is h11.IDLE:
            self._wait_for_head()  # a head has begun (or the next one, on a kept-alive connection)
        else:
            self._head_done()


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_GuardedHttp, HttpToolsProtocol):
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._wait_for_head()  # the next request on a kept-alive connection has begun

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

    HttpProtocol: type[asyncio.Protocol] = GuardedHttpToolsProtocol
else:  # pragma: no cover
    HttpProtocol = GuardedH11Protocol


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """`HttpProtocol` holding these settings' limits (`dreamstream serve`; plain uvicorn's reads the environment)."""
    return type(HttpProtocol.__name__, (HttpProtocol,), {"limits": ConnectionLimits.from_settings(settings)})


@functools.cache
def guarded_ws(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's WebSocket protocol `base` (any of its three) that releases its connection from the caps when it
    ends, offers the app an `abort` (ABORT_EXTENSION), and aborts a connection still open LINGER_S after the app
    is done (close() waits for the client to read what is buffered; one that stopped reading never does)."""

    class GuardedWebSocket(base):  # type: ignore[valid-type,misc]
        def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            super().__init__(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
            self._guard = guard_of(server_state)
            self._lost = False
            self._linger: asyncio.TimerHandle | None = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._lost = True
            if self._linger is not None:
                self._linger.cancel()
            try:
                super().connection_lost(exc)
            finally:
                if self._guard is not None:
                    self._guard.release(self.transport)

        async def run_asgi(self) -> None:
            self.scope.setdefault("extensions", {})[ABORT_EXTENSION] = {"abort": self.abort}  # type: ignore[index]
            try:
                await super().run_asgi()
            finally:
                if not self._lost:
                    self._linger = self.loop.call_later(LINGER_S, self.abort)

        def abort(self) -> None:
            if not self._lost and self.transport is not None:
                reset(self.transport)

    GuardedWebSocket.__name__ = GuardedWebSocket.__qualname__ = f"Guarded{base.__name__}"
    return GuardedWebSocket


def drain_before_exit(drain: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run `drain` when SIGINT or SIGTERM arrives, before the host hears of the signal; returns an undo.

    uvicorn's shutdown closes every WebSocket with 1012 (service restart) and only then runs the app's lifespan
    shutdown, too late to send 1001 (going away) and the frame in flight. This handler goes first: it starts
    `drain`, and once that is done puts the host's own handler back and raises the signal again, so the host
    stops as it always does. A second signal while draining goes to the host at once (uvicorn: force quit).
    Signals can only be caught on the main thread: elsewhere (a server in a test thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    draining: list[asyncio.Task] = []

    def restore() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    def pass_on(sig: int) -> None:
        restore()
        signal.raise_signal(sig)

    def start_drain(sig: int) -> None:
        if draining:
            return pass_on(sig)
        log.info("%s: draining the streams before stopping", signal.Signals(sig).name)
        task = loop.create_task(drain())
        task.add_done_callback(lambda _task: pass_on(sig))
        draining.append(task)

    def on_signal(sig: int, _frame: Any) -> None:
        loop.call_soon_threadsafe(start_drain, sig)  # the handler may run in the middle of the loop's own work

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    return restore


def bind_error(host: str, port: int) -> OSError | None:
    """Bind (and release) host:port the way uvicorn will: every address host resolves to, SO_REUSEADDR on POSIX
    (asyncio's default for create_server), IPv6 sockets v6-only. The error if one cannot be bound, else None."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return exc
    return None


def bind_problem(host: str, port: int) -> str | None:
    """One line saying why `dreamstream serve` cannot listen on host:port and what to do; None when it can."""
    error = bind_error(host, port)
    if error is None:
        return None
    if error.errno == errno.EADDRINUSE:
        free = next((p for p in range(port + 1, min(port + 20, 65536)) if bind_error(host, p) is None), port + 1)
        return (
            f"dreamstream serve: port {port} on {host} is in use (another dreamstream?). "
            f'Pick another with --port {free}, or with make: make serve ARGS="--port {free}"'
        )
    return f"dreamstream serve: cannot listen on {host} port {port}: {error.strerror or error}"


def serve(app: Any, settings: Settings, log_level: str = "info") -> int:
    """Serve `app` until stopped; the exit status."""
    options = uvicorn_options(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, **options)
    log.info("connections: %s", options["http"].limits.describe())
    return run_server(uvicorn.Server(config))


def run_server(server: uvicorn.Server) -> int:
    """Run until stopped; the exit status. Ctrl+C is a normal stop (0); a port lost to another process after
    `bind_problem` said it was free gets the same line and status (2) as a port found busy beforehand."""
    try:
        server.run()
    except KeyboardInterrupt:
        # uvicorn handles SIGINT itself (drain, shutdown), then re-raises it to the default handler once its own
        # is removed, which ends in this KeyboardInterrupt: the shutdown is already done, so this is a clean stop.
        return 0
    except SystemExit as exc:  # uvicorn's sys.exit(3): the port could not be bound, or the app failed to start
        config = server.config
        problem = bind_problem(config.host, config.port)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
        print("dreamstream serve: the server did not start; the log above says why", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 1
    return 0
