"""Judged on what it predicts (issue 11): a real `modelcd serve` on the process target, under a
bounded load of varied requests. A candidate that is healthy and fast but disagrees with the
champion on a share of inputs fails its shadow phase (and, separately, a mirrored canary step)
with the agreement figure in the release's error, production untouched and not one failed
client request; a candidate that agrees passes and takes the traffic; a candidate whose outputs
drift in distribution fails on PSI."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SUM_OF_ROWS, Hammer, Service, custom_model, running_service

pytestmark = pytest.mark.slow

POLICY = """\
name: shadowed
match: {models: ["sh-*"]}
environments:
  - name: production
    strategy: shadow
    shadow_s: 60
    analysis: {min_samples: 150, min_agreement: 0.95}
smoke: {requests: 3}
---
name: drifting
match: {models: ["drift-*"]}
environments:
  - name: production
    strategy: shadow
    shadow_s: 60
    analysis: {min_samples: 150, max_prediction_psi: 0.2}
smoke: {requests: 3}
---
name: mirrored-canary
match: {models: ["cm-*"]}
environments:
  - name: production
    strategy: canary
    steps: [50, 100]
    step_hold_s: 30
    max_error_rate: 0
    mirror: true
    analysis: {min_samples: 100, min_agreement: 0.95}
smoke: {requests: 3}
"""

# the same answers, except where the first value is 8 or 9 (a fifth of the load below)
DISAGREES = SUM_OF_ROWS.replace("[sum(r) for r in", "[sum(r) + (1 if r[0] >= 8 else 0) for r in")
# every answer three times larger: the distribution of outputs moves
DRIFTS = SUM_OF_ROWS.replace("[sum(r) for r in", "[3 * sum(r) for r in")
# the varied live traffic: first values 0..9, second 0..4; the first value turns fastest, so any
# ten bodies in a row hold two that DISAGREES answers differently (whatever window of the load the
# analysis sees, each hammer thread walking the list in turn)
BODIES = [{"data": [[float(i), float(j)]]} for j in range(5) for i in range(10)]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("shadow-svc")
    with running_service(home) as service:
        for doc in POLICY.split("---\n"):
            service.apply_policy(doc)
        yield service


def _serve_first(svc: Service, name: str, tmp: Path) -> None:
    v = svc.register(name, tmp / "v1", custom_model(tmp / "v1", SUM_OF_ROWS))
    assert svc.wait_release_for(name, v["version"])["phase"] == "succeeded"


def _release_under_load(svc: Service, name: str, tmp: Path, body: str) -> tuple[dict[str, Any], Hammer]:
    ep = svc.endpoint(name)
    with Hammer(ep["scoring_uri"], BODIES, headers=svc.auth(ep), threads=4) as hammer:
        time.sleep(0.3)
        v = svc.register(name, tmp / "cand", custom_model(tmp / "cand", body))
        rel = svc.wait_release_for(name, v["version"], timeout_s=180)
        time.sleep(0.3)
    return svc.release_detail(rel["id"]), hammer


def test_an_agreeing_candidate_passes_its_shadow_and_takes_the_traffic(svc: Service, tmp_path: Path) -> None:
    _serve_first(svc, "sh-agree", tmp_path)
    detail, hammer = _release_under_load(svc, "sh-agree", tmp_path, SUM_OF_ROWS)
    assert detail["phase"] == "succeeded", (detail["error"], svc.job_log(detail["id"]))
    assert hammer.failures == [] and hammer.ok > 150
    (shadow,) = [s for s in detail["analysis"] if s["step"] == "shadow"]
    assert shadow["outcome"] == "passed" and shadow["figures"]["agreement"] == 1.0
    assert shadow["figures"]["rows"] >= 150
    assert hammer.versions.get("2", 0) == 0 or hammer.versions.get("1", 0) > 0  # v1 answered while v2 was judged
    assert svc.endpoint("sh-agree")["traffic"] == {"2": 100}
    assert svc.endpoint("sh-agree")["mirror"] is None
    kinds = [e["kind"] for e in detail["events"]]
    assert "analysis.step" in kinds


def test_a_disagreeing_candidate_fails_its_shadow_and_production_stays(svc: Service, tmp_path: Path) -> None:
    _serve_first(svc, "sh-disagree", tmp_path)
    before = svc.endpoint("sh-disagree")["traffic"]
    detail, hammer = _release_under_load(svc, "sh-disagree", tmp_path, DISAGREES)
    assert detail["phase"] == "failed", svc.job_log(detail["id"])
    assert "shadow failed: agreement" in detail["error"] and "below min_agreement 95.00%" in detail["error"]
    (shadow,) = [s for s in detail["analysis"] if s["step"] == "shadow"]
    assert 0.7 < shadow["figures"]["agreement"] < 0.9  # a fifth of the inputs disagree
    assert hammer.failures == [] and set(hammer.versions) == {"1"}  # no client ever saw the candidate
    assert svc.endpoint("sh-disagree")["traffic"] == before and svc.endpoint("sh-disagree")["mirror"] is None
    deployment = svc.api("GET", "/deployments", params={"model": "sh-disagree"}).json()["deployments"][-1]
    assert deployment["version"] == 2 and deployment["state"] == "stopped"
    shown = subprocess.run(["modelcd", "releases", "show", detail["id"]], env=svc.env, capture_output=True,
                           text=True, check=True).stdout
    assert "analysis shadow: failed" in shown and "agreement: failed — agreement" in shown, shown


def test_a_candidate_whose_outputs_drift_fails_on_prediction_psi(svc: Service, tmp_path: Path) -> None:
    _serve_first(svc, "drift-x", tmp_path)
    detail, hammer = _release_under_load(svc, "drift-x", tmp_path, DRIFTS)
    assert detail["phase"] == "failed", svc.job_log(detail["id"])
    assert "prediction PSI of prediction is" in detail["error"] and "above max_prediction_psi 0.2" in detail["error"]
    assert hammer.failures == []


def test_a_mirrored_canary_step_fails_a_disagreeing_candidate(svc: Service, tmp_path: Path) -> None:
    _serve_first(svc, "cm-x", tmp_path)
    before = svc.endpoint("cm-x")["traffic"]
    started = time.monotonic()
    detail, hammer = _release_under_load(svc, "cm-x", tmp_path, DISAGREES)
    assert detail["phase"] == "failed", svc.job_log(detail["id"])
    assert "canary step 1 (50%) failed: agreement" in detail["error"], detail["error"]
    assert time.monotonic() - started < 30  # decided within the step, not at its end
    assert hammer.failures == []  # the candidate served its share: it answers, just differently
    assert svc.endpoint("cm-x")["traffic"] == before
