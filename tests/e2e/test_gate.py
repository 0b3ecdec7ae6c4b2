"""The approval gate on a real service: after smoke, a release waits for a person with its
new deployment ready and production untouched; approve moves traffic, reject rolls back, an
unanswered gate times out, a stop ends it, and the wait survives a restart of the service."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Service, iris_model, running_service, wait_until

POLICIES = ("""\
name: gated
match:
  models: ["gt-*"]
environments:
  - name: production
    approval: true
smoke:
  requests: 3
""", """\
name: gated-quick
match:
  models: ["gq-*"]
environments:
  - name: production
    approval: true
    approval_timeout_s: 2
smoke:
  requests: 3
""")


@pytest.fixture(scope="module")
def gated_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("gate-svc"), POLICIES[0]) as svc:
        svc.apply_policy(POLICIES[1])
        yield svc


def _at_gate(svc: Service, name: str, folder: Path, c: float = 1.0) -> dict[str, Any]:
    v = svc.register(name, folder, iris_model(folder, c=c))
    rel = svc.client.find_release(name, v["version"])
    assert rel is not None
    rel = svc.client.wait_release(rel["id"], timeout_s=300)
    assert rel["phase"] == "awaiting_approval", svc.job_log(rel["id"])
    return rel


def _finished(svc: Service, release_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """The release once it ended (``wait_release`` also returns at the gate)."""
    return wait_until(lambda: (r := svc.release_detail(release_id))["phase"] in
                      ("succeeded", "failed", "cancelled") and r, timeout_s)


def _live_versions(svc: Service, name: str) -> list[int]:
    deps = svc.api("GET", "/deployments", params={"model": name, "live": "1"}).json()["deployments"]
    return sorted(d["version"] for d in deps)


def test_approve_then_reject_with_production_untouched_until_approved(gated_service: Service, tmp_path: Path) -> None:
    svc = gated_service
    first = _at_gate(svc, "gt-iris", tmp_path / "v1")
    assert svc.api("GET", "/endpoints/gt-iris/production").status_code == 404 or \
        not svc.endpoint("gt-iris").get("traffic")  # nothing serves before the first approval
    result = CliRunner().invoke(main, ["releases", "approve", first["id"], "--comment", "looks good"], env=svc.env,
                                catch_exceptions=False)
    assert result.exit_code == 0 and "approved release" in result.output, result.output
    done = svc.client.wait_release(first["id"], timeout_s=120)
    assert done["phase"] == "succeeded", svc.job_log(first["id"])
    events = {e["kind"]: e["message"] for e in svc.release_detail(first["id"])["events"]}
    assert events["release.approved"] == "approved by admin: looks good"
    assert svc.endpoint("gt-iris")["traffic"] == {"1": 100}

    second = _at_gate(svc, "gt-iris", tmp_path / "v2", c=0.05)
    assert svc.endpoint("gt-iris")["traffic"] == {"1": 100}  # smoke passed, traffic did not move
    assert _live_versions(svc, "gt-iris") == [1, 2]  # the new deployment waits, ready
    r = svc.api("POST", f"/releases/{second['id']}/reject", json={"comment": "not this week"})
    assert r.status_code == 200 and r.json()["phase"] == "rolling_back", r.text
    done = svc.client.wait_release(second["id"], timeout_s=120)
    assert done["phase"] == "failed" and done["error"] == "rejected by admin: not this week", done
    assert svc.endpoint("gt-iris")["traffic"] == {"1": 100} and _live_versions(svc, "gt-iris") == [1]
    # only a release at its gate can be answered, and only with the token
    r = svc.api("POST", f"/releases/{second['id']}/approve")
    assert r.status_code == 409 and "not awaiting approval" in r.json()["message"]
    r = svc.api("POST", f"/releases/{first['id']}/approve", headers={})
    assert r.status_code == 401


def test_the_gate_survives_a_restart_and_a_stop_ends_it(gated_service: Service, tmp_path: Path) -> None:
    svc = gated_service
    waiting = _at_gate(svc, "gt-restart", tmp_path / "v1")
    svc.stop()
    svc.start()
    assert svc.release_detail(waiting["id"])["phase"] == "awaiting_approval"
    r = svc.api("POST", f"/releases/{waiting['id']}/approve", json={})
    assert r.status_code == 200, r.text
    assert svc.client.wait_release(waiting["id"], timeout_s=120)["phase"] == "succeeded"

    stopped = _at_gate(svc, "gt-restart", tmp_path / "v2", c=0.05)
    result = CliRunner().invoke(main, ["releases", "stop", stopped["id"], "--json"], env=svc.env,
                                catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.output)["cancel_requested"] is True, result.output
    done = _finished(svc, stopped["id"])
    assert done["phase"] == "cancelled", done
    assert svc.endpoint("gt-restart")["traffic"] == {"1": 100} and _live_versions(svc, "gt-restart") == [1]


def test_an_unanswered_gate_times_out_and_bad_comments_are_refused(gated_service: Service, tmp_path: Path) -> None:
    svc = gated_service
    rel = _at_gate(svc, "gq-iris", tmp_path / "v1")
    r = svc.api("POST", f"/releases/{rel['id']}/approve", json={"comment": 5})
    assert r.status_code == 400 and r.json()["field"] == "comment"
    started = time.monotonic()
    done = _finished(svc, rel["id"], 60)
    assert done["phase"] == "failed" and "not approved within 2s (approval_timeout_s)" in done["error"], done
    assert time.monotonic() - started < 30
    wait_until(lambda: _live_versions(svc, "gq-iris") == [], 30)
    assert requests.get(f"{svc.url}/healthz", timeout=5).status_code == 200


def test_cli_register_wait_returns_at_the_gate(gated_service: Service, tmp_path: Path) -> None:
    svc = gated_service
    meta = iris_model(tmp_path / "m")
    (tmp_path / "sample.json").write_text(json.dumps(meta["sample"]))
    result = CliRunner().invoke(main, ["register", "gt-cli", str(tmp_path / "m"), "--sample",
                                       str(tmp_path / "sample.json"), "--wait"], env=svc.env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "awaiting_approval" in result.output and "waits for a person" in result.output
    rel = svc.client.find_release("gt-cli", 1)
    assert rel is not None and rel["phase"] == "awaiting_approval"
    result = CliRunner().invoke(main, ["releases", "reject", rel["id"], "--json"], env=svc.env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    answered = json.loads(result.output)
    assert answered["id"] == rel["id"] and answered["phase"] == "rolling_back"
    done = _finished(svc, rel["id"])
    assert done["phase"] == "failed" and done["error"] == "rejected by admin"
