"""Who may broadcast, watch, read the stream list, and which browser pages may drive the server.

Secrets are compared in constant time and never logged. Browser requests (they carry `Origin`, or the
`Sec-Fetch-*` headers every current browser sends) must name one of this server's hosts (DNS rebinding) and, when
they carry an `Origin`, come from the server's own origin or DREAMSTREAM_ALLOWED_ORIGINS (cross-site WebSocket
hijacking, cross-site POSTs). Clients that send neither (the OBS companion, scripts) are not browsers: the keys
guard them, as before.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import socket
from collections.abc import Mapping
from functools import lru_cache
from urllib.parse import unquote_plus, urlsplit

from service.config import Settings

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


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


def any_key_allowed(settings: Settings, key: str | None) -> bool:
    """With keys on, a key that opens some stream (any stream's key, or the broadcast key); otherwise anyone.
    What POST /api/process asks for: it styles no stream, but it costs the processor that serves them all."""
    if not settings.keys_enabled:
        return True
    keys = [*settings.stream_keys.values(), *([settings.broadcast_key] if settings.broadcast_key else [])]
    found = False
    for expected in keys:  # every key compared, so the time says nothing about which one matched
        found |= _same(key, expected)
    return found


def viewer_allowed(settings: Settings, token: str | None) -> bool:
    return settings.viewer_token is None or _same(token, settings.viewer_token)


def reader_allowed(settings: Settings, secret: str | None) -> bool:
    """GET /api/streams and /metrics: open without a viewer token; with one, the token or the broadcast key."""
    if settings.viewer_token is None:
        return True
    return _same(secret, settings.viewer_token) or (
        settings.broadcast_key is not None and _same(secret, settings.broadcast_key))


def bearer_key(authorization: str | None, query_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return query_key


# ---- hosts and origins (DNS rebinding, cross-site pages) ------------------------------------------


def split_host(host: str | None) -> tuple[str, int | None] | None:
    """A `Host` header -> (lower-case name without brackets or a trailing dot, port or None); None if malformed."""
    if not host:
        return None
    try:
        parts = urlsplit("//" + host.strip())
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path or parts.query:
        return None
    return name.rstrip("."), port


def normalise_origin(origin: str) -> str | None:
    """`HTTPS://Studio.Example:443/` -> `https://studio.example`: scheme + host + port, the default port dropped,
    case and a trailing `/` ignored. None when it is not an http(s) origin (`null`, file:, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        scheme, name, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in ("http", "https") or not name or parts.path not in ("", "/") or parts.query:
        return None
    name = name.rstrip(".")
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{shown}:{port}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def _machine_names() -> frozenset[str]:
    name = socket.gethostname().lower().rstrip(".")
    return frozenset({name, f"{name}.local"} if name else set())


def host_allowed(settings: Settings, host: str | None, local_address: str | None = None) -> bool:
    """Whether a browser's `Host` names this server, so a page that rebinds its own DNS name to our address is
    refused. Accepted: loopback names and addresses; the address the connection came in on (`local_address`);
    the bound host; when bound to every address (0.0.0.0, ::), any IP literal (the machine's addresses, also
    through NAT); this machine's host name; and DREAMSTREAM_ALLOWED_HOSTS (`*` any, `*.example.com` subdomains)."""
    parsed = split_host(host)
    if parsed is None:
        return False
    name = parsed[0]
    bound = settings.host.strip().lower()
    if _is_loopback(name) or name == bound.strip("[]") or name in _machine_names():
        return True
    if local_address and name == local_address.lower():
        return True
    if bound in WILDCARD_HOSTS and _is_ip(name):
        return True
    for allowed in settings.allowed_hosts:
        pattern = allowed.strip().lower().rstrip(".")
        pattern = (split_host(pattern) or (pattern, None))[0] if not pattern.startswith("*") else pattern
        if pattern == "*" or pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def origin_allowed(settings: Settings, origin: str | None, host: str | None = None) -> bool:
    """Whether a browser page from `origin` may open our sockets or send our state-changing requests.

    No `Origin`: not a browser (the OBS companion, scripts), let through; the keys guard those. Otherwise the
    server's own origin (the page was served by the host the request names) or DREAMSTREAM_ALLOWED_ORIGINS
    (`*` for any), compared normalised. Check `host_allowed` first: "own origin" trusts the Host header.
    """
    if origin is None:
        return True
    if "*" in settings.allowed_origins:
        return True
    normal = normalise_origin(origin)
    if normal is None:
        return False
    if normal in {normalise_origin(o) for o in settings.allowed_origins}:
        return True
    parsed_host = split_host(host)
    if parsed_host is None:
        return False
    parts = urlsplit(normal)
    return (parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme]) == (
        parsed_host[0], parsed_host[1] or _DEFAULT_PORTS[parts.scheme])


def is_browser(headers: Mapping[str, str]) -> bool:
    """Browsers send Origin on every WebSocket handshake and POST, and Sec-Fetch-* on every request (2023+)."""
    return "origin" in headers or "sec-fetch-site" in headers or "sec-fetch-mode" in headers


def browser_refusal(settings: Settings, headers: Mapping[str, str], local_address: str | None = None) -> str | None:
    """Why a browser request may not reach a socket or a guarded route (None: it may). Short, for a 1008 close
    reason (at most 123 bytes), and naming the setting that opens it."""
    if not is_browser(headers):
        return None
    host = headers.get("host")
    if not host_allowed(settings, host, local_address):
        shown = (split_host(host) or ("?", None))[0][:40]
        return f"host {shown!r} is not this server's (DREAMSTREAM_ALLOWED_HOSTS)"
    if not origin_allowed(settings, headers.get("origin"), host):
        return "origin not allowed: not this server's page (DREAMSTREAM_ALLOWED_ORIGINS)"
    return None


# ---- keeping secrets out of logs -----------------------------------------------------------------

SECRET_PARAMS = ("key", "token")
SECRET_HEADERS = ("authorization", "proxy-authorization", "sec-websocket-protocol", "cookie", "x-api-key")
REDACTED = "[redacted]"
# a query parameter: its name (maybe percent-encoded) and value, after ? & ; or where a bare query string starts
_PARAM_RE = re.compile(r"(?P<lead>(?:^|[?&;'\"\s(]))(?P<name>[A-Za-z0-9%+._~-]{1,40})=(?P<value>[^&;\s\"'<>)]*)")
# a header as websockets' debug log (`< authorization: Bearer x`) or uvicorn's trace log (`(b'authorization',
# b'Bearer x')`) shows it
_HEADER_RE = re.compile(
    r"(?P<name>\b(?:" + "|".join(SECRET_HEADERS) + r"))(?P<sep>['\"]?\s*[:,=]\s*(?-i:b)?['\"]?)(?P<value>[^'\"\r\n]*)",
    re.IGNORECASE)
_BEARER_RE = re.compile(r"(\bBearer\s+)[^\s'\",;]+", re.IGNORECASE)


def _param(match: re.Match) -> str:
    name = unquote_plus(match["name"]).strip().lower()
    if name in SECRET_PARAMS and match["value"] != REDACTED:
        return f"{match['lead']}{match['name']}={REDACTED}"
    return match[0]


def redact(text: str) -> str:
    """`/ws/broadcaster/a?key=s3cret&x=1` -> `/ws/broadcaster/a?key=[redacted]&x=1`; also `?%6Bey=`,
    `Authorization: Bearer ...`, `Sec-WebSocket-Protocol: ...` and the other secret-carrying headers."""
    text = _PARAM_RE.sub(_param, text)
    text = _HEADER_RE.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}", text)
    return _BEARER_RE.sub(r"\1" + REDACTED, text)


