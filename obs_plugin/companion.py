"""`dreamstream obs`: capture a scene or input from OBS and push it to a DreamStream stream.

    OBS --GetSourceScreenshot--> capture thread --mailbox (1 slot)--> server link --binary JPEG-->
    /ws/broadcaster/{stream}

The capture thread blocks on OBS; the server link runs on asyncio; the one-slot mailbox between
them means a slow side drops old frames rather than queueing them. Both sides reconnect on their
own. The stream key is checked with the server first, before OBS (`check_server`). With
`--sync-audio INPUT` a third thread keeps INPUT's audio sync offset at the measured latency
(obs_plugin/audio_sync.py). Exit codes: 0 stopped by the user (Ctrl+C / SIGTERM), 2 a configuration
error (wrong password, a port that is not OBS, missing source or audio input, feedback loop, no
browser_source, refused stream key), 3 ended by someone else (kicked by OBS, replaced by another
broadcaster), 1 anything unexpected.
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

from obs_plugin.audio_sync import AudioSync
from obs_plugin.capture import CaptureOptions, Capturer, Mailbox
from obs_plugin.obs_client import ObsFatal, ObsSessionKicked, silence_obsws_logging
from obs_plugin.overlay import overlay_url, redact
from obs_plugin.server_link import LinkEnded, ServerLink, broadcaster_url, check_server
from obs_plugin.status import Snapshot, Stats
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
    parser.add_argument("--sync-audio", default=None, metavar="INPUT",
                        help="keep the audio sync offset of this OBS input (your microphone) at the measured "
                             "latency of the styled video; the old offset is restored on exit")


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
        check_server(args.server, args.stream, args.key)
        return asyncio.run(_run(options, *broadcaster_url(args.server, args.stream, args.key), args.sync_audio))
    except LinkEnded as exc:  # the key check
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_STOPPED


async def _run(options: CaptureOptions, url: str, safe_url: str, sync_input: str | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows; or not the main thread
            loop.add_signal_handler(signum, stop.set)

    stats = Stats()
    mailbox = Mailbox(stats)
    mailbox.bind(loop)
    link_up = threading.Event()
    obs_ready, sync_ready = asyncio.Event(), asyncio.Event()

    def from_thread(event: asyncio.Event) -> Callable[[], None]:
        def fire() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: we are past shutdown
                loop.call_soon_threadsafe(event.set)

        return fire

    capturer = Capturer(options, mailbox, stats, link_up, on_ready=from_thread(obs_ready), on_exit=from_thread(stop))
    sync = None
    if sync_input:
        sync = AudioSync(options, sync_input, stats, on_ready=from_thread(sync_ready), on_exit=from_thread(stop))
    else:
        sync_ready.set()
    link = ServerLink(url, safe_url, mailbox, stats, link_up)
    if options.overlay_url:
        log.info("overlay URL for an OBS Browser Source: %s", redact(options.overlay_url))

    capturer.start()
    if sync is not None:
        sync.start()
    status_task = asyncio.create_task(_report_status(stats, 1000.0 / options.fps, advise=sync is None))
    link_task = asyncio.create_task(_link_after([obs_ready, sync_ready], link, safe_url))
    link_task.add_done_callback(lambda _: stop.set())
    try:
        await stop.wait()
    finally:
        capturer.stop()
        if sync is not None:
            sync.stop()  # it puts the audio sync offset back before it ends
        link_up.set()  # wake a capture loop paused for the server
        status_task.cancel()
        link_task.cancel()
        await asyncio.gather(status_task, link_task, return_exceptions=True)
        await asyncio.to_thread(capturer.join, 2.0)
        if sync is not None:
            await asyncio.to_thread(sync.join, 8.0)
    return _exit_code([capturer, sync], link_task)


async def _link_after(checks: list[asyncio.Event], link: ServerLink, safe_url: str) -> None:
    """Open the broadcaster socket only once OBS passed the checks (source, feedback loop, --sync-audio
    input): a companion about to stop on a typo must not take the stream over from a broadcaster that
    is already live (close 4000).
    """
    for check in checks:
        await check.wait()
    log.info("streaming to %s; Ctrl+C stops", safe_url)
    await link.run()


def _exit_code(threads: list[Capturer | AudioSync | None], link_task: asyncio.Task) -> int:
    fatal = next((t.fatal for t in threads if t is not None and t.fatal is not None), None)
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


async def _report_status(stats: Stats, frame_ms: float, advise: bool) -> None:
    """The status line whenever something in it a user acts on changes (a new state, a rate or the audio
    offset moving), checked once a second; and, once latency is measured, what to set the mic's offset to.
    """
    printed: Snapshot | None = None
    while True:
        await asyncio.sleep(STATUS_EVERY_S)
        now = stats.snapshot()
        if printed is None or now.differs_from(printed, frame_ms):
            log.info("status: %s", stats.line())
            if advise and now.offset_ms is not None:
                log.info("set your microphone's Sync Offset (Edit > Advanced Audio Properties) to the audio sync "
                         "offset in the status line (%+.0f ms now), so speech stays in step with the styled video; "
                         "or let `--sync-audio MIC` keep it there", now.offset_ms)
                advise = False  # once: the status line shows the number from now on
            printed = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamstream obs", description=__doc__.split("\n\n")[0])
    add_obs_arguments(parser)
    return run_obs(parser.parse_args(argv))
