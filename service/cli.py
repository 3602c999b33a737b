"""`dreamstream serve` and `dreamstream obs`."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Awaitable, Callable

import uvicorn

from service.config import PROCESSOR_TYPES, Settings

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


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


def serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.auth import install_log_redaction

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    install_log_redaction()
    try:
        settings = settings_from_args(args)
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
    DrainingServer(config, app.state.dreamstream.drain).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamstream", description="Restyle a live stream with diffusion models")
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
    return args.func(args)


def _missing_obs() -> int:
    print("dreamstream obs needs the obs extra: pip install 'dreamstream[obs]'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
