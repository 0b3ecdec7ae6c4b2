"""A deployment started again after a crash is the one that was released: the policy's
environment variables and worker count come back with it (process target; the docker
target's limits are checked in tests/containers)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import requests

from tests.conftest import custom_model, running_service, wait_until

POLICY = """\
name: fidelity
match:
  models: ["fid-*"]
environments:
  - name: production
    scoring_workers: 1
    env:
      MY_VAR: hello
      MY_SECRET: {secret_env: FIDELITY_SECRET}
smoke:
  requests: 2
"""

SECRET = "s3cr3t-by-reference"
SHOWS_ENV = """\
import os

def init():
    pass

def run(raw_data):
    return [os.environ.get("MY_VAR", "<unset>"), os.environ.get("MY_SECRET", "<unset>")]
"""


def test_a_restarted_deployment_keeps_the_policy_env_and_workers(tmp_path: Path) -> None:
    with running_service(tmp_path, POLICY, FIDELITY_SECRET=SECRET) as svc:
        svc.register("fid-env", tmp_path / "v1", custom_model(tmp_path / "v1", SHOWS_ENV))
        rel = svc.wait_release_for("fid-env", 1)
        assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
        ep = svc.endpoint("fid-env")
        headers = svc.auth(ep)
        assert requests.post(ep["scoring_uri"], headers=headers, json={"data": [[1.0]]}, timeout=10).json() \
            == ["hello", SECRET]
        [dep] = svc.api("GET", "/deployments", params={"model": "fid-env", "live": "1"}).json()["deployments"]
        assert dep["spec"]["env"] == {"MY_VAR": "(set)", "MY_SECRET": "(set)"}  # names only in reads
        assert dep["spec"]["workers"] == 1
        for stored in svc.home.glob("modelcd.db*"):  # a reference is stored, never the value
            assert SECRET.encode() not in stored.read_bytes(), stored

        os.killpg(dep["pid"], signal.SIGKILL)  # the scoring process and its workers
        svc.kill9()  # and the control plane
        wait_until(lambda: not psutil.pid_exists(dep["pid"]) or
                   psutil.Process(dep["pid"]).status() == psutil.STATUS_ZOMBIE, timeout_s=10)
        svc.start()

        def answered() -> requests.Response | None:
            try:
                r = requests.post(ep["scoring_uri"], headers=headers, json={"data": [[1.0]]}, timeout=5)
            except requests.RequestException:
                return None
            return r if r.status_code == 200 else None

        r = wait_until(answered, timeout_s=90, poll_s=0.2)
        assert r.json() == ["hello", SECRET]
        [again] = svc.api("GET", "/deployments", params={"model": "fid-env", "live": "1"}).json()["deployments"]
        assert again["id"] == dep["id"] and again["pid"] != dep["pid"]  # the same deployment, started anew
        workers = [p for p in psutil.Process(again["pid"]).children(recursive=True) if p.status() != "zombie"]
        assert len(workers) == 1, [p.cmdline() for p in workers]  # scoring_workers: 1, not the service default 2
        time.sleep(0.1)
