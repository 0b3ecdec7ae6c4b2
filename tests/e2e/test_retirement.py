"""Retiring an endpoint and archiving a model on a real service: a retirement under load drains
the endpoint (requests get the router's 410 naming it at once, never a hang), stops its
scoring processes and keeps the records; a later promote serves it again with the same keys.
An archived model records new versions but releases none (an event says why) until it is
unarchived. Both are refused, naming the release, while one runs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Hammer, Service, iris_model, running_service, wait_until

POLICIES = ("""\
name: rt-blue-green
match:
  models: ["rt-*"]
environments:
  - name: production
smoke:
  requests: 2
""", """\
name: rt-gated
match:
  models: ["rtg-*"]
environments:
  - name: production
    approval: true
smoke:
  requests: 2
""")


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("retire-svc"), POLICIES[0]) as service:
        service.apply_policy(POLICIES[1])
        yield service


def _cli(svc: Service, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=svc.env, catch_exceptions=False)


def _registered(svc: Service, name: str, folder: Path, c: float = 1.0) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = iris_model(folder, c=c)
    return meta, svc.register(name, folder, meta)


def _deployments(svc: Service, name: str) -> list[dict[str, Any]]:
    return svc.api("GET", "/deployments", params={"model": name}).json()["deployments"]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _at_gate(svc: Service, name: str, folder: Path, c: float = 1.0) -> dict[str, Any]:
    _, v = _registered(svc, name, folder, c)
    rel = svc.client.find_release(name, v["version"])
    assert rel is not None
    rel = svc.client.wait_release(rel["id"], timeout_s=300)
    assert rel["phase"] == "awaiting_approval", svc.job_log(rel["id"])
    return rel


def test_retire_under_load_drains_then_a_promote_serves_again(svc: Service, tmp_path: Path) -> None:
    meta, v = _registered(svc, "rt-iris", tmp_path / "v1")
    assert svc.wait_release_for("rt-iris", v["version"])["phase"] == "succeeded"
    ep = svc.endpoint("rt-iris")
    headers = svc.auth(ep)
    [dep] = [d for d in _deployments(svc, "rt-iris") if d["state"] == "serving"]
    with Hammer(ep["scoring_uri"], meta["sample"], headers, threads=4, max_s=60) as load:
        wait_until(lambda: load.ok >= 20, 30)
        result = _cli(svc, "endpoints", "retire", "rt-iris", "--env", "production", "--json")
        wait_until(lambda: len(load.failures) >= 20, 30)  # answered at once after: no hang
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["type"] == "retire" and job["state"] == "succeeded", job
    kinds = [e["kind"] for e in job["events"]]
    assert {"endpoint.retired", "deployment.stopped", "job.succeeded"} <= set(kinds), kinds
    assert load.ok >= 20 and all(f.startswith("410 ") and "endpoint_retired" in f for f in load.failures), \
        load.failures[:5]  # served until drained, then the router's clear answer: nothing failed otherwise

    started = time.monotonic()
    r = requests.post(ep["scoring_uri"], headers=headers, json=meta["sample"], timeout=5)
    assert r.status_code == 410 and time.monotonic() - started < 2, r.text
    assert "rt-iris/production was retired" in r.json()["message"]
    assert not _running(dep["pid"])  # its scoring process is gone
    assert [(d["id"], d["state"]) for d in _deployments(svc, "rt-iris")] == [(dep["id"], "stopped")]  # record kept
    listed = _cli(svc, "endpoints", "list")
    assert any("rt-iris" in line and "retired" in line for line in listed.output.splitlines()), listed.output
    assert svc.api("GET", f"/jobs/{job['id']}").json()["state"] == "succeeded"

    again = _cli(svc, "endpoints", "retire", "rt-iris", "--env", "production")
    assert again.exit_code != 0 and "already" in again.output, again.output
    promoted = svc.api("POST", "/endpoints/rt-iris/production/promote", json={"version": 1})
    assert promoted.status_code == 202, promoted.text
    assert svc.client.wait_release(promoted.json()["id"], timeout_s=120)["phase"] == "succeeded"
    back = svc.endpoint("rt-iris")
    assert back["state"] == "active" and back["traffic"] == {"1": 100}, back
    r = requests.post(ep["scoring_uri"], headers=headers, json=meta["sample"], timeout=5)  # the same key
    assert r.status_code == 200 and r.json()["predictions"] == meta["expected"], r.text


def test_retire_and_archive_are_refused_while_a_release_runs(svc: Service, tmp_path: Path) -> None:
    first = _at_gate(svc, "rtg-iris", tmp_path / "v1")
    assert svc.api("POST", f"/releases/{first['id']}/approve").status_code == 200
    assert svc.client.wait_release(first["id"], timeout_s=120)["phase"] == "succeeded"
    second = _at_gate(svc, "rtg-iris", tmp_path / "v2", c=0.05)

    r = svc.api("POST", "/endpoints/rtg-iris/production/retire")
    assert r.status_code == 409, r.text
    message = r.json()["message"]
    assert f"a release of it runs: {second['id']} (rtg-iris v2 → production, awaiting_approval)" in message
    assert f"`modelcd releases reject {second['id']}`" in message, message
    result = _cli(svc, "endpoints", "retire", "rtg-iris", "--env", "production")
    assert result.exit_code != 0 and second["id"] in result.output, result.output
    r = svc.api("POST", "/models/rtg-iris/archive")
    assert r.status_code == 409 and second["id"] in r.json()["message"], r.text
    assert svc.endpoint("rtg-iris")["traffic"] == {"1": 100}  # untouched

    assert svc.api("POST", f"/releases/{second['id']}/reject").status_code == 200
    wait_until(lambda: svc.release_detail(second["id"])["phase"] == "failed", 60)
    r = svc.api("POST", "/endpoints/rtg-iris/production/retire")
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text


def test_an_archived_model_records_versions_but_releases_none_until_unarchived(svc: Service, tmp_path: Path) -> None:
    _, v1 = _registered(svc, "rt-arch", tmp_path / "v1")
    assert svc.wait_release_for("rt-arch", v1["version"])["phase"] == "succeeded"
    result = _cli(svc, "models", "archive", "rt-arch")
    assert result.exit_code == 0 and "(archive): succeeded" in result.output, result.output
    listed = _cli(svc, "models")
    assert any("rt-arch" in line and "archived" in line for line in listed.output.splitlines()), listed.output

    meta, v2 = _registered(svc, "rt-arch", tmp_path / "v2", c=0.05)
    assert v2["version"] == 2  # recorded as ever
    skipped = wait_until(lambda: svc.api("GET", "/models/rt-arch").json()["skipped_releases"], 30)
    assert "rt-arch v2 recorded, no release: model archived" in skipped[0], skipped
    assert [r["version"] for r in svc.api("GET", "/releases", params={"model": "rt-arch"}).json()["releases"]] == [1]
    shown = _cli(svc, "models", "show", "rt-arch")
    assert "archived: since" in shown.output and "model archived" in shown.output, shown.output
    r = svc.api("POST", "/endpoints/rt-arch/production/promote", json={"version": 2})
    assert r.status_code == 409 and "`modelcd models unarchive rt-arch`" in r.json()["message"], r.text
    assert svc.endpoint("rt-arch")["traffic"] == {"1": 100}  # what served keeps serving

    result = _cli(svc, "models", "unarchive", "rt-arch")
    assert result.exit_code == 0 and "v2 was registered while archived" in result.output, result.output
    result = _cli(svc, "promote", "rt-arch", "2", "--env", "production")
    assert result.exit_code == 0, result.output
    ep = svc.endpoint("rt-arch")
    assert ep["traffic"] == {"2": 100}
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=5)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "2", r.text
