"""A crashed scoring process is not an outage while a warm standby runs: the router sends
its traffic to the standby at once, and the supervisor starts the crashed deployment again
without waiting for the next reconcile."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import requests

from tests.conftest import Hammer, iris_model, running_service, wait_until


def test_kill9_of_the_serving_deployment_fails_over_to_the_standby(tmp_path: Path) -> None:
    with running_service(tmp_path) as svc:
        meta = iris_model(tmp_path / "v1")
        svc.register("fo-iris", tmp_path / "v1", meta)
        assert svc.wait_release_for("fo-iris", 1)["phase"] == "succeeded"
        svc.register("fo-iris", tmp_path / "v2", iris_model(tmp_path / "v2", c=0.05))
        assert svc.wait_release_for("fo-iris", 2)["phase"] == "succeeded"
        deps = {d["version"]: d for d in svc.api("GET", "/deployments", params={"model": "fo-iris", "live": "1"})
                .json()["deployments"]}
        assert deps[2]["state"] == "serving" and deps[1]["state"] == "standby"
        ep = svc.endpoint("fo-iris")

        with Hammer(ep["scoring_uri"], meta["sample"], headers=svc.auth(ep), threads=4, max_s=60) as hammer:
            time.sleep(1.0)
            killed_at = time.monotonic()
            os.killpg(deps[2]["pid"], signal.SIGKILL)  # the scoring process and its workers
            time.sleep(3.0)
        total = hammer.ok + len(hammer.failures)
        assert total > 200, total
        assert len(hammer.failures) <= max(4, total // 100), (len(hammer.failures), total, hammer.failures[:5])
        late = [t - killed_at for t in hammer.failed_at if t - killed_at > 1.0]
        assert late == [], late  # recovered within a second of the kill
        assert hammer.versions.get("1", 0) > 0, hammer.versions  # the standby answered meanwhile

        def restarted() -> dict[str, object] | None:
            [d] = [d for d in svc.api("GET", "/deployments", params={"model": "fo-iris", "live": "1"})
                   .json()["deployments"] if d["id"] == deps[2]["id"]]
            return d if d["pid"] != deps[2]["pid"] and psutil.pid_exists(d["pid"]) else None

        again = wait_until(restarted, timeout_s=9)  # before the 10 s reconcile tick
        assert again["state"] == "serving"
        wait_until(lambda: requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=5)
                   .headers.get("X-Modelcd-Version") == "2", timeout_s=10)
