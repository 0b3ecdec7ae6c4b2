"""Release plans against a real service: a plan leaves no release, job, event, deployment,
build or process behind, and the releases that follow do what their plans said (policy,
environment, strategy, artifact reused, what retires, what a rollback returns to);
``policies apply --plan`` lists the versions a change would affect and stores nothing."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Service, iris_model, running_service

POLICY = """\
name: planned
match: {models: [planned]}
auto: false
environments:
  - name: production
    env: {OMP_NUM_THREADS: "1"}
retention: {keep_deployments: 2}
smoke: {requests: 2}
"""


def _cli(svc: Service, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=svc.env, catch_exceptions=False)
    return result.exit_code, result.output


def _rows(svc: Service) -> dict[str, int]:
    path = svc.home / "modelcd.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _built(svc: Service) -> set[str]:
    """Everything a build or a deploy leaves in the home (bytecode aside: a new environment's is
    compiled in the background after its build, and any import may write it)."""
    found: set[str] = set()
    for folder in ("bundles", "envs", "images", "deployments", "locks"):
        root = svc.home / folder
        if root.is_dir():
            found |= {str(p.relative_to(svc.home)) for p in root.rglob("*")
                      if ".modelcd-tmp" not in p.name and "__pycache__" not in p.parts}
    return found


def _processes(svc: Service) -> set[int]:
    assert svc.proc is not None
    return {p.pid for p in psutil.Process(svc.proc.pid).children(recursive=True)}


def _snapshot(svc: Service) -> tuple[dict[str, int], set[str], set[int]]:
    return _rows(svc), _built(svc), _processes(svc)


def _plan(svc: Service, version: int, env: str | None = "production") -> dict[str, Any]:
    r = svc.api("GET", f"/models/planned/versions/{version}/plan", params={"environment": env} if env else None,
                headers={})  # a read: no token
    assert r.status_code == 200, r.text
    return r.json()


def _promote(svc: Service, version: int) -> dict[str, Any]:
    r = svc.api("POST", "/releases", json={"model": "planned", "version": version, "environment": "production"})
    assert r.status_code == 202, r.text
    rel = svc.client.wait_release(r.json()["id"], timeout_s=300)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    return svc.release_detail(rel["id"])


def _check_release_did(svc: Service, plan: dict[str, Any], rel: dict[str, Any]) -> None:
    """The release ``rel`` did what ``plan`` (made just before it) said."""
    [env] = plan["environments"]
    assert rel["policy_name"] == plan["policy"]["name"]
    assert rel["policy"]["name"] == plan["policy"]["name"]
    assert rel["environment"] == env["name"] and rel["trigger"] == plan["trigger"] == "manual"
    assert [j["type"] for j in rel["jobs"]] == ["build", "deploy", "smoke", "promote"]
    assert rel["bundle"] == env["artifact"]["bundle"]
    log = svc.job_log(rel["id"])
    assert ("reusing environment" in log) is env["artifact"]["cache_hit"], log
    dep = next(d for d in svc.api("GET", "/deployments", params={"model": "planned"}).json()["deployments"]
               if d["id"] == rel["deployment_id"])
    assert dep["spec"]["workers"] == env["deployment"]["workers"]
    assert sorted(dep["spec"]["env"]) == env["deployment"]["env_names"]
    assert dep["state"] == "serving" and dep["target"] == env["target"]
    ep = svc.endpoint("planned")
    assert ep["traffic"] == {str(plan["version"]): 100}  # blue-green: all at once
    assert (ep["previous_traffic"] or {}) == env["rollback"]["to"]  # what `modelcd rollback` returns to
    retired = {d["id"] for d in svc.api("GET", "/deployments", params={"model": "planned"}).json()["deployments"]
               if d["state"] == "stopped"}
    assert {d["id"] for d in env["retire"]["deployments"]} <= retired


def test_plans_change_nothing_and_match_what_the_releases_do(tmp_path: Path) -> None:
    with running_service(tmp_path, POLICY) as svc:
        for n, c in ((1, 1.0), (2, 0.5), (3, 0.1)):
            v = svc.register("planned", tmp_path / f"v{n}", iris_model(tmp_path / f"v{n}", c=c))
            assert v["version"] == n
        time.sleep(0.5)  # the dispatcher records the registrations (auto: false: no release)
        assert svc.api("GET", "/releases").json()["releases"] == []

        # v1: nothing built, nothing served; planning leaves nothing behind
        before = _snapshot(svc)
        plan1 = _plan(svc, 1)
        whole = _plan(svc, 1, env=None)
        code, text = _cli(svc, "releases", "plan", "planned", "1", "--env", "production")
        assert code == 0, text
        code, as_json = _cli(svc, "releases", "plan", "planned", "1", "--json")
        assert code == 0 and json.loads(as_json)["releases_to"] == []
        assert _snapshot(svc) == before
        assert whole["auto"] is False and whole["releases_to"] == [] and "auto: false" in whole["summary"]
        assert plan1["policy"]["name"] == "planned" and plan1["policy"]["why"].startswith("the only matching policy")
        [env1] = plan1["environments"]
        assert env1["artifact"]["cache_hit"] is False and env1["artifact"]["bundle_built"] is False
        assert env1["rollback"]["available"] is False and env1["retire"]["deployments"] == []
        assert env1["deployment"]["env_names"] == ["OMP_NUM_THREADS"]
        assert "policy:   planned (revision 1" in text and "[1/1] production: process target, blue-green" in text
        assert "environment" in text and "not built yet" in text and "nothing to return to" in text
        rel1 = _promote(svc, 1)
        _check_release_did(svc, plan1, rel1)

        # v2: the environment is reused (same requirements); a rollback would return to v1
        plan2 = _plan(svc, 2)
        [env2] = plan2["environments"]
        assert env2["artifact"]["cache_hit"] is True and env2["artifact"]["env_key"] == env1["artifact"]["env_key"]
        assert env2["rollback"]["to"] == {rel1["deployment_id"]: 100} and env2["rollback"]["versions"] == {"1": 100}
        assert env2["retire"]["deployments"] == []
        code, text = _cli(svc, "releases", "plan", "planned", "2", "--env", "production")
        assert "already built (cache hit)" in text and "back to v1" in text
        rel2 = _promote(svc, 2)
        _check_release_did(svc, plan2, rel2)

        # v3: keep_deployments 2 retires v1 (neither serving nor what a rollback returns to)
        before = _snapshot(svc)
        plan3 = _plan(svc, 3)
        assert _snapshot(svc) == before
        [env3] = plan3["environments"]
        assert [d["id"] for d in env3["retire"]["deployments"]] == [rel1["deployment_id"]]
        assert env3["rollback"]["to"] == {rel2["deployment_id"]: 100}
        code, text = _cli(svc, "releases", "plan", "planned", "3", "--env", "production")
        assert f"retires:   {rel1['deployment_id']} (v1)" in text
        rel3 = _promote(svc, 3)
        _check_release_did(svc, plan3, rel3)
        live = {d["version"] for d in svc.api("GET", "/deployments", params={"model": "planned", "live": "1"}).json()[
            "deployments"]}
        assert live == {2, 3}
        r = svc.api("POST", "/endpoints/planned/production/rollback")
        assert r.status_code == 200 and svc.endpoint("planned")["traffic"] == env3["rollback"]["versions"]

        # the planned version that serves now: reused, nothing retires, rollback to its own previous split
        plan2_again = _plan(svc, 2)
        [env] = plan2_again["environments"]
        assert env["endpoint"]["reuses_deployment"] == rel2["deployment_id"]
        assert env["endpoint"]["serves_this_version"] is True

        # errors name the field and the fix
        r = svc.api("GET", "/models/planned/versions/9/plan")
        assert r.status_code == 404 and r.json()["field"] == "version"
        code, text = _cli(svc, "releases", "plan", "planned", "1", "--env", "staging")
        assert code != 0 and "no environment 'staging'" in text and "[environment]" in text
        code, text = _cli(svc, "releases", "plan", "nope", "1")
        assert code != 0 and "modelcd models" in text


def test_policies_apply_plan_lists_changed_versions_and_stores_nothing(tmp_path: Path) -> None:
    with running_service(tmp_path, POLICY) as svc:
        svc.register("planned", tmp_path / "p", iris_model(tmp_path / "p"))
        svc.register("other", tmp_path / "p", {**iris_model(tmp_path / "p"), "release": False})  # no release
        time.sleep(0.5)  # the dispatcher records both registrations
        changed = tmp_path / "changed.yaml"
        changed.write_text(POLICY.replace("    env: {OMP_NUM_THREADS: \"1\"}\n",
                                          "    strategy: canary\n    step_hold_s: 5\n    approval: true\n"))
        rows = _rows(svc)
        code, out = _cli(svc, "policies", "apply", str(changed), "--plan")
        assert code == 0, out
        assert "policy planned (content" in out and "stored revision 1" in out and "1 of 2 current versions" in out
        assert "planned v1 (latest version): policy planned, new settings" in out
        assert "environments.production.strategy: blue-green → canary" in out
        assert "environments.production.approval: false → true" in out
        assert "environments.production.env.OMP_NUM_THREADS: removed" in out
        assert "other v1 (latest version): no change (policy default)" in out
        assert "nothing was stored" in out
        code, out = _cli(svc, "policies", "apply", str(changed), "--plan", "--json")
        assert code == 0 and json.loads(out)["changed"] == 1
        assert svc.api("GET", "/policies/planned").json()["revision"] == 1
        assert _rows(svc) == rows
        r = svc.api("POST", "/policies/plan", data="name: planned\n", headers={})
        assert r.status_code == 401  # the same token as apply
        r = svc.api("POST", "/policies/plan", data="name: planned\nenvironments: [{name: production, strategy: x}]\n",
                    headers={"Authorization": f"Bearer {svc.env['MODELCD_TOKEN']}",
                             "Content-Type": "application/yaml"})
        assert r.status_code == 400 and "request body:2: environments[0].strategy" in r.json()["message"]
