"""Canary releases on a real service: traffic moves through the policy's steps while a bounded
client scores through the endpoint; a new version that fails real traffic during a step is
rolled back with production on the old version."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import Hammer, Service, Watcher, custom_model, iris_model, running_service, wait_until

POLICY = """\
name: canary
match:
  models: ["cn-*"]
environments:
  - name: production
    strategy: canary
    steps: [30, 100]
    step_hold_s: 3
    max_error_rate: 0
    max_p95_ms: 5000
smoke:
  requests: 3
"""

# scores every request, but fails those whose first value is 9 (smoke's sample is [1.0, 2.0])
FAILS_ON_NINE = """\
def init():
    pass

def run(raw_data):
    import json
    rows = json.loads(raw_data)["data"]
    if rows[0][0] == 9.0:
        raise ValueError("cannot score 9")
    return [sum(r) for r in rows]
"""
SCORES = FAILS_ON_NINE.replace('if rows[0][0] == 9.0:\n        raise ValueError("cannot score 9")\n    ', "")


@pytest.fixture(scope="module")
def canary_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("canary-svc"), POLICY) as svc:
        yield svc


class TrafficWatch(Watcher):
    """Records every distinct traffic split the endpoint reports while a release runs."""

    def __init__(self, svc: Service, name: str) -> None:
        super().__init__()
        self.svc, self.name = svc, name
        self.seen: list[dict[str, int]] = []

    def sample(self) -> None:
        traffic = self.svc.endpoint(self.name).get("traffic")
        if traffic and (not self.seen or self.seen[-1] != traffic):
            self.seen.append(traffic)


def test_canary_moves_traffic_through_its_steps_without_failing_a_request(
        canary_service: Service, tmp_path: Path) -> None:
    svc = canary_service
    meta = iris_model(tmp_path / "v1")
    svc.register("cn-iris", tmp_path / "v1", meta)
    first = svc.wait_release_for("cn-iris", 1)
    assert first["phase"] == "succeeded", svc.job_log(first["id"])
    assert "nothing served before, so all traffic moves at once" in svc.job_log(first["id"])

    meta2 = iris_model(tmp_path / "v2", c=0.05)
    ep = svc.endpoint("cn-iris")
    with Hammer(ep["scoring_uri"], meta["sample"], headers=svc.auth(ep), threads=4) as hammer, \
            TrafficWatch(svc, "cn-iris") as watch:
        svc.register("cn-iris", tmp_path / "v2", meta2)
        rel = svc.wait_release_for("cn-iris", 2)
        time.sleep(0.3)
    log = svc.job_log(rel["id"])
    assert rel["phase"] == "succeeded", log
    assert hammer.failures == [], hammer.failures[:5]
    assert watch.seen[0] == {"1": 100} and watch.seen[-1] == {"2": 100}
    assert {"1": 70, "2": 30} in watch.seen, watch.seen  # the 30% step held
    assert hammer.versions.get("1", 0) > 0 and hammer.versions.get("2", 0) > 0, hammer.versions
    assert "canary step 1/2: 30% of traffic to v2 for 3s (max_error_rate 0.0%, max_p95_ms 5000)" in log
    assert re.search(r"step held 3s: \d+ scoring requests, 0 failed, p95 \d+\.\d ms", log), log
    events = [e["kind"] for e in svc.release_detail(rel["id"])["events"]]
    assert "canary.step" in events


def test_canary_that_fails_real_traffic_is_rolled_back(canary_service: Service, tmp_path: Path) -> None:
    svc = canary_service
    svc.register("cn-custom", tmp_path / "v1", custom_model(tmp_path / "v1", SCORES))
    first = svc.wait_release_for("cn-custom", 1)
    assert first["phase"] == "succeeded", svc.job_log(first["id"])

    ep = svc.endpoint("cn-custom")
    bad = custom_model(tmp_path / "v2", FAILS_ON_NINE)  # passes smoke (its sample has no 9)
    with Hammer(ep["scoring_uri"], {"data": [[9.0, 1.0]]}, headers=svc.auth(ep), threads=2) as hammer, \
            TrafficWatch(svc, "cn-custom") as watch:
        svc.register("cn-custom", tmp_path / "v2", bad)
        rel = svc.wait_release_for("cn-custom", 2)
        failures_at_end = len(hammer.failures)
        time.sleep(1.0)
    log = svc.job_log(rel["id"])
    assert rel["phase"] == "failed", log
    assert "canary:" in rel["error"] and "over max_error_rate 0.0%" in rel["error"], rel["error"]
    assert {"1": 70, "2": 30} in watch.seen and watch.seen[-1] == {"1": 100}, watch.seen
    assert svc.endpoint("cn-custom")["traffic"] == {"1": 100}
    # only the canary's share failed, and nothing after the rollback
    assert hammer.failures and all(f.startswith("500") for f in hammer.failures), hammer.failures[:3]
    assert len(hammer.failures) == failures_at_end and hammer.ok > len(hammer.failures)
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json={"data": [[9.0, 1.0]]}, timeout=10)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "1"
    live = svc.api("GET", "/deployments", params={"model": "cn-custom", "live": "1"}).json()["deployments"]
    assert [d["version"] for d in live] == [1]  # the canary's deployment is stopped


def test_a_person_stops_a_canary_during_a_step(canary_service: Service, tmp_path: Path) -> None:
    svc = canary_service
    svc.register("cn-stop", tmp_path / "v1", iris_model(tmp_path / "v1"))
    assert svc.wait_release_for("cn-stop", 1)["phase"] == "succeeded"
    v2 = svc.register("cn-stop", tmp_path / "v2", iris_model(tmp_path / "v2", c=0.05))
    rel = svc.client.find_release("cn-stop", v2["version"])
    assert rel is not None
    wait_until(lambda: svc.endpoint("cn-stop")["traffic"] == {"1": 70, "2": 30}, 120, 0.05)
    r = svc.api("POST", f"/releases/{rel['id']}/stop")
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    done = svc.client.wait_release(rel["id"], timeout_s=60)
    assert done["phase"] == "cancelled", done
    assert svc.endpoint("cn-stop")["traffic"] == {"1": 100}
    assert "stopped by a person during a canary step" in svc.job_log(rel["id"])
