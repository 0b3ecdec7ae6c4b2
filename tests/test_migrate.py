"""An older database is brought up to the current tables when the store opens it: a column and
an index added since it was made are added, and its rows stay."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import inspect

from modelcd.store.db import Database


def test_an_older_jobs_table_gets_the_new_columns_and_indexes(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # jobs as it was made before runs_in and the list indexes
        conn.execute("CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, release_id VARCHAR(32), type VARCHAR(16) NOT NULL,"
                     " state VARCHAR(16) NOT NULL, model VARCHAR(64), version INTEGER, environment VARCHAR(32),"
                     " error TEXT, cancel_requested BOOLEAN NOT NULL, created_at VARCHAR(32) NOT NULL,"
                     " started_at VARCHAR(32), finished_at VARCHAR(32))")
        conn.execute("INSERT INTO jobs (id, type, state, cancel_requested, created_at) "
                     "VALUES ('j-1', 'build', 'succeeded', 0, '2026-01-01T00:00:00.000+00:00')")
    db = Database(f"sqlite:///{path}")
    try:
        inspector = inspect(db.engine)
        assert "runs_in" in {c["name"] for c in inspector.get_columns("jobs")}
        indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("jobs")}
        assert indexes["ix_jobs_created"] == ["created_at"]
        assert indexes["ix_jobs_state_created"] == ["state", "created_at"]
        assert indexes["ix_jobs_release"] == ["release_id"]
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT id, state FROM jobs").all() == [("j-1", "succeeded")]
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT id FROM jobs ORDER BY created_at DESC LIMIT 51"))
        assert "ix_jobs_created" in plan and "TEMP B-TREE" not in plan, plan
    finally:
        db.dispose()
    Database(f"sqlite:///{path}").dispose()  # opening it again adds nothing and fails on nothing
