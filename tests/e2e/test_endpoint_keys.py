"""Keyed endpoints on a real service and router: `auth: key` is the default; the keys are
shown once (made on the first ask, and when one is regenerated), only their hashes are kept,
and rotating one under load fails no client that holds the other."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Hammer, Service, iris_model, running_service

OPEN = """\
name: open
match: {models: ["open-*"]}
environments:
  - name: production
    auth: none
"""


def _cli(svc: Service, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=svc.env, catch_exceptions=False)
    return result.exit_code, result.output


def _score(url: str, key: str | None, sample: dict[str, object]) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return requests.post(url, headers=headers, json=sample, timeout=10)


def test_keys_guard_the_endpoint_and_rotate_without_a_failed_request(tmp_path: Path) -> None:
    with running_service(tmp_path, OPEN) as svc:
        meta = iris_model(tmp_path / "v1")
        svc.register("keyed", tmp_path / "v1", meta)
        assert svc.wait_release_for("keyed", 1)["phase"] == "succeeded"
        url = svc.endpoint("keyed")["scoring_uri"]

        r = _score(url, None, meta["sample"])
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "modelcd endpoints keys keyed --env production" in r.json()["message"]

        code, out = _cli(svc, "endpoints", "keys", "keyed", "--env", "production", "--json")
        assert code == 0, out
        keys = json.loads(out)
        primary, secondary = keys["primary"], keys["secondary"]
        assert primary and secondary and primary != secondary
        assert _score(url, primary, meta["sample"]).status_code == 200
        assert _score(url, secondary, meta["sample"]).status_code == 200
        assert _score(url, primary + "x", meta["sample"]).status_code == 401
        assert _score(url, "\xa0", meta["sample"]).status_code == 401

        code, out = _cli(svc, "endpoints", "keys", "keyed", "--env", "production", "--json")
        again = json.loads(out)  # shown once: now hidden, only their hashes are kept
        assert again["primary"] is None and again["secondary"] is None and "regenerate" in again["note"]
        db = (svc.home / "modelcd.db").read_bytes()
        assert primary.encode() not in db and secondary.encode() not in db

        with Hammer(url, meta["sample"], headers={"Authorization": f"Bearer {secondary}"}, threads=2,
                    max_s=30) as hammer:
            time.sleep(0.5)
            code, out = _cli(svc, "endpoints", "keys", "keyed", "--env", "production", "--regenerate", "primary",
                             "--json")
            rotated = time.monotonic()
            assert code == 0, out
            new_primary = json.loads(out)["primary"]
            old_status = _score(url, primary, meta["sample"]).status_code
            refused_after = time.monotonic() - rotated
            time.sleep(0.5)
        assert hammer.failures == [] and hammer.ok > 20, (hammer.failures[:3], hammer.ok)
        assert old_status == 401 and refused_after < 1.0
        assert new_primary != primary and _score(url, new_primary, meta["sample"]).status_code == 200
        assert _score(url, secondary, meta["sample"]).status_code == 200

        code, out = _cli(svc, "endpoints", "keys", "keyed", "--env", "staging")
        assert code != 0 and "no endpoint for keyed in staging" in out

        svc.register("open-iris", tmp_path / "o1", iris_model(tmp_path / "o1"))
        assert svc.wait_release_for("open-iris", 1)["phase"] == "succeeded"
        assert _score(svc.endpoint("open-iris")["scoring_uri"], None, meta["sample"]).status_code == 200


def test_keys_need_the_api_token(shared_service: Service) -> None:
    r = shared_service.api("POST", "/endpoints/none-such/production/keys", json={}, headers={})
    assert r.status_code == 401
