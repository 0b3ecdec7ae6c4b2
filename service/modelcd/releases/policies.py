"""Stored release policies: YAML text per name, validated on the way in."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import delete, select

from modelcd.errors import NotFound
from modelcd.registry.names import validate_model_name
from modelcd.releases.policy import DEFAULT_POLICY, Policy, parse_policy, select_policy
from modelcd.store import schema
from modelcd.store.db import Database, now


@lru_cache(maxsize=256)
def _parsed(name: str, text: str) -> Policy:
    """A stored policy's text parsed once per process (a Policy is frozen): matching a version and
    planning a release read every stored policy."""
    return parse_policy(text, f"policy {name}")


class Policies:
    """CRUD for release policies plus matching a version to one."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, text: str, source: str = "<policy>") -> tuple[Policy, int]:
        """Validate ``text`` and store it under the policy's own name; returns (policy, revision)."""
        policy = parse_policy(text, source)
        with self.db.write() as conn:
            row = conn.execute(select(schema.policies.c.revision)
                               .where(schema.policies.c.name == policy.name)).first()
            if row is None:
                revision = 1
                conn.execute(schema.policies.insert().values(name=policy.name, revision=1, text=text,
                                                             updated_at=now()))
            else:
                revision = int(row[0]) + 1
                conn.execute(schema.policies.update().where(schema.policies.c.name == policy.name)
                             .values(revision=revision, text=text, updated_at=now()))
        return policy, revision

    def get(self, name: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute(select(schema.policies).where(schema.policies.c.name == name)).first()
        if row is None:
            if name == DEFAULT_POLICY.name:
                return {"name": name, "revision": 0, "text": "", "builtin": True, "policy": DEFAULT_POLICY.to_dict()}
            raise NotFound(f"policy {name!r} not found; list them with `modelcd policies list`", field="name")
        m = dict(row._mapping)
        m["policy"] = _parsed(name, m["text"]).to_dict()
        return m

    def delete(self, name: str) -> None:
        validate_model_name(name, field="name")
        with self.db.write() as conn:
            if conn.execute(delete(schema.policies).where(schema.policies.c.name == name)).rowcount == 0:
                raise NotFound(f"policy {name!r} not found", field="name")

    def all(self) -> list[Policy]:
        with self.db.read() as conn:
            rows = conn.execute(select(schema.policies.c.name, schema.policies.c.text)).all()
        return [_parsed(name, text) for name, text in rows]

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(schema.policies.c.name, schema.policies.c.revision, schema.policies.c.updated_at)
                .order_by(schema.policies.c.name))]

    def select(self, model: str, tags: dict[str, str], source: str) -> Policy:
        return select_policy(self.all(), model, tags, source)
