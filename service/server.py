"""How the app is served: uvicorn's settings, and the graceful stop, the same whoever starts it.

`dreamstream serve` runs `serve(app, settings)`. Plain uvicorn runs the same app (`uvicorn service.app:app`) and
gets the same stop, because the app's lifespan installs `drain_before_exit`; for the same limits give uvicorn
the options `uvicorn_options` lists (the README's "Run under plain uvicorn" shows the command line). On Modal,
and on any ASGI host that runs the lifespan shutdown before closing connections, the lifespan's drain is enough.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from service.config import Settings

log = logging.getLogger("dreamstream")

GRACEFUL_SHUTDOWN_S = 10


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
    }


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
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            **uvicorn_options(settings))
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
