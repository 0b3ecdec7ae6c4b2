"""The API token: ``MODELCD_TOKEN`` if set, else ``$MODELCD_HOME/token`` (mode 0600),
generated on first start. The CLI finds it the same way."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from modelcd.config import Settings


def token_path(settings: Settings) -> Path:
    return settings.home / "token"


def ensure_token(settings: Settings) -> tuple[str, bool]:
    """Return (token, created_now). Creates the token file with mode 0600 when missing."""
    if settings.token:
        return settings.token, False
    path = token_path(settings)
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def find_token(settings: Settings) -> str | None:
    """The token a client should send, without creating one."""
    if settings.token:
        return settings.token
    path = token_path(settings)
    return path.read_text().strip() if path.exists() else None


def token_matches(expected: str, header: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(expected.encode(), header[len("Bearer "):].strip().encode())
