"""Named users and their API tokens, and the principal a bearer token acts as.

A user has a name and one role (``access.ROLES``) and any number of API tokens. A token is
shown once, when it is made; the store keeps its SHA-256 (a token holds 256 random bits, so
an unsalted hash is as good as the token is hard to guess) and its first characters, to
recognise it in a list. ``principal_for`` resolves a token on every request straight from the
store, so a revoked token or a removed user is refused at once.

The service's API token (``auth``) is not stored here: it is the first admin."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from modelcd.access import FIRST_ADMIN, ROLES, Principal, Role, validate_role, validate_user_name
from modelcd.errors import Conflict, InvalidInput, NotFound
from modelcd.store import schema
from modelcd.store.db import Database, new_id, now

if TYPE_CHECKING:
    from modelcd.context import Context

TOKEN_PREFIX = "mcd_"  # every user token starts so (a secret scanner can recognise it)
SHOWN_CHARS = 8  # how much of a token a list shows: the fixed prefix and 4 random characters
LABEL_MAX = 64
LAST_USED_EVERY = timedelta(seconds=60)  # last_used_at is written at most this often per token


def _label(label: object) -> str:
    if label is None:
        return ""
    if not isinstance(label, str) or len(label) > LABEL_MAX or not all(c.isprintable() for c in label):
        raise InvalidInput(f"name: a token's label is up to {LABEL_MAX} printable characters, e.g. 'laptop'",
                           field="name")
    return label


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    created_at: str
    disabled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: never the token, only its first characters."""

    id: str
    user: str
    name: str
    prefix: str
    created_at: str
    last_used_at: str | None
    revoked_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class NewToken:
    """A token just made: ``token`` is shown this once and kept nowhere."""

    info: TokenInfo
    token: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.info.to_dict(), "token": self.token}


def _user(row: Any) -> User:
    m = row._mapping
    return User(name=m["name"], role=m["role"], created_at=m["created_at"], disabled=bool(m["disabled"]))


def _token_info(row: Any) -> TokenInfo:
    m = row._mapping
    return TokenInfo(id=m["id"], user=m["user"], name=m["name"], prefix=m["prefix"], created_at=m["created_at"],
                     last_used_at=m["last_used_at"], revoked_at=m["revoked_at"])


