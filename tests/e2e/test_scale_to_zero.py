"""Scale to zero (issue 14): with `idle: {scale_to_zero_after_s: 2}` a deployment with no request
for 2 s is stopped (state kept, route marked sleeping, an event); the router holds the next
requests while a warm start brings it back, and every one of them succeeds; the standby a
rollback needs stays warm (unless `standby: sleep`: then a rollback to it wakes it); a wake that
cannot finish in `wake_timeout_s` answers 503 with Retry-After, as does a control plane that is
down; a restart of the service leaves a sleeping deployment asleep and wakeable. Real service,
real router, real scoring processes forked from their environment's parent."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import Service, custom_model, running_service, wait_until

pytestmark = pytest.mark.slow

POLICY = """\
name: sleepy
match: {models: ["stz-*"]}
environments:
  - name: production
    idle: {scale_to_zero_after_s: 2, wake_timeout_s: 3}
smoke: {requests: 2}
"""
# each row answered with the sum of its values plus a version-specific offset
MODEL = """\
import json

def init():
    pass

def run(raw_data):
    return [sum(r) + {offset} for r in json.loads(raw_data)["data"]]
"""
SLOW_INIT = """\
import time

def init():
    time.sleep(30)

def run(raw_data):
    return []
"""


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("stz-svc"), POLICY) as service:
        yield service


@pytest.fixture(scope="module")
def released(svc: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """stz-sum v1 then v2 released: v2 serves, v1 is the standby a rollback returns to."""
    tmp = tmp_path_factory.mktemp("stz-models")
    for offset in (100, 200):
        folder = tmp / f"v{offset}"
        meta = custom_model(folder, MODEL.replace("{offset}", str(offset)))
        meta["sample"] = {"data": [[1.0, 2.0]]}
        version = svc.register("stz-sum", folder, meta)["version"]
        rel = svc.wait_release_for("stz-sum", version)
        assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    ep = svc.endpoint("stz-sum")
    assert ep["traffic"] == {"2": 100}
    return {"endpoint": ep, "headers": svc.auth(ep), "release": rel}


def _deployments(svc: Service) -> dict[int, dict[str, Any]]:
    deps = svc.api("GET", "/deployments", params={"model": "stz-sum", "live": "true"}).json()["deployments"]
    return {d["version"]: d for d in deps}


def _asleep(svc: Service, version: int = 2) -> dict[str, Any] | None:
    d = _deployments(svc)[version]
    return d if d["sleeping"] else None


def _event(svc: Service, released: dict[str, Any], kind: str, dep_id: str) -> str:
    """The message of the newest ``kind`` event naming ``dep_id`` (waited for)."""
    def find() -> str | None:
        events = svc.release_detail(released["release"]["id"])["events"]
        return next((e["message"] for e in reversed(events) if e["kind"] == kind and dep_id in e["message"]), None)

    return wait_until(find, timeout_s=10)


def _score(uri: str, headers: dict[str, str], value: float) -> requests.Response:
    return requests.post(uri, json={"data": [[value, 1.0]]}, headers=headers, timeout=30)


def _burst(uri: str, headers: dict[str, str], n: int) -> list[requests.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: _score(uri, headers, float(i)), range(n)))


def _sleep_and_check(svc: Service) -> dict[str, Any]:
    """Wait until v2 sleeps (no request for 2 s); its process must be gone."""
    started = time.monotonic()
    asleep = wait_until(lambda: _asleep(svc), timeout_s=30, poll_s=0.2)
    assert asleep["state"] == "serving" and asleep["sleeping"]["wake_timeout_s"] == 3
    assert asleep["pid"] is None
    assert time.monotonic() - started < 15
    wait_until(lambda: _closed(asleep["port"]), timeout_s=15, poll_s=0.05)  # its process stopped
    return asleep


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_idle_deployment_sleeps_and_the_first_requests_wake_it(svc: Service, released: dict[str, Any]) -> None:
    uri, headers = released["endpoint"]["scoring_uri"], released["headers"]
    awake = _deployments(svc)[2]
    pid = awake["pid"]
    assert pid and psutil.pid_exists(pid)
    asleep = _sleep_and_check(svc)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               timeout_s=15)
    _event(svc, released, "deployment.slept", asleep["id"])
    route = requests.get(f"{svc.router_url}/-/table", timeout=5).json()["endpoints"]["stz-sum/production"]
    by_version = {b["version"]: b for b in route["backends"]}
    assert by_version[2]["sleeping"] is True and by_version[2]["weight"] == 100
    # the standby a rollback needs is kept warm (idle.standby defaults to keep)
    standby = _deployments(svc)[1]
    assert standby["state"] == "standby" and not standby["sleeping"] and psutil.pid_exists(standby["pid"])
    assert "sleeping" not in by_version[1]
    listed = subprocess.run([sys.executable, "-m", "modelcd", "deployments", "--model", "stz-sum", "--live"],
                            env=svc.env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert [line for line in listed.splitlines() if asleep["id"] in line and "serving (asleep)" in line], listed

    # 8 concurrent requests while it sleeps: held by the router, all answered by v2
    answers = _burst(uri, headers, 8)
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    assert {r.headers["x-modelcd-version"] for r in answers} == {"2"}
    assert sorted(r.json()[0] for r in answers) == [201.0 + i for i in range(8)]
    # the router forwards once the deployment answers its health check; the service records it awake
    woke = wait_until(lambda: (d := _deployments(svc)[2])["pid"] and not d["sleeping"] and d, timeout_s=10)
    assert woke["pid"] != pid and woke["port"] == awake["port"]
    assert "woke on a request in" in _event(svc, released, "deployment.woke", asleep["id"])
    assert _score(uri, headers, 5.0).json() == [206.0]


def test_a_wake_that_cannot_finish_answers_503_with_retry_after(svc: Service, released: dict[str, Any]) -> None:
    uri, headers = released["endpoint"]["scoring_uri"], released["headers"]
    asleep = _sleep_and_check(svc)
    score = Path(asleep["bundle"]) / "model" / "score.py"
    good = score.read_text()
    score.write_text(SLOW_INIT)  # the model now takes 30 s to load: longer than wake_timeout_s (3)
    try:
        started = time.monotonic()
        answers = _burst(uri, headers, 3)
        took = time.monotonic() - started
    finally:
        score.write_text(good)
    assert [r.status_code for r in answers] == [503] * 3, [r.text for r in answers]
    assert all(int(r.headers["retry-after"]) >= 3 for r in answers)
    assert "did not wake within 3s" in answers[0].json()["message"]
    assert 2.5 < took < 8, took
    assert _asleep(svc) is not None  # still asleep; the next request tries again, and the model loads now
    wait_until(lambda: _score(uri, headers, 1.0).status_code == 200, timeout_s=20, poll_s=0.5)
    assert _score(uri, headers, 1.0).json() == [202.0]
    wait_until(lambda: _asleep(svc) is None, timeout_s=10)  # recorded awake


def test_the_wake_route_needs_the_routers_secret(svc: Service) -> None:
    wake_file = svc.home / "router" / "wake.json"
    assert wake_file.stat().st_mode & 0o777 == 0o600
    doc = json.loads(wake_file.read_text())
    assert doc["url"] == f"{svc.url}/-/wake"
    url = f"{svc.url}/-/wake/d-nothing"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {svc.env['MODELCD_TOKEN']}"}):
        r = requests.post(url, json={"timeout_s": 1}, headers=headers, timeout=10)
        assert r.status_code == 401 and "wake secret" in r.json()["message"], r.text
    secret = {"Authorization": f"Bearer {doc['secret']}"}
    r = requests.post(url, json={"timeout_s": 0}, headers=secret, timeout=10)
    assert r.status_code == 400 and r.json()["field"] == "timeout_s", r.text
    r = requests.post(url, json={"timeout_s": 1}, headers=secret, timeout=10)
    assert r.status_code == 404 and "d-nothing" in r.json()["message"], r.text
    assert doc["secret"] not in (svc.home / "router" / "router.log").read_text()


SLEEPY_STANDBY = """\
name: sleepy-standby
match: {models: ["stzs-*"]}
environments:
  - name: production
    auth: none
    idle: {scale_to_zero_after_s: 2, standby: sleep}
