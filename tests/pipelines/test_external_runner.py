"""The service's external runner against a local GitHub stand-in that never runs anything:
trigger retries and refusals, a run that never reports or dies early fails the release with
production untouched, and per-release tokens drive only their own release."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Service, iris_model, make_service
from tests.pipelines.scripted_github import ScriptedGitHub

GH_TOKEN = "ghp_external_0123456789"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, ScriptedGitHub]]:
    stub = ScriptedGitHub()
    svc = make_service(tmp_path_factory.mktemp("ext"), MODELCD_TEST_GH_TOKEN=GH_TOKEN)
    svc.start()
    policy = f"""\
name: scripted
match: {{models: ["ext-*"]}}
runner: github
pipeline:
  repo: acme/models
  api_url: {stub.url}
  token_env: MODELCD_TEST_GH_TOKEN
  poll_interval_s: 1
  report_timeout_s: 8
  start_timeout_s: 30
smoke: {{requests: 3}}
"""
    svc.apply_policy(policy)
    try:
        yield svc, stub
    finally:
        svc.stop()
        svc.shutdown_data_plane()
        stub.server.shutdown()


def _stage(svc: Service, release_id: str, stage: str, token: str, wait: float = 20) -> requests.Response:
    """Run a stage as the CLI does: POST, then GET while it answers 202 running."""
    url = f"{svc.url}/api/v1/releases/{release_id}/stages/{stage}"
    r = requests.post(url, params={"wait": wait}, headers={"Authorization": f"Bearer {token}"}, timeout=90)
    deadline = time.monotonic() + 600
    while r.status_code == 202 and time.monotonic() < deadline:
        assert r.json()["outcome"] == "running"
        r = requests.get(url, params={"wait": 5}, timeout=90)
    return r


def _wait_dispatch(stub: ScriptedGitHub, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while len(stub.dispatches) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(stub.dispatches) >= count, stub.dispatches
    return stub.dispatches[count - 1]


def test_stages_driven_with_the_release_token_reach_production(scripted: tuple[Service, ScriptedGitHub],
                                                               tmp_path: Path) -> None:
    svc, stub = scripted
    meta = iris_model(tmp_path / "v1")
    seen = len(stub.dispatches)
    svc.register("ext-a", tmp_path / "v1", meta)
    dispatch = _wait_dispatch(stub, seen + 1)
    assert dispatch["auth"] == f"Bearer {GH_TOKEN}"
    rid, token = dispatch["inputs"]["release_id"], dispatch["inputs"]["release_token"]
    assert _stage(svc, rid, "deploy", token).status_code == 409  # stages run in order
    assert _stage(svc, rid, "build", "mcdr_wrong").status_code == 401
    for stage in ("build", "deploy", "smoke", "promote"):
        r = _stage(svc, rid, stage, token)
        assert r.status_code == 200 and r.json()["outcome"] == "succeeded", r.text
        if stage == "build":  # a CI retry of a stage that already ran: answered, not run again
            again = _stage(svc, rid, "build", token)
            assert again.status_code == 200 and again.json()["outcome"] == "succeeded", again.text
            assert again.json()["already"] is True
    rel = svc.release_detail(rid)
    assert rel["phase"] == "succeeded" and [j["type"] for j in rel["jobs"]] == ["build", "deploy", "smoke", "promote"]
    ep = svc.endpoint("ext-a")
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
    assert r.headers["X-Modelcd-Version"] == "1"
    # this release's token cannot drive another release
    seen = len(stub.dispatches)
    svc.register("ext-b", tmp_path / "v1", meta)
    other = _wait_dispatch(stub, seen + 1)
    assert _stage(svc, other["inputs"]["release_id"], "build", token).status_code == 401
    assert token not in json.dumps(rel)


def test_a_run_that_never_reports_fails_the_release_and_production_stays(
        scripted: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    svc, stub = scripted
    meta = iris_model(tmp_path / "v1")
    seen = len(stub.dispatches)
    svc.register("ext-silent", tmp_path / "v1", meta)
    dispatch = _wait_dispatch(stub, seen + 1)
    rid, token = dispatch["inputs"]["release_id"], dispatch["inputs"]["release_token"]
    for stage in ("build", "deploy", "smoke", "promote"):
        assert _stage(svc, rid, stage, token).json()["outcome"] == "succeeded"
    # v2: the pipeline builds and deploys, then goes silent
    seen = len(stub.dispatches)
    svc.register("ext-silent", tmp_path / "v2", iris_model(tmp_path / "v2", c=0.5))
    dispatch = _wait_dispatch(stub, seen + 1)
    rid2, token2 = dispatch["inputs"]["release_id"], dispatch["inputs"]["release_token"]
    for stage in ("build", "deploy"):
        assert _stage(svc, rid2, stage, token2).json()["outcome"] == "succeeded"
    rel = svc.client.wait_release(rid2, timeout_s=60)
    assert rel["phase"] == "failed" and "reported nothing" in rel["error"], rel
    assert svc.endpoint("ext-silent")["traffic"] == {"1": 100}
    deps = svc.api("GET", "/deployments", params={"model": "ext-silent"}).json()["deployments"]
    assert [d["state"] for d in deps if d["version"] == 2] == ["stopped"]


def test_trigger_retries_transient_errors_and_gives_up_on_refusals(scripted: tuple[Service, ScriptedGitHub],
                                                                    tmp_path: Path) -> None:
    svc, stub = scripted
    meta = iris_model(tmp_path / "v1")
    stub.dispatch_statuses[:] = [502, 502, 502, 502, 200]  # the client's own retries, then the driver's
    start = len(stub.dispatches)
    svc.register("ext-flaky", tmp_path / "v1", meta)
    deadline = time.monotonic() + 60
    while not any(d["status"] == 200 for d in stub.dispatches[start:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    ok = [d for d in stub.dispatches[start:] if d["status"] == 200]
    assert ok, stub.dispatches[start:]
    rel = svc.client.find_release("ext-flaky", 1)
    assert rel is not None and rel["phase"] == "building"

    stub.dispatch_statuses[:] = [401]
    svc.register("ext-refused", tmp_path / "v1", meta)
    rel = svc.client.find_release("ext-refused", 1)
    assert rel is not None
    rel = svc.client.wait_release(rel["id"], timeout_s=60)
    assert rel["phase"] == "failed" and "could not be started" in rel["error"] and "401" in rel["error"], rel
    assert GH_TOKEN not in rel["error"]


def test_a_run_that_finishes_without_the_release_fails_it(scripted: tuple[Service, ScriptedGitHub],
                                                          tmp_path: Path) -> None:
    svc, stub = scripted
    meta = iris_model(tmp_path / "v1")
    seen = len(stub.dispatches)
    svc.register("ext-died", tmp_path / "v1", meta)
    dispatch = _wait_dispatch(stub, seen + 1)
    run_id = len(stub.dispatches)
    stub.run_state[run_id] = ("completed", "cancelled")  # e.g. cancelled by a person before any stage ran
    rel = svc.client.wait_release(dispatch["inputs"]["release_id"], timeout_s=60)
    assert rel["phase"] == "failed" and "finished (cancelled) [build cancelled" in rel["error"], rel


def test_stage_commands_refuse_releases_of_the_local_runner(scripted: tuple[Service, ScriptedGitHub],
                                                            tmp_path: Path) -> None:
    svc, _ = scripted
    svc.register("plain", tmp_path / "v1", iris_model(tmp_path / "v1"))  # default policy: local runner
    rel = svc.client.find_release("plain", 1)
    assert rel is not None
    for path, body in ((f"/releases/{rel['id']}/stages/build", None),
                       (f"/releases/{rel['id']}/report", {"stage": "build", "outcome": "failed"})):
        r = svc.api("POST", path, json=body)
        assert r.status_code == 409 and "local runner" in r.json()["message"], r.text
    assert svc.client.wait_release(rel["id"], timeout_s=300)["phase"] == "succeeded"


def test_a_missing_credential_fails_the_release_at_once(scripted: tuple[Service, ScriptedGitHub],
                                                        tmp_path: Path) -> None:
    svc, stub = scripted
    policy = f"""\
