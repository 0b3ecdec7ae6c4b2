"""Webhook intake through a real `modelcd serve`: signed generic deliveries whose files sit
in a real S3 API (moto's server on 127.0.0.1) become versions and releases exactly once,
duplicates and forgeries are refused, dead letters can be retried, and nothing accepted is
lost across `kill -9`."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from modelcd.sources.generic import sign
from tests.conftest import Service, custom_model, make_service, wait_until

SECRET = "generic-hook-secret-0123456789"
BUCKET = "models"


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "AKIATESTING", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1",
            "MODELCD_S3_ENDPOINT_URL": endpoint}


@pytest.fixture
def hook_service(tmp_path: Path, moto: str) -> Iterator[tuple[Service, Any]]:
    env = _aws_env(moto)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    svc = make_service(tmp_path, MODELCD_HOOKS_GENERIC_SECRET=SECRET, **env)
    svc.start()
    try:
        yield svc, s3
    finally:
        svc.stop()
        svc.shutdown_data_plane()


def _upload(s3: Any, folder: Path, prefix: str) -> str:
    for path in folder.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{BUCKET}/{prefix}/"


def _post(svc: Service, doc: dict[str, Any], *, delivery: str | None = None, secret: str = SECRET,
          ts: int | None = None, tamper: bool = False) -> requests.Response:
    body = json.dumps(doc).encode()
    t = int(time.time()) if ts is None else ts
    headers = {"Content-Type": "application/json", "X-Modelcd-Signature": f"t={t},v1={sign(secret, t, body)}",
               "X-Modelcd-Delivery-Id": delivery or uuid.uuid4().hex}
    if tamper:
        body = body.replace(b'"3"', b'"4"') if b'"3"' in body else body + b" "
    return requests.post(f"{svc.url}/hooks/generic", data=body, headers=headers, timeout=10)


def _echo_model(folder: Path, answer: int) -> dict[str, Any]:
    return custom_model(folder, f"def init():\n    pass\n\ndef run(raw):\n    return {{'predictions': [{answer}]}}\n")


def test_signed_delivery_releases_once_and_forgeries_are_refused(hook_service: tuple[Service, Any],
                                                                 tmp_path: Path) -> None:
    svc, s3 = hook_service
    _echo_model(tmp_path / "m", 7)
    uri = _upload(s3, tmp_path / "m", "churn/3")
    doc = {"model": "churn", "version": "3", "artifact_uri": uri, "tags": {"deploy": "true"}}

    # forgeries: nothing stored
    assert _post(svc, doc, secret="wrong-secret-value").status_code == 401
    assert _post(svc, doc, tamper=True).status_code == 401
    assert _post(svc, doc, ts=int(time.time()) - 3600).status_code == 401
    r = requests.post(f"{svc.url}/hooks/generic", data=b"{}", timeout=10)
    assert r.status_code == 401 and SECRET not in r.text
    assert svc.api("GET", "/inbox").json()["deliveries"] == []

    r = _post(svc, doc, delivery="d-1")
    assert r.status_code == 202, r.text
    assert _post(svc, doc, delivery="d-1").json()["status"] == "duplicate"
    # the same version announced under another delivery id is recorded once
    assert _post(svc, doc, delivery="d-2").status_code == 202

    rel = svc.wait_release_for("churn", 1)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    ep = svc.endpoint("churn")
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json={"data": [[1.0]]}, timeout=10)
    assert r.json() == {"predictions": [7]}
    deliveries = wait_until(lambda: [d for d in svc.api("GET", "/inbox").json()["deliveries"] if d["state"] == "done"]
                       if len(svc.api("GET", "/inbox", params={"state": "done"}).json()["deliveries"]) == 2 else None)
    assert {d["delivery_id"] for d in deliveries} == {"d-1", "d-2"}
    versions = svc.api("GET", "/models/churn/versions").json()["versions"]
    assert [(v["version"], v["source"], v["external_ref"]) for v in versions] == [(1, "native", uri)]
    assert len(svc.api("GET", "/releases", params={"model": "churn"}).json()["releases"]) == 1


def test_dead_letter_then_retry(hook_service: tuple[Service, Any], tmp_path: Path) -> None:
    svc, s3 = hook_service
    prefix = f"late-{uuid.uuid4().hex[:8]}/1"  # moto's objects are one store for the whole test process
    uri = f"s3://{BUCKET}/{prefix}/"
    assert _post(svc, {"model": "late", "version": "1", "artifact_uri": uri}, delivery="late-1").status_code == 202
    try:
        dead = wait_until(lambda: svc.api("GET", "/inbox", params={"state": "dead"}).json()["deliveries"])
    except AssertionError as e:  # say where the delivery stands and what the service logged
        raise AssertionError(f"{e}; inbox: {svc.api('GET', '/inbox').json()}; service log:\n"
                             f"{svc.logs[-1].read_text(errors='replace')[-4000:]}") from e
    assert "no objects" in dead[0]["last_error"] and SECRET not in json.dumps(dead)
    shown = svc.api("GET", f"/inbox/{dead[0]['id']}").json()
    assert json.loads(shown["body"])["model"] == "late"
    _echo_model(tmp_path / "late", 1)
    _upload(s3, tmp_path / "late", prefix)
    assert svc.api("POST", f"/inbox/{dead[0]['id']}/retry").status_code == 202
    rel = svc.wait_release_for("late", 1)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    assert svc.api("GET", f"/inbox/{dead[0]['id']}").json()["state"] == "done"


def test_kill9_under_load_loses_nothing_and_duplicates_nothing(hook_service: tuple[Service, Any],
                                                               tmp_path: Path) -> None:
    svc, s3 = hook_service
    _echo_model(tmp_path / "m", 1)
    uri = _upload(s3, tmp_path / "m", "load/any")
    n = 60
    docs = [{"model": "load", "version": str(i), "artifact_uri": uri, "external_ref": f"load:{i}"} for i in range(n)]
    sends = [(i, f"load-{i}") for i in range(n)] + [(i, f"load-{i}") for i in random.Random(1).sample(range(n), 20)]
    random.Random(2).shuffle(sends)
    accepted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    acked_at: list[float] = []

    def sender(part: list[tuple[int, str]]) -> None:
        for i, delivery in part:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not stop.is_set():  # a sender retries until acknowledged
                try:
                    r = _post(svc, docs[i], delivery=delivery)
                    if r.status_code in (200, 202):
                        with lock:
                            accepted.add(delivery)
                            acked_at.append(time.monotonic())
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.05)
            time.sleep(0.05)  # spread the load so the kill lands in the middle of it

    threads = [threading.Thread(target=sender, args=(sends[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    svc.kill9()
    killed_at = time.monotonic()
    time.sleep(0.5)
    svc.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    assert accepted == {f"load-{i}" for i in range(n)}
    before = sum(1 for t in acked_at if t < killed_at)
    assert 0 < before < len(acked_at), (before, len(acked_at))  # the kill landed mid-load
    wait_until(lambda: not svc.api("GET", "/inbox", params={"state": "pending"}).json()["deliveries"], 180)
    states = [d["state"] for d in svc.api("GET", "/inbox", params={"limit": 1000}).json()["deliveries"]]
    assert len(states) == n and set(states) == {"done"}
    versions = svc.api("GET", "/models/load/versions").json()["versions"]
    refs = sorted(v["external_ref"] for v in versions)
    assert refs == sorted(f"load:{i}" for i in range(n))  # each exactly once
    rels = svc.api("GET", "/releases", params={"model": "load", "limit": 1000}).json()["releases"]
    per_version: dict[int, int] = {}
    for r in rels:
        per_version[r["version"]] = per_version.get(r["version"], 0) + 1
    assert sorted(per_version) == sorted(v["version"] for v in versions)  # every version got a release
    assert set(per_version.values()) == {1}  # and only one


def test_unknown_source_and_oversize(hook_service: tuple[Service, Any]) -> None:
    svc, _ = hook_service
    r = requests.post(f"{svc.url}/hooks/nosuch", data=b"{}", timeout=10)
    assert r.status_code == 404 and "generic" in r.json()["message"]
    r = requests.post(f"{svc.url}/hooks/generic", data=b"x" * (1024 * 1024 + 10), timeout=10)
    assert r.status_code == 413
    assert os.environ.get("MODELCD_HOOKS_GENERIC_SECRET") is None  # the secret lives in the service's env only


def test_recorded_without_release_then_approved_releases_once(hook_service: tuple[Service, Any],
                                                              tmp_path: Path) -> None:
    """Like a SageMaker package: first pending approval (recorded only), then approved."""
    svc, s3 = hook_service
    _echo_model(tmp_path / "m", 5)
    uri = _upload(s3, tmp_path / "m", "approve/1")
    doc = {"model": "approve", "version": "1", "artifact_uri": uri, "external_ref": "pkg/approve/1"}
    assert _post(svc, {**doc, "release": False}, delivery="pending").status_code == 202
    wait_until(lambda: svc.api("GET", "/inbox", params={"state": "done"}).json()["deliveries"])
    time.sleep(1)
    assert svc.api("GET", "/releases", params={"model": "approve"}).json()["releases"] == []
    for delivery in ("approved", "approved-again"):
        assert _post(svc, {**doc, "release": True}, delivery=delivery).status_code == 202
    rel = svc.wait_release_for("approve", 1)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    wait_until(lambda: len(svc.api("GET", "/inbox", params={"state": "done"}).json()["deliveries"]) >= 3 or None)
    time.sleep(1)
    assert len(svc.api("GET", "/releases", params={"model": "approve"}).json()["releases"]) == 1
    assert len(svc.api("GET", "/models/approve/versions").json()["versions"]) == 1


def test_s3_poller_finds_a_marker_and_releases_it(tmp_path: Path, moto: str) -> None:
    """A bucket without notifications: the poller finds models/<name>/<version>/modelcd.yaml."""
    env = _aws_env(moto)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="polled")
    svc = make_service(tmp_path, MODELCD_S3_POLL_BUCKET="polled", MODELCD_S3_POLL_INTERVAL_S="0.5", **env)
    svc.start()
    try:
        _echo_model(tmp_path / "m", 3)
        for path in (tmp_path / "m").rglob("*"):
            s3.upload_file(str(path), "polled", f"models/fraud/9/{path.name}")
        s3.put_object(Bucket="polled", Key="models/fraud/9/modelcd.yaml", Body=b"marker: true\n")
        rel = svc.wait_release_for("fraud", 1, timeout_s=120)
        assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
        v = svc.api("GET", "/models/fraud/versions/1").json()
        assert v["source"] == "s3" and v["external_ref"] == "s3://polled/models/fraud/9/"
        time.sleep(1.5)  # more polls: nothing new
        assert len(svc.api("GET", "/inbox", params={"source": "s3"}).json()["deliveries"]) == 1
    finally:
        svc.stop()
        svc.shutdown_data_plane()
