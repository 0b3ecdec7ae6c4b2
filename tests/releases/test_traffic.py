"""Endpoint traffic against a real SQLite store and the real router process: a change is
applied and read back before it is committed, or it is not committed and the router keeps
serving what it served; retention never stops what a rollback returns to; keys reach the
router as digests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from modelcd.domain import DeploymentState
from modelcd.errors import RouterError
from modelcd.releases.deployments import Deployments
from modelcd.releases.endpoint_keys import create_missing_keys
from modelcd.releases.traffic import Traffic
from modelcd.routing.builtin import BuiltinRouter
from modelcd.store.db import Database
from modelcd.targets.process import ProcessTarget, free_port
from tests.routing.conftest import EchoBackend


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Traffic, Deployments, BuiltinRouter, list[str]]]:
    db = Database(f"sqlite:///{tmp_path / 't.db'}")
    deployments = Deployments(db)
    router = BuiltinRouter(tmp_path / "home", "127.0.0.1", free_port())
    router.ensure_running()
    backends = [EchoBackend(f"b{i}") for i in range(3)]
    ids = []
    for i, b in enumerate(backends):
        d = deployments.create(model="iris", version=i + 1, environment="production", target="process",
                               release_id=None, spec={"bundle": str(tmp_path / f"bundle{i}")})
        deployments.update(d.id, state=DeploymentState.READY, url=b.url)
        ids.append(d.id)
    try:
        yield Traffic(db, router, deployments), deployments, router, ids
    finally:
        router.stop()
        for b in backends:
            b.close()
        db.dispose()


def _live_split(router: BuiltinRouter) -> dict[str, int]:
    return {b.id: b.weight for b in router.read().endpoints["iris/production"].backends if b.weight > 0}


def test_a_switch_is_applied_read_back_and_recorded(world: Any) -> None:
    traffic, _, router, (d1, d2, _) = world
    traffic.switch("iris", "production", {d1: 100}, previous=None, auth="none")
    traffic.switch("iris", "production", {d2: 100}, previous={d1: 100}, auth="none")
    ep = traffic.get("iris", "production")
    assert ep.traffic == {d2: 100} and ep.previous_traffic == {d1: 100}
    assert _live_split(router) == {d2: 100}
    traffic.switch("iris", "production", {d1: 100})  # a person's rollback: the split being left is the previous
    assert traffic.get("iris", "production").previous_traffic == {d2: 100}


def test_a_switch_the_router_cannot_take_is_not_recorded(world: Any) -> None:
    traffic, _, router, (d1, d2, _) = world
    traffic.switch("iris", "production", {d1: 100}, previous=None, auth="none")
    router.stop()
    with pytest.raises(RouterError, match="traffic of iris/production unchanged"):
        traffic.switch("iris", "production", {d2: 100})
    assert traffic.get("iris", "production").traffic == {d1: 100}


def test_a_commit_that_fails_after_the_router_took_the_table_puts_the_old_table_back(world: Any) -> None:
    traffic, _, router, (d1, d2, _) = world
    traffic.switch("iris", "production", {d1: 100}, previous=None, auth="none")
    commits = {"seen": 0}

    def disk_full(conn: Any) -> None:  # the generation's commit goes through, the switch's does not
        commits["seen"] += 1
        if commits["seen"] == 2:
            raise OperationalError("COMMIT", {}, Exception("database or disk is full"))

    event.listen(traffic.db.engine, "commit", disk_full)
    try:
        with pytest.raises(RouterError, match="unchanged.*disk is full"):
            traffic.switch("iris", "production", {d2: 100})
    finally:
        event.remove(traffic.db.engine, "commit", disk_full)
    assert traffic.get("iris", "production").traffic == {d1: 100}
    assert _live_split(router) == {d1: 100}  # the router serves the stored split again
    traffic.switch("iris", "production", {d2: 100})  # and the next change goes through
    assert _live_split(router) == {d2: 100}


def test_retention_keeps_what_current_and_previous_traffic_name(world: Any, tmp_path: Path) -> None:
    traffic, deployments, _, (d1, d2, d3) = world
    traffic.switch("iris", "production", {d1: 100}, previous=None, auth="none")
    traffic.switch("iris", "production", {d2: 100}, previous={d1: 100})
    traffic.switch("iris", "production", {d1: 100})  # rolled back: d2 standby, the newer one
    traffic.switch("iris", "production", {d3: 100}, previous={d1: 100})  # a release that found d1 serving
    retired = traffic.retire("iris", "production", 2, ProcessTarget(tmp_path / "home"), tmp_path / "home")
    assert [d.id for d in retired] == [d2]
    assert deployments.get(d1).state is DeploymentState.STANDBY
    assert deployments.get(d2).state is DeploymentState.STOPPED


def test_keys_reach_the_router_as_digests(world: Any) -> None:
    traffic, _, router, (d1, _, _) = world
    traffic.switch("iris", "production", {d1: 100}, previous=None, auth="key")
    assert router.read().endpoints["iris/production"].key_hashes == ()  # keyed, no keys yet: refuses all
    keys, _ = traffic.change("keys", lambda conn: create_missing_keys(conn, "iris", "production"))
    route = router.read().endpoints["iris/production"]
    assert route.auth == "key"
    assert set(route.key_hashes) == {hashlib.sha256(k.encode()).hexdigest() for k in keys.values()}
