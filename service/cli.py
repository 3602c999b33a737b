"""`dreamstream serve` and `dreamstream obs`."""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable

import uvicorn

from service.config import PROCESSOR_TYPES, Settings

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Used when the package is run from a checkout without being installed; kept equal to pyproject.toml's version.
__version__ = "0.1.0"


def package_version() -> str:
    try:
        return importlib.metadata.version("dreamstream")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--processor",
        choices=("auto", *PROCESSOR_TYPES),
        default=None,
        help="auto (default) = lightning on a CUDA GPU, else filter",
    )
    parser.add_argument("--prompt", default=None, help="default style prompt for new streams")
    parser.add_argument("--strength", type=float, default=None, help="default img2img strength, in (0, 1]")
    parser.add_argument("--steps", type=int, default=None, help="default denoising steps")
    parser.add_argument("--no-controlnet", action="store_true", help="run without the depth ControlNet")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        host=args.host,
        port=args.port,
        processor=args.processor,
        prompt=args.prompt,
        strength=args.strength,
        steps=args.steps,
        use_controlnet=False if args.no_controlnet else None,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's shutdown closes every WebSocket with 1012 (service restart) and only then runs the app's
    lifespan shutdown; `drain` goes first, so clients get 1001 (going away) and the frame in flight."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self.drain()
        except Exception:  # a failed drain must not stop the shutdown itself
            logging.getLogger("dreamstream").exception("draining the streams failed")
        await super().shutdown(sockets)


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


def serve(args: argparse.Namespace) -> int:
    from service.auth import install_log_redaction

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    install_log_redaction()
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"dreamstream serve: {exc}", file=sys.stderr)
        return 2
    # Before the app (and its processor) loads, so a busy port is said at once, not after seconds of startup.
    problem = bind_problem(settings.host, settings.port)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    from service.app import create_app

    try:
        app = create_app(settings)
    except ValueError as exc:
        print(f"dreamstream serve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        # Bounds the memory one client can make us hold: a bigger message closes its socket (1009).
        # It is above the frame limit, so an oversized frame still gets `too_large` and the socket lives.
        ws_max_size=settings.ws_max_size,
        # Every client offers permessage-deflate, and uvicorn would accept it and compress each frame
        # once per viewer: ~4 ms of CPU per 50 kB JPEG per viewer, for JPEG bytes that barely shrink.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=10,
    )
    return run_server(DrainingServer(config, app.state.dreamstream.drain))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamstream", description="Restyle a live stream with diffusion models")
    parser.add_argument("--version", action="version", version=f"dreamstream {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the server")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=serve)
    try:
        from obs_plugin.companion import add_obs_arguments, run_obs
    except ImportError:  # obs extra not installed
        add_obs_arguments = run_obs = None
    obs_parser = sub.add_parser("obs", help="capture an OBS scene and push it to the server")
    if add_obs_arguments is not None:
        add_obs_arguments(obs_parser)
        obs_parser.set_defaults(func=run_obs)
    else:
        obs_parser.set_defaults(func=lambda _args: _missing_obs())
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl+C before the command's own handling was in place (e.g. while importing)
        return 130


def _missing_obs() -> int:
    print("dreamstream obs needs the obs extra: pip install 'dreamstream[obs]'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
