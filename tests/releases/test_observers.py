"""Every phase a release enters is an outbox event, committed with the move, and the
dispatcher hands each to the observers in order; a failing observer is noted on the event
and does not stop the others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.releases import observers
from modelcd.releases.dispatcher import dispatch_outbox
from modelcd.releases.machine import Phase
from modelcd.releases.observers import ReleaseMoved
from modelcd.releases.policy import DEFAULT_POLICY
from modelcd.store import schema
from modelcd.targets.process import free_port

SEEN: list[ReleaseMoved] = []


def record(ctx: Context, moved: ReleaseMoved) -> None:
    SEEN.append(moved)


def explode(ctx: Context, moved: ReleaseMoved) -> None:
    raise RuntimeError("registry down")


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    SEEN.clear()
    monkeypatch.setattr(observers, "OBSERVERS", [f"{__name__}:explode", f"{__name__}:record"])
    c = build_context(load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"),
                                             "MODELCD_ROUTER_PORT": str(free_port())}))
    yield c
    c.db.dispose()


def test_each_phase_reaches_the_observers_in_order(ctx: Context) -> None:
    with ctx.db.write() as conn:
        rid = ctx.releases.create_in(conn, model="iris", version=3, environment="production", policy=DEFAULT_POLICY,
                                     env_index=0, trigger="auto")
    assert ctx.releases.claim(rid)
    ctx.releases.advance(rid, Phase.DEPLOYING, "built", bundle="/b")
    ctx.releases.advance(rid, Phase.ROLLING_BACK, "deploy failed", error="deploy failed: no port")
    ctx.releases.advance(rid, Phase.FAILED, "rolled back")
    dispatch_outbox(ctx)
    assert [(m.phase, m.version, m.runner) for m in SEEN] == [
        ("building", 3, "local"), ("deploying", 3, "local"), ("rolling_back", 3, "local"), ("failed", 3, "local")]
    assert SEEN[-1].error == "deploy failed: no port"
    with ctx.db.read() as conn:
        notes = [r.error for r in conn.execute(select(schema.outbox).where(schema.outbox.c.kind == "release.phase"))]
    assert len(notes) == 4 and all("explode: RuntimeError: registry down" in n for n in notes)
    assert dispatch_outbox(ctx) == 0  # each event is handled once
