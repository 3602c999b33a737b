"""A thin obs-websocket v5 client: obsws-python's `ReqClient` for the handshake, then requests on its socket.

Why not call `ReqClient.send` for every request: it reads replies with `WebSocket.recv()`, which turns
OBS's close frame into an empty string (so a session kicked by OBS, close 4011, cannot be told
from OBS crashing), and it tags requests with a random id in 1..1000 it never checks, so after a
timeout the next call returns the previous call's reply. Here each request carries a fresh
`requestId`, replies are matched to it, close frames keep their code, and every failure tells the
caller whether retrying can help (`ObsUnavailable`) or not (`ObsFatal`).

One `ObsConnection` per thread: a websocket-client socket is not safe to share.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import struct
import time
from dataclasses import dataclass

import obsws_python
from obsws_python.error import OBSSDKError
from websocket import ABNF, WebSocketBadStatusException, WebSocketException, WebSocketTimeoutException

from service.codec import FrameError, split_base64

# obs-websocket v5 WebSocketCloseCode values we act on
CLOSE_AUTHENTICATION_FAILED = 4009
CLOSE_SESSION_INVALIDATED = 4011  # "kicked" from OBS's WebSocket Server Settings > connected clients

# obs-websocket v5 RequestStatus values we act on
STATUS_RESOURCE_NOT_FOUND = 600
STATUS_INVALID_RESOURCE_STATE = 604  # e.g. an audio request on an input without audio
STATUS_INVALID_INPUT_KIND = 605

# the range obs-websocket 5 accepts for SetInputAudioSyncOffset, in ms
AUDIO_SYNC_OFFSET_MIN_MS, AUDIO_SYNC_OFFSET_MAX_MS = -950, 20000

_ids = itertools.count(1)


def silence_obsws_logging() -> None:
    """obsws-python logs the password at INFO and every failed request as an ERROR with a traceback.

    Its loggers all hang below `obsws_python`, so one level on the parent mutes them; our own log
    lines say what happened instead.
    """
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 1)


class ObsError(Exception):
    """Something went wrong talking to OBS; the message is meant for the user."""


class ObsUnavailable(ObsError):
    """OBS is not running, went away, or did not answer in time: reconnecting can help."""


class ObsFatal(ObsError):
    """A configuration problem reconnecting cannot fix (wrong password, kicked by the user)."""


class ObsAuthError(ObsFatal):
    pass


class ObsSessionKicked(ObsFatal):
    pass


class ObsNotObs(ObsFatal):
    """Something answers on the port, but it is not obs-websocket (a wrong --obs-port)."""


class ObsRequestError(ObsError):
    """OBS answered a request with a failure `RequestStatus` code (e.g. 600 ResourceNotFound)."""

    def __init__(self, request_type: str, code: int, comment: str | None):
        super().__init__(f"OBS refused {request_type} (code {code}): {comment or 'no comment'}")
        self.request_type = request_type
        self.code = code
        self.comment = comment or ""


@dataclass(frozen=True)
class ObsVersion:
    obs: str
    websocket: str
    image_formats: tuple[str, ...]


class ObsConnection:
    """An authenticated obs-websocket session. Build a new one after any `ObsError` but `ObsRequestError`."""

    def __init__(self, host: str, port: int, password: str, timeout: float = 5.0):
        self.host = host
        self.port = port
        self.timeout = timeout
        self._client = _identify(host, port, password, timeout)
        # the replies are ASCII JSON carrying base64: checking them as UTF-8 in pure Python costs
        # more than OBS takes to render and encode the screenshot (2-4x capture rate measured)
        ws = self._client.base_client.ws
        ws.frame_buffer.skip_utf8_validation = True
        ws.cont_frame.skip_utf8_validation = True

    @property
    def address(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def request(self, request_type: str, data: dict | None = None) -> dict:
        """Send one request and return its `responseData` ({} when OBS sends none)."""
        request_id = f"ds-{next(_ids)}"
        payload: dict = {"op": 6, "d": {"requestType": request_type, "requestId": request_id}}
        if data:
            payload["d"]["requestData"] = data
        ws = self._client.base_client.ws
        try:
            ws.send(json.dumps(payload))
            while True:
                opcode, raw = ws.recv_data()
                if opcode == ABNF.OPCODE_CLOSE:
                    raise _closed_error(raw, self.address)
                message = json.loads(raw)
                # op 7 = RequestResponse; a reply to an older, timed-out request is skipped
                if message.get("op") == 7 and message["d"].get("requestId") == request_id:
                    reply = message["d"]
                    break
        except (WebSocketTimeoutException, TimeoutError) as exc:
            raise ObsUnavailable(f"OBS did not answer {request_type} within {self.timeout:g} s") from exc
        except (OSError, WebSocketException, ValueError, KeyError) as exc:
            raise ObsUnavailable(f"lost the connection to OBS at {self.address} ({_reason(exc)})") from exc
        status = reply["requestStatus"]
        if not status["result"]:
            raise ObsRequestError(request_type, status["code"], status.get("comment"))
        return reply.get("responseData") or {}

    def version(self) -> ObsVersion:
        info = self.request("GetVersion")
        return ObsVersion(
            obs=info.get("obsVersion", "?"),
            websocket=info.get("obsWebSocketVersion", "?"),
            image_formats=tuple(info.get("supportedImageFormats", ())),
        )

    def screenshot(self, source: str, width: int, image_format: str = "jpg") -> bytes:
        """The source rendered `width` px wide, as encoded image bytes.

        Only the width is given: obs-websocket 5.1 stretches the image when given both width and
        height, and the server crops or pads to its own size anyway.
        """
        reply = self.request(
            "GetSourceScreenshot",
            {"sourceName": source, "imageFormat": image_format, "imageWidth": width},
        )
        try:
            data, _ = split_base64(reply["imageData"])  # "data:image/jpg;base64,..."
        except (KeyError, FrameError) as exc:
            raise ObsUnavailable(f"OBS sent an unreadable screenshot of {source!r} ({exc})") from exc
        return data

    def audio_sync_offset(self, input_name: str) -> int:
        """The input's audio sync offset in ms (Edit > Advanced Audio Properties > Sync Offset)."""
        return int(self.request("GetInputAudioSyncOffset", {"inputName": input_name})["inputAudioSyncOffset"])

    def set_audio_sync_offset(self, input_name: str, offset_ms: int) -> None:
        self.request("SetInputAudioSyncOffset", {"inputName": input_name, "inputAudioSyncOffset": offset_ms})

    def close(self) -> None:
        # the socket may already be gone: then there is nothing left to release
        with contextlib.suppress(Exception):
            self._client.base_client.ws.close(timeout=1)


