"""Stages that run in the CI runner, end to end (issue 10, part 3): a model registered in a real
MLflow server reaches production through a GitHub Actions run, and the run does the work.

MLflow's webhook reaches `modelcd serve`, whose GitHub runner dispatches the rendered workflow
to a contract-checking stand-in for GitHub's API, which runs it with `act` (self-hosted: the
runner is this machine, with the runner's own MODELCD_HOME and registry secrets). In the run,
`modelcd build --release` builds the scoring image with the runner's Docker engine and pushes
it to a local registry (Debian's docker-registry, htpasswd auth) with the secrets; `deploy`
pulls it by digest and starts it; `smoke` tests it from the runner; `promote` asks the service,
whose router moves traffic. The service's record names the pushed digest, which is the one the
container runs. A version whose smoke test fails in the runner runs the rollback job: the
container is stopped and production keeps serving the version before.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Service, iris_model, make_service
from tests.containers.conftest import BaseImage, containers_of, local_registry, remove_containers
from tests.pipelines.github_standin import GH_TOKEN, REPO, GitHubStandIn
from tests.sources.mlflow_fixture import MlflowServer, mlflow_server_fixture  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

NAME = "rs-iris"


@dataclass
class Setup:
    svc: Service
    stand_in: GitHubStandIn
    registry: str
    user: str
    password: str
    mlflow: MlflowServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, base_image: BaseImage, engine: Any, docker_home: Path,
          mlflow_server: MlflowServer) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("runner-stages")
    remote = root / "models.git"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch", "main", str(remote)], check=True)
    (root / "registry").mkdir()
    with local_registry(root / "registry") as (address, user, password):
        # the runner: its own home (the session's image-build home, whose wheelhouse is warm), the
        # registry credentials as its secrets; nothing of the service's
        stand_in = GitHubStandIn(str(remote), root, act_args=[
            "--env", f"MODELCD_HOME={docker_home}", "--env", "MODELCD_DOCKER_NETWORK=host",
            "-s", f"MODELCD_REGISTRY_USERNAME={user}", "-s", f"MODELCD_REGISTRY_PASSWORD={password}"])
        svc = make_service(root / "svc", MODELCD_TEST_GH_TOKEN=GH_TOKEN, MODELCD_DOCKER_BASE_IMAGE=base_image.tag,
                           MODELCD_DOCKER_REPOSITORY="modelcd-test")
        connect = CliRunner().invoke(main, ["sources", "connect", "mlflow", "--tracking-uri",
                                            mlflow_server.tracking_uri], env=svc.env, catch_exceptions=False)
        assert connect.exit_code == 0, connect.output
        svc.start()
        try:
            svc.apply_policy(f"""\
name: runner-stages
match: {{models: ["rs-*"]}}
runner: github
pipeline:
  repo: {REPO}
  api_url: {stand_in.url}
  token_env: MODELCD_TEST_GH_TOKEN
  poll_interval_s: 2
  registry: {address}/ci
environments:
  - name: production
    target: docker
    network: host
    scoring_workers: 1
smoke: {{requests: 5}}
""")
            out = subprocess.run(["modelcd", "pipelines", "publish", NAME, "--provider", "github", "--repo",
                                  str(remote), "--branch", "main"], env=svc.env, capture_output=True, text=True,
                                 check=False)
            assert out.returncode == 0, out.stdout + out.stderr
            yield Setup(svc, stand_in, address, user, password, mlflow_server)
        finally:
            svc.stop()
            svc.shutdown_data_plane()
            stand_in.close()
            remove_containers(engine, svc.home)
            from modelcd.sources.mlflow_server import disconnect_webhook

            disconnect_webhook(mlflow_server.tracking_uri)


def _release(svc: Service, version: int) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while svc.client.find_release(NAME, version) is None:
        assert time.monotonic() < deadline, svc.api("GET", "/inbox").json()
        time.sleep(0.5)
    rel = svc.wait_release_for(NAME, version, timeout_s=900)
    return svc.release_detail(rel["id"])


def _manifest_digest(s: Setup, image: str) -> str:
    """What the registry itself says the pushed tag's digest is."""
    repo, _, tag = image.removeprefix(s.registry + "/").rpartition(":")
    r = requests.head(f"http://{s.registry}/v2/{repo}/manifests/{tag}", auth=(s.user, s.password), timeout=10,
                      headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                         "application/vnd.oci.image.manifest.v1+json"})
    assert r.status_code == 200, (r.status_code, r.text)
    return str(r.headers["Docker-Content-Digest"])


