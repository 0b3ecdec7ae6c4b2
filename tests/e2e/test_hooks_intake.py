"""The webhook intake of a real `modelcd serve` (hooks answered on uvicorn's event loop, group
committed; the API through Flask on threads) and its inbox worker process: a concurrent burst
with duplicates is acknowledged and stored exactly once, bodies in every framing are read,
API bodies large and too large pass the bridge as before, and the worker process is restarted
when it dies and dies with a killed service."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from modelcd.sources.generic import sign
from tests.conftest import Service, custom_model, make_service, wait_until

SECRET = "generic-intake-secret-0123456789"


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    s = make_service(tmp_path, MODELCD_HOOKS_GENERIC_SECRET=SECRET, MODELCD_MAX_ARTIFACT_BYTES=str(4 * 1024 * 1024))
    s.start()
    try:
        yield s
    finally:
        s.stop()
        s.shutdown_data_plane()


def _signed(doc: dict[str, Any], delivery: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(doc).encode()
    t = int(time.time())
    return body, {"Content-Type": "application/json", "X-Modelcd-Signature": sign(SECRET, t, body),
                  "X-Modelcd-Delivery-Id": delivery}


def _doc(i: int) -> dict[str, Any]:
    return {"model": "burst", "version": str(i), "artifact_uri": None, "external_ref": f"burst:{i}", "release": False}


def _worker_pids(svc: Service) -> list[int]:
    """Live worker processes of the service (a killed one is a zombie until the service reaps it)."""
    assert svc.proc is not None
    pids = []
    for p in psutil.Process(svc.proc.pid).children():
        with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
            if any("modelcd.worker" in part for part in p.cmdline()):
                pids.append(p.pid)
    return pids


def test_a_concurrent_burst_with_duplicates_is_stored_and_processed_exactly_once(svc: Service) -> None:
    sends = [i % 150 for i in range(300)]  # every delivery twice

    def post(i: int) -> int:
        body, headers = _signed(_doc(i), f"burst-{i}")
        with requests.Session() as s:
            return s.post(f"{svc.url}/hooks/generic", data=body, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(post, sends))
    assert statuses.count(202) == 150 and statuses.count(200) == 150
    done = {"state": "done", "limit": 1000}
    wait_until(lambda: len(svc.api("GET", "/inbox", params=done).json()["deliveries"]) == 150)
    versions = svc.api("GET", "/models/burst/versions").json()["versions"]
    assert sorted(v["external_ref"] for v in versions) == sorted(f"burst:{i}" for i in range(150))
    metrics = requests.get(f"{svc.url}/metrics", timeout=10).text
    assert 'modelcd_http_requests_total{method="POST",status="202"} 150' in metrics


def test_bodies_in_any_framing_and_the_refusals_answer_as_the_api_does(svc: Service) -> None:
    body, headers = _signed(_doc(1), "chunked-1")
    r = requests.post(f"{svc.url}/hooks/generic", data=iter([body[:10], body[10:]]), headers=headers, timeout=10)
    assert r.status_code == 202 and r.json() == {"status": "accepted", "delivery_id": "chunked-1"}
    assert "Transfer-Encoding" not in r.request.headers or r.request.headers["Transfer-Encoding"] == "chunked"
    r = requests.post(f"{svc.url}/hooks/generic?x=1", data=body, headers={**headers, "X-Modelcd-Delivery-Id": "q"},
                      timeout=10)
    assert r.status_code == 202
    r = requests.post(f"{svc.url}/hooks/generic", data=body + b" ", headers=headers, timeout=10)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized" and SECRET not in r.text
    r = requests.get(f"{svc.url}/hooks/generic", timeout=10)  # not a hook method: Flask answers, as before
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    r = requests.post(f"{svc.url}/hooks/generic/extra", data=body, timeout=10)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = requests.post(f"{svc.url}/hooks/generic", data=iter([b"x" * 700_000, b"x" * 700_000]), timeout=10)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    r = requests.options(f"{svc.url}/hooks/generic", timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert {d["delivery_id"] for d in svc.api("GET", "/inbox").json()["deliveries"]} == {"chunked-1", "q"}


def test_api_bodies_over_the_spool_and_over_the_limit_pass_the_bridge_as_before(svc: Service,
                                                                              tmp_path: Path) -> None:
    meta = custom_model(tmp_path / "big", "def init():\n    pass\n\ndef run(raw):\n    return {'predictions': [1]}\n")
    (tmp_path / "big" / "weights.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # incompressible: > 1 MiB spool
    v = svc.register("big", tmp_path / "big", meta)
    assert v["version"] == 1 and v["size_bytes"] >= 2 * 1024 * 1024
    (tmp_path / "big" / "weights.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    auth = {"Authorization": f"Bearer {svc.env['MODELCD_TOKEN']}"}
    r = requests.post(f"{svc.url}/api/v1/models/big/versions", headers=auth,
                      files={"artifact": ("a.tar.gz", (tmp_path / "big" / "weights.bin").read_bytes())}, timeout=60)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert "MODELCD_MAX_ARTIFACT_BYTES" in r.json()["message"]


def test_the_worker_process_is_restarted_when_it_dies_and_dies_with_the_service(svc: Service) -> None:
    [first] = wait_until(lambda: _worker_pids(svc))
    psutil.Process(first).kill()
    [second] = wait_until(lambda: [p for p in _worker_pids(svc) if p != first])
    body, headers = _signed(_doc(7), f"after-restart-{uuid.uuid4().hex}")
    assert requests.post(f"{svc.url}/hooks/generic", data=body, headers=headers, timeout=10).status_code == 202
    wait_until(lambda: svc.api("GET", "/inbox", params={"state": "done"}).json()["deliveries"], 60)
    svc.kill9()
    wait_until(lambda: not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE, 10)
