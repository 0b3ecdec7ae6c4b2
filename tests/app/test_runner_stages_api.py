"""The service's side of stages a pipeline's runner does itself (policy ``pipeline.stages``):
``…/stages/<stage>/begin``, ``…/jobs/<job>/log``, ``…/jobs/<job>/finish`` and ``…/files``,
driven here as a runner would, over HTTP against a real ``modelcd serve`` whose pipeline
"starts" on a GitHub stand-in that only records the dispatch (the release token is in its
inputs). A little HTTP server on 127.0.0.1 plays the container the runner started."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from modelcd.context import Context
from modelcd.domain import Source
from modelcd.registry.archive import safe_extract, tree_digest
from modelcd.registry.service import RegisterMetadata
from modelcd.releases.manual import start_release
from tests.conftest import TOKEN, Service, free_port, iris_model, make_service, wait_until
from tests.pipelines.scripted_github import ScriptedGitHub

GH_TOKEN = "ghp_runner_stages_0123456789"
REGISTRY = "127.0.0.1:5000/models"
DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32


class FakeDeployment:
    """What the runner's container would be: ``GET /healthz`` answers ``health``; a POST
    answers a prediction (what the router forwards after the promotion)."""

    def __init__(self, health: dict[str, Any]) -> None:
        self.health = health
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._reply(fake.health if self.path == "/healthz" else {})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply({"predictions": [42]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


POLICIES = """\
name: runner-stages
match: {{models: ["rs-*"]}}
runner: github
pipeline:
  repo: acme/models
  api_url: {api}
  token_env: MODELCD_TEST_GH_TOKEN
  poll_interval_s: 1
  report_timeout_s: 300
  registry: {registry}
environments:
  - name: production
    target: docker
    strategy: recreate
smoke: {{requests: 3}}
---
name: quiet
match: {{models: ["quiet-*"]}}
runner: github
pipeline:
  repo: acme/models
  api_url: {api}
  token_env: MODELCD_TEST_GH_TOKEN
  poll_interval_s: 1
  report_timeout_s: 3
environments:
  - name: production
    target: docker
---
name: on-the-service
match: {{models: ["proc-*"]}}
runner: github
pipeline:
  repo: acme/models
  api_url: {api}
  token_env: MODELCD_TEST_GH_TOKEN
  poll_interval_s: 1
  report_timeout_s: 300
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, ScriptedGitHub]]:
    stub = ScriptedGitHub()
    svc = make_service(tmp_path_factory.mktemp("rs"), MODELCD_TEST_GH_TOKEN=GH_TOKEN)
    svc.start()
    try:
        for text in POLICIES.format(api=stub.url, registry=REGISTRY).split("---\n"):
            svc.apply_policy(text)
        yield svc, stub
    finally:
        svc.stop()
        svc.shutdown_data_plane()
        stub.server.shutdown()


@dataclass
class Run:
    """A pipeline run of one release, calling the service as the runner's ``modelcd`` does."""

    svc: Service
    rid: str
    token: str
    model: str
    version: int = 1

    def call(self, method: str, path: str, token: str | None = None, release: str | None = None,
             **kw: Any) -> requests.Response:
        url = f"{self.svc.url}/api/v1/releases/{release or self.rid}{path}"
        return requests.request(method, url, headers={"Authorization": f"Bearer {token or self.token}"},
                                timeout=60, **kw)

    def begin(self, stage: str) -> dict[str, Any]:
        r = self.call("POST", f"/stages/{stage}/begin")
        assert r.status_code == 200, r.text
        return r.json()

    def log(self, job_id: str, lines: Any) -> requests.Response:
        return self.call("POST", f"/jobs/{job_id}/log", json={"lines": lines})

    def finish(self, job_id: str, outcome: str = "succeeded", report: Any = None, error: str = "") -> dict[str, Any]:
        r = self.call("POST", f"/jobs/{job_id}/finish", json={"outcome": outcome, "error": error,
                                                             "report": report or {}})
        assert r.status_code == 200, r.text
        return r.json()

    def stage(self, stage: str) -> dict[str, Any]:
        """A stage the service runs (``POST …/stages/<stage>``, polled while it runs)."""
        r = self.call("POST", f"/stages/{stage}", params={"wait": 20})
        while r.status_code == 202:
            r = self.call("GET", f"/stages/{stage}", params={"wait": 5})
        assert r.status_code == 200, r.text
        return r.json()

    def release(self) -> dict[str, Any]:
        return self.svc.release_detail(self.rid)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.svc.api("GET", f"/jobs/{job_id}").json()

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        deps = self.svc.api("GET", "/deployments", params={"model": self.model}).json()["deployments"]
        return next(d for d in deps if d["id"] == deployment_id)

    def job_lines(self, job_id: str) -> list[str]:
        return [e["line"] for e in self.svc.api("GET", f"/jobs/{job_id}/logs").json()["logs"]]

    def build_ok(self) -> dict[str, Any]:
        began = self.begin("build")
        return self.finish(began["job_id"], report={"image": self.image, "image_digest": DIGEST})

    @property
    def image(self) -> str:
        return f"{REGISTRY}/{self.model}:{self.version}-0123456789ab"


