"""Register → image → container → smoke → promote/rollback on a real engine, through a real
`modelcd serve` and the built-in router, with a policy choosing `target: docker`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Hammer, Service, custom_model, iris_model, running_service
from tests.containers.conftest import BaseImage, containers_of, remove_containers

POLICY = """\
name: docker-models
match:
  models: ["dk-*"]
environments:
  - name: production
    target: docker
    scoring_workers: 1
    resources: {cpu: 1, memory: 512m}
    env: {OMP_NUM_THREADS: "1"}
smoke:
  requests: 5
"""


@pytest.fixture(scope="module")
def docker_service(tmp_path_factory: pytest.TempPathFactory, base_image: BaseImage, engine: Any) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("docker-svc")
    try:
        with running_service(home, POLICY, MODELCD_DOCKER_BASE_IMAGE=base_image.tag, MODELCD_DOCKER_NETWORK="host",
                             MODELCD_DOCKER_REPOSITORY="modelcd-test") as svc:
            yield svc
    finally:
        remove_containers(engine, home / "home")


def _live(svc: Service, name: str) -> list[dict[str, Any]]:
    return svc.api("GET", "/deployments", params={"model": name, "live": "1"}).json()["deployments"]


def _first_version(svc: Service, tmp_path: Path) -> dict[str, Any]:
    meta = iris_model(tmp_path / "v1")
    v = svc.register("dk-iris", tmp_path / "v1", meta)
    rel = svc.wait_release_for("dk-iris", v["version"])
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    return meta


def test_release_to_docker_target_reaches_production(docker_service: Service, tmp_path: Path, engine: Any) -> None:
    svc = docker_service
    meta = _first_version(svc, tmp_path)
    ep = svc.endpoint("dk-iris")
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
    assert r.status_code == 200 and r.json()["predictions"] == meta["expected"]
    assert r.headers["X-Modelcd-Version"] == "1"
    (dep,) = _live(svc, "dk-iris")
    assert dep["target"] == "docker"
    container = engine.containers.get(f"modelcd-{dep['id']}")
    assert container.status == "running" and container.image.labels["io.modelcd.model"] == "dk-iris"
    assert container.attrs["HostConfig"]["NanoCpus"] == 1_000_000_000


def test_promote_and_rollback_under_load_drop_no_request(docker_service: Service, tmp_path: Path) -> None:
    svc = docker_service
    if svc.api("GET", "/models/dk-iris").status_code == 404:
        _first_version(svc, tmp_path)
    meta = iris_model(tmp_path / "v2", c=0.05)
    ep = svc.endpoint("dk-iris")
    with Hammer(ep["scoring_uri"], meta["sample"], headers=svc.auth(ep), threads=4) as hammer:
        time.sleep(0.3)
        v = svc.register("dk-iris", tmp_path / "v2", meta)
        rel = svc.wait_release_for("dk-iris", v["version"])
        time.sleep(0.3)
    log = svc.job_log(rel["id"])
    assert rel["phase"] == "succeeded", log
    assert hammer.failures == [], hammer.failures[:5]
    new = str(v["version"])
    assert svc.endpoint("dk-iris")["traffic"] == {new: 100}
    assert hammer.versions.get(new, 0) > 0 and len(hammer.versions) >= 2, hammer.versions
    assert "reusing wheelhouse" in log and "steps from cache" in log

    with Hammer(ep["scoring_uri"], meta["sample"], headers=svc.auth(ep), threads=4) as hammer:
        time.sleep(0.3)
        r = svc.api("POST", "/endpoints/dk-iris/production/rollback")
        assert r.status_code == 200, r.text
        time.sleep(0.3)
    assert hammer.failures == [], hammer.failures[:5]
    previous = str(int(new) - 1)
    assert svc.endpoint("dk-iris")["traffic"] == {previous: 100}
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
    assert r.headers["X-Modelcd-Version"] == previous


def _fails_and_leaves_production(svc: Service, engine: Any, name: str, version: int, why: str) -> str:
    log = svc.wait_failed_untouched(name, version, why)
    live_ids = {d["id"] for d in _live(svc, name)}
    for container in containers_of(engine, svc.home):  # no stray containers: only the live deployments
        if container.labels["io.modelcd.model"] == name:
            assert container.labels["io.modelcd.deployment"] in live_ids, container.name
    return log


def test_failing_build_container_or_smoke_leave_production_alone(docker_service: Service, tmp_path: Path,
                                                                  engine: Any) -> None:
    svc = docker_service
    base = iris_model(tmp_path / "base")
    v = svc.register("dk-guard", tmp_path / "base", base)
    assert svc.wait_release_for("dk-guard", v["version"])["phase"] == "succeeded"

    bad = iris_model(tmp_path / "badreq")
    (tmp_path / "badreq" / "requirements.txt").write_text("modelcd-no-such-package-xyz==1.0\n")
    v = svc.register("dk-guard", tmp_path / "badreq", bad)
    log = _fails_and_leaves_production(svc, engine, "dk-guard", v["version"], "modelcd-no-such-package-xyz")

    meta = custom_model(tmp_path / "crash", "def init():\n    raise RuntimeError('weights missing')\n\n"
                                            "def run(raw):\n    return raw\n")
    v = svc.register("dk-guard", tmp_path / "crash", meta)
    log = _fails_and_leaves_production(svc, engine, "dk-guard", v["version"], "exited with code")
    assert "weights missing" in log

    wrong = iris_model(tmp_path / "wrong", expected_offset=1)
    v = svc.register("dk-guard", tmp_path / "wrong", wrong)
    _fails_and_leaves_production(svc, engine, "dk-guard", v["version"], "smoke")

    ep = svc.endpoint("dk-guard")
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=base["sample"], timeout=10)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "1"


def test_restarted_service_adopts_running_containers(docker_service: Service, tmp_path: Path, engine: Any) -> None:
    svc = docker_service
    if svc.api("GET", "/models/dk-iris").status_code == 404:
        _first_version(svc, tmp_path)
    before = {c.id for c in containers_of(engine, svc.home)}
    live_before = {d["id"] for d in _live(svc, "dk-iris")}
    svc.kill9()
    svc.start()
    ep = svc.endpoint("dk-iris")
    deadline = time.monotonic() + 30
    while True:
        r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json={"data": [[5.1, 3.5, 1.4, 0.2]]}, timeout=10)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    time.sleep(1.0)  # let the reconciler look at every deployment
    assert {d["id"] for d in _live(svc, "dk-iris")} == live_before
    assert {c.id for c in containers_of(engine, svc.home)} == before


def test_a_container_started_again_after_a_crash_keeps_its_limits_and_env(docker_service: Service, tmp_path: Path,
                                                                          engine: Any) -> None:
    svc = docker_service
    if svc.api("GET", "/models/dk-iris").status_code == 404:
        _first_version(svc, tmp_path)
    serving = next(d for d in _live(svc, "dk-iris") if d["state"] == "serving")
    [container] = [c for c in containers_of(engine, svc.home) if serving["id"] in c.name]
    container.remove(force=True)  # the scoring container dies (kill -9 and gone)
    svc.kill9()  # and so does the control plane
    svc.start()  # reconcile finds the container gone and starts the deployment again from its record
    ep = svc.endpoint("dk-iris")
    deadline = time.monotonic() + 120
    while True:
        try:
            r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json={"data": [[5.1, 3.5, 1.4, 0.2]]},
                              timeout=10)
            if r.status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the deployment did not come back"
        time.sleep(0.5)
    [again] = [c for c in containers_of(engine, svc.home) if serving["id"] in c.name]
    assert again.id != container.id
    host = again.attrs["HostConfig"]
    assert host["NanoCpus"] == 1_000_000_000 and host["Memory"] == 512 * 1024 * 1024, host
    assert "OMP_NUM_THREADS=1" in again.attrs["Config"]["Env"]


def _tags(engine: Any, prefix: str) -> set[str]:
    return {t for image in engine.images.list() for t in image.tags if t.startswith(prefix)}


def test_images_prune_removes_what_nothing_needs_and_a_pruned_version_comes_back(
        docker_service: Service, tmp_path: Path, engine: Any) -> None:
    svc = docker_service
    for n, c in ((1, 1.0), (2, 0.5), (3, 0.2)):
        meta = iris_model(tmp_path / f"v{n}", c=c)
        v = svc.register("dk-prune", tmp_path / f"v{n}", meta)
        assert svc.wait_release_for("dk-prune", v["version"])["phase"] == "succeeded"
    mine = _tags(engine, "modelcd-test/dk-prune:")
    assert {t.split(":")[1].split("-")[0] for t in mine} == {"1", "2", "3"}
    others = _tags(engine, "modelcd-test/") - _tags(engine, "modelcd-test/dk-")  # other services' (other tests')
    deps = _tags(engine, "modelcd-test-deps:")
    assert deps

    refused = svc.api("POST", "/images/prune", json={"dry_run": "yes"})
    assert refused.status_code == 400 and refused.json()["field"] == "dry_run", refused.text
    dry = subprocess.run([sys.executable, "-m", "modelcd", "images", "prune", "--dry-run"], env=svc.env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    v1, v2, v3 = sorted(mine)
    assert f"would remove {v1}: dk-prune v1: no live deployment" in dry.stdout, dry.stdout
    assert f"keeping {v2}: deployment" in dry.stdout and f"keeping {v3}: deployment" in dry.stdout  # standby, serving
    assert "nothing removed" in dry.stdout
    assert _tags(engine, "modelcd-test/dk-prune:") == mine  # a dry run removes nothing

    job = svc.api("POST", "/images/prune", json={}).json()
    assert job["state"] == "succeeded" and job["type"] == "prune_images", job
    assert f"removed {v1}: dk-prune v1: no live deployment, not on an endpoint, no release" in job["log"]
    assert _tags(engine, "modelcd-test/dk-prune:") == mine - {v1}
    assert others <= _tags(engine, "modelcd-test/")  # images this service did not record are not its to remove
    log = "\n".join(job["log"])
    gone = {t for t in deps if f"removed {t}: dependencies no image left uses" in log}
    assert _tags(engine, "modelcd-test-deps:") & deps == deps - gone  # the rest stay, this service's or not
    assert "keeping modelcd-test-deps:" in log and "the dependencies of " in log, log
    ep = svc.endpoint("dk-prune")
    assert requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10).status_code == 200
    assert svc.api("POST", "/endpoints/dk-prune/production/rollback").status_code == 200  # to v2: its image stayed
    assert svc.endpoint("dk-prune")["traffic"] == {"2": 100}

    r = svc.api("POST", "/endpoints/dk-prune/production/promote", json={"version": 1})  # built again
    assert r.status_code == 202, r.text
    rel = svc.client.wait_release(r.json()["id"], timeout_s=300)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    assert v1 in _tags(engine, "modelcd-test/dk-prune:") and svc.endpoint("dk-prune")["traffic"] == {"1": 100}
