"""The two WebSocket endpoints: broadcaster (frames and config in) and viewer (frames out)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from service import auth, codec, protocol
from service.config import valid_stream_id
from service.connection import Connection
from service.errors import ClientError
from service.hub import HubFull, Stream
from service.rates import TokenBucket
from service.server import ABORT_EXTENSION

if TYPE_CHECKING:
    from service.state import DreamStream

log = logging.getLogger("dreamstream.sockets")

POLICY_VIOLATION = 1008
GOING_AWAY = 1001
CONTROL_RATE = 50.0  # control messages (config, ping) answered a second per socket...
CONTROL_BURST = 100.0  # ...with bursts of this many; past that they are dropped
NOTICE_S = 5.0  # a socket over the control limit hears so at most this often


def read_pace(settings: Any) -> TokenBucket:
    """How fast a broadcaster's messages are read: twice DREAMSTREAM_MAX_FPS (frames over the rate are read and
    dropped, counted, up to that) plus the control messages; unpaced when the fps limit is off."""
    if settings.max_fps <= 0:
        return TokenBucket(0, 0)
    return TokenBucket(2 * settings.max_fps + CONTROL_RATE, max(2 * settings.max_fps, 8) + CONTROL_BURST)


class ControlLimit:
    """Control messages (config, ping) per socket: CONTROL_RATE a second; past it they are dropped, and the
    client is told with one `bad_message` every NOTICE_S seconds, not one per message."""

    def __init__(self) -> None:
        self.pace = TokenBucket(CONTROL_RATE, CONTROL_BURST)
        self.dropped = 0
        self.told = -math.inf

    def allow(self) -> bool:
        if self.pace.take():
            return True
        self.dropped += 1
        return False

    def notice(self) -> dict[str, Any] | None:
        """The error to send now about the messages dropped, or None (nothing dropped, or told lately)."""
        now = time.monotonic()
        if not self.dropped or now - self.told < NOTICE_S:
            return None
        self.told = now
        dropped, self.dropped = self.dropped, 0
        return protocol.error("bad_message", f"too many control messages: {dropped} dropped; at most "
                                             f"{CONTROL_RATE:g} a second (bursts of {CONTROL_BURST:g})")


async def refuse(ws: WebSocket, reason: str, code: int = POLICY_VIOLATION) -> None:
    """Accept, then close with `code`, so every client sees the code and the reason (not a bare HTTP 403)."""
    await ws.accept()
    await ws.close(code=code, reason=reason[:120])


def _refusal(ds: DreamStream, ws: WebSocket, stream_id: str) -> str | None:
    """Why this socket may not open, before any role-specific check (None: go on)."""
    if ds.closing:
        return "the server is shutting down"
    if not valid_stream_id(stream_id):
        return "stream id must be 1-64 characters of A-Z a-z 0-9 _ -"
    server = ws.scope.get("server")
    if (why := auth.browser_refusal(ds.settings, ws.headers, str(server[0]) if server else None)) is not None:
        log.warning("stream %s: socket refused: %s (Origin %.100r, Host %.100r)", stream_id, why,
                    ws.headers.get("origin"), ws.headers.get("host"))
        return why
    return None


def _ds(ws: WebSocket) -> DreamStream:
    return ws.app.state.dreamstream


async def _run_until_either(*coros) -> None:
    """Run the socket's tasks until the first ends (the client left, or the pump stopped); a task that failed is
    logged, never swallowed."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and isinstance(task.exception(), Exception) \
                    and not isinstance(task.exception(), (WebSocketDisconnect, ConnectionError)):
                log.error("a socket task failed", exc_info=task.exception())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def broadcaster_socket(ws: WebSocket, stream_id: str) -> None:
    ds = _ds(ws)
    if (why := _refusal(ds, ws, stream_id)) is not None:
        return await refuse(ws, why, GOING_AWAY if ds.closing else POLICY_VIOLATION)
    if not auth.broadcaster_allowed(ds.settings, stream_id, ws.query_params.get("key")):
        log.warning("stream %s: broadcaster refused: missing or wrong stream key", stream_id)
        return await refuse(ws, "missing or wrong stream key")
    try:
        stream = ds.hub.open(stream_id, broadcaster=True)
    except HubFull as exc:
        return await refuse(ws, str(exc))
    await ws.accept()
    conn = Connection(ws)
    await ds.hub.attach_broadcaster(stream, conn)
    try:
        await _run_until_either(conn.pump(), _receive_broadcasts(ds, stream, ws), _send_stats(stream, conn))
    finally:
        ds.hub.detach_broadcaster(stream, conn)


