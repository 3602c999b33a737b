"""Who may broadcast and who may watch. Secrets are compared in constant time and never logged."""

from __future__ import annotations

import hmac

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


def origin_allowed(settings: Settings, origin: str | None) -> bool:
    """Browsers send Origin; other clients (OBS companion, scripts) usually don't and are let through."""
    if not settings.allowed_origins or origin is None:
        return True
    return origin in settings.allowed_origins or "*" in settings.allowed_origins


def bearer_key(authorization: str | None, query_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return query_key
