"""`dreamstream serve` and `dreamstream obs`."""

from __future__ import annotations

import argparse
import logging
import sys

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


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        settings = settings_from_args(args)
        app = create_app(settings)
    except ValueError as exc:
        print(f"dreamstream serve: {exc}", file=sys.stderr)
        return 2
    # Frames over the limit must reach us (to answer `too_large`) rather than kill the socket.
    ws_max = max(16 * 1024 * 1024, settings.max_frame_bytes * 2)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        ws_max_size=ws_max,
        timeout_graceful_shutdown=10,
    )
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
