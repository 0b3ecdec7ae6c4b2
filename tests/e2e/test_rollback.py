"""Rollback means "what served before this release began", for blue-green and canary, on a
real service: the pre-release split is recorded once, the deployments it names stay warm
until a later release supersedes them, rolling back twice returns, and a rollback with
nothing to return to is refused instead of re-releasing the live version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Service, Watcher, iris_model, running_service

CANARY = """\
name: rb-canary
match:
  models: ["rbc-*"]
environments:
  - name: production
    strategy: canary
    steps: [50, 100]
    step_hold_s: 1
    max_error_rate: 0
smoke:
  requests: 2
"""

BLUE_GREEN = """\
name: rb-blue-green
match:
  models: ["rbg-*"]
environments:
  - name: production
retention:
  keep_deployments: 2
smoke:
  requests: 2
"""


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("rollback-svc"), CANARY) as service:
        service.apply_policy(BLUE_GREEN)
        yield service


def _deployments(svc: Service, name: str, live: bool = True) -> list[dict[str, Any]]:
    params = {"model": name, "live": "1"} if live else {"model": name}
    return svc.api("GET", "/deployments", params=params).json()["deployments"]


def _release(svc: Service, name: str, folder: Path, c: float) -> dict[str, Any]:
    meta = iris_model(folder, c=c)
    v = svc.register(name, folder, meta)
    rel = svc.wait_release_for(name, v["version"])
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    return meta


def _served_by(svc: Service, name: str, sample: dict[str, Any]) -> str:
    ep = svc.endpoint(name)
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=sample, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["X-Modelcd-Version"]


class StateWatch(Watcher):
    """Records every state one deployment had while a release runs."""

    every_s = 0.05

    def __init__(self, svc: Service, name: str, dep_id: str) -> None:
        super().__init__()
        self.svc, self.name, self.dep_id = svc, name, dep_id
        self.states: set[str] = set()

    def sample(self) -> None:
        self.states |= {d["state"] for d in _deployments(self.svc, self.name, live=False) if d["id"] == self.dep_id}


def test_rollback_after_a_canary_restores_the_split_from_before_it(svc: Service, tmp_path: Path) -> None:
    meta = _release(svc, "rbc-iris", tmp_path / "v1", c=1.0)
    [v1] = _deployments(svc, "rbc-iris")
    with StateWatch(svc, "rbc-iris", v1["id"]) as watch:
        _release(svc, "rbc-iris", tmp_path / "v2", c=0.05)
        rolled = svc.api("POST", "/endpoints/rbc-iris/production/rollback")
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["release_id"] is None and rolled.json()["traffic"] == {"1": 100}
    assert "stopped" not in watch.states, watch.states  # v1 stayed warm through every canary step
    ep = svc.endpoint("rbc-iris")
    assert ep["traffic"] == {"1": 100} and ep["deployments"] == {v1["id"]: 100}
    assert _served_by(svc, "rbc-iris", meta["sample"]) == "1"
    assert {d["id"]: d["pid"] for d in _deployments(svc, "rbc-iris")}[v1["id"]] == v1["pid"]  # the same process

    again = svc.api("POST", "/endpoints/rbc-iris/production/rollback")  # returns to where we were
    assert again.status_code == 200 and again.json()["traffic"] == {"2": 100}, again.text
    assert _served_by(svc, "rbc-iris", meta["sample"]) == "2"


def test_retention_keeps_what_a_rollback_returns_to(svc: Service, tmp_path: Path) -> None:
    meta = _release(svc, "rbg-iris", tmp_path / "v1", c=1.0)
    [v1] = _deployments(svc, "rbg-iris")
    _release(svc, "rbg-iris", tmp_path / "v2", c=0.05)
    assert svc.api("POST", "/endpoints/rbg-iris/production/rollback").json()["traffic"] == {"1": 100}
    _release(svc, "rbg-iris", tmp_path / "v3", c=0.2)  # before it began, v1 served: v1 must stay warm

    live = {d["version"]: d["id"] for d in _deployments(svc, "rbg-iris")}
    assert live == {1: v1["id"], 3: live[3]}, live  # v2 (rolled back earlier) is the one retired
    rolled = svc.api("POST", "/endpoints/rbg-iris/production/rollback")
    assert rolled.status_code == 200 and rolled.json()["release_id"] is None, rolled.text  # instant, no re-release
    assert svc.endpoint("rbg-iris")["deployments"] == {v1["id"]: 100}
    assert _served_by(svc, "rbg-iris", meta["sample"]) == "1"


def test_rollback_with_nothing_to_return_to_is_refused(svc: Service, tmp_path: Path) -> None:
    _release(svc, "rbg-only", tmp_path / "v1", c=1.0)
    r = svc.api("POST", "/endpoints/rbg-only/production/rollback")
    assert r.status_code == 409, r.text
    assert "nothing to roll back to" in r.json()["message"]
    assert svc.endpoint("rbg-only")["traffic"] == {"1": 100}
    assert [rel["version"] for rel in svc.api("GET", "/releases", params={"model": "rbg-only"}).json()["releases"]] \
        == [1]  # no release of the live version was queued