def start(world: tuple[Service, ScriptedGitHub], tmp_path: Path, model: str) -> Run:
    """Register a version of ``model``; its release starts the stub's pipeline: the runner's view."""
    svc, stub = world
    folder = tmp_path / model
    svc.register(model, folder, iris_model(folder))
    rel = wait_until(lambda: svc.client.find_release(model, 1), timeout_s=30)
    run = Run(svc, rel["id"], stub.token_of(rel["id"]), model)
    wait_until(lambda: run.release()["phase"] == "building", timeout_s=30)
    return run


def error_of(r: requests.Response) -> tuple[int, str | None, str]:
    body = r.json()
    return r.status_code, body.get("field"), body.get("message", "")


# --- where stages run -------------------------------------------------------------------------


def test_stages_the_policy_keeps_on_the_service_answer_run_in_service(world: tuple[Service, ScriptedGitHub],
                                                                      tmp_path: Path) -> None:
    run = start(world, tmp_path, "rs-places")
    for stage in ("promote", "rollback"):
        assert run.begin(stage) == {"run_in": "service", "stage": stage, "release_id": run.rid}
    assert error_of(run.call("POST", "/stages/package/begin"))[:2] == (400, "stage")
    # a process target keeps build and deploy on the service: nothing is opened for the runner
    proc = start(world, tmp_path, "proc-places")
    assert proc.begin("build") == {"run_in": "service", "stage": "build", "release_id": proc.rid}
    assert proc.release()["jobs"] == [] and proc.release()["phase"] == "building"
    # and deploy in the runner is refused before build, by the order of the stages
    r = run.call("POST", "/stages/deploy/begin")
    assert error_of(r)[:2] == (409, "stage") and "cannot run before build" in error_of(r)[2]


# --- build ------------------------------------------------------------------------------------


def test_build_in_the_runner_opens_a_runner_job_and_hands_over_the_work(world: tuple[Service, ScriptedGitHub],
                                                                         tmp_path: Path) -> None:
    run = start(world, tmp_path, "rs-work")
    began = run.begin("build")
    assert (began["run_in"], began["stage"], began["release_id"]) == ("runner", "build", run.rid)
    job = run.job(began["job_id"])
    assert (job["type"], job["state"], job["runs_in"], job["release_id"]) == ("build", "running", "runner", run.rid)
    work = began["work"]
    version = run.svc.api("GET", "/models/rs-work/versions/1").json()
    assert "artifact_uri" not in work["version"]
    assert (work["version"]["model"], work["version"]["version"], work["version"]["digest"]) == (
        "rs-work", 1, version["digest"])
    assert work["files"] == f"/api/v1/releases/{run.rid}/files"
    assert work["image"] == {"repository": "modelcd", "base_image": "python:3.11-slim", "registry": REGISTRY,
                             "username_env": "MODELCD_REGISTRY_USERNAME",
                             "password_env": "MODELCD_REGISTRY_PASSWORD"}
    assert "build runs in the pipeline's runner; its log follows" in run.job_lines(began["job_id"])
    # the files, as the runner downloads them with its release token
    r = run.call("GET", "/files")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/gzip"
    assert r.headers["X-Modelcd-Digest"] == version["digest"]
    safe_extract(io.BytesIO(r.content), tmp_path / "got", 10**8)
    assert tree_digest(tmp_path / "got") == version["digest"]
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == sorted(
        p.name for p in (tmp_path / "rs-work").iterdir())
    assert run.call("GET", "/files", token="mcdr_wrong").status_code == 401


