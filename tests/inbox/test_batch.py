"""Processing the inbox a run of deliveries at a time, on a real SQLite home: a run with nothing
to fetch is one write transaction; a delivery that cannot be read, or that the database refuses,
fails alone (retried with backoff, then dead-lettered with its error) while the others of its
run are recorded; and the versions of each model are numbered in the order their deliveries
were stored, across runs and around a delivery whose files are fetched from S3 (moto's server)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import Connection, select

from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.inbox.processor import process_due
from modelcd.inbox.store import Delivery
from modelcd.store import schema
from tests.conftest import custom_model, free_port, wait_until

AWS = {"AWS_ACCESS_KEY_ID": "AKIATESTING", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1"}


def _context(home: Path, **env: str) -> Context:
    return build_context(load_settings(environ={"MODELCD_HOME": str(home), "MODELCD_ROUTER_PORT": str(free_port()),
                                                **env}))


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    c = _context(tmp_path / "home", MODELCD_HOOKS_MAX_ATTEMPTS="2")
    yield c
    c.db.dispose()


def _store(ctx: Context, delivery: str, doc: dict[str, Any] | bytes) -> None:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    assert ctx.inbox.accept("generic", delivery, {"content-type": "application/json"}, body)


def _ref(model: str, i: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "version": str(i), "artifact_uri": None, "external_ref": f"{model}:{i}", **extra}


def _by_delivery(ctx: Context) -> dict[str, Delivery]:
    return {d.delivery_id: d for d in ctx.inbox.list(limit=1000)}


def _versions(ctx: Context, model: str) -> list[tuple[int, str | None, str]]:
    return [(v.version, v.external_ref, v.status) for v in ctx.registry.list_versions(model)]


class WriteCounter:
    """Counts the store's write transactions (the real ones, opened through ``Database.write``)."""

    def __init__(self, ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = ctx.db.write

        def counted() -> AbstractContextManager[Connection]:
            self.count += 1
            return real()

        monkeypatch.setattr(ctx.db, "write", counted)


def test_a_run_is_one_transaction_and_unreadable_deliveries_fail_alone(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(40):
        _store(ctx, f"good-{i}", _ref("fraud", i))
        if i == 10:
            _store(ctx, "not-json", b"{not json")
        if i == 20:
            _store(ctx, "bad-name", _ref("Bad Name!", 1))
        if i == 30:
            _store(ctx, "ignored", {**_ref("fraud", 99), "event": "model_version.deleted"})
    _store(ctx, "again", _ref("fraud", 5))  # another delivery of a version recorded in this run
    writes = WriteCounter(ctx, monkeypatch)
    assert process_due(ctx, ctx.inbox) == 44
    assert writes.count == 1  # versions, outbox events, outcomes and dead letters: one commit
    assert _versions(ctx, "fraud") == [(i + 1, f"fraud:{i}", "referenced") for i in range(40)]
    d = _by_delivery(ctx)
    assert all(d[f"good-{i}"].state == "done" and d[f"good-{i}"].result[0]["version"] == i + 1 for i in range(40))
    assert d["again"].state == "done" and d["again"].result[0]["version"] == 6
    assert d["ignored"].state == "ignored" and "model_version.deleted" in d["ignored"].result[0]["ignored"]
    for name, words in (("not-json", "JSON"), ("bad-name", "Bad Name!")):
        assert d[name].state == "dead" and d[name].attempts == 1  # can never succeed: dead at once
        assert words in (d[name].last_error or ""), d[name].last_error
    with ctx.db.read() as conn:
        events = conn.execute(select(schema.outbox.c.payload)).scalars().all()
    assert sorted(e["version"] for e in events) == list(range(1, 41))  # one event per version, none for "again"
    assert process_due(ctx, ctx.inbox) == 0


def test_a_delivery_the_database_refuses_is_retried_with_backoff_then_dead_and_the_others_are_recorded(
        ctx: Context) -> None:
    with ctx.db.write() as conn:  # a real refusal by the database, for one model only
        conn.exec_driver_sql("CREATE TRIGGER poison BEFORE INSERT ON versions WHEN NEW.model = 'poison' "
                             "BEGIN SELECT RAISE(ABORT, 'poisoned version refused'); END")
    for i in range(10):
        _store(ctx, f"good-{i}", _ref("churn", i))
        if i == 4:
            _store(ctx, "poison", _ref("poison", 1))
    assert process_due(ctx, ctx.inbox) == 11
    d = _by_delivery(ctx)
    assert _versions(ctx, "churn") == [(i + 1, f"churn:{i}", "referenced") for i in range(10)]
    assert all(d[f"good-{i}"].state == "done" for i in range(10))
    first = d["poison"]
    assert first.state == "pending" and first.attempts == 1 and "poisoned version refused" in (first.last_error or "")
    assert first.next_attempt_at > time.time() + 0.5  # backoff: 1 s after the first failure
    assert process_due(ctx, ctx.inbox) == 0  # not due yet
    wait_until(lambda: process_due(ctx, ctx.inbox), timeout_s=10, poll_s=0.1)
    second = ctx.inbox.get(first.id)
    assert second.state == "dead" and second.attempts == 2  # MODELCD_HOOKS_MAX_ATTEMPTS=2
    assert "poisoned version refused" in (second.last_error or "")
    with ctx.db.read() as conn:
        assert conn.execute(select(schema.versions.c.model).where(schema.versions.c.model == "poison")).first() is None


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    yield f"http://{host}:{port}"
    server.stop()


def test_versions_of_each_model_keep_the_order_of_their_deliveries_across_runs_and_fetches(
        tmp_path: Path, moto: str) -> None:
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    folder = tmp_path / "model"
    custom_model(folder, "def init():\n    pass\n\ndef run(raw):\n    return raw\n")
    for path in folder.iterdir():
        s3.upload_file(str(path), "models", f"a/7/{path.name}")
    ctx = _context(tmp_path / "home", MODELCD_S3_ENDPOINT_URL=moto)
    try:
        for i in range(25):
            for model in ("a", "b"):
                doc = _ref(model, i)
                if model == "a" and i == 7:  # files to fetch: imported on its own, between two runs
                    doc = {**doc, "artifact_uri": "s3://models/a/7/", "release": False}
                _store(ctx, f"{model}-{i}", doc)
        while process_due(ctx, ctx.inbox, limit=9):  # runs that end mid-model
            pass
        a = _versions(ctx, "a")
        assert [(n, ref) for n, ref, _ in a] == [(i + 1, f"a:{i}") for i in range(25)]
        assert [status for _, _, status in a] == ["referenced"] * 7 + ["ready"] + ["referenced"] * 17
        assert [(n, ref) for n, ref, _ in _versions(ctx, "b")] == [(i + 1, f"b:{i}") for i in range(25)]
        assert {d.state for d in ctx.inbox.list(limit=100)} == {"done"}
    finally:
        ctx.db.dispose()
