"""`dreamstream serve` and `dreamstream obs`."""

from __future__ import annotations

import argparse
import logging
import sys

from service import server
from service.config import PROCESSOR_TYPES, PROCESSORS, Settings
from service.version import package_version

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
    parser.add_argument(
        "--option", action="append", default=[], metavar="[TYPE.]NAME=VALUE",
        help="a processor option, over its env var: e.g. --option compile=off or --option "
             "lightning.base_model=/models/sdxl (without TYPE: every processor that takes it)",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        processor=args.processor,
        prompt=args.prompt,
        strength=args.strength,
        steps=args.steps,
        use_controlnet=False if args.no_controlnet else None,
    )
    for text in args.option:
        name, sep, value = text.partition("=")
        kind, _, option = name.rpartition(".")
        kinds = [kind] if kind else [k for k, spec in PROCESSORS.items() if option in spec.env_options]
        known = all(k in PROCESSORS and option in PROCESSORS[k].env_options for k in kinds)
        if not sep or not kinds or not known:
            raise ValueError(f"--option {text!r}: expected [TYPE.]NAME=VALUE with a processor option, such as "
                             "compile=off or lightning.base_model=PATH")
        for k in kinds:
            settings.processor_options.setdefault(k, {})[option] = value
    return settings


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
    problem = server.bind_problem(settings.host, settings.port)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    from service.app import create_app

    try:
        app = create_app(settings)
    except ValueError as exc:
        print(f"dreamstream serve: {exc}", file=sys.stderr)
        return 2
    return server.serve(app, settings, args.log_level)


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
