"""The one error a client is told about: a SPEC error code, its HTTP status, and a message that says what to do.

Raised by the codec (a frame we refuse), the protocol (a message we cannot read) and the stream config (a
value out of range); the sockets answer it with an `error` message and keep the socket open, the HTTP API
with its status. It also travels back from a remote GPU pool as a return value (it pickles by code and
message).
"""

from __future__ import annotations

from typing import Any

# SPEC §3's error codes, and the HTTP status each gets on the HTTP API
HTTP_STATUS = {
    "bad_frame": 400,
    "bad_message": 400,
    "too_large": 413,
    "bad_config": 422,
    "processing_failed": 503,
}
ERROR_CODES = tuple(HTTP_STATUS)


class ClientError(ValueError):
    """Something a client sent that we refuse. `code` is the SPEC error code."""

    def __init__(self, code: str, message: str):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_message(self) -> dict[str, Any]:
        """The protocol's `error` message."""
        return {"type": "error", "code": self.code, "message": self.message}

    def to_http(self) -> dict[str, Any]:
        """The HTTP API's error body."""
        return {"error": self.code, "message": self.message}

    def __reduce__(self) -> tuple[type[ClientError], tuple[str, str]]:
        return type(self), (self.code, self.message)