class Users:
    """The users and tokens in the store; ``api_token`` is the service's own (the first admin)."""

    def __init__(self, db: Database, api_token: str | None = None) -> None:
        self.db = db
        self.api_token = api_token

    # users
    def add(self, name: str, role: str) -> User:
        name, role = validate_user_name(name), validate_role(role)
        with self.db.write() as conn:
            if conn.execute(select(schema.users.c.name).where(schema.users.c.name == name)).first():
                raise Conflict(f"user {name!r} already exists; change their role with "
                               f"`modelcd users set-role {name} ROLE`", field="name")
            conn.execute(schema.users.insert().values(name=name, role=role, created_at=now(), disabled=False))
        return self.get(name)

    def get(self, name: str) -> User:
        with self.db.read() as conn:
            row = conn.execute(select(schema.users).where(schema.users.c.name == name)).first()
        if row is None:
            raise NotFound(f"user {name[:80]!r} not found; list them with `modelcd users list`", field="name")
        return _user(row)

    def list(self) -> list[User]:
        with self.db.read() as conn:
            return [_user(r) for r in conn.execute(select(schema.users).order_by(schema.users.c.name))]

    def set_role(self, name: str, role: str) -> User:
        role = validate_role(role)
        self.get(name)
        with self.db.write() as conn:
            conn.execute(update(schema.users).where(schema.users.c.name == name).values(role=role))
        return self.get(name)

    def set_disabled(self, name: str, disabled: bool) -> User:
        """Refuse (or accept again) every token of the user, keeping them."""
        self.get(name)
        with self.db.write() as conn:
            conn.execute(update(schema.users).where(schema.users.c.name == name).values(disabled=disabled))
        return self.get(name)

    def remove(self, name: str) -> list[str]:
        """Delete the user and revoke their tokens (kept, revoked, for the record); the ids revoked."""
        self.get(name)
        ts = now()
        t = schema.api_tokens
        with self.db.write() as conn:
            ids = [r[0] for r in conn.execute(select(t.c.id).where(t.c.user == name, t.c.revoked_at.is_(None)))]
            conn.execute(update(t).where(t.c.user == name, t.c.revoked_at.is_(None)).values(revoked_at=ts))
            conn.execute(schema.users.delete().where(schema.users.c.name == name))
        return ids

    # tokens
    def create_token(self, user: str, label: str | None = None) -> NewToken:
        """A new token of ``user``: the plaintext is in the result and nowhere else."""
        label = _label(label)
        if self.get(user).disabled:
            raise Conflict(f"user {user!r} is disabled; enable them before making a token", field="user")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = new_id("t")
        with self.db.write() as conn:
            conn.execute(schema.api_tokens.insert().values(
                id=token_id, user=user, name=label, token_hash=token_hash(token), prefix=token[:SHOWN_CHARS],
                created_at=now()))
        return NewToken(self.get_token(token_id), token)

    def get_token(self, token_id: str) -> TokenInfo:
        with self.db.read() as conn:
            row = conn.execute(select(schema.api_tokens).where(schema.api_tokens.c.id == token_id)).first()
        if row is None:
            raise NotFound(f"token {token_id[:40]!r} not found; list them with `modelcd tokens list`", field="id")
        return _token_info(row)

    def list_tokens(self, user: str | None = None) -> list[TokenInfo]:
        t = schema.api_tokens
        q = select(t).order_by(t.c.created_at, t.c.id)
        if user is not None:
            q = q.where(t.c.user == user)
        with self.db.read() as conn:
            return [_token_info(r) for r in conn.execute(q)]

    def revoke_token(self, token_id: str) -> TokenInfo:
        """Refuse the token from now on (idempotent: revoking a revoked token keeps its time)."""
        self.get_token(token_id)
        t = schema.api_tokens
        with self.db.write() as conn:
            conn.execute(update(t).where(t.c.id == token_id, t.c.revoked_at.is_(None)).values(revoked_at=now()))
        return self.get_token(token_id)

    # resolving a bearer token
    def principal(self, token: str | None) -> Principal | None:
        """Who ``token`` acts as: the API token is the first admin; a live token of an enabled
        user is that user with their current role; anything else None."""
        if not token:
            return None
        if self.api_token and hmac.compare_digest(self.api_token.encode(), token.encode("utf-8", "surrogatepass")):
            return FIRST_ADMIN
        if not token.startswith(TOKEN_PREFIX):
            return None
        digest = token_hash(token)
        t, u = schema.api_tokens, schema.users
        q = (select(t.c.id, t.c.token_hash, t.c.revoked_at, t.c.last_used_at, u.c.name, u.c.role, u.c.disabled)
             .join(u, u.c.name == t.c.user).where(t.c.token_hash == digest))
        with self.db.read() as conn:
            row = conn.execute(q).first()
        if row is None:
            return None
        m = row._mapping
        if not hmac.compare_digest(m["token_hash"], digest) or m["revoked_at"] or m["disabled"]:
            return None
        if m["role"] not in ROLES:
            return None
        self._touch(m["id"], m["last_used_at"])
        return Principal(m["name"], m["role"], m["id"])

    def _touch(self, token_id: str, last_used_at: str | None) -> None:
        ts = now()
        if last_used_at and datetime.fromisoformat(ts) - datetime.fromisoformat(last_used_at) < LAST_USED_EVERY:
            return
        with self.db.write() as conn:
            conn.execute(update(schema.api_tokens).where(schema.api_tokens.c.id == token_id).values(last_used_at=ts))


def principal_for(ctx: Context, token: str | None) -> Principal | None:
    """The principal a bearer token acts as (None: no token, or not a live one)."""
    return ctx.users.principal(token)