def test_mlflow_registration_is_built_pushed_deployed_and_smoke_tested_in_the_runner(
        setup: Setup, engine: Any) -> None:
    s, svc = setup, setup.svc
    mlflow_version = s.mlflow.register_sklearn(NAME, C=1.0)
    detail = _release(svc, 1)
    run_id = s.stand_in.finished_run(120)
    act_log = s.stand_in.act_log(run_id)
    assert detail["phase"] == "succeeded", (detail["error"], svc.job_log(detail["id"]), act_log[-6000:])
    assert s.stand_in.problems == []

    # the runner did build, deploy and smoke; the service promoted
    jobs = {j["type"]: j for j in detail["jobs"]}
    assert [j["type"] for j in detail["jobs"]] == ["build", "deploy", "smoke", "promote"]
    assert [jobs[t]["runs_in"] for t in ("build", "deploy", "smoke", "promote")] == [
        "runner", "runner", "runner", "service"]
    for job in ("build", "deploy", "smoke", "promote"):
        assert f"Success - Main modelcd {job}" in act_log, act_log[-6000:]

    # the image: pushed by the runner into the policy's registry; the record names its digest,
    # which is what the registry holds and what the serving container runs
    image, digest = detail["image"], detail["image_digest"]
    assert image.startswith(f"{s.registry}/ci/modelcd-test/{NAME}:1-"), image
    assert digest.startswith("sha256:") and _manifest_digest(s, image) == digest
    (dep,) = svc.api("GET", "/deployments", params={"model": NAME, "live": "1"}).json()["deployments"]
    assert dep["spec"]["started_by"] == "runner" and dep["spec"]["image_digest"] == digest
    container = engine.containers.get(f"modelcd-{dep['id']}")
    assert container.status == "running"
    assert any(d.endswith("@" + digest) for d in engine.images.get(container.attrs["Image"]).attrs["RepoDigests"])

    # the whole record is the service's: the runner's lines are in its jobs' logs
    log = svc.job_log(detail["id"])
    assert "[build] build runs in the pipeline's runner" in log
    assert f"[build] pushed {image} ({digest})" in log
    assert "[build] downloaded the model files" in log
    assert f"[deploy] deployment {dep['id']} of {digest} ready" in log
    assert "[smoke] smoke checks passed in the runner" in log
    assert s.password not in log and s.password not in act_log  # the registry secret stays in the runner

    ep = svc.endpoint(NAME)
    v = svc.api("GET", f"/models/{NAME}/versions/1").json()
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=v["sample"], timeout=10)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "1"
    assert r.json()["predictions"] == [0, 0, 0]  # the first iris rows, all setosa
    # and the MLflow version carries the environment's alias (registry write-back)
    deadline = time.monotonic() + 30
    while True:
        try:
            aliased = s.mlflow.client().get_model_version_by_alias(NAME, "production")
            break
        except Exception:
            assert time.monotonic() < deadline, "MLflow never got the production alias"
            time.sleep(0.5)
    assert aliased.version == mlflow_version


def test_failing_smoke_in_the_runner_rolls_back_and_production_stays(
        setup: Setup, engine: Any, tmp_path: Path) -> None:
    s, svc = setup, setup.svc
    if svc.api("GET", f"/models/{NAME}").status_code == 404:
        test_mlflow_registration_is_built_pushed_deployed_and_smoke_tested_in_the_runner(setup, engine)
    before = svc.endpoint(NAME)["traffic"]
    serving = svc.api("GET", "/deployments", params={"model": NAME, "live": "1"}).json()["deployments"]
    wrong = iris_model(tmp_path / "wrong", expected_offset=1)  # the model answers; the expected output differs
    v = svc.register(NAME, tmp_path / "wrong", wrong)
    detail = _release(svc, v["version"])
    run_id = s.stand_in.finished_run(120)
    act_log = s.stand_in.act_log(run_id)
    assert detail["phase"] == "failed", act_log[-6000:]
    assert "smoke failed" in detail["error"] and "from the runner" in detail["error"], detail["error"]
    assert "Failure - Main modelcd smoke" in act_log and "Success - Main modelcd rollback" in act_log, act_log
    assert [j["type"] for j in detail["jobs"]] == ["build", "deploy", "smoke", "rollback"]
    assert svc.endpoint(NAME)["traffic"] == before
    # the failed version's container is gone; the serving one still runs
    names = {c.name for c in containers_of(engine, svc.home) if c.status == "running"}
    assert f"modelcd-{detail['deployment_id']}" not in names
    assert {f"modelcd-{d['id']}" for d in serving} <= names
    ep = svc.endpoint(NAME)
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=wrong["sample"], timeout=10)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "1"