def _identify(host: str, port: int, password: str, timeout: float) -> obsws_python.ReqClient:
    """Connect and authenticate, telling a wrong password apart from OBS being away.

    obs-websocket answers a wrong password by closing with 4009, but obsws-python drops the close
    code and raises a generic "failed to identify". OBS shutting down mid-handshake looks the same
    once; so on that error we try once more at once: a stopped OBS then refuses the connection,
    while a wrong password fails the same way again.
    """
    for attempt in (1, 2):
        try:
            # host, port and password are always given, so obsws-python never reads a config.toml
            return obsws_python.ReqClient(host=host, port=port, password=password, timeout=timeout)
        except OBSSDKError as exc:
            if "no password" in str(exc):
                raise ObsAuthError(
                    f"OBS at ws://{host}:{port} requires a password: set OBS_PASSWORD (or --obs-password) to "
                    "the one in OBS > Tools > WebSocket Server Settings > Show Connect Info"
                ) from None
            if attempt == 2:
                raise ObsAuthError(
                    f"OBS at ws://{host}:{port} refused the password (obs-websocket authentication failed): "
                    "check OBS_PASSWORD / --obs-password against OBS > Tools > WebSocket Server Settings "
                    "> Show Connect Info"
                ) from None
            time.sleep(0.2)
        except WebSocketBadStatusException as exc:  # an HTTP server that is not obs-websocket
            raise _not_obs(host, port, f"it answered the WebSocket handshake with HTTP {exc.status_code}") from None
        except WebSocketException as exc:
            if str(exc).startswith("Invalid status line"):  # not even HTTP: ssh, a database, ...
                raise _not_obs(host, port, "it does not speak HTTP") from None
            raise ObsUnavailable(f"cannot reach OBS at ws://{host}:{port} ({_reason(exc)})") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ObsUnavailable(f"cannot reach OBS at ws://{host}:{port} ({_reason(exc)})") from None
    raise AssertionError("unreachable")


def _not_obs(host: str, port: int, how: str) -> ObsNotObs:
    return ObsNotObs(
        f"ws://{host}:{port} is not OBS's WebSocket server ({how}): check --obs-host / --obs-port against "
        "OBS > Tools > WebSocket Server Settings (OBS's default port is 4455)"
    )


def _closed_error(close_payload: bytes, address: str) -> ObsError:
    code = struct.unpack("!H", close_payload[:2])[0] if len(close_payload) >= 2 else None
    reason = close_payload[2:].decode("utf-8", "replace")
    if code == CLOSE_SESSION_INVALIDATED:
        return ObsSessionKicked(
            f"OBS ended this session (close {code}: kicked from Tools > WebSocket Server Settings); "
            "not reconnecting - start `dreamstream obs` again to resume"
        )
    if code == CLOSE_AUTHENTICATION_FAILED:
        return ObsAuthError(f"OBS refused the password (close {code})")
    return ObsUnavailable(f"OBS at {address} closed the connection (close {code}{': ' + reason if reason else ''})")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, ConnectionRefusedError) or "Connection refused" in text:
        return "connection refused: is OBS running with its WebSocket server on?"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
