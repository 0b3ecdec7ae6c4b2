"""Watching production (issue 11): after a release whose policy has `watch`, the router samples
the endpoint's live traffic off the request path and the service judges it over a sliding
window. Live inputs that drift away from the version's training statistics breach the watch:
an event on the release, a Prometheus series, a signed notification (the /hooks/generic format)
to the configured URL, and with `on_breach: rollback` the traffic returns to the version before.
Inputs like the training data do not."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import SUM_OF_ROWS, Hammer, Service, custom_model, running_service

pytestmark = pytest.mark.slow

SECRET = "notify-secret-0123456789"
POLICY = """\
name: watched
match: {models: ["wt-*"]}
environments:
  - name: production
    watch: {window_s: 4, sample_rate: 1.0, min_samples: 40, check_every_s: 0.5, max_input_psi: 0.5,
            on_breach: rollback}
smoke: {requests: 3}
"""
LIKE_TRAINING = [{"data": [[float(a), float(b)]]} for a in range(10) for b in range(5)]
DRIFTED = [{"data": [[float(a) + 20.0, float(b)]]} for a in range(10) for b in range(5)]


class Receiver:
    """Records the notifications POSTed to it (127.0.0.1)."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/modelcd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("watch-svc"), POLICY, MODELCD_NOTIFY_URLS=receiver.url,
                         MODELCD_NOTIFY_SECRET=SECRET) as service:
        yield service


def _metric(svc: Service, name: str) -> list[str]:
    text = requests.get(f"{svc.url}/metrics", timeout=10).text
    return [line for line in text.splitlines() if line.startswith(name)]


def _watch_state(svc: Service) -> str | None:
    lines = _metric(svc, 'modelcd_watch_breaches_total{model="wt-iris"')
    return lines[0] if lines else None


def test_drifted_live_inputs_breach_the_watch_and_roll_back(svc: Service, receiver: Receiver, tmp_path: Path) -> None:
    v1 = svc.register("wt-iris", tmp_path / "v1", custom_model(tmp_path / "v1", SUM_OF_ROWS))
    assert svc.wait_release_for("wt-iris", v1["version"])["phase"] == "succeeded"
    v2 = svc.register("wt-iris", tmp_path / "v2", custom_model(tmp_path / "v2", SUM_OF_ROWS))
    rel = svc.wait_release_for("wt-iris", v2["version"])
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    training = tmp_path / "training.csv"
    training.write_text("a,b\n" + "".join(f"{a},{b}\n" for _ in range(20) for a in range(10) for b in range(5)))
    for version in (v1["version"], v2["version"]):
        with open(training, "rb") as fh:
            r = svc.api("POST", f"/models/wt-iris/versions/{version}/statistics", files={"data": fh})
        assert r.status_code == 202, r.text
    ep = svc.endpoint("wt-iris")
    assert ep["traffic"] == {"2": 100} and ep["sample_rate"] == 1.0

    # live inputs like the training data: the watch judges them and finds nothing
    with Hammer(ep["scoring_uri"], LIKE_TRAINING, headers=svc.auth(ep), threads=2) as calm:
        deadline = time.monotonic() + 30
        while not _metric(svc, 'modelcd_watch_input_psi{model="wt-iris"'):
            assert time.monotonic() < deadline, "the watch never judged the live traffic"
            time.sleep(0.3)
        time.sleep(1.5)
    assert calm.failures == []
    psi = {line.split('feature="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
           for line in _metric(svc, 'modelcd_watch_input_psi{model="wt-iris"')}
    assert set(psi) == {"a", "b"} and max(psi.values()) < 0.5, psi
    assert receiver.got == [] and svc.endpoint("wt-iris")["traffic"] == {"2": 100}

    # the inputs drift: breach, notification, rollback to v1 — with no failed client request
    started = time.monotonic()
    with Hammer(ep["scoring_uri"], DRIFTED, headers=svc.auth(ep), threads=2) as drifted:
        deadline = time.monotonic() + 30
        while svc.endpoint("wt-iris")["traffic"] != {"1": 100}:
            assert time.monotonic() < deadline, svc.release_detail(rel["id"])["events"][-5:]
            time.sleep(0.2)
        took = time.monotonic() - started
        # the inputs stay drifted: v1 breaches too, but the watch does not roll "back" to v2
        v1_release = svc.client.find_release("wt-iris", v1["version"])
        deadline = time.monotonic() + 20
        while not any(e["kind"] == "watch.breach" for e in svc.release_detail(v1_release["id"])["events"]):
            assert time.monotonic() < deadline, "v1 never breached on the drifted inputs"
            time.sleep(0.2)
        assert svc.endpoint("wt-iris")["traffic"] == {"1": 100}
    assert drifted.failures == []
    assert took < 15, took  # a window (4 s) of drifted traffic, a check every 0.5 s
    events = {e["kind"]: e["message"] for e in svc.release_detail(rel["id"])["events"]}
    assert "input PSI of a" in events["watch.breach"] and "on_breach: rollback" in events["watch.breach"]
    assert "watch.rolled_back" in events
    assert _watch_state(svc) is not None and _watch_state(svc).endswith(" 2")  # v2's breach, then v1's

    deadline = time.monotonic() + 15
    while not receiver.got:
        assert time.monotonic() < deadline, "no notification arrived"
        time.sleep(0.1)
    headers, body = receiver.got[0]
    t, v1sig = (part.split("=", 1)[1] for part in headers["x-modelcd-signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(v1sig, expected)  # signed as /hooks/generic checks it
    doc = json.loads(body)
    assert doc["event"] == "watch.breach" and doc["model"] == "wt-iris" and doc["version"] == 2
    assert doc["outcome"] == "rolled back" and doc["figures"]["input_psi"]["a"] > 0.5
    assert SECRET.encode() not in body
