"""A local stand-in for GitHub's workflow_dispatch and runs endpoints, backed by `act`: each
dispatch is checked against GitHub's documented contract and runs the dispatched workflow with
`act` (self-hosted platform, no image pulls) on a fresh clone of the model's repository."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

GH_TOKEN = "ghp_standin_0123456789abcdef"
REPO = "acme/models"


class GitHubStandIn:
    """GitHub's workflow_dispatch and runs endpoints, backed by `act` on a local clone."""

    def __init__(self, repo_url: str, workdir: Path, act_args: list[str] | None = None) -> None:
        self.repo_url, self.workdir = repo_url, workdir
        self.act_args = list(act_args or [])  # e.g. --env NAME=VALUE, -s SECRET=VALUE
        self.problems: list[str] = []
        self.dispatches: list[dict[str, Any]] = []
        self.runs: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, doc: Any = None) -> None:
                body = b"" if doc is None else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _check_headers(self) -> bool:
                expected = {"Authorization": f"Bearer {GH_TOKEN}", "Accept": "application/vnd.github+json",
                            "X-GitHub-Api-Version": "2022-11-28"}
                for key, value in expected.items():
                    if self.headers.get(key) != value:
                        stand_in.problems.append(f"{self.command} {self.path}: header {key}={self.headers.get(key)!r}")
                if not self.headers.get("User-Agent"):
                    stand_in.problems.append(f"{self.command} {self.path}: no User-Agent")
                if self.headers.get("Authorization") != f"Bearer {GH_TOKEN}":
                    self._reply(401, {"message": "Bad credentials"})
                    return False
                return True

            def do_POST(self) -> None:
                if not self._check_headers():
                    return
                match = re.fullmatch(rf"/repos/{REPO}/actions/workflows/([A-Za-z0-9._-]+)/dispatches", self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if match is None:
                    stand_in.problems.append(f"unexpected POST {self.path}")
                    self._reply(404, {"message": "Not Found"})
                    return
                inputs = body.get("inputs", {})
                if body.get("ref") != "main" or body.get("return_run_details") is not True or \
                        not all(isinstance(v, str) for v in inputs.values()) or len(inputs) > 25:
                    stand_in.problems.append(f"dispatch body breaks the contract: {body}")
                    self._reply(422, {"message": "Invalid request"})
                    return
                run_id = stand_in.start(match.group(1), inputs)
                self._reply(200, {"workflow_run_id": run_id,
                                  "run_url": f"https://api.github.com/repos/{REPO}/actions/runs/{run_id}",
                                  "html_url": f"https://github.com/{REPO}/actions/runs/{run_id}"})

            def do_GET(self) -> None:
                if not self._check_headers():
                    return
                match = re.fullmatch(rf"/repos/{REPO}/actions/runs/(\d+)", self.path)
                run = stand_in.runs.get(int(match.group(1))) if match else None
                if run is None:
                    stand_in.problems.append(f"unexpected GET {self.path}")
                    self._reply(404, {"message": "Not Found"})
                    return
                self._reply(200, {"id": run["id"], "status": run["status"], "conclusion": run["conclusion"],
                                  "html_url": f"https://github.com/{REPO}/actions/runs/{run['id']}",
                                  "display_title": run["title"], "created_at": "2026-01-01T00:00:00Z",
                                  "event": "workflow_dispatch", "head_branch": "main"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def start(self, workflow: str, inputs: dict[str, str]) -> int:
        with self._lock:
            run_id = len(self.runs) + 1
            self.dispatches.append({"workflow": workflow, "inputs": dict(inputs)})
            self.runs[run_id] = {"id": run_id, "status": "in_progress", "conclusion": None,
                                 "title": f"release v{inputs.get('version')} [{inputs.get('release_id')}]"}
        threading.Thread(target=self._act, args=(run_id, workflow, inputs), daemon=True).start()
        return run_id

    def _act(self, run_id: int, workflow: str, inputs: dict[str, str]) -> None:
        checkout = self.workdir / f"run-{run_id}"
        subprocess.run(["git", "clone", "-q", "--branch", "main", self.repo_url, str(checkout)], check=True)
        event = self.workdir / f"event-{run_id}.json"
        event.write_text(json.dumps({"inputs": inputs}))
        log = self.workdir / f"act-{run_id}.log"
        with open(log, "wb") as out:
            proc = subprocess.run(["act", "workflow_dispatch", "-e", str(event), "-W", f".github/workflows/{workflow}",
                                   "-P", "ubuntu-latest=-self-hosted", *self.act_args], cwd=checkout, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=600, check=False)
        self.runs[run_id].update(status="completed", conclusion="success" if proc.returncode == 0 else "failure")

    def finished_run(self, timeout_s: float = 60) -> int:
        """The latest run, once act has finished it (the release ends a moment before its job does)."""
        run_id = len(self.runs)
        deadline = time.monotonic() + timeout_s
        while self.runs[run_id]["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.2)
        return run_id

    def act_log(self, run_id: int) -> str:
        path = self.workdir / f"act-{run_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.server.shutdown()