class RedactSecrets(logging.Filter):
    """Blanks secrets in log records: `key=` and `token=` query values (their names decoded first), and the
    headers that carry keys (Authorization, Sec-WebSocket-Protocol...).

    uvicorn's access log and its WebSocket "[accepted]" lines print the full path with the query string, which
    is where broadcasters put `?key=` and overlays `?token=`; at debug level websockets logs every handshake
    header (`"< %s: %s"`, the name and the value as two arguments), and at trace level uvicorn logs the ASGI
    scope. Each argument is redacted in place (uvicorn's access formatter unpacks its five arguments, so their
    number stays); a secret that only shows in the message as a whole (a header's name in one argument, its
    value in the next) makes the record its redacted message, with no arguments, on the loggers whose
    formatters allow it.
    """

    KEEP_ARGS = ("uvicorn.access",)  # formatters that unpack record.args

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        if record.args and record.name not in self.KEEP_ARGS:
            try:
                message = record.getMessage()
            except Exception:  # a broken record: leave it to logging's own error handling
                return True
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, ()
        return True


def _redact_arg(value: object) -> object:
    """A log argument with its secrets blanked: strings redacted; other objects (a scope dict, bytes) become their
    redacted text only when that text held a secret; numbers are left alone (a `%d` still gets a number)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (int, float)) or value is None:
        return value
    try:
        text = str(value)
    except Exception:
        return value
    clean = redact(text)
    return value if clean == text else clean


# A logger's filters see only the records made on that logger (not ones propagated from its
# children), so each logger that prints request paths or headers gets the filter itself.
_LOGGERS_WITH_PATHS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets",
                       "websockets.server", "websockets.protocol", "dreamstream")


def install_log_redaction() -> None:
    """Idempotent; logging.config.dictConfig (what uvicorn calls) keeps logger filters, so once is enough."""
    for name in _LOGGERS_WITH_PATHS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
