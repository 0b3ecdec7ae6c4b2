"""The REST API through Flask's test client on a fresh store: auth, registration and every
bad input the registry refuses, leaving nothing behind."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from modelcd.context import Context
from modelcd.registry.archive import pack_tree
from modelcd.store import schema
from tests.app.conftest import AUTH, TOKEN
from tests.conftest import iris_model


@pytest.fixture
def app_env() -> dict[str, str]:
    return {"MODELCD_MAX_ARTIFACT_BYTES": str(200_000)}


@pytest.fixture
def model_dir(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    meta = iris_model(tmp_path / "m")
    return tmp_path / "m", meta


def _register(client: FlaskClient, name: str, archive: bytes, meta: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> Any:
    data: dict[str, Any] = {"artifact": (io.BytesIO(archive), "a.tar.gz")}
    if meta is not None:
        data["metadata"] = json.dumps(meta)
    return client.post(f"/api/v1/models/{name}/versions", data=data, headers=AUTH if headers is None else headers,
                       content_type="multipart/form-data")


def _counts(ctx: Context) -> tuple[int, int, int, list[Path]]:
    with ctx.db.read() as conn:
        n = [conn.execute(schema.models.select()).all(), conn.execute(schema.versions.select()).all(),
             conn.execute(schema.outbox.select()).all()]
    art = ctx.home / "artifacts"
    files = [p for p in art.rglob("*") if p.is_file()] if art.exists() else []
    tmp = ctx.home / "tmp"
    leftovers = list(tmp.iterdir()) if tmp.exists() else []
    return len(n[0]), len(n[1]), len(n[2]), files + leftovers


def test_register_numbers_versions_and_writes_outbox(client: FlaskClient, ctx: Context,
                                                     model_dir: tuple[Path, dict[str, Any]]) -> None:
    folder, meta = model_dir
    r1 = _register(client, "iris", pack_tree(folder), meta)
    assert r1.status_code == 201, r1.json
    r2 = _register(client, "iris", pack_tree(folder), meta)
    assert (r1.json["version"], r2.json["version"]) == (1, 2)
    assert r1.json["digest"] == r2.json["digest"] and r1.json["flavor"] == "sklearn"
    assert r1.json["requirements"][0].startswith("scikit-learn==")
    with ctx.db.read() as conn:
        events = conn.execute(schema.outbox.select()).all()
    assert [e._mapping["payload"]["version"] for e in events] == [1, 2]
    assert all(e._mapping["kind"] == "model_version.registered" for e in events)
    assert client.get("/api/v1/models/iris/versions").json["versions"][1]["version"] == 2
    assert client.get("/api/v1/models").json["models"][0]["latest_version"] == 2


def test_writes_need_the_token(client: FlaskClient, ctx: Context, model_dir: tuple[Path, dict[str, Any]]) -> None:
    folder, meta = model_dir
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = _register(client, "iris", pack_tree(folder), meta, headers=headers)
        assert r.status_code == 401 and r.json["code"] == "unauthorized"
    assert client.post("/api/v1/releases", json={}).status_code == 401
    assert client.put("/api/v1/policies", data="name: x").status_code == 401
    assert client.post("/api/v1/endpoints/iris/production/rollback").status_code == 401
    assert _counts(ctx)[:3] == (0, 0, 0)


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


@pytest.mark.parametrize(("name", "archive", "meta", "field", "words"), [
    ("bad name!", None, {}, "name", "name"),
    ("-leading", None, {}, "name", "name"),
    ("x" * 65, None, {}, "name", "64"),
    ("ok", "empty", {}, "archive", "no regular files"),
    ("ok", "traversal", {}, "archive", ".."),
    ("ok", "absolute", {}, "archive", "absolute"),
    ("ok", "symlink", {}, "archive", "link"),
    ("ok", "notgz", {}, "archive", "gzip"),
    ("ok", None, {"flavor": "tensorflow"}, "flavor", "sklearn"),
    ("ok", None, {"sample": {"rows": [1]}}, "sample", "data"),
    ("ok", None, {"sample": []}, "sample", ""),
    ("ok", None, {"tags": {"bad key!": "v"}}, "tags", ""),
    ("ok", None, {"unknown": 1}, "unknown", "known fields"),
    ("ok", None, {"metrics": {"acc": "high"}}, "metrics.acc", "number"),
])
def test_bad_registrations_get_clear_errors_and_leave_nothing(
        client: FlaskClient, ctx: Context, model_dir: tuple[Path, dict[str, Any]], name: str, archive: str | None,
        meta: dict[str, Any], field: str, words: str) -> None:
    folder, _ = model_dir
    archives = {
        None: pack_tree(folder),
        "empty": _tar([]),
        "traversal": _tar([_file("../evil.pkl")]),
        "absolute": _tar([_file("/tmp/evil.pkl")]),
        "symlink": _tar([_file("model.pkl"), _link("link.pkl", "/etc/passwd")]),
        "notgz": b"this is not an archive",
    }
    r = _register(client, name, archives[archive], meta)
    assert 400 <= r.status_code < 500, r.json
    body = r.json
    assert body["field"] is not None and body["field"].startswith(field.split(".")[0]), body
    assert words.lower() in body["message"].lower(), body
    assert _counts(ctx) == (0, 0, 0, [])


def test_missing_artifact_and_oversize(client: FlaskClient, ctx: Context) -> None:
    r = client.post("/api/v1/models/iris/versions", data={"metadata": "{}"}, headers=AUTH,
                    content_type="multipart/form-data")
    assert r.status_code == 400 and r.json["field"] == "artifact"
    big = _tar([_file("model.pkl", bytes(300_000))])
    r = _register(client, "iris", big + bytes(250_000), {})
    assert r.status_code == 413 and "MODELCD_MAX_ARTIFACT_BYTES" in r.json["message"]
    assert _counts(ctx) == (0, 0, 0, [])


def test_policy_put_validates_with_yaml_path(client: FlaskClient) -> None:
    r = client.put("/api/v1/policies", data="name: p1\nenvironments:\n  - name: production\n    strategy: bluegreen\n",
                   headers=AUTH)
    assert r.status_code == 400
    assert "request body:4: environments[0].strategy" in r.json["message"]
    r = client.put("/api/v1/policies", data="name: p1\nmatch:\n  models: ['iris*']\n", headers=AUTH)
    assert r.status_code == 200 and r.json["revision"] == 1
    assert client.get("/api/v1/policies/p1").json["policy"]["match"]["models"] == ["iris*"]


def test_openapi_document_lists_every_route(app: Flask, client: FlaskClient) -> None:
    doc = client.get("/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")
    documented = {(m.upper(), "/api/v1" + p) for p, ops in doc["paths"].items() for m in ops}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1"):
            path = rule.rule.replace("<int:", "{").replace("<", "{").replace(">", "}")
            path = path.replace("number", "version").replace("row_id", "id")
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                assert (method, path) in documented, (method, path)


def test_not_found_errors_name_the_fix(client: FlaskClient) -> None:
    r = client.get("/api/v1/models/nope")
    assert r.status_code == 404 and "modelcd models" in r.json["message"]
    assert client.get("/api/v1/releases/r-000000000000").status_code == 404
    assert client.get("/api/v1/endpoints/nope/production").status_code == 404


def test_endpoints_list_pages_and_filters_by_model(client: FlaskClient, ctx: Context) -> None:
    from sqlalchemy import insert

    from modelcd.store.db import now

    with ctx.db.write() as conn:
        conn.execute(insert(schema.endpoints), [{"model": f"m{i:02d}", "environment": env, "traffic": {},
                                                 "updated_at": now()} for i in range(12) for env in ("prod", "stg")])
    listed = client.get("/api/v1/endpoints", headers=AUTH).get_json()["endpoints"]
    assert len(listed) == 24 and [(e["model"], e["environment"]) for e in listed[:3]] == [
        ("m00", "prod"), ("m00", "stg"), ("m01", "prod")]
    assert len(client.get("/api/v1/endpoints?limit=5", headers=AUTH).get_json()["endpoints"]) == 5
    only = client.get("/api/v1/endpoints?model=m07", headers=AUTH).get_json()["endpoints"]
    assert [(e["model"], e["environment"]) for e in only] == [("m07", "prod"), ("m07", "stg")]
    bad = client.get("/api/v1/endpoints?limit=0", headers=AUTH)
    assert bad.status_code == 400 and bad.get_json()["field"] == "limit"
