"""Endpoint keys: each endpoint with ``auth: key`` has a primary and a secondary key, as
Azure ML's online endpoints do. Only their sha256 digests are stored; the router checks a
request's ``Authorization: Bearer <key>`` against them. A key is shown once: when the
endpoint's keys are created (the first time an admin asks for them) and when one is
regenerated, which leaves the other working so clients can move over without a failure."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, select

from modelcd.errors import InvalidInput
from modelcd.store import schema
from modelcd.store.db import now

SLOTS = ("primary", "secondary")


def key_hash(key: str) -> str:
    """What the store and the router keep of a key: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return secrets.token_urlsafe(32)


def key_hashes(conn: Connection) -> dict[tuple[str, str], tuple[str, ...]]:
    """(model, environment) → digests of its keys, primary first (for the routing table)."""
    out: dict[tuple[str, str], list[str]] = {}
    for row in conn.execute(select(schema.endpoint_keys).order_by(schema.endpoint_keys.c.slot)):
        m = row._mapping
        out.setdefault((m["model"], m["environment"]), []).append(m["key_hash"])
    return {k: tuple(v) for k, v in out.items()}


@dataclass(frozen=True)
class KeysShown:
    """The answer to a request for an endpoint's keys: the keys made just now (shown this
    once), and which slots exist."""

    model: str
    environment: str
    auth: str  # key | none: whether the router asks for them now
    shown: dict[str, str]  # slot → key, only for keys created by this call
    slots: dict[str, str]  # slot → created_at, every key the endpoint has

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {slot: self.shown.get(slot) for slot in SLOTS}
        out.update(model=self.model, environment=self.environment, auth=self.auth, created=dict(self.slots))
        if not self.shown:
            out["note"] = ("keys are stored hashed and were shown when they were created; make a new one with "
                           "--regenerate primary|secondary (the other keeps working meanwhile)")
        return out


def key_slots(conn: Connection, model: str, environment: str) -> dict[str, str]:
    """slot → created_at of every key the endpoint has."""
    t = schema.endpoint_keys
    return {r.slot: r.created_at for r in conn.execute(
        select(t.c.slot, t.c.created_at).where(t.c.model == model, t.c.environment == environment))}


def create_missing_keys(conn: Connection, model: str, environment: str) -> dict[str, str]:
    """Give the endpoint the keys it lacks; return them (slot → key), to be shown this once."""
    have = key_slots(conn, model, environment)
    return {slot: _put(conn, model, environment, slot) for slot in SLOTS if slot not in have}


def regenerate_key(conn: Connection, model: str, environment: str, slot: str) -> dict[str, str]:
    """Replace one key (the other keeps working); return the new one (and any missing one)."""
    if slot not in SLOTS:
        raise InvalidInput(f"regenerate must be primary or secondary (got {slot!r})", field="regenerate")
    return {slot: _put(conn, model, environment, slot), **{
        s: k for s, k in create_missing_keys(conn, model, environment).items() if s != slot}}


def _put(conn: Connection, model: str, environment: str, slot: str) -> str:
    t = schema.endpoint_keys
    key = new_key()
    conn.execute(delete(t).where(t.c.model == model, t.c.environment == environment, t.c.slot == slot))
    conn.execute(t.insert().values(model=model, environment=environment, slot=slot, key_hash=key_hash(key),
                                   created_at=now()))
    return key
