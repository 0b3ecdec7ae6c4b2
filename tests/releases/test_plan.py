"""Release plans in process, against a real store and home: which policy and why, the
fields of each target and strategy, errors naming the field, the retention choice shared
with ``Traffic.retire``, a policy's plan before it is applied, and that planning writes
nothing anywhere."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from modelcd.app import create_app
from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.domain import Deployment, DeploymentState, ModelVersion
from modelcd.errors import NotFound
from modelcd.registry.archive import pack_tree
from modelcd.registry.service import parse_metadata
from modelcd.releases.plan import plan_policy_change, plan_release, policy_differences
from modelcd.releases.plan_text import release_plan_lines
from modelcd.releases.policy import parse_policy
from modelcd.releases.traffic import retention_choice
from modelcd.store import schema
from tests.conftest import free_port, iris_model

TOKEN = "plan-test-token-0123456789"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    settings = load_settings(environ={
        "MODELCD_HOME": str(tmp_path / "home"), "MODELCD_TOKEN": TOKEN, "MODELCD_ROUTER_PORT": str(free_port()),
        "MODELCD_DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}"})  # an engine that does not answer
    c = build_context(settings)
    yield c
    c.db.dispose()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("iris") / "m"
    return folder, iris_model(folder)


def _register(ctx: Context, name: str, model: tuple[Path, dict[str, Any]], **meta: Any) -> ModelVersion:
    folder, base = model
    return ctx.registry.register(name, io.BytesIO(pack_tree(folder)), parse_metadata({**base, **meta}))


def _rows(ctx: Context) -> dict[str, int]:
    with ctx.db.read() as conn:
        return {t.name: int(conn.execute(select(func.count()).select_from(t)).scalar() or 0)
                for t in schema.metadata.sorted_tables}


def _files(home: Path) -> set[str]:
    return {str(p.relative_to(home)) for p in home.rglob("*")}


def test_the_matching_policy_and_the_rule_that_chose_it(ctx: Context, model_dir: Any) -> None:
    for text in ("name: all\nmatch: {models: ['*']}\n",
                 "name: iris-wide\nmatch: {models: ['iris*']}\n",
                 "name: iris-team\nmatch: {models: ['iris*'], tags: {team: a}}\n",
                 "name: iris-exact\nmatch: {models: ['iris-x', 'iris-x*']}\n"):
        ctx.policies.put(text)
    tagged = _register(ctx, "iris", model_dir, tags={"team": "a"})
    plan = plan_release(ctx, "iris", tagged.version)
    assert plan.policy.name == "iris-team" and plan.policy.stored_revision == 1
    assert plan.policy.rule is not None and plan.policy.rule.startswith("rule 1, more tag filters (1 vs 0)")
    assert "model glob 'iris*', 1 tag filter" in plan.policy.why
    considered = {c["name"]: c for c in plan.policy.considered}
    assert considered["iris-exact"]["matches"] is False
    assert "do not match 'iris'" in considered["iris-exact"]["reason"]

    untagged = _register(ctx, "iris", model_dir, tags={"team": "b"})
    plan = plan_release(ctx, "iris", untagged.version)
    assert plan.policy.name == "iris-wide"
    assert plan.policy.rule == "rule 2, a longer literal prefix of the matching model glob (4 vs 0 characters)"
    assert "wants tag team='a', the version has team='b'" in {c["name"]: c for c in plan.policy.considered}[
        "iris-team"]["reason"]

    exact = _register(ctx, "iris-x", model_dir)
    plan = plan_release(ctx, "iris-x", exact.version)
    assert plan.policy.name == "iris-exact" and plan.policy.glob == "iris-x"
    assert plan.policy.rule is not None and plan.policy.rule.startswith("rule 2, a longer literal prefix")

    other = _register(ctx, "churn", model_dir)
    plan = plan_release(ctx, "churn", other.version)
    assert plan.policy.name == "all" and plan.policy.why.startswith("the only matching policy")


def test_default_policy_process_target_fields(ctx: Context, model_dir: Any) -> None:
    v = _register(ctx, "iris", model_dir)
    plan = plan_release(ctx, "iris", v.version)
    assert plan.policy.name == "default" and plan.policy.why.startswith("default policy: no policy is stored")
    assert plan.chain == ("production",) and plan.releases_to == ("production",) and plan.trigger == "auto"
    [env] = plan.environments
    assert env.target == "process" and env.strategy["name"] == "blue-green"
    assert env.stages == {s: "service" for s in ("build", "deploy", "smoke", "promote", "rollback")}
    art = env.artifact
    assert art["kind"] == "bundle" and len(art["env_key"]) == 64 and art["env_built"] is False
    assert art["cache_hit"] is False and art["bundle_built"] is False
    assert art["bundle"] == str(ctx.home.absolute() / "bundles" / "iris" / f"{v.version}-{v.digest12}")
    assert env.rollback["available"] is False and env.retire["deployments"] == []
    assert env.endpoint["exists"] is False and env.endpoint["uri"].endswith("/iris/production")
    assert env.approval == {"required": False}
    assert env.policy["name"] == "production" and "strategy" in env.policy  # the step, every field
    doc = plan.to_dict()
    assert doc["environments"][0]["artifact"]["env_key"] == art["env_key"]


def test_canary_docker_gates_env_names_and_a_chain(ctx: Context, model_dir: Any) -> None:
    ctx.policies.put("""
name: fraud
match: {models: [fraud]}
environments:
  - name: staging
    target: docker
    network: host
    resources: {cpu: 0.5, memory: 512Mi}
    env: {OMP_NUM_THREADS: "1", DB_PASSWORD: {secret_env: FRAUD_DB}}
    auth: none
  - name: production
    strategy: canary
    steps: [5, 50, 100]
    step_hold_s: 30
    max_error_rate: 0.02
    max_p95_ms: 250
    approval: true
    approval_timeout_s: 600
    scoring_workers: 3
retention: {keep_deployments: 3}
smoke: {requests: 7}
""")
    v = _register(ctx, "fraud", model_dir)
    started = time.monotonic()
    plan = plan_release(ctx, "fraud", v.version)
    assert time.monotonic() - started < 10  # the engine that does not answer is not waited for long
    assert plan.releases_to == ("staging", "production") and "staging then production" in plan.summary
    staging, production = plan.environments
    image = staging.artifact
    assert image["kind"] == "image" and image["image"] == f"modelcd/fraud:{v.version}-{v.digest12}"
    assert image["image_built"] is None and image["cache_hit"] is None and image["note"].startswith("unknown")
    assert staging.deployment == {"workers": 2, "health_timeout_s": 60.0, "cpu": 0.5, "memory": "512m",
                                  "network": "host", "auth": "none", "env_names": ["DB_PASSWORD", "OMP_NUM_THREADS"],
                                  "secret_names": ["DB_PASSWORD"]}
    assert staging.policy["env"] == {"OMP_NUM_THREADS": "(set)", "DB_PASSWORD": "(set)"}
    assert "FRAUD_DB" not in str(plan.to_dict())  # names of variables, never what they hold or point at
    assert staging.smoke["requests"] == 7 and staging.smoke["sample"] is True

    strategy = production.strategy
    assert strategy["steps"] == [5, 50, 100] and strategy["step_hold_s"] == 30
    assert strategy["max_error_rate"] == 0.02 and strategy["max_p95_ms"] == 250
    assert strategy["effective_steps"] == [100]  # nothing serves there yet: all at once, as the release does
    assert production.approval["required"] is True and production.approval["timeout_s"] == 600
    assert production.deployment["workers"] == 3 and production.retire["keep"] == 3
    assert production.artifact["kind"] == "bundle"

    one = plan_release(ctx, "fraud", v.version, "production")
    assert one.trigger == "manual" and one.releases_to == ("production",) and len(one.environments) == 1


def test_a_pipeline_runner_builds_in_the_runner(ctx: Context, model_dir: Any) -> None:
    ctx.policies.put("""
name: gh
match: {models: [gh]}
runner: github
pipeline: {repo: acme/models, token_env: GITHUB_TOKEN, registry: 127.0.0.1:5000/models}
environments: [{name: production, target: docker}]
""")
    v = _register(ctx, "gh", model_dir)
    [env] = plan_release(ctx, "gh", v.version).environments
    assert env.stages == {"build": "runner", "deploy": "runner", "smoke": "runner", "promote": "service",
                          "rollback": "service"}
    assert env.artifact["image"] == f"127.0.0.1:5000/models/modelcd/gh:{v.version}-{v.digest12}"
    assert env.artifact["built_in"] == "runner" and env.artifact["cache_hit"] is None


def test_auto_false_releases_nothing_on_its_own(ctx: Context, model_dir: Any) -> None:
    ctx.policies.put("name: manual\nauto: false\nenvironments: [{name: staging}, {name: production}]\n")
    v = _register(ctx, "iris", model_dir)
    plan = plan_release(ctx, "iris", v.version)
    assert plan.auto is False and plan.releases_to == () and "modelcd promote iris" in plan.summary
    assert [e.name for e in plan.environments] == ["staging", "production"]


def test_unknown_model_version_or_environment_name_the_field(ctx: Context, model_dir: Any) -> None:
    v = _register(ctx, "iris", model_dir)
    with pytest.raises(NotFound) as e:
        plan_release(ctx, "nope", 1)
    assert e.value.field == "name" and "modelcd models" in e.value.message
    with pytest.raises(NotFound) as e:
        plan_release(ctx, "iris", 99)
    assert e.value.field == "version" and "modelcd versions iris" in e.value.message
    with pytest.raises(NotFound) as e:
        plan_release(ctx, "iris", v.version, "staging")
    assert e.value.field == "environment" and "its environments are production" in e.value.message

    client = create_app(ctx, TOKEN).test_client()
    r = client.get(f"/api/v1/models/iris/versions/{v.version}/plan", query_string={"environment": "staging"})
    assert r.status_code == 404 and r.json["field"] == "environment"
    r = client.get("/api/v1/models/iris/versions/99/plan")
    assert r.status_code == 404 and r.json["field"] == "version"
    r = client.get(f"/api/v1/models/iris/versions/{v.version}/plan", query_string={"environment": "Bad Env"})
    assert r.status_code == 400 and r.json["field"] == "environment"
    r = client.get(f"/api/v1/models/iris/versions/{v.version}/plan")
    assert r.status_code == 200 and r.json["environments"][0]["name"] == "production"


def test_planning_writes_nothing(ctx: Context, model_dir: Any) -> None:
    ctx.policies.put("name: two\nenvironments: [{name: staging, target: docker}, {name: production}]\n")
    v = _register(ctx, "iris", model_dir)
    rows, files = _rows(ctx), _files(ctx.home)
    plan_release(ctx, "iris", v.version)
    plan_release(ctx, "iris", v.version, "production")
    plan_policy_change(ctx, "name: two\nenvironments: [{name: production, strategy: canary}]\n")
    assert _rows(ctx) == rows
    assert _files(ctx.home) == files


def _dep(dep_id: str, state: DeploymentState, created: str) -> Deployment:
    return Deployment(id=dep_id, model="m", version=int(dep_id[1:]), environment="production", target="process",
                      state=state, url=None, pid=None, port=None, bundle=None, release_id=None, created_at=created)


def test_the_retention_choice_keeps_current_previous_and_the_newest() -> None:
    deps = [_dep("d1", DeploymentState.STANDBY, "1"), _dep("d2", DeploymentState.STANDBY, "2"),
            _dep("d3", DeploymentState.SERVING, "3"), _dep("d4", DeploymentState.SERVING, "4"),
            _dep("d5", DeploymentState.READY, "5")]
    # d4 serves, d1 is what a rollback returns to: both stay; no room left for d2 with keep 2
    assert [d.id for d in retention_choice(deps, {"d4": 100}, {"d1": 100}, 2)] == ["d3", "d2"]
    assert [d.id for d in retention_choice(deps, {"d4": 100}, {"d1": 100}, 3)] == ["d2"]
    assert retention_choice(deps, {"d4": 100}, None, 4) == []  # d5 (under smoke) is never counted
    assert [d.id for d in retention_choice(deps, {"d4": 100}, None, 1)] == ["d3", "d2", "d1"]


def test_a_policy_change_is_planned_per_current_version(ctx: Context, model_dir: Any) -> None:
    ctx.policies.put("name: iris\nmatch: {models: ['iris*']}\nenvironments: [{name: production}]\n")
    _register(ctx, "iris", model_dir)
    _register(ctx, "churn", model_dir)
    text = """
name: iris
match: {models: ['iris*']}
environments:
  - name: production
    strategy: canary
    env: {TOKEN: abc}
retention: {keep_deployments: 3}
"""
    plan = plan_policy_change(ctx, text, "iris.yaml")
    assert plan.stored_revision == 1 and not plan.unchanged_text
    by_model = {c.model: c for c in plan.versions}
    assert by_model["churn"].changed is False and by_model["churn"].before["name"] == "default"
    iris = by_model["iris"]
    assert iris.changed and iris.why == "latest version"
    assert "environments.production.strategy: blue-green → canary" in iris.differences
    assert "environments.production.steps: (unset) → [10, 50, 100]" in iris.differences
    assert "environments.production.env.TOKEN: added" in iris.differences
    assert "retention.keep_deployments: 2 → 3" in iris.differences
    assert "abc" not in str(plan.to_dict())
    assert ctx.policies.get("iris")["revision"] == 1  # nothing stored

    taken = plan_policy_change(ctx, "name: churn-only\nmatch: {models: [churn]}\nrunner: local\n"
                                    "environments: [{name: staging}, {name: production}]\n")
    assert taken.stored_revision is None
    churn = {c.model: c for c in taken.versions}["churn"]
    assert churn.differences[0] == "policy: default → churn-only"
    assert "environments: production becomes staging → production" in churn.differences
    assert "environments.staging: added (process target, blue-green)" in churn.differences
    assert {c.model: c for c in taken.versions}["iris"].changed is False

    same = plan_policy_change(ctx, "name: iris\nmatch: {models: ['iris*']}\nenvironments: [{name: production}]\n")
    assert same.unchanged_text and not any(c.changed for c in same.versions)
    wider = plan_policy_change(ctx, "name: iris\nmatch: {models: ['*']}\nenvironments: [{name: production}]\n")
    assert not {c.model: c for c in wider.versions}["iris"].changed  # only match changed: same behaviour for iris
    assert {c.model: c for c in wider.versions}["churn"].differences == ("policy: default → iris",)


def test_policy_differences_hide_env_values() -> None:
    a = parse_policy("name: p\nenvironments: [{name: production, env: {A: one, B: two}}]\n")
    b = parse_policy("name: p\nenvironments: [{name: production, env: {A: uno, C: {secret_env: S}}}]\n")
    assert policy_differences(a, b) == ["environments.production.env.A: changed (values not shown)",
                                        "environments.production.env.B: removed",
                                        "environments.production.env.C: added"]


def test_shadow_and_mirrored_canary_show_their_gates(ctx: Context, model_dir: Any) -> None:
    ctx.policies.put("""
name: judged
environments:
  - name: staging
    strategy: shadow
    sample_rate: 0.5
    shadow_s: 120
    analysis: {min_samples: 50, max_prediction_psi: 0.2}
  - name: production
    strategy: canary
    mirror: true
    analysis: {min_agreement: 0.9}
""")
    v = _register(ctx, "iris", model_dir)
    plan = plan_release(ctx, "iris", v.version)
    shadow, canary = (e.strategy for e in plan.environments)
    assert shadow["name"] == "shadow" and shadow["sample_rate"] == 0.5 and shadow["shadow_s"] == 120
    assert shadow["analysis"]["min_samples"] == 50 and shadow["analysis"]["max_prediction_psi"] == 0.2
    assert shadow["shadowed"] is False  # nothing serves yet: no champion to compare with, as the release does
    assert canary["mirror"] is True and canary["analysis"]["min_agreement"] == 0.9
    assert plan.environments[0].policy["analysis"]["min_samples"] == 50  # the step, whatever fields it has
    text = "\n".join(release_plan_lines(plan.to_dict()))
    assert "staging: process target, shadow on 50% of live requests for at most 120 s" in text
    assert "min_samples 50" in text and "answers compared on copies (" in text


def test_an_archived_model_releases_nothing(ctx: Context, model_dir: Any) -> None:
    from modelcd.releases.retirement import archive_model

    v = _register(ctx, "iris", model_dir)
    archive_model(ctx, "iris")
    plan = plan_release(ctx, "iris", v.version)
    assert plan.releases_to == () and "archived" in plan.summary and "modelcd models unarchive iris" in plan.summary
    assert plan.warnings and plan.environments[0].name == "production"
    assert plan_release(ctx, "iris", v.version, "production").releases_to == ()
