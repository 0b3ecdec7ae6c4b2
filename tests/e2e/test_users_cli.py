"""Users and tokens through the `modelcd` command against a real `modelcd serve` with closed
reads: an admin adds users and makes their tokens (printed once), each user runs the CLI with
``MODELCD_TOKEN=<their token>``, a viewer's write is refused 403 (before its body is read),
a revoked token is refused at once, and no token reaches the service's log or store."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import TOKEN, Service, running_service

pytestmark = pytest.mark.slow

POLICY = "name: web\nmatch: {models: ['web-*']}\n"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("users"), MODELCD_OPEN_READS="false") as service:
        yield service


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def modelcd(svc: Service, *args: str, token: str = TOKEN) -> Ran:
    """The command, as a user with ``token`` runs it (in this process: a fresh interpreter per
    call costs seconds on a busy machine)."""
    result = CliRunner().invoke(main, list(args), env={**svc.env, "MODELCD_TOKEN": token})
    return Ran(result.exit_code, result.stdout, result.stderr)


def test_users_and_tokens_through_the_cli(svc: Service, tmp_path: Path) -> None:
    done = modelcd(svc, "users", "add", "alice", "--role", "viewer")
    assert done.returncode == 0 and "added user alice (viewer)" in done.stdout, done.stderr
    done = modelcd(svc, "users", "add", "dan", "--role", "deployer", "--json")
    assert json.loads(done.stdout)["role"] == "deployer" and "token" not in done.stdout
    done = modelcd(svc, "users", "add", "bob", "--role", "superuser")
    assert done.returncode != 0 and "viewer, deployer, approver, admin" in done.stderr
    done = modelcd(svc, "users", "list")
    assert done.returncode == 0 and [line.split()[:2] for line in done.stdout.splitlines()[1:]] == [
        ["alice", "viewer"], ["dan", "deployer"]]

    # a token: printed once on stdout, the warning on stderr; the list shows only its prefix
    made = subprocess.run(["modelcd", "tokens", "create", "--user", "alice", "--name", "laptop"], env=svc.env,
                          capture_output=True, text=True, timeout=60)  # the real command, once
    assert made.returncode == 0, made.stderr
    alice = made.stdout.strip()
    assert alice.startswith("mcd_") and "Store it now" in made.stderr and alice not in made.stderr
    dan = json.loads(modelcd(svc, "tokens", "create", "--user", "dan", "--json").stdout)["token"]

    # reads are closed (as the service said when it started): no token 401, a viewer's token reads
    assert "API reads and writes need a token (MODELCD_OPEN_READS=false)" in svc.logs[-1].read_text()
    assert requests.get(f"{svc.url}/api/v1/models", timeout=10).status_code == 401
    assert modelcd(svc, "models", token=alice).returncode == 0
    assert modelcd(svc, "models", token="mcd_made-up").returncode != 0

    # a viewer's writes: 403 naming the roles; a deployer passes the role check, an admin's write it cannot do
    (tmp_path / "policy.yaml").write_text(POLICY)
    done = modelcd(svc, "policies", "apply", str(tmp_path / "policy.yaml"), token=alice)
    assert done.returncode != 0
    assert "this needs the admin role; your token is for viewer `alice`" in done.stderr, done.stderr
    done = modelcd(svc, "releases", "stop", "r-000000000000", token=alice)
    assert "this needs the deployer or admin role; your token is for viewer `alice`" in done.stderr
    done = modelcd(svc, "releases", "stop", "r-000000000000", token=dan)
    assert done.returncode != 0 and "not found" in done.stderr  # past the role check
    assert "admin role" in modelcd(svc, "policies", "apply", str(tmp_path / "policy.yaml"), token=dan).stderr
    assert modelcd(svc, "policies", "apply", str(tmp_path / "policy.yaml")).returncode == 0  # the first admin

    # tokens: a user lists and makes their own; an admin sees everyone's
    own = json.loads(modelcd(svc, "tokens", "list", "--json", token=alice).stdout)["tokens"]
    assert [(t["user"], t["name"], t["prefix"]) for t in own] == [("alice", "laptop", alice[:8])]
    assert own[0]["last_used_at"] is not None
    assert modelcd(svc, "tokens", "list", "--user", "dan", token=alice).returncode != 0
    table = modelcd(svc, "tokens", "list").stdout
    assert table.split()[:7] == ["ID", "USER", "NAME", "PREFIX", "CREATED_AT", "LAST_USED_AT", "REVOKED_AT"]
    assert "alice" in table and "dan" in table and alice not in table and dan not in table

    # disabled: refused from the next command, accepted again once enabled
    done = modelcd(svc, "users", "disable", "dan")
    assert done.returncode == 0 and "user dan disabled" in done.stdout, done.stderr
    assert modelcd(svc, "models", token=dan).returncode != 0
    listed = modelcd(svc, "users", "list").stdout
    assert ["dan", "deployer", "True"] in [line.split()[:3] for line in listed.splitlines()], listed
    assert modelcd(svc, "users", "enable", "dan").returncode == 0
    assert modelcd(svc, "models", token=dan).returncode == 0

    # revoked: refused on the very next command
    assert modelcd(svc, "tokens", "revoke", own[0]["id"]).returncode == 0
    done = modelcd(svc, "models", token=alice)
    assert done.returncode != 0 and "missing or wrong API token" in done.stderr
    done = modelcd(svc, "users", "remove", "dan")
    assert done.returncode == 0 and "1 token(s) revoked" in done.stdout
    assert modelcd(svc, "models", token=dan).returncode != 0

    # who did it: the policy change names the first admin
    events = _events(svc)
    assert ("policy.applied", "admin") in events and ("user.added", "admin") in events

    # no token in the service's log or in its store
    log = "\n".join(p.read_text(errors="replace") for p in svc.logs)
    stored = b"".join(p.read_bytes() for p in svc.home.rglob("modelcd.db*"))
    for token in (alice, dan):
        assert token not in log and token.encode() not in stored


def _events(svc: Service) -> list[tuple[str, str | None]]:
    """(kind, actor) of every event in the service's store."""
    from modelcd.jobs.service import Jobs
    from modelcd.store.db import Database

    db = Database(svc.settings.db_url)
    try:
        return [(e["kind"], e["actor"]) for e in Jobs(db).events()]
    finally:
        db.dispose()


def test_a_viewer_s_upload_is_refused_before_its_body_is_sent(svc: Service) -> None:
    """A viewer announcing a 10 GB artifact gets 403 at once: the body is never read."""
    viewer = json.loads(modelcd(svc, "users", "add", "vic", "--role", "viewer", "--json").stdout)["name"]
    token = json.loads(modelcd(svc, "tokens", "create", "--user", viewer, "--json").stdout)["token"]
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/models/web-a/versions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + token.encode() + b"\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 10000000000\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:300]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["message"] == "this needs the deployer or admin role; your token is for viewer `vic`"
