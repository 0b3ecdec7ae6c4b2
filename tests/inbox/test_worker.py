"""The inbox worker as the real process `modelcd serve` starts (``python -m modelcd.worker
--channel``) on a real SQLite home: it processes stored deliveries when woken, reports outbox
work, exits when its service goes (end of its stdin), never works a home beside another
worker (the second one waits for the first to end, however it ends), and a worker killed with
``kill -9`` in the middle of a run of deliveries leaves them all to be processed once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from modelcd.config import Settings, load_settings, save_home_settings
from modelcd.context import Context, build_context
from modelcd.sources.connect import reload_sources
from modelcd.store import schema
from modelcd.store.db import now
from modelcd.worker import LOCK_NAME, SettingsFile
from tests.conftest import free_port, wait_until


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    return {**base, "MODELCD_HOME": str(home), "MODELCD_TOKEN": "worker-test-token-0123456789",
            "MODELCD_ROUTER_PORT": str(free_port())}


@pytest.fixture
def ctx(env: dict[str, str]) -> Iterator[Context]:
    settings: Settings = load_settings(environ=env)
    c = build_context(settings)
    yield c
    c.db.dispose()


def _store(ctx: Context, i: int) -> None:
    body = json.dumps({"model": "w", "version": str(i), "artifact_uri": None, "external_ref": f"w:{i}"}).encode()
    assert ctx.inbox.accept("generic", f"w-{i}", {"content-type": "application/json"}, body)


def _worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "modelcd.worker", "--channel"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wake(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"w")
    proc.stdin.flush()


def _done(ctx: Context) -> int:
    return len(ctx.inbox.list(state="done"))


def test_worker_processes_when_woken_reports_outbox_work_and_exits_with_its_service(
        ctx: Context, env: dict[str, str]) -> None:
    proc = _worker(env)
    try:
        for i in range(5):
            _store(ctx, i)
        _wake(proc)
        wait_until(lambda: _done(ctx) == 5, timeout_s=30, poll_s=0.05)
        assert sorted(v.external_ref for v in ctx.registry.list_versions("w")) == [f"w:{i}" for i in range(5)]
        with ctx.db.write() as conn:  # an event for the dispatcher (referenced versions ask for no release)
            event_id = conn.execute(schema.outbox.insert().values(kind="probe", payload={}, created_at=now())
                                    ).inserted_primary_key[0]
        _wake(proc)
        assert proc.stdout is not None and proc.stdout.read1(100)  # notices: the outbox was dispatched
        with ctx.db.read() as conn:
            note = conn.execute(select(schema.outbox.c.error).where(schema.outbox.c.id == event_id)).scalar()
        assert note == "ignored: unknown event kind probe"
        assert proc.stdin is not None
        proc.stdin.close()  # the service went away
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_second_worker_waits_for_the_first_however_it_ends(ctx: Context, env: dict[str, str]) -> None:
    first = _worker(env)
    second = None
    try:
        _store(ctx, 0)
        _wake(first)
        wait_until(lambda: _done(ctx) == 1, timeout_s=30, poll_s=0.05)
        second = _worker(env)
        assert second.stderr is not None
        assert b"another inbox worker holds" in second.stderr.readline()
        first.send_signal(signal.SIGSTOP)  # frozen with the lock: only the waiting worker could act
        _store(ctx, 1)
        _wake(second)
        time.sleep(1.0)
        assert _done(ctx) == 1  # and it does not
        first.send_signal(signal.SIGKILL)  # a kill -9 frees the lock too
        first.wait(timeout=10)
        wait_until(lambda: _done(ctx) == 2, timeout_s=30, poll_s=0.05)
        assert len(ctx.registry.list_versions("w")) == 2
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
                p.wait()
    assert (ctx.home / LOCK_NAME).exists()


# Drains the inbox as the worker does, but SIGKILLs itself in the middle of the first run of
# deliveries: after their versions and outbox events are written, before the outcomes and commit.
DIE_MID_RUN = """
import os, signal
from modelcd.config import load_settings
from modelcd.context import build_context
from modelcd.inbox import batch
from modelcd.inbox.processor import process_due

real = batch.record_versions

def record_then_die(conn, rows, release):
    real(conn, rows, release)
    print(len(rows), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

batch.record_versions = record_then_die
ctx = build_context(load_settings())
process_due(ctx, ctx.inbox)
"""


def test_a_worker_killed_in_the_middle_of_a_run_leaves_every_delivery_to_be_processed_once(
        ctx: Context, env: dict[str, str]) -> None:
    for i in range(30):
        _store(ctx, i)
    killed = subprocess.run([sys.executable, "-c", DIE_MID_RUN], env=env, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.strip() == b"30", killed.stderr
    assert {d.state for d in ctx.inbox.list()} == {"pending"} and ctx.registry.list_models() == []
    proc = _worker(env)
    try:
        _store(ctx, 30)
        _wake(proc)
        wait_until(lambda: _done(ctx) == 31, timeout_s=30, poll_s=0.05)
    finally:
        proc.kill()
        proc.wait()
    assert [(v.version, v.external_ref) for v in ctx.registry.list_versions("w")] == [
        (i + 1, f"w:{i}") for i in range(31)]  # each once, in delivery order
    assert {d.attempts for d in ctx.inbox.list()} == {1}
    with ctx.db.read() as conn:
        events = conn.execute(select(schema.outbox.c.payload, schema.outbox.c.processed_at)).all()
    assert sorted(p["version"] for p, _ in events) == list(range(1, 32))  # one outbox event per version
    assert all(done is not None for _, done in events)  # referenced: recorded without a release


def test_worker_started_for_a_parent_that_is_gone_exits_at_once(env: dict[str, str]) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    r = subprocess.run([sys.executable, "-m", "modelcd.worker", "--channel", "--parent", str(gone.pid)], env=env,
                       input=b"", capture_output=True, timeout=30)
    assert r.returncode == 0 and b"Traceback" not in r.stderr


def test_the_worker_sees_a_tracking_uri_that_sources_connect_saved_meanwhile(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ctx = build_context(load_settings(environ={"MODELCD_HOME": str(home), "MODELCD_ROUTER_PORT": str(free_port())}))
    try:
        saved = SettingsFile(home)
        assert not saved.changed() and ctx.settings.mlflow_tracking_uri is None
        save_home_settings(home, {"mlflow_tracking_uri": "http://127.0.0.1:5999"})
        assert saved.changed()  # what drain() checks on every turn
        reload_sources(ctx)
        assert ctx.settings.mlflow_tracking_uri == "http://127.0.0.1:5999"
        assert not saved.changed()
    finally:
        ctx.db.dispose()

