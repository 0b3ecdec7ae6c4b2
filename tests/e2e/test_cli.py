"""The CLI against a real service: register --wait, listings with --json, promote,
rollback, errors; settings and token handling at start."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Service, free_port, iris_model


def _run(svc: Service, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=svc.env, catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_register_wait_list_show_promote_rollback(shared_service: Service, tmp_path: Path) -> None:
    svc = shared_service
    meta = iris_model(tmp_path / "m")
    (tmp_path / "sample.json").write_text(json.dumps(meta["sample"]))
    (tmp_path / "expected.json").write_text(json.dumps(meta["expected"]))
    code, out = _run(svc, "register", "cli-iris", str(tmp_path / "m"), "--sample", str(tmp_path / "sample.json"),
                     "--expected", str(tmp_path / "expected.json"), "--tag", "team=ml", "--description", "d",
                     "--wait")
    assert code == 0, out
    assert "registered cli-iris v1" in out and "succeeded" in out and "/cli-iris/production/score" in out

    code, out = _run(svc, "endpoints", "show", "cli-iris", "--env", "production", "--json")
    ep = json.loads(out)
    assert ep["traffic"] == {"1": 100} and ep["uri"].endswith("/cli-iris/production")

    code, out = _run(svc, "versions", "cli-iris", "--json")
    v = json.loads(out)["versions"][0]
    assert v["tags"] == {"team": "ml"} and v["sample"] == meta["sample"]
    for args in (["models"], ["versions", "cli-iris"], ["releases", "list"], ["jobs", "list"],
                 ["endpoints", "list"], ["deployments"]):
        code, out = _run(svc, *args)
        assert code == 0 and "cli-iris" in out, (args, out)
        code, out = _run(svc, *args, "--json")
        assert code == 0 and isinstance(json.loads(out), dict)

    rel = json.loads(_run(svc, "releases", "list", "--model", "cli-iris", "--json")[1])["releases"][0]
    code, out = _run(svc, "releases", "show", rel["id"])
    assert code == 0 and "promote" in out and "release.succeeded" in out
    job = json.loads(_run(svc, "releases", "show", rel["id"], "--json")[1])["jobs"][0]
    code, out = _run(svc, "jobs", "logs", job["id"])
    assert code == 0 and "building cli-iris v1" in out
    code, out = _run(svc, "jobs", "show", job["id"])
    assert code == 0 and "job.succeeded" in out

    # v2 by hand: register without a release wait, then promote it; then roll back
    code, out = _run(svc, "register", "cli-iris", str(tmp_path / "m"), "--sample", str(tmp_path / "sample.json"),
                     "--wait")
    assert code == 0, out
    code, out = _run(svc, "rollback", "cli-iris", "--env", "production")
    assert code == 0 and '"1": 100' in out, out
    code, out = _run(svc, "promote", "cli-iris", "2", "--env", "production")
    assert code == 0 and '"2": 100' in out, out


def test_cli_errors_are_one_clear_line(shared_service: Service, tmp_path: Path) -> None:
    svc = shared_service
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("no model here")
    code, out = _run(svc, "register", "bad name", str(tmp_path / "m"))
    assert code != 0 and "name" in out and "Traceback" not in out
    code, out = _run(svc, "register", "ok", str(tmp_path / "m"), "--tag", "novalue")
    assert code != 0 and "KEY=VALUE" in out
    code, out = _run(svc, "register", "ok", str(tmp_path / "m"))
    assert code != 0 and "no model found" in out and "[flavor]" in out, out
    code, out = _run(svc, "endpoints", "show", "nope", "--env", "production")
    assert code != 0 and "no endpoint" in out
    env = {**svc.env, "MODELCD_TOKEN": "wrong-token-value"}
    result = CliRunner().invoke(main, ["promote", "x", "1"], env=env)
    assert result.exit_code != 0 and "token" in result.output.lower()
    env = {**svc.env, "MODELCD_URL": f"http://127.0.0.1:{free_port()}"}
    result = CliRunner().invoke(main, ["models"], env=env)
    assert result.exit_code != 0 and "modelcd serve" in result.output


def test_invalid_settings_fail_at_start_naming_the_setting(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    for env, words in (({"MODELCD_PORT": "eighty"}, "MODELCD_PORT"),
                       ({"MODELCD_ARTIFACT_STORE": "ftp"}, "MODELCD_ARTIFACT_STORE"),
                       ({"MODELCD_URL": "localhost:8600"}, "MODELCD_URL")):
        r = subprocess.run([sys.executable, "-m", "modelcd", "serve"], env={**base, **env,
                           "MODELCD_HOME": str(tmp_path / "h")}, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and words in r.stderr, (env, r.stderr)
        assert "Traceback" not in r.stderr
    (tmp_path / "c.yaml").write_text("port: 1\nbogus: 2\n")
    env = {**base, "MODELCD_CONFIG": str(tmp_path / "c.yaml"), "MODELCD_HOME": str(tmp_path / "h")}
    r = subprocess.run([sys.executable, "-m", "modelcd", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "bogus" in r.stderr and "known settings" in r.stderr


def test_token_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    from modelcd.auth import ensure_token, find_token
    from modelcd.config import load_settings

    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "h")})
    token, created = ensure_token(settings)
    assert created and len(token) >= 32
    assert stat.S_IMODE((tmp_path / "h" / "token").stat().st_mode) == 0o600
    assert ensure_token(settings) == (token, False) and find_token(settings) == token
    override = load_settings(environ={"MODELCD_HOME": str(tmp_path / "h"), "MODELCD_TOKEN": "from-env-123456"})
    assert ensure_token(override) == ("from-env-123456", False)
