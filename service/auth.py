"""Who may broadcast and who may watch. Secrets are compared in constant time and never logged."""

from __future__ import annotations

import hmac
import logging
import re
from urllib.parse import urlsplit

from service.config import Settings


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def broadcaster_allowed(settings: Settings, stream_id: str, key: str | None) -> bool:
    """With keys on, a stream's own key or the global broadcast key opens it; otherwise anyone may."""
    if not settings.keys_enabled:
        return True
    own = settings.stream_keys.get(stream_id)
    if own is not None and _same(key, own):
        return True
    return settings.broadcast_key is not None and _same(key, settings.broadcast_key)


def viewer_allowed(settings: Settings, token: str | None) -> bool:
    return settings.viewer_token is None or _same(token, settings.viewer_token)


def origin_allowed(settings: Settings, origin: str | None, host: str | None = None) -> bool:
    """Whether a browser page from `origin` may open our sockets (stops cross-site WebSocket hijacking).

    Browsers always send Origin; other clients (OBS companion, scripts) usually don't and are let
    through, since the keys and tokens are what guard them. Our own pages (same host and port as the
    request) are always allowed, so the studio and overlays keep working with a list set.
    """
    if not settings.allowed_origins or origin is None:
        return True
    if origin in settings.allowed_origins or "*" in settings.allowed_origins:
        return True
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def bearer_key(authorization: str | None, query_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return query_key


# ---- keeping secrets out of logs -----------------------------------------------------------------

_SECRET_QUERY_RE = re.compile(r"([?&;](?:key|token)=)[^&;\s\"']*", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`/ws/broadcaster/a?key=s3cret&x=1` -> `/ws/broadcaster/a?key=[redacted]&x=1`."""
    return _SECRET_QUERY_RE.sub(r"\1" + REDACTED, text)


class RedactSecrets(logging.Filter):
    """Blanks `key=` and `token=` query values in log records.

    uvicorn's access log and its WebSocket "[accepted]" lines print the full path with the query
    string, which is where broadcasters put `?key=` and overlays `?token=`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


# A logger's filters see only the records made on that logger (not ones propagated from its
# children), so each logger that prints request paths gets the filter itself.
_LOGGERS_WITH_PATHS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets", "dreamstream")


def install_log_redaction() -> None:
    """Idempotent; logging.config.dictConfig (what uvicorn calls) keeps logger filters, so once is enough."""
    for name in _LOGGERS_WITH_PATHS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
