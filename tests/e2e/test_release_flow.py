"""Register → release → production through a real `modelcd serve`, real scoring processes
and the real router, all on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import requests

from tests.conftest import Hammer, Service, custom_model, iris_model


def _live_pids(svc: Service, name: str) -> dict[int, int]:
    deps = svc.api("GET", "/deployments", params={"model": name, "live": "1"}).json()["deployments"]
    return {d["version"]: d["pid"] for d in deps}


def test_register_releases_to_production_and_scores(shared_service: Service, tmp_path: Path) -> None:
    svc = shared_service
    meta = iris_model(tmp_path / "v1")
    version = svc.register("iris", tmp_path / "v1", meta)
    assert version["version"] == 1 and version["flavor"] == "sklearn" and len(version["digest"]) == 64
    rel = svc.wait_release_for("iris", 1)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    detail = svc.release_detail(rel["id"])
    assert [j["type"] for j in detail["jobs"]] == ["build", "deploy", "smoke", "promote"]
    assert all(j["state"] == "succeeded" for j in detail["jobs"])
    kinds = [e["kind"] for e in svc.api("GET", f"/jobs/{detail['jobs'][0]['id']}").json()["events"]]
    assert kinds == ["job.created", "job.scheduled", "job.running", "job.succeeded"]

    ep = svc.endpoint("iris")
    assert ep["uri"] == f"{svc.router_url}/iris/production"
    assert ep["traffic"] == {"1": 100}
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
    assert r.status_code == 200
    assert r.json()["predictions"] == meta["expected"]
    assert r.headers["X-Modelcd-Version"] == "1"
    # MLflow's request formats work through the endpoint too
    split = {"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": meta["sample"]["data"]}}
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=split, timeout=10)
    assert r.json()["predictions"] == meta["expected"]


def test_blue_green_switch_and_rollback_drop_no_request(shared_service: Service, tmp_path: Path) -> None:
    svc = shared_service
    if svc.api("GET", "/models/iris").status_code == 404:
        test_register_releases_to_production_and_scores(svc, tmp_path)
    before = svc.endpoint("iris")["traffic"]
    meta = iris_model(tmp_path / "v2", c=0.05)
    ep = svc.endpoint("iris")
    with Hammer(ep["scoring_uri"], meta["sample"], headers=svc.auth(ep), threads=4) as hammer:
        time.sleep(0.5)
        v = svc.register("iris", tmp_path / "v2", meta)
        t0 = time.monotonic()
        rel = svc.wait_release_for("iris", v["version"])
        took = time.monotonic() - t0
        time.sleep(0.5)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    assert hammer.failures == [], hammer.failures[:5]
    new = str(v["version"])
    assert svc.endpoint("iris")["traffic"] == {new: 100}, before
    assert hammer.versions.get(new, 0) > 0 and len(hammer.versions) >= 2, hammer.versions
    assert took < 60
    # the build reused the environment of the previous version
    assert "reusing environment" in svc.job_log(rel["id"])

    with Hammer(ep["scoring_uri"], meta["sample"], headers=svc.auth(ep), threads=4) as hammer:
        time.sleep(0.5)
        r = svc.api("POST", "/endpoints/iris/production/rollback")
        assert r.status_code == 200, r.text
        assert r.json()["release_id"] is None  # previous deployment was warm: instant
        time.sleep(0.5)
    assert hammer.failures == [], hammer.failures[:5]
    assert svc.endpoint("iris")["traffic"] == {str(int(new) - 1): 100}
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
    assert r.headers["X-Modelcd-Version"] == str(int(new) - 1)


def _assert_failed_and_untouched(svc: Service, name: str, version: int, why: str) -> str:
    log = svc.wait_failed_untouched(name, version, why)
    deps = svc.api("GET", "/deployments", params={"model": name}).json()["deployments"]
    for d in deps:
        if d["version"] == version:
            assert d["state"] in ("stopped", "failed")
            if d["pid"]:
                assert not psutil.pid_exists(d["pid"]) or psutil.Process(d["pid"]).status() == psutil.STATUS_ZOMBIE
    return log


def test_failing_versions_leave_production_alone(shared_service: Service, tmp_path: Path) -> None:
    svc = shared_service
    base = iris_model(tmp_path / "base")
    v = svc.register("guard", tmp_path / "base", base)
    assert svc.wait_release_for("guard", v["version"])["phase"] == "succeeded"

    # run() raises: the smoke sample gets a 500
    meta = custom_model(tmp_path / "raises", "def init():\n    pass\n\ndef run(raw):\n    raise ValueError('boom')\n")
    v = svc.register("guard", tmp_path / "raises", meta)
    log = _assert_failed_and_untouched(svc, "guard", v["version"], "smoke")
    assert "ValueError" in log and "boom" in log

    # requirements that cannot install
    bad = iris_model(tmp_path / "badreq")
    (tmp_path / "badreq" / "requirements.txt").write_text("modelcd-no-such-package-xyz==1.0\n")
    v = svc.register("guard", tmp_path / "badreq", bad)
    log = _assert_failed_and_untouched(svc, "guard", v["version"], "build failed")
    assert "modelcd-no-such-package-xyz" in log

    # sample output does not match the expected output
    wrong = iris_model(tmp_path / "wrong", expected_offset=1)
    v = svc.register("guard", tmp_path / "wrong", wrong)
    _assert_failed_and_untouched(svc, "guard", v["version"], "smoke")

    # production still answers with the first version
    ep = svc.endpoint("guard")
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=base["sample"], timeout=10)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "1"


def test_stop_running_release_cancels_cleanly(shared_service: Service, tmp_path: Path) -> None:
    svc = shared_service
    base = iris_model(tmp_path / "base")
    v = svc.register("stoppable", tmp_path / "base", base)
    assert svc.wait_release_for("stoppable", v["version"])["phase"] == "succeeded"
    slow = custom_model(tmp_path / "slow", "import time\n\ndef init():\n    time.sleep(120)\n\n"
                                           "def run(raw):\n    return []\n")
    v = svc.register("stoppable", tmp_path / "slow", slow)
    rel = svc.client.find_release("stoppable", v["version"])
    assert rel is not None
    deadline = time.monotonic() + 120
    while svc.client.get(f"/api/v1/releases/{rel['id']}")["phase"] != "deploying":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1)
    r = svc.api("POST", f"/releases/{rel['id']}/stop")
    assert r.status_code == 202, r.text
    done = svc.client.wait_release(rel["id"], timeout_s=60)
    assert done["phase"] == "cancelled"
    assert svc.endpoint("stoppable")["traffic"] == {"1": 100}
    assert set(_live_pids(svc, "stoppable")) == {1}
    assert any(j["state"] == "cancelled" for j in svc.release_detail(rel["id"])["jobs"])


def test_newer_version_supersedes_queued_one(shared_service: Service, tmp_path: Path) -> None:
    svc = shared_service
    slow = custom_model(tmp_path / "slow", "import time, json\n\ndef init():\n    time.sleep(3)\n\n"
                                           "def run(raw):\n    return {'predictions': [1]}\n")
    first = svc.register("queue", tmp_path / "slow", slow)
    r1 = svc.client.find_release("queue", first["version"])
    fast = custom_model(tmp_path / "fast", "def init():\n    pass\n\ndef run(raw):\n    return {'predictions': [2]}\n")
    second = svc.register("queue", tmp_path / "fast", fast)
    third = svc.register("queue", tmp_path / "fast", fast)
    assert r1 is not None
    r2 = svc.client.find_release("queue", second["version"])
    r3 = svc.client.find_release("queue", third["version"])
    assert r2 is not None and r3 is not None
    assert svc.client.wait_release(r1["id"])["phase"] == "succeeded"
    assert svc.client.wait_release(r2["id"])["phase"] == "superseded"
    assert svc.client.wait_release(r3["id"])["phase"] == "succeeded"
    assert svc.endpoint("queue")["traffic"] == {str(third["version"]): 100}