def test_log_lines_are_appended_and_redacted(world: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    run = start(world, tmp_path, "rs-log")
    job_id = run.begin("build")["job_id"]
    long_line = "x" * 8180 + run.token  # the token straddles the line's cut (8192 characters kept)
    r = run.log(job_id, ["step 1/3: FROM python", f"pushing with {run.token}", f"api token {TOKEN} here",
                         long_line])
    assert r.status_code == 200 and r.json() == {"job_id": job_id, "state": "running", "cancel": False}
    lines = run.job_lines(job_id)
    assert lines[1:4] == ["step 1/3: FROM python", "pushing with ***", "api token *** here"]
    assert lines[4].startswith("x" * 8180) and len(lines[4]) <= 8192
    assert run.token[:12] not in lines[4]  # not even the start of the token
    assert run.token[:12] not in json.dumps(run.svc.api("GET", f"/jobs/{job_id}/logs").json())
    r = run.log(job_id, [])  # a heartbeat: no lines, still an answer
    assert r.status_code == 200 and r.json()["cancel"] is False and len(run.job_lines(job_id)) == 5


@pytest.mark.parametrize("lines", [["x"] * 1001, ["ok", 3], "one line", None, [["nested"]]],
                         ids=["too-many", "not-strings", "a-string", "missing", "nested"])
def test_bad_log_lines_are_refused_naming_lines(world: tuple[Service, ScriptedGitHub], tmp_path: Path,
                                                lines: Any) -> None:
    run = start(world, tmp_path, f"rs-badlines-{len(world[1].dispatches)}")
    job_id = run.begin("build")["job_id"]
    r = run.log(job_id, lines) if lines is not None else run.call("POST", f"/jobs/{job_id}/log", json={})
    status, field, message = error_of(r)
    assert (status, field) == (400, "lines") and "at most 1000 strings" in message
    assert run.job_lines(job_id) == ["build runs in the pipeline's runner; its log follows"]


def test_a_stopped_release_tells_the_runner_to_cancel(world: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    run = start(world, tmp_path, "rs-stop")
    job_id = run.begin("build")["job_id"]
    assert run.svc.api("POST", f"/releases/{run.rid}/stop").status_code == 202
    r = run.log(job_id, ["building layer 3"])
    assert r.status_code == 200 and r.json()["cancel"] is True
    done = run.finish(job_id, "cancelled", error="stopped at the service's request")
    assert (done["outcome"], done["phase"]) == ("failed", "rolling_back")
    assert run.job(job_id)["state"] == "cancelled"
    assert run.stage("rollback")["phase"] == "cancelled"


def test_a_good_build_report_moves_the_release_to_deploying(world: tuple[Service, ScriptedGitHub],
                                                             tmp_path: Path) -> None:
    run = start(world, tmp_path, "rs-build")
    job_id = run.begin("build")["job_id"]
    done = run.finish(job_id, report={"image": run.image, "image_digest": DIGEST})
    assert (done["outcome"], done["phase"], done["already"]) == ("succeeded", "deploying", False)
    assert (done["image"], done["image_digest"]) == (run.image, DIGEST)
    rel = run.release()
    assert (rel["phase"], rel["image"], rel["image_digest"], rel["error"]) == ("deploying", run.image, DIGEST, None)
    assert run.job(job_id)["state"] == "succeeded"
    assert f"the runner built {run.image} ({DIGEST})" in run.job_lines(job_id)
    # a CI retry of the finished stage: answered, nothing opened again
    again = run.begin("build")
    assert (again["run_in"], again["outcome"], again["already"], "job_id" in again) == (
        "runner", "succeeded", True, False)
    assert [j["type"] for j in run.release()["jobs"]] == ["build"]
    # a second finish of the closed job changes nothing
    assert run.finish(job_id, report={"image": run.image, "image_digest": OTHER_DIGEST})["already"] is True
    assert run.release()["image_digest"] == DIGEST


@pytest.mark.parametrize(("report", "reason"), [
    ({"image": "IMAGE", "image_digest": "sha256:abc"}, "names no image digest sha256:<64 hex> (got 'sha256:abc')"),
    ({"image": "IMAGE", "image_digest": "md5:" + "ab" * 32}, "names no image digest sha256:<64 hex>"),
    ({"image": "IMAGE"}, "names no image digest sha256:<64 hex> (got '')"),
    ({"image": "docker.io/evil/rs:1", "image_digest": DIGEST},
     f"the runner pushed docker.io/evil/rs:1, not into pipeline.registry {REGISTRY}"),
    ({"image": f"{REGISTRY}-evil/rs:1", "image_digest": DIGEST}, "not into pipeline.registry"),
    ({"image": "has space:1", "image_digest": DIGEST}, "names no valid image"),
], ids=["short-digest", "md5", "no-digest", "other-registry", "registry-prefix", "bad-ref"])
def test_a_bad_build_report_fails_the_stage_and_the_release(world: tuple[Service, ScriptedGitHub], tmp_path: Path,
                                                            report: dict[str, Any], reason: str) -> None:
    run = start(world, tmp_path, f"rs-badbuild-{len(world[1].dispatches)}")
    report = {k: (run.image if v == "IMAGE" else v) for k, v in report.items()}
    job_id = run.begin("build")["job_id"]
    done = run.finish(job_id, report=report)
    assert (done["outcome"], done["phase"]) == ("failed", "rolling_back")
    assert done["error"].startswith("build failed: the runner") and reason in done["error"]
    job = run.job(job_id)
    assert job["state"] == "failed" and reason in job["error"]
    assert run.release()["image"] is None
    rolled = run.stage("rollback")  # what the pipeline's failure job runs
    assert rolled["phase"] == "failed" and reason in rolled["error"]


# --- deploy and smoke ---------------------------------------------------------------------------


def _deploying(world: tuple[Service, ScriptedGitHub], tmp_path: Path, model: str) -> tuple[Run, dict[str, Any]]:
    run = start(world, tmp_path, model)
    assert run.build_ok()["phase"] == "deploying"
    return run, run.begin("deploy")


def test_deploy_begin_records_a_deployment_started_by_the_runner(world: tuple[Service, ScriptedGitHub],
                                                                 tmp_path: Path) -> None:
    run, began = _deploying(world, tmp_path, "rs-deploy-work")
    work = began["work"]
    dep = run.deployment(work['deployment_id'])
    assert (dep["state"], dep["release_id"], dep["version"], dep["target"]) == ("starting", run.rid, 1, "docker")
    assert dep["spec"]["started_by"] == "runner" and dep["spec"]["image_digest"] == DIGEST
    assert run.release()["deployment_id"] == work["deployment_id"]
    assert work["pull"] == f"{REGISTRY}/rs-deploy-work@{DIGEST}"
    assert (work["image"], work["image_digest"], work["model"], work["version"]) == (
        run.image, DIGEST, "rs-deploy-work", 1)
    assert re.fullmatch(r"[0-9a-f]{16}", work["instance"])
    assert run.job(began["job_id"])["runs_in"] == "runner"


def test_deploy_of_another_digest_fails_naming_both(world: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    run, began = _deploying(world, tmp_path, "rs-deploy-digest")
    fake = FakeDeployment({"model": "rs-deploy-digest", "version": 1})
    try:
        done = run.finish(began["job_id"], report={"image_digest": OTHER_DIGEST, "url": fake.url})
    finally:
        fake.close()
    assert (done["outcome"], done["phase"]) == ("failed", "rolling_back")
    assert OTHER_DIGEST in done["error"] and DIGEST in done["error"]
    dep = run.deployment(began['work']['deployment_id'])
    assert dep["state"] == "failed"


@pytest.mark.parametrize("answer", [None, {"model": "rs-other", "version": 1}, {"model": "MODEL", "version": 2}],
                         ids=["nothing-listens", "another-model", "another-version"])
def test_deploy_the_service_cannot_reach_fails_naming_the_url(world: tuple[Service, ScriptedGitHub], tmp_path: Path,
                                                              answer: dict[str, Any] | None) -> None:
    model = f"rs-unreachable-{len(world[1].dispatches)}"
    run, began = _deploying(world, tmp_path, model)
    fake = FakeDeployment({k: (model if v == "MODEL" else v) for k, v in answer.items()}) if answer else None
    url = fake.url if fake else f"http://127.0.0.1:{free_port()}"
    try:
        done = run.finish(began["job_id"], report={"image_digest": DIGEST, "url": url})
    finally:
        if fake:
            fake.close()
    assert (done["outcome"], done["phase"]) == ("failed", "rolling_back")
    assert f"the service cannot reach {model} v1 at {url}" in done["error"]
    assert run.deployment(began['work']['deployment_id'])["state"] == "failed"


def test_deploy_smoke_and_promote_through_the_runner(world: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    run, began = _deploying(world, tmp_path, "rs-full")
    fake = FakeDeployment({"model": "rs-full", "version": 1})
    try:
        done = run.finish(began["job_id"], report={"image_digest": DIGEST, "url": fake.url + "/",
                                                   "container": "modelcd-x", "pid": 4242})
        assert (done["outcome"], done["phase"]) == ("succeeded", "smoke_testing"), done
        dep_id = began["work"]["deployment_id"]
        dep = run.deployment(dep_id)
        assert (dep["state"], dep["url"], dep["pid"], dep["spec"]["container"]) == (
            "ready", fake.url, 4242, "modelcd-x")
        smoke = run.begin("smoke")
        assert smoke["work"]["url"] == fake.url and smoke["work"]["checks"]["requests"] == 3
        assert smoke["work"]["sample"] == iris_model(tmp_path / "again")["sample"]
        done = run.finish(smoke["job_id"], report={"passed": True, "summary": "3 requests, p95 4 ms"})
        assert (done["outcome"], done["phase"]) == ("succeeded", "promoting")
        promoted = run.stage("promote")
        assert (promoted["outcome"], promoted["phase"]) == ("succeeded", "succeeded"), promoted
        ep = run.svc.endpoint("rs-full")
        assert ep["traffic"] == {"1": 100}
        scored = requests.post(ep["scoring_uri"], headers=run.svc.auth(ep), json=smoke["work"]["sample"], timeout=10)
        assert scored.status_code == 200 and scored.json() == {"predictions": [42]}  # the runner's deployment
        assert [(j["type"], j["runs_in"], j["state"]) for j in run.release()["jobs"]] == [
            ("build", "runner", "succeeded"), ("deploy", "runner", "succeeded"),
            ("smoke", "runner", "succeeded"), ("promote", "service", "succeeded")]
    finally:
        fake.close()


def test_a_failed_smoke_report_fails_the_release_with_its_summary(world: tuple[Service, ScriptedGitHub],
                                                                  tmp_path: Path) -> None:
    run, began = _deploying(world, tmp_path, "rs-smoke-fails")
    fake = FakeDeployment({"model": "rs-smoke-fails", "version": 1})
    try:
        assert run.finish(began["job_id"], report={"image_digest": DIGEST, "url": fake.url})["phase"] == \
            "smoke_testing"
        smoke = run.begin("smoke")
        done = run.finish(smoke["job_id"], report={"passed": False, "summary": "2 of 3 answers differ"})
    finally:
        fake.close()
    assert (done["outcome"], done["phase"], done["error"]) == ("failed", "rolling_back",
                                                               "smoke failed: 2 of 3 answers differ")


# --- retries, tokens, jobs of other releases -------------------------------------------------------


def test_a_retried_begin_supersedes_the_open_job(world: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    run = start(world, tmp_path, "rs-retry")
    first = run.begin("build")["job_id"]
    second = run.begin("build")["job_id"]
    assert first != second
    old = run.job(first)
    assert (old["state"], old["error"]) == ("failed", "superseded by the runner's retry")
    assert run.job(second)["state"] == "running"
    # the first attempt, if it is still alive, is told to stop and cannot close the stage
    r = run.log(first, ["late line"])
    assert r.status_code == 200 and r.json()["state"] == "failed" and r.json()["cancel"] is True
    assert "late line" not in run.job_lines(first)
    late = run.finish(first, report={"image": run.image, "image_digest": DIGEST})
    assert (late["outcome"], late["already"], late["phase"]) == ("failed", True, "building")
    assert run.finish(second, report={"image": run.image, "image_digest": DIGEST})["phase"] == "deploying"
    # a retried deploy: the first attempt's deployment record does not stay "starting" for ever
    dep_first = run.begin("deploy")["work"]["deployment_id"]
    dep_second = run.begin("deploy")["work"]["deployment_id"]
    assert dep_first != dep_second and run.release()["deployment_id"] == dep_second
    assert run.deployment(dep_first)["state"] == "failed"
    assert run.deployment(dep_second)["state"] == "starting"


def test_tokens_and_jobs_belong_to_their_release(world: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    a = start(world, tmp_path, "rs-owner-a")
    b = start(world, tmp_path, "rs-owner-b")
    b_job = b.begin("build")["job_id"]
    for method, path, body in (("POST", "/stages/build/begin", None), ("POST", f"/jobs/{b_job}/log", {"lines": []}),
                               ("POST", f"/jobs/{b_job}/finish", {"outcome": "failed"}), ("GET", "/files", None)):
        r = a.call(method, path, release=b.rid, json=body)
        assert r.status_code == 401, (path, r.text)
    assert b.job(b_job)["state"] == "running" and b.release()["phase"] == "building"
    # A's token on A's routes, naming B's job: refused, B untouched
    a.begin("build")
    for path, body in ((f"/jobs/{b_job}/log", {"lines": ["x"]}), (f"/jobs/{b_job}/finish", {"outcome": "failed"})):
        status, field, message = error_of(a.call("POST", path, json=body))
        assert (status, field) == (409, "job_id") and f"job {b_job} is not a stage of release {a.rid}" in message
    assert b.job(b_job)["state"] == "running" and b.job_lines(b_job) == [
        "build runs in the pipeline's runner; its log follows"]
    assert error_of(a.call("POST", "/jobs/j-000000000000/log", json={"lines": []}))[:2] == (404, "job_id")
    # the API token may drive any release
    assert b.call("POST", f"/jobs/{b_job}/log", token=TOKEN, json={"lines": ["by the operator"]}).status_code == 200


def test_a_rollback_while_the_runner_job_is_open_closes_it(world: tuple[Service, ScriptedGitHub],
                                                           tmp_path: Path) -> None:
    run, began = _deploying(world, tmp_path, "rs-died")  # the runner's deploy step dies without finishing
    rolled = run.stage("rollback")  # the pipeline's failure job
    assert (rolled["outcome"], rolled["phase"]) == ("succeeded", "failed")
    job = run.job(began["job_id"])
    assert job["state"] == "failed" and job["error"], job
    assert all(j["state"] in ("succeeded", "failed", "cancelled") for j in run.release()["jobs"])
    assert run.deployment(began["work"]["deployment_id"])["state"] in ("failed", "stopped")


def test_a_late_finish_after_the_pipeline_reported_failure_changes_nothing(world: tuple[Service, ScriptedGitHub],
                                                                          tmp_path: Path) -> None:
    run, began = _deploying(world, tmp_path, "rs-late")
    r = run.call("POST", "/report", json={"stage": "deploy", "outcome": "failed", "message": "step timed out"})
    assert r.status_code == 200 and r.json()["phase"] == "rolling_back"
    fake = FakeDeployment({"model": "rs-late", "version": 1})
    try:
        late = run.finish(began["job_id"], report={"image_digest": DIGEST, "url": fake.url})
    finally:
        fake.close()
    assert (late["outcome"], late["already"], late["phase"]) == ("failed", True, "rolling_back")
    assert run.job(began["job_id"])["state"] == "failed"
    assert run.deployment(began["work"]["deployment_id"])["state"] != "ready"
    assert run.stage("rollback")["phase"] == "failed"
    assert "deploy failed in the pipeline: step timed out" in run.release()["error"]


# --- a runner that goes silent ------------------------------------------------------------------


def test_a_silent_runner_fails_the_release_and_its_job_is_closed(world: tuple[Service, ScriptedGitHub],
                                                                 tmp_path: Path) -> None:
    run = start(world, tmp_path, "quiet-runner")  # pipeline.report_timeout_s: 3
    job_id = run.begin("build")["job_id"]
    deadline = time.monotonic() + 5  # log posts are signs of life: past the timeout, still building
    while time.monotonic() < deadline:
        assert run.log(job_id, ["still building"]).status_code == 200
        time.sleep(0.5)
    assert run.release()["phase"] == "building"
    rel = wait_until(lambda: (r := run.release())["phase"] in ("failed", "cancelled", "succeeded") and r,
                     timeout_s=20)  # now silent
    assert rel["phase"] == "failed" and "reported nothing" in rel["error"] and "report_timeout_s" in rel["error"]
    job = run.job(job_id)
    assert job["state"] == "failed" and "reported nothing" in job["error"]
    assert any(line.startswith("closed by the service: pipeline run") for line in run.job_lines(job_id))
    assert [j["type"] for j in rel["jobs"]] == ["build", "rollback"]
    # the runner that wakes up is told to stop; its report changes nothing
    r = run.log(job_id, ["back"])
    assert r.status_code in (200, 401)  # the release finished: its token may be revoked already
    if r.status_code == 200:
        assert r.json()["cancel"] is True
    assert run.call("POST", f"/jobs/{job_id}/finish", token=TOKEN,
                    json={"outcome": "succeeded", "report": {"image": "x/y:1", "image_digest": DIGEST}}
                    ).json()["already"] is True
    assert run.release()["phase"] == "failed"


# --- after a restart ----------------------------------------------------------------------------


def test_release_tokens_stay_out_of_logs_after_a_restart(world: tuple[Service, ScriptedGitHub], tmp_path: Path) -> None:
    run = start(world, tmp_path, "rs-restart")
    first = run.begin("build")["job_id"]
    run.svc.stop()
    run.svc.start()
    assert run.job(first)["state"] == "failed"  # interrupted by the restart
    job_id = run.begin("build")["job_id"]
    assert run.log(job_id, [f"docker login -p {run.token}"]).status_code == 200
    assert run.job_lines(job_id)[-1] == "docker login -p ***"


# --- work the service cannot hand over (in process: a version only referenced) ----------------


def test_a_build_with_nothing_to_hand_over_fails_the_stage_and_leaves_no_open_job(ctx: Context,
                                                                                 client: FlaskClient) -> None:
    ctx.policies.put("name: p\nrunner: github\npipeline: {repo: acme/models, token_env: GH}\n"
                     "environments:\n  - name: production\n    target: docker\n")
    ctx.registry.register_reference("rs-ref", RegisterMetadata(source=Source.MLFLOW, external_ref="models:/ref/3"))
    rid = start_release(ctx, "rs-ref", 1, "production")
    assert ctx.releases.claim(rid)
    token = ctx.pipeline_runs.mint(rid, "github")
    r = client.post(f"/api/v1/releases/{rid}/stages/build/begin", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.get_json()
    began = r.get_json()
    assert (began["run_in"], began["outcome"], began["phase"], "job_id" in began) == (
        "runner", "failed", "rolling_back", False)
    assert began["error"].startswith("build failed: rs-ref v1 is referenced only (models:/ref/3)")
    (job,) = ctx.jobs.list(release_id=rid)
    assert (job.runs_in, job.state.value, job.error) == ("runner", "failed", began["error"].removeprefix(
        "build failed: "))
