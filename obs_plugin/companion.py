"""`dreamstream obs`: capture a scene or input from OBS and push it to a DreamStream stream.

    OBS --GetSourceScreenshot--> capture thread --mailbox (1 slot)--> server link --binary JPEG-->
    /ws/broadcaster/{stream}

The capture thread blocks on OBS; the server link runs on asyncio; the one-slot mailbox between
them means a slow side drops old frames rather than queueing them. Both sides reconnect on their
own. Exit codes: 0 stopped by the user (Ctrl+C / SIGTERM), 2 a configuration error (wrong
password, missing source, feedback loop, no browser_source, refused stream key), 3 ended by
someone else (kicked by OBS, replaced by another broadcaster), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from obs_plugin.capture import CaptureOptions, Capturer, Mailbox
from obs_plugin.obs_client import ObsFatal, ObsSessionKicked, silence_obsws_logging
from obs_plugin.overlay import overlay_url, redact
from obs_plugin.server_link import LinkEnded, ServerLink, broadcaster_url
from obs_plugin.status import Stats
from service.config import valid_stream_id

log = logging.getLogger("dreamstream.obs")

EXIT_STOPPED, EXIT_UNEXPECTED, EXIT_CONFIG, EXIT_ENDED = 0, 1, 2, 3
STATUS_EVERY_S = 1.0


def add_obs_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dreamstream obs` (SPEC section 4); service/cli.py registers them as a subcommand."""
    parser.add_argument("--source", default=None,
                        help="OBS scene or input to capture (default: the current program scene)")
    parser.add_argument("--stream", required=True, help="stream id on the server ([A-Za-z0-9_-], 1-64)")
    parser.add_argument("--server", default="ws://127.0.0.1:8000",
                        help="DreamStream server, ws(s):// or http(s):// (default: %(default)s)")
    parser.add_argument("--key", default=None, help="stream key, when the server requires one")
    parser.add_argument("--fps", type=float, default=15.0, help="captures per second (default: %(default)s)")
    parser.add_argument("--width", type=int, default=512,
                        help="capture width in px; the height keeps the aspect ratio (default: %(default)s)")
    parser.add_argument("--obs-host", default="127.0.0.1", help="obs-websocket host (default: %(default)s)")
    parser.add_argument("--obs-port", type=int, default=4455, help="obs-websocket port (default: %(default)s)")
    parser.add_argument("--obs-password", default=None,
                        help="obs-websocket password (default: $OBS_PASSWORD; prefer the variable, "
                             "command lines are visible to other users)")
    parser.add_argument("--install-overlay", action="store_true",
                        help='create or update the "DreamStream Overlay" browser source showing the styled '
                             "stream, then capture as usual")
    parser.add_argument("--overlay-scene", default=None,
                        help="scene for --install-overlay (default: the current program scene)")
    parser.add_argument("--token", default=None,
                        help="viewer token put into the overlay URL (default: $DREAMSTREAM_VIEWER_TOKEN)")


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the flags, as a message, or None."""
    if not valid_stream_id(args.stream):
        return f"--stream {args.stream!r} is not a valid stream id: use 1-64 of A-Z a-z 0-9 _ -"
    if not 0 < args.fps <= 60:
        return f"--fps must be above 0 and at most 60, got {args.fps:g}"
    if not 16 <= args.width <= 4096:
        return f"--width must be 16-4096 px, got {args.width}"
    if urlsplit(args.server).scheme not in ("ws", "wss", "http", "https") or not urlsplit(args.server).netloc:
        return f"--server must look like ws://host:port (or http://, https://, wss://), got {args.server!r}"
    if args.overlay_scene is not None and not args.install_overlay:
        return "--overlay-scene only makes sense with --install-overlay"
    return None


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                            stream=sys.stderr)
    silence_obsws_logging()


def run_obs(args: argparse.Namespace) -> int:
    """Run the companion until stopped; returns the process exit code."""
    _configure_logging()
    problem = _check_args(args)
    if problem:
        log.error("%s", problem)
        return EXIT_CONFIG
    password = args.obs_password if args.obs_password is not None else os.environ.get("OBS_PASSWORD", "")
    token = args.token if args.token is not None else os.environ.get("DREAMSTREAM_VIEWER_TOKEN") or None
    options = CaptureOptions(
        host=args.obs_host, port=args.obs_port, password=password, source=args.source, fps=args.fps,
        width=args.width, overlay_url=overlay_url(args.server, args.stream, token) if args.install_overlay else None,
        overlay_scene=args.overlay_scene,
    )
    try:
        return asyncio.run(_run(options, *broadcaster_url(args.server, args.stream, args.key)))
    except KeyboardInterrupt:
        return EXIT_STOPPED


async def _run(options: CaptureOptions, url: str, safe_url: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows; or not the main thread
            loop.add_signal_handler(signum, stop.set)

    stats = Stats()
    mailbox = Mailbox(stats)
    mailbox.bind(loop)
    link_up = threading.Event()
    obs_ready = asyncio.Event()
    def from_thread(event: asyncio.Event) -> Callable[[], None]:
        def fire() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: we are past shutdown
                loop.call_soon_threadsafe(event.set)

        return fire

    capturer = Capturer(options, mailbox, stats, link_up, on_ready=from_thread(obs_ready), on_exit=from_thread(stop))
    link = ServerLink(url, safe_url, mailbox, stats, link_up)
    if options.overlay_url:
        log.info("overlay URL for an OBS Browser Source: %s", redact(options.overlay_url))

    capturer.start()
    status_task = asyncio.create_task(_print_status(stats))
    link_task = asyncio.create_task(_link_after(obs_ready, link, safe_url))
    link_task.add_done_callback(lambda _: stop.set())
    try:
        await stop.wait()
    finally:
        capturer.stop()
        link_up.set()  # wake a capture loop paused for the server
        status_task.cancel()
        link_task.cancel()
        await asyncio.gather(status_task, link_task, return_exceptions=True)
        await asyncio.to_thread(capturer.join, 2.0)
    return _exit_code(capturer, link_task)


async def _link_after(obs_ready: asyncio.Event, link: ServerLink, safe_url: str) -> None:
    """Open the broadcaster socket only once OBS passed the checks: a companion about to stop on a
    typo must not take the stream over from a broadcaster that is already live (close 4000).
    """
    await obs_ready.wait()
    log.info("streaming to %s; Ctrl+C stops", safe_url)
    await link.run()


def _exit_code(capturer: Capturer, link_task: asyncio.Task) -> int:
    fatal = capturer.fatal
    if fatal is not None:
        log.error("%s", fatal)
        if isinstance(fatal, ObsSessionKicked):
            return EXIT_ENDED
        return EXIT_CONFIG if isinstance(fatal, ObsFatal) else EXIT_UNEXPECTED
    if link_task.done() and not link_task.cancelled():
        exc = link_task.exception()
        if isinstance(exc, LinkEnded):
            log.error("%s", exc)
            return exc.exit_code
        if exc is not None:
            log.error("the server link failed: %r", exc)
            return EXIT_UNEXPECTED
    log.info("stopped")
    return EXIT_STOPPED


async def _print_status(stats: Stats) -> None:
    """Once a second, what the user needs to judge the stream, including the audio sync to set."""
    await asyncio.sleep(STATUS_EVERY_S)
    log.info("set your microphone's Sync Offset (Edit > Advanced Audio Properties) to the audio sync offset "
             "shown below, so speech stays in step with the styled video")
    while True:
        log.info("status: %s", stats.line())
        await asyncio.sleep(STATUS_EVERY_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamstream obs", description=__doc__.split("\n\n")[0])
    add_obs_arguments(parser)
    return run_obs(parser.parse_args(argv))