async def _send_stats(stream: Stream, conn: Connection) -> None:
    """The stream's once-a-second tick, while it is live (the only time frames can pile up)."""
    while True:
        await asyncio.sleep(1.0)
        conn.send_control(stream.stats_message())
        stream.expire_stuck_viewers()


async def _receive_broadcasts(ds: DreamStream, stream: Stream, ws: WebSocket) -> None:
    limits = ds.settings
    pace, control = read_pace(limits), ControlLimit()
    while True:
        await pace.wait()
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if stream.broadcaster is None or stream.broadcaster.ws is not ws:
            return  # replaced by a newer broadcaster
        if await _over_message_limit(ds, ws, message):
            return
        data, text = message.get("bytes"), message.get("text") or ""
        try:
            if data is not None:
                await accept_frame(ds, stream, data, None)
                continue
            parsed = protocol.parse_text(text, limits.max_frame_bytes)
            if isinstance(parsed, protocol.FrameMessage):
                await accept_frame(ds, stream, parsed.data, parsed.ts)
            elif not control.allow():
                if (notice := control.notice()) is not None:
                    ds.hub.tell_broadcaster(stream, notice)
            elif isinstance(parsed, protocol.ConfigMessage):
                config = ds.change_config(stream, parsed.changes)
                reply = protocol.config_reply(config.to_dict())
                if (loading := ds.switching_to(stream)) is not None:
                    reply["loading"] = loading
                ds.hub.tell_broadcaster(stream, reply)
            else:
                ds.hub.tell_broadcaster(stream, protocol.pong())
        except ClientError as exc:
            ds.hub.tell_broadcaster(stream, exc.to_message())


async def accept_frame(ds: DreamStream, stream: Stream, data: bytes, ts: float | None) -> None:
    """Check the frame's header against the limits, make it the newest, and show it to `source=original` viewers."""
    limits = ds.settings
    info = codec.probe(data, limits.max_frame_bytes, limits.max_frame_side, limits.max_frame_pixels)
    ts = ts if ts is not None else protocol.now_ms()
    if ds.hub.submit(stream, data, ts, info.width * info.height):
        await ds.hub.show_original(stream, data, info, ts)


async def viewer_socket(ws: WebSocket, stream_id: str) -> None:
    ds = _ds(ws)
    query = ws.query_params
    if (why := _refusal(ds, ws, stream_id)) is not None:
        return await refuse(ws, why, GOING_AWAY if ds.closing else POLICY_VIOLATION)
    if not auth.viewer_allowed(ds.settings, query.get("token")):
        log.warning("stream %s: viewer refused: missing or wrong token", stream_id)
        return await refuse(ws, "missing or wrong viewer token")
    source = query.get("source", "styled")
    fmt = query.get("format", "json")
    if source not in ("styled", "original") or fmt not in ("json", "binary"):
        return await refuse(ws, "source must be styled or original; format must be json or binary")
    try:
        stream = ds.hub.open(stream_id)
        conn = Connection(ws, source=source, binary=fmt == "binary", send_timeout=ds.settings.send_timeout_s,
                          abort=_abort_of(ws))
        ds.hub.add_viewer(stream, conn)
    except HubFull as exc:
        return await refuse(ws, str(exc))
    await ws.accept()
    try:
        await _run_until_either(conn.pump(), _drain(ds, conn))
    finally:
        ds.hub.remove_viewer(stream, conn)


def _abort_of(ws: WebSocket) -> Any:
    """The host's way to drop this connection at once (service/server.py's protocol offers one), or None."""
    return (ws.scope.get("extensions") or {}).get(ABORT_EXTENSION, {}).get("abort")


async def _drain(ds: DreamStream, conn: Connection) -> None:
    """Viewers have nothing to say; read until they leave (and answer pings), at most CONTROL_RATE messages a
    second: the rest wait in TCP."""
    pace = TokenBucket(CONTROL_RATE, CONTROL_BURST)
    try:
        while True:
            await pace.wait()
            message = await conn.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if await _over_message_limit(ds, conn.ws, message):
                return
            if message.get("text") and '"ping"' in message["text"]:
                conn.send_control(protocol.pong())
    except WebSocketDisconnect:
        return


async def _over_message_limit(ds: DreamStream, ws: WebSocket, message: dict) -> bool:
    """Close the socket with 1009 when a message is over DREAMSTREAM_MAX_MESSAGE_BYTES. The host's own cap
    (uvicorn's --ws-max-size) may be higher than ours, so the app checks too: the same 1009 on every host."""
    limit = ds.settings.max_message_bytes
    data = message.get("bytes")
    if len(data if data is not None else message.get("text") or "") <= limit:
        return False
    await ws.close(1009, f"message over {limit} bytes (DREAMSTREAM_MAX_MESSAGE_BYTES)")
    return True
