"""`kill -9` of the control plane: the data plane keeps serving, in-flight releases finish
or roll back after a restart, and the restart re-adopts what was serving."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psutil
import requests

from tests.conftest import Hammer, Service, iris_model


def _deployments(svc: Service, name: str) -> dict[str, tuple[int, int, str]]:
    deps = svc.api("GET", "/deployments", params={"model": name, "live": "1"}).json()["deployments"]
    return {d["id"]: (d["version"], d["pid"], d["state"]) for d in deps}


def test_kill9_while_scoring_drops_nothing_and_restart_readopts(service: Service, tmp_path: Path) -> None:
    svc = service
    meta = iris_model(tmp_path / "v1")
    svc.register("iris", tmp_path / "v1", meta)
    assert svc.wait_release_for("iris", 1)["phase"] == "succeeded"
    meta2 = iris_model(tmp_path / "v2", c=0.05)
    svc.register("iris", tmp_path / "v2", meta2)
    assert svc.wait_release_for("iris", 2)["phase"] == "succeeded"
    before = _deployments(svc, "iris")
    assert sorted(v for v, _, _ in before.values()) == [1, 2]  # v1 kept warm
    ep = svc.endpoint("iris")
    router_pid = int((svc.home / "router" / "router.pid").read_text().split()[0])

    with Hammer(ep["scoring_uri"], meta["sample"], headers=svc.auth(ep), threads=4) as hammer:
        time.sleep(0.5)
        svc.kill9()
        time.sleep(2)  # control plane down: the data plane answers alone
        down_ok = hammer.ok
        svc.start()
        time.sleep(1)
    assert hammer.failures == [], hammer.failures[:5]
    assert down_ok > 0 and hammer.ok > down_ok
    assert _deployments(svc, "iris") == before  # same deployments, same pids
    assert int((svc.home / "router" / "router.pid").read_text().split()[0]) == router_pid
    assert svc.endpoint("iris")["traffic"] == {"2": 100}


def test_kill9_mid_release_then_restart_finishes_or_rolls_back(service: Service, tmp_path: Path) -> None:
    svc = service
    meta = iris_model(tmp_path / "v1")
    svc.register("iris", tmp_path / "v1", meta)
    assert svc.wait_release_for("iris", 1)["phase"] == "succeeded"

    for phase in ("deploying", "smoke_testing"):
        folder = tmp_path / f"next-{phase}"
        nxt = iris_model(folder, c=0.2)
        v = svc.register("iris", folder, nxt)
        rel = svc.client.find_release("iris", v["version"])
        assert rel is not None
        deadline = time.monotonic() + 120
        while svc.client.get(f"/api/v1/releases/{rel['id']}")["phase"] not in (phase, "succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        svc.kill9()
        svc.start()
        done = svc.client.wait_release(rel["id"], timeout_s=180)
        assert done["phase"] in ("succeeded", "failed"), done
        serving = svc.endpoint("iris")["traffic"]
        if done["phase"] == "succeeded":
            assert serving == {str(v["version"]): 100}
        ep = svc.endpoint("iris")
        r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
        assert r.status_code == 200
        assert r.headers["X-Modelcd-Version"] == next(iter(serving))
        events = [e["kind"] for e in svc.release_detail(rel["id"])["events"]]
        assert "release.resumed" in events or done["phase"] == "succeeded"
        # nothing the release started is left running beside what serves and what is kept warm
        live = _deployments(svc, "iris")
        assert len(live) <= 2, live
        assert _running_deployments(svc.home) <= set(live), (_running_deployments(svc.home), live)


def _running_deployments(home: Path) -> set[str]:
    """Deployment ids of the scoring processes running from bundles under ``home`` (what the
    operating system says, not the store)."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] != psutil.STATUS_ZOMBIE and "modelcd.scoring" in cmdline \
                    and any(str(home) in arg for arg in cmdline):
                found.add(proc.environ().get("MODELCD_DEPLOYMENT_ID", "?"))
    return found


def test_a_deployment_stopped_while_the_reconciler_restarts_it_leaves_no_process(service: Service,
                                                                                  tmp_path: Path) -> None:
    """The reconciler starts again a serving deployment whose process is gone; a rollback or a
    retirement that records the deployment stopped in the meantime (they record the stop before
    the process ends) must not leave the process the reconciler just started behind."""
    from modelcd.context import build_context
    from modelcd.domain import DeploymentState
    from modelcd.releases.reconcile import reconcile

    svc = service
    meta = iris_model(tmp_path / "v1")
    svc.register("iris", tmp_path / "v1", meta)
    assert svc.wait_release_for("iris", 1)["phase"] == "succeeded"
    ((dep_id, (_, pid, state)),) = _deployments(svc, "iris").items()
    assert state == "serving"
    svc.stop()  # this test is the control plane now
    ctx = build_context(svc.settings)
    proc = psutil.Process(pid)
    proc.kill()
    proc.wait(10)
    said: list[str] = []

    def say(line: str) -> None:  # the stop of a rollback lands while the reconciler starts it again
        said.append(line)
        if "is gone; starting it again" in line:
            ctx.deployments.update(dep_id, state=DeploymentState.STOPPED)

    report = reconcile(ctx, say)
    assert report.restarted == [] and any("stopped meanwhile" in line for line in said), said
    dep = ctx.deployments.get(dep_id)
    assert dep.state is DeploymentState.STOPPED and dep.pid == pid  # the record untouched by the restart
    started = [line for line in said if line.startswith("started scoring process")]
    assert len(started) == 1, said
    new_pid = int(started[0].split()[3])
    assert not psutil.pid_exists(new_pid) or psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE
