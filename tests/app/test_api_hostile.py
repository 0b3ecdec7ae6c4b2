"""Hostile values through Flask's test client: bad query parameters, path ids that are not
ids, huge numbers, deep or non-standard JSON, exact tokens, and policy `env` values that
reads show only as set. Each is a 4xx naming the field, never a 500, never ignored."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient

from modelcd.context import Context
from modelcd.registry.archive import pack_tree
from tests.app.conftest import AUTH
from tests.conftest import iris_model

HUGE = "99999999999999999999999"
SECRET = "s3cr3t-value-never-shown"
POLICY = f"""name: envp
match:
  models: ["iris*"]
auto: false
environments:
  - name: production
    env: {{MY_VAR: "{SECRET}", OMP_NUM_THREADS: "1"}}
"""


def _register(client: FlaskClient, folder: Path, meta: dict[str, Any] | str) -> Any:
    data = {"artifact": (io.BytesIO(pack_tree(folder)), "a.tar.gz"),
            "metadata": meta if isinstance(meta, str) else json.dumps(meta)}
    return client.post("/api/v1/models/iris/versions", data=data, headers=AUTH, content_type="multipart/form-data")


@pytest.fixture
def release_id(client: FlaskClient, tmp_path: Path) -> str:
    """A queued release of iris v1 under the policy with env values (never run: no runner)."""
    assert client.put("/api/v1/policies", data=POLICY, headers=AUTH).status_code == 200
    assert _register(client, _model(tmp_path), {}).status_code == 201
    r = client.post("/api/v1/releases", json={"model": "iris", "version": 1, "environment": "production"},
                    headers=AUTH)
    assert r.status_code == 202, r.json
    return str(r.json["id"])


def _model(tmp_path: Path) -> Path:
    iris_model(tmp_path / "m")
    return tmp_path / "m"


def _bad(r: Any, status: int, field: str) -> None:
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    assert r.json["field"] == field, r.json
    assert field.split(".")[0] in r.json["message"], r.json


# -- tokens ------------------------------------------------------------------------------------

def test_a_pipeline_token_must_match_exactly(client: FlaskClient, ctx: Context, release_id: str) -> None:
    pipeline_token = ctx.pipeline_runs.mint(release_id, "github")
    body = {"stage": "build", "outcome": "succeeded"}
    for header in (f"Bearer {pipeline_token} ", f"Bearer {pipeline_token}\xa0", "Bearer \xa0",
                   f"bearer {pipeline_token}"):
        r = client.post(f"/api/v1/releases/{release_id}/report", json=body, headers={"Authorization": header})
        assert r.status_code == 401, header
    assert client.post("/api/v1/models/iris/versions", headers={"Authorization": "Bearer \xa0"}).status_code == 401


# -- query parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "field"), [
    ("/api/v1/releases?limit=abc", "limit"),
    ("/api/v1/releases?limit=-5", "limit"),
    ("/api/v1/releases?limit=0", "limit"),
    ("/api/v1/releases?limit=1.5", "limit"),
    (f"/api/v1/releases?limit={HUGE}", "limit"),
    ("/api/v1/releases?limit=5000", "limit"),
    ("/api/v1/releases?phase=bogus", "phase"),
    ("/api/v1/releases?environment=Not%20An%20Env", "environment"),
    ("/api/v1/releases?model=bad%2Fname", "model"),
    ("/api/v1/jobs?limit=abc", "limit"),
    ("/api/v1/jobs?state=sleeping", "state"),
    ("/api/v1/jobs?release_id=x%2F..", "release_id"),
    ("/api/v1/inbox?limit=-1", "limit"),
    ("/api/v1/inbox?state=bogus", "state"),
    ("/api/v1/inbox?source=%00", "source"),
    ("/api/v1/deployments?live=maybe", "live"),
    ("/api/v1/deployments?model=..", "model"),
    ("/api/v1/releases/r-0123456789ab/stages/build?wait=nan", "wait"),
    ("/api/v1/releases/r-0123456789ab/stages/build?wait=inf", "wait"),
    ("/api/v1/releases/r-0123456789ab/stages/build?wait=-1", "wait"),
    ("/api/v1/releases/r-0123456789ab/stages/build?wait=31", "wait"),
    ("/api/v1/releases/r-0123456789ab/stages/build?wait=abc", "wait"),
])
def test_bad_query_values_are_400_naming_the_parameter(client: FlaskClient, path: str, field: str) -> None:
    _bad(client.get(path), 400, field)


def test_job_log_after_must_be_a_line_id(client: FlaskClient) -> None:
    for value in ("abc", "-1", HUGE, "1e3"):
        _bad(client.get(f"/api/v1/jobs/j-0123456789ab/logs?after={value}"), 400, "after")


def test_good_query_values_still_work(client: FlaskClient, release_id: str) -> None:
    assert len(client.get("/api/v1/releases?limit=1&phase=queued&model=iris").json["releases"]) == 1
    assert client.get("/api/v1/releases?limit=1000&environment=production").status_code == 200
    assert client.get("/api/v1/jobs?state=running&limit=10").status_code == 200
    assert client.get("/api/v1/inbox?state=dead&source=generic").status_code == 200
    assert client.get("/api/v1/deployments?live=1").status_code == 200
    assert client.get("/api/v1/deployments?live=false").status_code == 200


# -- path values -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    f"/api/v1/models/iris/versions/{HUGE}",
    f"/api/v1/inbox/{HUGE}",
    "/api/v1/models/iris/versions/9223372036854775808",
])
def test_huge_numbers_in_paths_are_not_found(client: FlaskClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404 and r.json["code"] == "not_found", r.get_data(as_text=True)


@pytest.mark.parametrize(("method", "path", "field"), [
    ("GET", "/api/v1/releases/r-missing", "release_id"),
    ("GET", "/api/v1/releases/x..", "release_id"),
    ("POST", "/api/v1/releases/x..%3F/stop", "release_id"),
    ("POST", "/api/v1/releases/j-0123456789ab/approve", "release_id"),
    ("GET", "/api/v1/jobs/r-0123456789ab", "job_id"),
    ("POST", "/api/v1/jobs/bogus/stop", "job_id"),
    ("GET", "/api/v1/releases/..%3F/stages/build", "release_id"),
    ("GET", "/api/v1/endpoints/iris/Production", "environment"),
    ("POST", "/api/v1/endpoints/bad%20name/production/rollback", "model"),
])
def test_ids_that_are_not_ids_are_refused(client: FlaskClient, method: str, path: str, field: str) -> None:
    _bad(client.open(path, method=method, headers=AUTH), 400, field)


def test_well_formed_missing_ids_are_not_found(client: FlaskClient) -> None:
    assert client.get("/api/v1/releases/r-0123456789ab").status_code == 404
    assert client.get("/api/v1/jobs/j-0123456789ab").status_code == 404


# -- bodies --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    ({"model": "iris", "version": HUGE, "environment": "production"}, "version"),
    ({"model": "iris", "version": int(HUGE), "environment": "production"}, "version"),
    ({"model": "iris", "version": 1.5, "environment": "production"}, "version"),
    ({"model": "iris", "version": True, "environment": "production"}, "version"),
    ({"model": "iris", "version": "1e3", "environment": "production"}, "version"),
    ({"model": "iris", "version": -1, "environment": "production"}, "version"),
    ({"model": ["iris"], "version": 1, "environment": "production"}, "model"),
    ({"model": "iris", "version": 1, "environment": {"name": "production"}}, "environment"),
])
def test_bad_release_bodies_are_400(client: FlaskClient, body: dict[str, Any], field: str) -> None:
    r = client.post("/api/v1/releases", data=json.dumps(body), content_type="application/json", headers=AUTH)
    _bad(r, 400, field)


@pytest.mark.parametrize("raw", [
    "[" * 100_000,
    '{"a":' * 100_000,
    '{"model": "iris", "version": NaN, "environment": "production"}',
    '{"model": "iris", "version": Infinity, "environment": "production"}',
    "not json",
])
def test_deep_or_nonstandard_json_is_400(client: FlaskClient, raw: str) -> None:
    for path in ("/api/v1/releases", "/api/v1/endpoints/iris/production/promote",
                 "/api/v1/releases/r-0123456789ab/approve"):
        _bad(client.post(path, data=raw, content_type="application/json", headers=AUTH), 400, "body")


def test_deep_yaml_policy_is_400(client: FlaskClient) -> None:
    _bad(client.put("/api/v1/policies", data="[" * 100_000, headers=AUTH), 400, "body")


@pytest.mark.parametrize("metrics", ['{"acc": NaN}', '{"acc": Infinity}', '{"acc": -Infinity}', '{"acc": 1e400}'])
def test_non_finite_metrics_are_refused(client: FlaskClient, tmp_path: Path, metrics: str) -> None:
    r = _register(client, _model(tmp_path), '{"metrics": ' + metrics + "}")
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.json["field"] in ("metadata", "metrics.acc"), r.json
    assert "finite" in r.json["message"], r.json
    assert client.get("/api/v1/models/iris/versions").status_code == 404


def test_deep_metadata_is_400(client: FlaskClient, tmp_path: Path) -> None:
    _bad(_register(client, _model(tmp_path), '{"sample": ' + "[" * 100_000 + "}"), 400, "metadata")


def test_finite_metrics_are_served_as_valid_json(client: FlaskClient, tmp_path: Path) -> None:
    assert _register(client, _model(tmp_path), {"metrics": {"acc": 0.97}}).status_code == 201
    raw = client.get("/api/v1/models/iris/versions/1").get_data(as_text=True)
    doc = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in {raw}"))
    assert doc["metrics"] == {"acc": 0.97} and math.isfinite(doc["metrics"]["acc"])


# -- policy env values ---------------------------------------------------------------------------

def test_reads_show_env_variables_as_set_never_their_values(client: FlaskClient, ctx: Context,
                                                            release_id: str) -> None:
    reads = [client.get("/api/v1/policies/envp"), client.get(f"/api/v1/releases/{release_id}"),
             client.get("/api/v1/releases"), client.get("/api/v1/releases?model=iris"),
             client.put("/api/v1/policies", data=POLICY, headers=AUTH),
             client.post(f"/api/v1/releases/{release_id}/stop", headers=AUTH)]
    for r in reads:
        assert r.status_code in (200, 202), r.get_data(as_text=True)
        assert SECRET not in r.get_data(as_text=True)
    policy = reads[0].json["policy"]
    assert policy["environments"][0]["env"] == {"MY_VAR": "(set)", "OMP_NUM_THREADS": "(set)"}
    assert yaml.safe_load(reads[0].json["text"])["environments"][0]["env"]["MY_VAR"] == "(set)"
    assert reads[1].json["policy"]["environments"][0]["env"] == {"MY_VAR": "(set)", "OMP_NUM_THREADS": "(set)"}
    assert ctx.releases.get(release_id).to_dict()["policy"]["environments"][0]["env"]["MY_VAR"] == SECRET  # kept


def test_a_policy_without_env_keeps_its_text(client: FlaskClient) -> None:
    text = "# comment kept\nname: plain\nmatch:\n  models: ['x*']\n"
    assert client.put("/api/v1/policies", data=text, headers=AUTH).status_code == 200
    assert client.get("/api/v1/policies/plain").json["text"] == text


def test_non_finite_samples_are_refused(client: FlaskClient, tmp_path: Path) -> None:
    r = _register(client, _model(tmp_path), '{"sample": {"data": [[1e400, 1, 2, 3]]}}')
    assert r.status_code == 400 and r.json["field"] == "metadata" and "finite" in r.json["message"], r.json
    r = client.post("/api/v1/releases", data='{"model": "iris", "version": 1e999, "environment": "production"}',
                    content_type="application/json", headers=AUTH)
    _bad(r, 400, "body")
