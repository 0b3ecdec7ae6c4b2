"""The batch routes over the Flask app: create, list, show, run, pause, resume, delete; errors
name the field."""

from __future__ import annotations

from flask.testing import FlaskClient

from modelcd.context import Context
from modelcd.store import schema
from modelcd.store.db import now
from tests.app.conftest import AUTH


def _model(ctx: Context) -> None:
    ts = now()
    with ctx.db.write() as conn:
        conn.execute(schema.models.insert().values(name="iris", description="", created_at=ts))
        conn.execute(schema.versions.insert().values(
            model="iris", version=1, digest="0" * 64, flavor="sklearn", requirements=[], metrics={}, tags={},
            description="", source="native", artifact_uri="x", size_bytes=0, status="ready", created_at=ts))


BODY = {"name": "nightly", "model": "iris", "version": 1, "input": "in.csv", "output": "out.csv",
        "schedule": "0 2 * * *", "zone": "Europe/Paris", "keys": ["id"]}


def test_batch_routes(ctx: Context, client: FlaskClient) -> None:
    _model(ctx)
    assert client.post("/api/v1/batch", json=BODY).status_code == 401
    r = client.post("/api/v1/batch", json=BODY, headers=AUTH)
    assert r.status_code == 201, r.json
    assert r.json["schedule"] == "0 2 * * *" and r.json["zone"] == "Europe/Paris" and r.json["runs"] == []
    assert r.json["next_run_at"].endswith(("T01:00:00.000+00:00", "T00:00:00.000+00:00"))
    assert client.post("/api/v1/batch", json=BODY, headers=AUTH).status_code == 409
    r = client.post("/api/v1/batch", json={**BODY, "name": "other", "schedule": "*/5 * *"}, headers=AUTH)
    assert r.status_code == 400 and r.json["field"] == "schedule"
    r = client.post("/api/v1/batch", json={**BODY, "name": "other", "model": "nope"}, headers=AUTH)
    assert r.status_code == 404 and r.json["field"] == "model"
    assert [d["name"] for d in client.get("/api/v1/batch").json["batch"]] == ["nightly"]
    r = client.post("/api/v1/batch/nightly/pause", headers=AUTH)
    assert r.status_code == 200 and r.json["paused"] is True
    assert client.get("/api/v1/batch/nightly").json["next_run_at"] is None
    assert client.post("/api/v1/batch/nightly/resume", headers=AUTH).json["paused"] is False
    r = client.post("/api/v1/batch/nightly/run", headers=AUTH)
    assert r.status_code == 202 and r.json["type"] == "batch_prediction" and r.json["state"] == "scheduled"
    job = r.json["id"]
    r = client.post("/api/v1/batch/nightly/run", headers=AUTH)
    assert r.status_code == 409 and job in r.json["message"]
    r = client.delete("/api/v1/batch/nightly", headers=AUTH)
    assert r.status_code == 409 and job in r.json["message"]
    assert client.get("/api/v1/batch/nightly").json["runs"][0]["job_id"] == job
    assert client.post(f"/api/v1/jobs/{job}/stop", headers=AUTH).status_code == 202  # no scheduler here
    ctx.jobs.transition(job, ctx.jobs.get(job).state.__class__("cancelled"))
    assert client.delete("/api/v1/batch/nightly", headers=AUTH).status_code == 200
    assert client.get("/api/v1/batch/nightly").status_code == 404
    assert client.get("/api/v1/batch/bad%20name").status_code == 400