name: no-credential
match: {{models: ["nocred-*"]}}
runner: github
pipeline: {{repo: acme/models, api_url: {stub.url}, token_env: MODELCD_TEST_NOT_SET}}
"""
    svc.apply_policy(policy)
    seen = len(stub.dispatches)
    svc.register("nocred-a", tmp_path / "v1", iris_model(tmp_path / "v1"))
    rel = svc.client.find_release("nocred-a", 1)
    assert rel is not None
    rel = svc.client.wait_release(rel["id"], timeout_s=60)
    assert rel["phase"] == "failed" and "MODELCD_TEST_NOT_SET is not set" in rel["error"], rel
    assert len(stub.dispatches) == seen


def test_a_long_stage_answers_running_then_its_result(scripted: tuple[Service, ScriptedGitHub],
                                                      tmp_path: Path) -> None:
    svc, stub = scripted
    seen = len(stub.dispatches)
    svc.register("ext-async", tmp_path / "v1", iris_model(tmp_path / "v1"))
    dispatch = _wait_dispatch(stub, seen + 1)
    rid, token = dispatch["inputs"]["release_id"], dispatch["inputs"]["release_token"]
    url = f"{svc.url}/api/v1/releases/{rid}/stages"
    assert requests.get(f"{url}/build", timeout=10).json()["outcome"] == "pending"
    r = requests.post(f"{url}/build", params={"wait": 0}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 202 and r.json()["outcome"] == "running", r.text
    again = requests.post(f"{url}/build", params={"wait": 0}, headers={"Authorization": f"Bearer {token}"},
                          timeout=30)
    assert again.status_code == 202  # the same run, not a second build
    r = _stage(svc, rid, "build", token, wait=0)
    assert r.status_code == 200 and r.json()["outcome"] == "succeeded", r.text
    assert [j["type"] for j in svc.release_detail(rid)["jobs"]] == ["build"]
    assert requests.get(f"{url}/nope", timeout=10).status_code == 400