smoke: {requests: 2}
"""


def test_with_standby_sleep_the_standby_sleeps_too_and_a_rollback_wakes_it(
        svc: Service, tmp_path: Path) -> None:
    svc.apply_policy(SLEEPY_STANDBY)
    for offset in (10, 20):
        folder = tmp_path / f"v{offset}"
        version = svc.register("stzs-sum", folder, custom_model(folder, MODEL.replace("{offset}", str(offset))))
        rel = svc.wait_release_for("stzs-sum", version["version"])
        assert rel["phase"] == "succeeded", svc.job_log(rel["id"])

    def both_asleep() -> dict[int, dict[str, Any]] | None:
        deps = svc.api("GET", "/deployments", params={"model": "stzs-sum", "live": "true"}).json()["deployments"]
        by_version = {d["version"]: d for d in deps}
        return by_version if all(d["sleeping"] for d in by_version.values()) else None

    asleep = wait_until(both_asleep, timeout_s=30, poll_s=0.2)
    assert {v: d["state"] for v, d in asleep.items()} == {1: "standby", 2: "serving"}
    wait_until(lambda: _closed(asleep[1]["port"]) and _closed(asleep[2]["port"]), timeout_s=15, poll_s=0.05)
    # a rollback to the sleeping standby is a table change; its first request wakes it
    r = svc.api("POST", "/endpoints/stzs-sum/production/rollback")
    assert r.status_code == 200, r.text
    answers = _burst(svc.endpoint("stzs-sum")["scoring_uri"], {}, 4)
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert {a.headers["x-modelcd-version"] for a in answers} == {"1"}
    assert sorted(a.json()[0] for a in answers) == [11.0, 12.0, 13.0, 14.0]
    assert _closed(asleep[2]["port"])  # v2, now the standby, sleeps on


def test_a_restarted_service_keeps_it_asleep_and_wakeable(svc: Service, released: dict[str, Any]) -> None:
    uri, headers = released["endpoint"]["scoring_uri"], released["headers"]
    _sleep_and_check(svc)
    svc.stop()
    # the control plane is down: nobody may start it, so the router says so at once
    down = _score(uri, headers, 3.0)
    assert down.status_code == 503 and int(down.headers["retry-after"]) >= 3, down.text
    assert "the control plane is down" in down.json()["message"]
    assert requests.get(f"{svc.router_url}/-/healthz", timeout=5).status_code == 200
    svc.start()
    time.sleep(1.0)  # the start's reconcile and a supervisor tick: neither may start it
    assert _asleep(svc) is not None and _deployments(svc)[2]["pid"] is None
    r = _score(uri, headers, 3.0)
    assert r.status_code == 200 and r.json() == [204.0], r.text
    wait_until(lambda: not _deployments(svc)[2]["sleeping"], timeout_s=10)
