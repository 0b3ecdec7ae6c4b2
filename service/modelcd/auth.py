"""The API token: ``MODELCD_TOKEN`` if set, else ``$MODELCD_HOME/token`` (mode 0600),
generated on first start. The CLI finds it the same way.

A token is printable ASCII without spaces. An empty, blank or unreadable token file or an
empty ``MODELCD_TOKEN`` stops the start (never an empty token that a stripped header could
match), and the file is written atomically, so a full disk cannot leave an empty one."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from pathlib import Path

from modelcd.config import Settings
from modelcd.errors import ConfigError

BEARER = "Bearer "
_FILE_FIX = "delete the file to have a new token generated on the next start, or set MODELCD_TOKEN"


def token_path(settings: Settings) -> Path:
    return settings.home / "token"


def _valid(token: str) -> bool:
    return bool(token) and all(0x21 <= ord(c) <= 0x7E for c in token)


def _from_env(value: str) -> str:
    if not _valid(value):
        what = "empty" if not value.strip() else "not printable ASCII without spaces"
        raise ConfigError(f"MODELCD_TOKEN is {what}; set it to a token (e.g. the output of `python3 -c "
                          "'import secrets; print(secrets.token_urlsafe(32))'`) or unset it to use "
                          "$MODELCD_HOME/token", field="MODELCD_TOKEN")
    return value


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding ASCII whitespace dropped); ConfigError naming the
    file and the fix when it cannot be read or holds no valid token."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"API token file {path} cannot be read ({e.strerror}); fix its permissions, or "
                          f"{_FILE_FIX}", field="token") from e
    token = raw.strip(b" \t\r\n").decode("latin-1")
    if not _valid(token):
        what = "empty" if not token else "not printable ASCII without spaces"
        raise ConfigError(f"API token file {path} is {what}; {_FILE_FIX}", field="token")
    return token


def _write_new_token(path: Path) -> tuple[str, bool]:
    """Create ``path`` holding a new token: written and synced under a temporary name, then
    linked into place (never overwriting a token another process made meanwhile)."""
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(token.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        _fsync_dir(path.parent)
        return token, True
    except FileExistsError:
        return read_token_file(path), False
    except OSError as e:
        raise ConfigError(f"cannot write the API token file {path} ({e.strerror}); free space or fix the "
                          "folder's permissions, or set MODELCD_TOKEN", field="token") from e
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_token(settings: Settings) -> tuple[str, bool]:
    """Return (token, created_now). Creates the token file with mode 0600 when missing;
    ConfigError for an empty ``MODELCD_TOKEN`` or an empty, blank or unreadable file."""
    if settings.token is not None:
        return _from_env(settings.token), False
    path = token_path(settings)
    if path.exists():
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)  # one written by an older version or by hand
        return read_token_file(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_new_token(path)


def find_token(settings: Settings) -> str | None:
    """The token a client should send, without creating one (ConfigError as ``ensure_token``)."""
    if settings.token is not None:
        return _from_env(settings.token)
    path = token_path(settings)
    return read_token_file(path) if path.exists() else None


def bearer(header: str | None) -> str | None:
    """What follows the exact ``Bearer `` prefix of an Authorization header, untouched."""
    if not header or not header.startswith(BEARER):
        return None
    return header[len(BEARER):]


def token_matches(expected: str, header: str | None) -> bool:
    """Constant-time, exact comparison of an ``Authorization: Bearer <token>`` header's bytes
    with the token (no stripping: a header with anything around the token does not match)."""
    given = bearer(header)
    if given is None or not expected:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))
