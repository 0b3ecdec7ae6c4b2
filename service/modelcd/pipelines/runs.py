"""Pipeline runs: what modelcd knows of the external run that drives a release, and the
per-release token that run uses to call back (``modelcd build|…|report`` in the pipeline).

A token is minted when the run is triggered, handed to the CI system once, and stored only as
its sha256; it authorises the stage and report calls of its own release and nothing else, and
stops working once the release is finished.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from modelcd.store import schema
from modelcd.store.db import Database, now

TOKEN_PREFIX = "mcdr_"  # recognisable in a leaked-secret scan


@dataclass(frozen=True)
class PipelineRun:
    release_id: str
    provider: str
    state: str
    run_id: str | None
    url: str | None
    attempts: int
    created_at: str
    triggered_at: str | None
    last_report_at: str | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PipelineRuns:
    def __init__(self, db: Database) -> None:
        self.db = db

    def mint(self, release_id: str, provider: str) -> str:
        """Create the run record of ``release_id`` with a fresh token; return the token.

        Minting again (a trigger that is retried) replaces the token: the old one stops working."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        values = {"provider": provider, "token_hash": _hash(token), "state": "minted"}
        with self.db.write() as conn:
            found = conn.execute(select(schema.pipeline_runs.c.release_id)
                                 .where(schema.pipeline_runs.c.release_id == release_id)).first()
            if found is None:
                conn.execute(schema.pipeline_runs.insert().values(release_id=release_id, created_at=now(), attempts=0,
                                                                  **values))
            else:
                conn.execute(update(schema.pipeline_runs).where(schema.pipeline_runs.c.release_id == release_id)
                             .values(**values))
        return token

    def get(self, release_id: str) -> PipelineRun | None:
        with self.db.read() as conn:
            row = conn.execute(select(schema.pipeline_runs)
                               .where(schema.pipeline_runs.c.release_id == release_id)).first()
        if row is None:
            return None
        m = dict(row._mapping)
        m.pop("token_hash")
        return PipelineRun(**m)

    def token_valid(self, release_id: str, token: str | None) -> bool:
        """Constant-time check of a per-release token (False once the run is finished)."""
        if not token:
            return False
        with self.db.read() as conn:
            row = conn.execute(select(schema.pipeline_runs.c.token_hash, schema.pipeline_runs.c.state)
                               .where(schema.pipeline_runs.c.release_id == release_id)).first()
        if row is None or row.state == "finished":
            return False
        return hmac.compare_digest(row.token_hash, _hash(token))

    def update(self, release_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(update(schema.pipeline_runs).where(schema.pipeline_runs.c.release_id == release_id)
                         .values(**values))

    def unfinished(self) -> list[str]:
        """Release ids whose run is not marked finished (their token still works)."""
        with self.db.read() as conn:
            rows = conn.execute(select(schema.pipeline_runs.c.release_id)
                                .where(schema.pipeline_runs.c.state != "finished")).all()
        return [r.release_id for r in rows]

    def reported(self, release_id: str) -> None:
        self.update(release_id, last_report_at=now())
