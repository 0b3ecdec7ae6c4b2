"""Console sessions: a sign-in makes a row in ``ui_sessions`` keyed by the sha256 of a random id
(the cookie holds the id, the store only its digest, so a copy of the database signs nobody in),
with the principal's name and role, the token it signed in with (by id, never the token), a
CSRF secret and an expiry. Sign-out deletes the row; a revoked token ends its sessions on their
next request (``app.ui.current_principal``)."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from modelcd.access import Principal
from modelcd.store import schema
from modelcd.store.db import Database, now
from modelcd.users import token_hash

SESSION_S = 12 * 3600
COOKIE = "modelcd_session"


API_REF = "api-"  # token_id of a session signed in with the service's API token: "api-" + its digest's start


def api_token_ref(token: str) -> str:
    """What a session signed in with the API token keeps of it: a change of token ends the session."""
    return API_REF + token_hash(token)[:16]


@dataclass(frozen=True)
class Session:
    id_hash: str
    principal: Principal
    token_ref: str | None  # the user token's id, or api_token_ref of the API token
    csrf: str
    flash: str | None
    expires_at: float

    def csrf_ok(self, given: str | None) -> bool:
        given_bytes = (given or "").encode("utf-8", "surrogatepass")
        return bool(given) and hmac.compare_digest(self.csrf.encode(), given_bytes)


class Sessions:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, principal: Principal, token_ref: str, ttl_s: float = SESSION_S) -> str:
        """A new session for ``principal`` signed in with ``token_ref`` (a user token's id or
        ``api_token_ref``); returns the id the cookie carries."""
        session_id = secrets.token_urlsafe(32)
        t = schema.ui_sessions
        with self.db.write() as conn:
            conn.execute(delete(t).where(t.c.expires_at < time.time()))  # sweep the expired
            conn.execute(t.insert().values(id_hash=token_hash(session_id), principal=principal.name,
                                           role=principal.role, token_id=token_ref,
                                           csrf=secrets.token_urlsafe(32), created_at=now(),
                                           expires_at=time.time() + ttl_s))
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        t = schema.ui_sessions
        with self.db.read() as conn:
            row = conn.execute(select(t).where(t.c.id_hash == token_hash(session_id))).first()
        if row is None or row.expires_at < time.time():
            return None
        token_id = None if (row.token_id or "").startswith(API_REF) else row.token_id
        return Session(row.id_hash, Principal(row.principal, row.role, token_id), row.token_id, row.csrf, row.flash,
                       row.expires_at)

    def end(self, session: Session) -> None:
        t = schema.ui_sessions
        with self.db.write() as conn:
            conn.execute(delete(t).where(t.c.id_hash == session.id_hash))

    def set_flash(self, session: Session, message: str | None) -> None:
        t = schema.ui_sessions
        with self.db.write() as conn:
            conn.execute(update(t).where(t.c.id_hash == session.id_hash).values(flash=message))
